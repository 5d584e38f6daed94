"""The public loss: ``policy_loss`` and the ``PolicyLoss`` module (SPEC section 2)."""
from __future__ import annotations

import inspect

import torch

from .dispatch import has_fused_gradient, resolve_backend, rows_forward, rows_forward_fused, rows_stats, weighted_sum
from .output import PolicyLossOutput, token_means
from .parallel import check_shard_kernels, vocab_parallel_rows, vocab_shard, whole_batch_output
from .reference import objective_terms
from .validation import check_matrix, prepare


def policy_loss(logits, targets, old_logprobs, advantages, cu_seqlens, *, loss_mask=None, ref_logprobs=None,
                weights=None, agg="delta-l", alpha=1.0, max_len=None, clip_low=0.2, clip_high=0.2,
                dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
                ratio_level="token", objective="ppo", rollout_logprobs=None, rollout_correction=None,
                rollout_clip=(None, 3.0), kl_entropy_agg=None, kl_entropy_weights=None,
                with_entropy=False, inplace_backward=False, backend="auto", vocab_start=None,
                vocab_group=None, sequence_group=None, row_index=None) -> PolicyLossOutput:
    """RLVR policy loss over packed ragged sequences, straight from the logits (SPEC sections 1-2).

    logits [N, V] (float32/float16/bfloat16; float64 on backend="torch"), targets [N], old_logprobs
    [N], advantages [N] per row or [S] per sequence (a length-N tensor is per row, also when
    N == S), cu_seqlens [S+1]. ``weights`` [S] overrides ``agg``: pass weights computed for the
    whole optimizer batch (``sequence_weights``) to each micro-batch. ``ratio_level``, ``objective``,
    ``rollout_*`` and ``kl_entropy_*`` choose GSPO's sequence ratio, CISPO, rollout correction and
    separately aggregated KL/entropy terms (README, "Objectives"). Returns a ``PolicyLossOutput``
    whose ``loss`` is differentiable w.r.t. ``logits`` only.

    vocab_group, vocab_start: the logits are this rank's vocabulary shard, the columns
    [vocab_start, vocab_start + V_r) of every row, of a tensor-parallel group (``parallel``); targets
    are global ids. Every rank returns the same loss, log-probs and metrics, and its own shard's gradient.

    sequence_group, row_index: the rows are this rank's part of the packed batch that cu_seqlens
    describes (sequence/context parallelism); row_index [N_r] int64, increasing, is each local row's
    position in it. Every rank returns the whole batch's loss and metrics; the loss's gradient on
    each rank is that of its own rows.
    """
    b, name, shard = _checked_call(logits, targets, old_logprobs, advantages, cu_seqlens, loss_mask=loss_mask,
                            ref_logprobs=ref_logprobs, weights=weights, agg=agg, alpha=alpha, max_len=max_len,
                            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                            kl_type=kl_type, entropy_coef=entropy_coef, temperature=temperature,
                            ratio_level=ratio_level, objective=objective, rollout_logprobs=rollout_logprobs,
                            rollout_correction=rollout_correction, rollout_clip=rollout_clip,
                            kl_entropy_agg=kl_entropy_agg, kl_entropy_weights=kl_entropy_weights,
                            with_entropy=with_entropy, inplace_backward=inplace_backward, backend=backend,
                            vocab_start=vocab_start, vocab_group=vocab_group, sequence_group=sequence_group,
                            row_index=row_index)
    if shard is not None:  # vocabulary-parallel rows: merged statistics, the objective in [N]-sized ops
        logp, entropy = vocab_parallel_rows(b, name, shard, inplace_backward)
        return objective_output(b, logp, entropy)
    p = b.params
    if not b.objective.is_default:
        # the kernels' statistics pass, the objective as [N]-sized torch ops (autograd gives dL/dlogp_t
        # and dL/dH_t), then the gradient kernel: the two-pass schedule
        logp, entropy, _ = rows_stats(name, b.logits.contiguous(), b.targets, b.scored, p.temperature, b.need_entropy,
                                      inplace_backward)
        return objective_output(b, logp, entropy)
    if (logits.requires_grad and torch.is_grad_enabled() and not inplace_backward and has_fused_gradient(name)
            and not torch.compiler.is_compiling()):
        # the forward launch writes the gradient too: one read of the logits fewer. (Under torch.compile
        # the two-pass schedule runs: its backward folds a loss scale into the row factors for free.)
        # The op takes the caller's logits as they are (strided ones are made contiguous inside it and
        # that copy is freed): a repeated backward recomputes from the tensor the caller holds.
        loss, logp, entropy, kl, flags, *_ = rows_forward_fused(
            name, b.logits, b.targets, b.scored, b.old_logprobs, b.ref_logprobs, b.advantages, b.row_weights,
            p.clip_low, p.clip_high, p.dual_clip, p.kl_coef, p.kl_type, p.entropy_coef, p.temperature,
            b.need_entropy)
    else:
        logp, entropy, _, loss_rows, _, kl, flags = rows_forward(
            name, b.logits.contiguous(), b.targets, b.scored, b.old_logprobs, b.ref_logprobs, b.advantages, p.clip_low,
            p.clip_high, p.dual_clip, p.kl_coef, p.kl_type, p.entropy_coef, p.temperature, b.need_entropy,
            inplace_backward)
        loss = weighted_sum(b.row_weights, loss_rows)
    return kernel_output(b, loss, logp, entropy, kl, flags)


def kernel_output(b, loss, logp, entropy, kl, flags) -> PolicyLossOutput:
    """The result from the row kernels' outputs (per-token PPO): the metrics from their [N] columns."""
    dtype = logp.dtype
    metrics = token_means(
        b.scored,
        clipfrac=(flags & 1).to(dtype),
        clipfrac_lower=((flags & 2) != 0).to(dtype),
        approx_kl=b.old_logprobs - logp,  # both 0 on unscored rows
        kl=kl if b.ref_logprobs is not None else None,
        entropy=entropy if b.need_entropy else None,
    )
    if b.sequences is not None:
        loss, metrics = whole_batch_output(loss, metrics, b.scored, b.sequences)
    return PolicyLossOutput(loss=loss, logprobs=logp.detach(), entropy=entropy.detach() if b.need_entropy else None,
                            metrics=metrics)


def objective_output(b, logp, entropy) -> PolicyLossOutput:
    """The result from the statistics op's differentiable logp_t and H_t: the objective as [N]-sized
    torch ops (``reference.objective_terms``), for the objectives beyond per-token PPO."""
    loss, metrics = objective_terms(logp, entropy if b.need_entropy else None, b)
    if b.sequences is not None:
        loss, metrics = whole_batch_output(loss, metrics, b.scored, b.sequences)
    return PolicyLossOutput(loss=loss, logprobs=logp.detach(), entropy=entropy.detach() if b.need_entropy else None,
                            metrics=metrics)


def _checked_call(logits, targets, old_logprobs, advantages, cu_seqlens, *, inplace_backward, backend,
                  vocab_start=None, vocab_group=None, **options):
    """Every argument check of ``policy_loss``; returns the prepared batch, the backend to run and the
    vocabulary shard (None for whole rows)."""
    check_matrix("logits", logits, "[N, V]")
    shard = vocab_shard(logits.shape, logits.device, targets, vocab_start, vocab_group, options.get("loss_mask"))
    b = prepare(logits, targets, old_logprobs, advantages, cu_seqlens,
                vocab_size=None if shard is None else shard.vocab_size, **options)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
    if inplace_backward and not logits.is_contiguous():
        raise ValueError("inplace_backward: needs contiguous logits (the gradient is written into their storage)")
    name = resolve_backend(backend, logits.device)
    if name != "torch" and logits.dtype == torch.float64:
        raise TypeError(f"logits: backend {name!r} takes float32, float16 or bfloat16 logits; "
                        "float64 runs on backend='torch'")
    check_shard_kernels(shard, name)
    return b, name, shard


def validate(logits, targets, old_logprobs, advantages, cu_seqlens, **options) -> None:
    """Run every check ``policy_loss`` makes on these arguments, the value checks included, and raise
    its ValueError/TypeError if one fails. ``policy_loss`` skips the value checks (cu_seqlens
    offsets, target range, finite advantages and weights, 0/1 mask) under torch.compile, where they
    would break the graph: a compiled training loop calls this once, eagerly, on a representative
    batch (or on every batch outside the compiled region). Takes policy_loss's arguments."""
    unknown = set(options) - _OPTION_NAMES - _TENSOR_OPTIONS
    if unknown:
        raise TypeError(f"validate: unknown options {sorted(unknown)}")
    defaults = {name: param.default for name, param in inspect.signature(policy_loss).parameters.items()
                if param.kind is inspect.Parameter.KEYWORD_ONLY}
    if torch.compiler.is_compiling():
        raise RuntimeError("validate: call it eagerly, outside the compiled region (its checks read values)")
    _checked_call(logits, targets, old_logprobs, advantages, cu_seqlens, **{**defaults, **options})


_TENSOR_OPTIONS = {"loss_mask", "ref_logprobs", "weights", "rollout_logprobs", "kl_entropy_weights", "row_index"}
_OPTION_NAMES = {name for name, param in inspect.signature(policy_loss).parameters.items()
                 if param.kind is inspect.Parameter.KEYWORD_ONLY} - _TENSOR_OPTIONS


class PolicyLoss(torch.nn.Module):
    """``policy_loss`` as a module: options at construction, tensors in ``forward``."""

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - _OPTION_NAMES
        if unknown:
            raise TypeError(f"PolicyLoss: unknown options {sorted(unknown)}; expected some of {sorted(_OPTION_NAMES)}")
        self.options = options

    def forward(self, logits, targets, old_logprobs, advantages, cu_seqlens, *, loss_mask=None,
                ref_logprobs=None, weights=None, rollout_logprobs=None, kl_entropy_weights=None,
                row_index=None) -> PolicyLossOutput:
        return policy_loss(logits, targets, old_logprobs, advantages, cu_seqlens, loss_mask=loss_mask,
                           ref_logprobs=ref_logprobs, weights=weights, rollout_logprobs=rollout_logprobs,
                           kl_entropy_weights=kl_entropy_weights, row_index=row_index, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
