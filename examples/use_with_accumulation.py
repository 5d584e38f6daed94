"""README, "Use it in your trainer", gradient accumulation: run by tests/test_accumulation.py::test_readme_snippet."""
import deltal_kernels as dk
from deltal_kernels.integrations import accumulation_weights


def accumulate(model, micro_batches, max_len, group=None):
    """One optimizer step's gradient: Delta-L weights computed once for all micro-batches (and ranks)."""
    lengths = [dk.packing.scored_lengths(mb["cu_seqlens"], mb["loss_mask"]) for mb in micro_batches]
    weights = accumulation_weights(lengths, "delta-l", alpha=1.0, max_len=max_len,
                                   group=group)  # e.g. torch.distributed.group.WORLD under DDP
    for mb, w in zip(micro_batches, weights):
        out = dk.policy_loss(model(mb["inputs"]), mb["targets"], mb["old_logprobs"], mb["advantages"],
                             mb["cu_seqlens"], loss_mask=mb["loss_mask"], weights=w)
        out.loss.backward()  # as it is: no division by the number of micro-batches
