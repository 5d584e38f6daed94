"""What the benchmark measures deltal-kernels against, and the package's own backends, as one kind of thing.

Every implementation is a function ``loss(logits, batch) -> scalar`` differentiable w.r.t. the
logits, computing the SPEC section 1 loss with the batch's options. The tests
(tests/test_baselines.py) check these very functions against ``dk.reference`` in float64, so the
thing timed is the thing tested.

Baselines:

- ``eager``: ``dk.reference.policy_loss``, float32 log_softmax + gather over the scored rows, as most
  trainers compute it;
- ``compile``: ``torch.compile`` of that same function;
- ``chunked``: the selective log-softmax of TRL and Unsloth (per chunk of rows: gather minus
  logsumexp, in float32, over every row, masked afterwards) followed by the same per-row loss;
- ``liger``: Liger-Kernel's Triton GRPO loss (CUDA only, when ``liger-kernel`` is installed).

On sm_90 and newer, ``cuda block-per-row`` is the cuda backend without thread-block clusters: the
ratio of the two at large V is the cluster schedule's gain, measured side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import deltal_kernels as dk
from deltal_kernels import extension
from deltal_kernels.dispatch import has_fused_gradient
from deltal_kernels.torch_backend import row_terms
from deltal_kernels.validation import compute_dtype, prepare

from .cases import Batch

LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

# TRL loops over the rows of one padded sequence at a time; 1024 rows is a typical response length
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "backend" (of this package) or "baseline"
    make: Callable[[], LossFn]  # called once per case, so compiled baselines start afresh
    inplace: bool = False  # the gradient overwrites the logits (each timed call gets a fresh copy)
    compiles: bool = False  # its first call compiles: on the CPU it gets one warm-up call before measuring
    fused: bool = False  # its forward writes the gradient (one pass over the logits), else two passes


def backend_loss(backend: str, inplace: bool = False) -> LossFn:
    def loss(logits, batch):
        return dk.policy_loss(logits, **batch.kwargs(), backend=backend, inplace_backward=inplace).loss
    return loss


def block_per_row_loss(logits, batch):
    """The cuda backend with one block per row at every V (``DELTAL_KERNELS_CUDA_CLUSTER=1``): the
    schedule that the cluster schedule replaces for large V on sm_90, timed beside it."""
    with extension.cluster_setting("1"):
        return backend_loss("cuda")(logits, batch)  # (the fused forward launches the gradient too)


def eager_loss(logits, batch):
    return dk.reference.policy_loss(logits, **batch.kwargs()).loss


def compiled_loss() -> LossFn:
    # compiled afresh for each case with static shapes: the fastest setting (dynamic shapes, which
    # a trainer whose token count changes every step would end up with, ran slower here), and
    # Dynamo's recompile limit is never reached however many cases run
    torch._dynamo.reset()
    return torch.compile(eager_loss)


def chunked_logprobs(logits, targets, temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS):
    """log_softmax(logits / temperature)[targets] a chunk of rows at a time, as TRL and Unsloth do.

    Each chunk is upcast to float32 (float64 stays float64, so the tests can hold it to float64).
    """
    out = []
    for x, y in zip(logits.split(chunk_rows), targets.split(chunk_rows)):
        x = x.to(compute_dtype(x))
        if temperature != 1.0:
            x = x / temperature
        out.append(x.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1))
    return torch.cat(out)


def _prepared(logits, batch):
    # the same argument checks and row view as policy_loss (entropy-free, no dual clip)
    return prepare(logits, with_entropy=False, dual_clip=None, entropy_coef=0.0, weights=None, **batch.kwargs())


def loss_from_logprobs(logp, b) -> torch.Tensor:
    """The SPEC loss from per-row log-probs (entropy-free), through autograd."""
    entropy = torch.zeros_like(logp)  # unused: these baselines run with entropy_coef = 0
    loss_rows, _, _, _ = row_terms(logp, entropy, b.old_logprobs, b.ref_logprobs, b.advantages, b.params)
    return (b.row_weights * loss_rows).sum()


def chunked_loss(logits, batch, chunk_rows: int = CHUNK_ROWS):
    b = _prepared(logits, batch)
    logp = chunked_logprobs(b.logits, b.targets, b.params.temperature, chunk_rows).masked_fill(~b.scored, 0.0)
    return loss_from_logprobs(logp, b)


def liger_unavailable_reason(device) -> Optional[str]:
    if torch.device(device).type != "cuda":
        return "Liger-Kernel runs CUDA tensors only"
    if not torch.cuda.is_available():
        return "Liger-Kernel runs CUDA tensors only and torch sees no CUDA device"
    try:
        import liger_kernel.transformers.grpo_loss  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not installed ({e})"
    return None


def liger_loss(logits, batch):
    """Liger's Triton GRPO loss on the packed batch, seen as one padded sequence.

    Liger takes logits [B, L+1, V] (the last row is dropped) and one advantage per sequence: the
    packed batch is B=1, L=N-1 to it, with the batch's mean advantage. The bytes it moves are the
    same as for a per-row advantage; on a one-sequence batch whose last row is not scored its loss
    is exactly the reference's. Its per-token loss (reduce=False) is weighted like every other.
    """
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    b = _prepared(logits, batch)
    p = b.params
    rows = slice(0, logits.shape[0] - 1)
    per_token = triton_grpo_loss(
        b.logits[None], b.old_logprobs[rows][None].contiguous(), b.ref_logprobs[rows][None].contiguous(),
        b.targets[rows][None].contiguous(), batch.advantages.float().mean()[None],
        b.scored[rows][None].to(torch.int32), temperature=p.temperature, beta=p.kl_coef, eps_low=p.clip_low,
        eps_high=p.clip_high, inplace=False)[0]
    return (b.row_weights[rows] * per_token[0]).sum()


def implementations(device) -> Tuple[List[Impl], Dict[str, str]]:
    """(every implementation runnable on ``device``, {name: why not} for those that are not).

    The package's backends are whatever ``dk.available_backends`` lists; the first (the one
    backend="auto" picks) also runs with ``inplace_backward=True``, the mode with no [N, V]
    allocation at all. A backend with a fused gradient uses it unless in place (``policy_loss``).
    """
    names = dk.available_backends(device)
    impls = [Impl(name, "backend", lambda name=name: backend_loss(name), fused=has_fused_gradient(name))
             for name in names]
    if names:
        impls.insert(1, Impl(f"{names[0]} inplace", "backend", lambda: backend_loss(names[0], True), inplace=True))
    if "cuda" in names and extension.clusters_unavailable_reason(device) is None:
        impls.insert(names.index("cuda") + 2, Impl("cuda block-per-row", "backend", lambda: block_per_row_loss,
                                                   fused=True))
    impls += [Impl("eager", "baseline", lambda: eager_loss),
              Impl("compile", "baseline", compiled_loss, compiles=True),
              Impl("chunked", "baseline", lambda: chunked_loss)]
    skipped = {}
    reason = liger_unavailable_reason(device)
    if reason is None:
        impls.append(Impl("liger", "baseline", lambda: liger_loss))
    else:
        skipped["liger"] = reason
    return impls, skipped
