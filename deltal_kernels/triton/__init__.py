"""backend="triton": the row contract of ``deltal_kernels.dispatch`` as Triton kernels.

``forward_rows`` runs one online-softmax pass over V per scored row and the per-row loss epilogue
in the same kernel; ``grad_rows`` recomputes the softmax from the saved lse and writes dL/dlogits
in the logits' dtype (possibly into the logits themselves). Both kernels are in
``logprob_loss.py``.

Runs CUDA tensors (Triton's GPU compiler), and CPU tensors only under Triton's interpreter, i.e.
when ``TRITON_INTERPRET=1`` was set before this module was imported (that is how the tests run on
a machine without a GPU; it is slow and meant for tests only).

Importing this module raises ImportError when triton is not installed; dispatch reports that as
the reason the backend is unavailable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import triton  # noqa: F401  (ImportError here -> dispatch says "not available")

from . import logprob_loss as _k

# Kernels are defined interpreted or compiled once, when triton.jit decorates them (at import).
INTERPRETED = type(_k._forward_kernel).__name__ == "InterpretedFunction"

# The grid is min(N, MAX_PROGRAMS) programs looping over rows with stride = grid size, so N is
# never limited by a grid dimension (CUDA's x-dimension allows 2^31 - 1 blocks; we stay far
# below). With N <= MAX_PROGRAMS (any realistic batch) it is one row per program.
MAX_PROGRAMS = 1 << 20

# Bytes of logits one loop iteration of a program reads: 16 KiB = 4096 fp32 or 8192 bf16/fp16.
CHUNK_BYTES = 16384
# Elements each thread handles per iteration: 16 -> 64 B (fp32) / 32 B (16-bit) per thread,
# i.e. 128-bit vector loads, several in flight.
ELEMENTS_PER_THREAD = 16
MAX_WARPS = 16


def block_config(V: int, itemsize: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) for rows of V logits of ``itemsize`` bytes.

    BLOCK is a power of two: the whole row when it fits in one 16 KiB chunk (V <= 4096 fp32,
    <= 8192 bf16/fp16), else the 16 KiB chunk, looped over V with a masked tail. num_warps gives
    each thread ELEMENTS_PER_THREAD elements (at least one warp, at most 16). A fixed heuristic,
    not autotuning: the block size fixes the order of the float32 reductions, and a timing-based
    choice could change it between processes, breaking bitwise determinism.
    """
    if V < 1:
        raise ValueError(f"V: expected >= 1, got {V}")
    max_block = CHUNK_BYTES // itemsize
    block = min(triton.next_power_of_2(V), max_block)
    block = max(block, 16)
    num_warps = max(1, min(MAX_WARPS, block // (32 * ELEMENTS_PER_THREAD)))
    return block, num_warps


def _grid(N: int):
    return (min(N, MAX_PROGRAMS),)


def fused_programs(N: int, V: int, itemsize: int, device) -> int:
    """Grid size of the fused forward + gradient launch.

    Its second pass over a row only saves a DRAM read if the row is still in L2, so on a GPU the
    rows in flight are bounded: a persistent grid of max(#SMs, L2/2 / row bytes) programs
    (Qwen's V=151936 in bf16 on an H100: 132 programs, ~39 MB in flight of a 50 MB L2; V=32k:
    ~390). An untuned starting point: measure before relying on it.
    """
    device = torch.device(device)
    if device.type != "cuda" or INTERPRETED:
        return min(N, MAX_PROGRAMS)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or (40 << 20)
    programs = max(props.multi_processor_count, (l2 // 2) // max(1, V * itemsize))
    return max(1, min(N, programs, MAX_PROGRAMS))


def unavailable_reason(device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRETED:
            return None  # the interpreter copies CUDA tensors to the host: slow but correct
        if not torch.cuda.is_available():
            return "backend 'triton': torch sees no CUDA device"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return ("backend 'triton' runs CUDA tensors; CPU tensors only under Triton's interpreter "
                "(set TRITON_INTERPRET=1 before importing deltal_kernels, for tests: it is slow)")
    return f"backend 'triton' runs CUDA tensors (and CPU ones under TRITON_INTERPRET=1), not {device.type}"


def _check_logits(logits: torch.Tensor):
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits: backend 'triton' takes float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError("logits: backend 'triton' needs [N, V] with unit stride along V")


def _forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy,
             row_weights=None, grad_scale=1.0, grad_out=None):
    _check_logits(logits)
    N, V = logits.shape
    dev = logits.device
    f32 = torch.float32
    outs = [torch.empty(N, dtype=f32, device=dev) for _ in range(6)]
    flags = torch.empty(N, dtype=torch.uint8, device=dev)
    if N == 0:
        return (*outs, flags)
    logp, entropy, lse, loss, dlogp, kl = outs
    old = old_logprobs.to(f32).contiguous()
    adv = advantages.to(f32).contiguous()
    ref = old if ref_logprobs is None else ref_logprobs.to(f32).contiguous()
    kl_type = params.kl_type if ref_logprobs is not None else 0
    entropy_in_loss = params.entropy_coef != 0.0
    write_grad = grad_out is not None
    if write_grad:
        _check_out(logits, grad_out)
        weights = row_weights.to(f32).contiguous()
    else:  # unused pointers of the WRITE_GRAD=False specialisation
        weights, grad_out = old, logits
    block, num_warps = block_config(V, logits.element_size())
    grid = (fused_programs(N, V, logits.element_size(), dev),) if write_grad else _grid(N)
    _k._forward_kernel[grid](
        logits, logits.stride(0), targets.to(torch.int64).contiguous(),
        scored.contiguous().view(torch.uint8), old, ref, adv,
        logp, entropy, lse, loss, dlogp, kl, flags,
        N, V, 1.0 / params.temperature, 1.0 - params.clip_low, 1.0 + params.clip_high,
        params.dual_clip, params.kl_coef, params.entropy_coef,
        weights, grad_out, grad_out.stride(0), float(grad_scale),
        KL_TYPE=kl_type, HAS_DUAL=bool(params.dual_clip), NEED_ENTROPY=bool(need_entropy or entropy_in_loss),
        ENTROPY_IN_LOSS=entropy_in_loss, BLOCK=block, WRITE_GRAD=write_grad, BF16_BY_HAND=INTERPRETED,
        num_warps=num_warps,
    )
    return logp, entropy, lse, loss, dlogp, kl, flags


def forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy):
    """The forward row contract (see ``dispatch.rows_forward``).

    Rows may have any row stride (only the stride along V must be 1); the contract passes
    contiguous logits.
    """
    return _forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy)


def forward_grad_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy,
                      row_weights, grad_scale, out):
    """``forward_rows`` plus, in the same launch, the gradient of
    ``grad_scale * sum_t row_weights[t] * loss[t]`` w.r.t. the logits, written into ``out``.

    The proposed fused extension of the row contract: each scored row is reduced once, then
    re-read (mostly from L2) and its gradient written, which saves the backward launch's full read
    of the logits. ``out`` may be ``logits`` itself (their values are then gone after the call).
    The result equals ``grad_rows`` called with g = (grad_scale * w) * dlogp and
    h = (grad_scale * w) * -entropy_coef, bit for bit.
    """
    return _forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy,
                    row_weights, grad_scale, out)


def _check_out(logits, out):
    if out.shape != logits.shape or out.dtype != logits.dtype or (out.shape[1] > 1 and out.stride(1) != 1):
        raise ValueError("out: expected the logits' shape and dtype with unit stride along V")


def grad_rows(logits, targets, lse, entropy, g, h, temperature, out):
    """The gradient row contract (see ``dispatch.rows_grad``): writes dL/dlogits into ``out``.

    ``out`` may be ``logits`` itself (in-place backward).
    """
    _check_logits(logits)
    _check_out(logits, out)
    N, V = logits.shape
    if N == 0:
        return out
    f32 = torch.float32
    block, num_warps = block_config(V, logits.element_size())
    _k._grad_kernel[_grid(N)](
        logits, logits.stride(0), out, out.stride(0), targets.to(torch.int64).contiguous(),
        lse.to(f32).contiguous(), entropy.to(f32).contiguous(), g.to(f32).contiguous(), h.to(f32).contiguous(),
        N, V, 1.0 / temperature, BLOCK=block, BF16_BY_HAND=INTERPRETED, num_warps=num_warps,
    )
    return out
