"""backend="triton": the row contract of ``deltal_kernels.dispatch`` as Triton kernels.

``forward_rows`` runs one online-softmax pass over V per scored row and the per-row loss epilogue
in the same kernel; ``grad_rows`` recomputes the softmax from the saved lse and writes dL/dlogits
in the logits' dtype (possibly into the logits themselves). Both kernels are in
``logprob_loss.py``. ``shard_stats`` and ``shard_grad_rows`` are their vocabulary-parallel forms
(kernels in ``shard.py``).

Runs CUDA tensors (Triton's GPU compiler), and CPU tensors only under Triton's interpreter, i.e.
when ``TRITON_INTERPRET=1`` was set before this module was imported (that is how the tests run on
a machine without a GPU; it is slow and meant for tests only).

Importing this module raises ImportError when triton is not installed; dispatch reports that as
the reason the backend is unavailable.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

import triton  # noqa: F401  (ImportError here -> dispatch says "not available")

from . import logprob_loss as _k
from . import shard as _shard

# Kernels are defined interpreted or compiled once, when triton.jit decorates them (at import).
INTERPRETED = type(_k._forward_kernel).__name__ == "InterpretedFunction"
# The GPU build uses ex2.approx.ftz (inline PTX); the interpreter runs tl.exp2.
FAST_EXP = not INTERPRETED


def _interpreter_index_compat():
    """Triton 3.6's interpreter turns a loop bound into a Python int with ``int(array)`` on a
    one-element 1-D array, which NumPy >= 2.5 rejects ("only 0-dimensional arrays can be converted to
    Python scalars"): every ``tl.range`` with a runtime bound fails. Triton 3.8 squeezes the array
    first; this applies the same fix to older interpreters, only when NumPy needs it."""
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter as ti

    original = getattr(ti, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_dk_squeezed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._dk_squeezed = True
    ti._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_index_compat()

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


# Threads an SM holds at once (sm_80 / sm_90) and its registers: the resident-program bound.
SM_THREADS = 2048
SM_REGISTERS = 65536
# Registers per thread assumed when the compiled kernel's count is not known (no launch yet).
ASSUMED_REGISTERS = 64


def fused_programs(N: int, V: int, itemsize: int, device, num_warps: int = 16, registers: int = 0) -> int:
    """Grid size of the fused forward + gradient launch (the README's schedule): ``fused_grid`` with
    the device's SM count and L2 size; all rows' programs under the interpreter."""
    device = torch.device(device)
    if device.type != "cuda" or INTERPRETED:
        return min(N, MAX_PROGRAMS)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or (40 << 20)
    return fused_grid(N, V, itemsize, props.multi_processor_count, l2, num_warps, registers)


def fused_grid(N: int, V: int, itemsize: int, sms: int, l2_bytes: int, num_warps: int, registers: int = 0) -> int:
    """Programs of the fused launch on a GPU with ``sms`` SMs and ``l2_bytes`` of L2.

    Its second pass over a row only saves a DRAM read if the row is still in L2, so the rows in
    flight (one per program) are bounded by a quarter of the L2, and the grid by what is resident at
    once (no second wave: a program of the second wave would start its rows after the first wave's
    lines were evicted), with at least one program per SM. ``registers``: per thread, of the compiled
    kernel (ASSUMED_REGISTERS when not known yet).
    """
    threads = 32 * num_warps
    per_sm = max(1, min(SM_THREADS // threads, SM_REGISTERS // (threads * max(registers or ASSUMED_REGISTERS, 1))))
    resident = sms * per_sm
    by_l2 = (l2_bytes // 4) // max(1, V * itemsize)
    return max(1, min(N, MAX_PROGRAMS, resident, max(sms, by_l2)))


def launch_options(num_warps: int) -> dict:
    """num_warps, and on the GPU an explicit register ceiling: all of an SM's registers for one
    program (ptxas then allocates what the kernel needs; left to itself, Triton 3.6's ptxas held the
    16-warp forward to 40 registers and spilled 8 bytes)."""
    options = dict(num_warps=num_warps)
    if not INTERPRETED:
        options["maxnreg"] = min(255, SM_REGISTERS // (32 * num_warps))
    return options


def vec_elements(itemsize: int) -> int:
    """Elements in a 16-byte packet (the 128-bit load): 4 fp32, 8 fp16/bf16."""
    return 16 // itemsize


def rows_aligned(*tensors) -> bool:
    """Every row of every [N, V] tensor starts on a 16-byte boundary (base pointer and row stride)."""
    return all(t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or (t.stride(0) * t.element_size()) % 16 == 0)
               for t in tensors)


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
    itemsize = logits.element_size()
    block, num_warps = block_config(V, itemsize)
    aligned = rows_aligned(logits, grad_out)
    grid = (fused_programs(N, V, itemsize, dev, num_warps, _REGISTERS.get((itemsize, block), 0)),) \
        if write_grad else _grid(N)
    with _on_device(logits):
        kernel = _k._forward_kernel[grid](
            logits, logits.stride(0), targets.to(torch.int64).contiguous(),
            scored.contiguous().view(torch.uint8), old, ref, adv,
            logp, entropy, lse, loss, dlogp, kl, flags,
            N, V, 1.0 / params.temperature, 1.0 - params.clip_low, 1.0 + params.clip_high,
            params.dual_clip, params.kl_coef, params.entropy_coef,
            weights, grad_out, grad_out.stride(0), float(grad_scale),
            KL_TYPE=kl_type, HAS_DUAL=bool(params.dual_clip), NEED_ENTROPY=bool(need_entropy or entropy_in_loss),
            ENTROPY_IN_LOSS=entropy_in_loss, BLOCK=block, WRITE_GRAD=write_grad, BF16_BY_HAND=INTERPRETED,
            VEC=vec_elements(itemsize), ROW_ALIGNED=aligned, FAST_EXP=FAST_EXP, **launch_options(num_warps),
        )
    if write_grad and not INTERPRETED:
        _REGISTERS[(itemsize, block)] = max(_REGISTERS.get((itemsize, block), 0), getattr(kernel, "n_regs", 0) or 0)
    return logp, entropy, lse, loss, dlogp, kl, flags


# Registers of the compiled fused kernel per (itemsize, BLOCK), as the last launches reported them:
# the next fused grid is sized with them (the first one assumes ASSUMED_REGISTERS).
_REGISTERS = {}


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

    Two launches of ``_grad_kernel``: the rows whose lse is not huge (the streaming loops, no exact
    pass in their code: it would cost the kernel registers and resident programs), then the rows of
    huge logits (|lse| >= 2^24 ln 2, never a trained model's) by the exact pass, which only loads the
    lse of every other row. Each row is written by exactly one of them.
    """
    _check_logits(logits)
    _check_out(logits, out)
    N, V = logits.shape
    if N == 0:
        return out
    f32 = torch.float32
    itemsize = logits.element_size()
    block, num_warps = block_config(V, itemsize)
    args = (logits, logits.stride(0), out, out.stride(0), targets.to(torch.int64).contiguous(),
            lse.to(f32).contiguous(), entropy.to(f32).contiguous(), g.to(f32).contiguous(), h.to(f32).contiguous(),
            N, V, 1.0 / temperature)
    options = dict(BLOCK=block, BF16_BY_HAND=INTERPRETED, VEC=vec_elements(itemsize),
                   ROW_ALIGNED=rows_aligned(logits, out), FAST_EXP=FAST_EXP, **launch_options(num_warps))
    with _on_device(logits):
        for rows in (_k.ORDINARY_ROWS, _k.HUGE_ROWS):
            _k._grad_kernel[_grid(N)](*args, ROWS=rows, **options)
    return out


def shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy):
    """Per-row softmax statistics (m, s, u, zt), four [N] float32 tensors in natural units, of one
    vocabulary shard: ``logits`` [N, V_r] are the columns [vocab_start, vocab_start + V_r) of each row,
    ``targets`` global ids (a target outside the shard gives zt = 0, nothing is read for it).

    m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m) (0 unless need_entropy) over the shard,
    z = x / tau as the forward computes it (its exact pass included); zt = z of the target. Merged in
    rank order (softmax_merge) they give the unsharded forward's lse, logp and entropy up to float32
    rounding. Unscored rows, and shards of -inf logits, are the empty part {-inf, 0, 0} (zt = 0 unscored).
    """
    _check_logits(logits)
    N, V = logits.shape
    dev = logits.device
    m, s, u, zt = (torch.empty(N, dtype=torch.float32, device=dev) for _ in range(4))
    if N == 0:
        return m, s, u, zt
    itemsize = logits.element_size()
    block, num_warps = block_config(V, itemsize)
    with _on_device(logits):
        _shard._shard_stats_kernel[_grid(N)](
            logits, logits.stride(0), targets.to(torch.int64).contiguous(), scored.contiguous().view(torch.uint8),
            m, s, u, zt, N, V, int(vocab_start), 1.0 / temperature, NEED_ENTROPY=bool(need_entropy), BLOCK=block,
            VEC=vec_elements(itemsize), ROW_ALIGNED=rows_aligned(logits), FAST_EXP=FAST_EXP,
            **launch_options(num_warps),
        )
    return m, s, u, zt


def shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h, temperature, out):
    """``grad_rows`` of one vocabulary shard (see ``shard_stats``): writes dL/dx_j =
    (g * (onehot(j) - p_j) - h * p_j * (log p_j + H)) / tau into ``out`` [N, V_r] with log p_j =
    (z_j - m) - log_s from the whole row's merged m, log_s and entropy H; the one-hot term where
    targets[i] == vocab_start + j. Rows with g == h == 0 get zeros without reading the logits, NaN
    where m or log_s is NaN. ``out`` may be ``logits`` itself.
    """
    _check_logits(logits)
    _check_out(logits, out)
    N, V = logits.shape
    if N == 0:
        return out
    f32 = torch.float32
    itemsize = logits.element_size()
    block, num_warps = block_config(V, itemsize)
    with _on_device(logits):
        _shard._shard_grad_kernel[_grid(N)](
            logits, logits.stride(0), out, out.stride(0), targets.to(torch.int64).contiguous(),
            m.to(f32).contiguous(), log_s.to(f32).contiguous(), entropy.to(f32).contiguous(),
            g.to(f32).contiguous(), h.to(f32).contiguous(), N, V, int(vocab_start), 1.0 / temperature,
            BLOCK=block, BF16_BY_HAND=INTERPRETED, VEC=vec_elements(itemsize), ROW_ALIGNED=rows_aligned(logits, out),
            FAST_EXP=FAST_EXP, **launch_options(num_warps),
        )
    return out


def _on_device(tensor):
    """Launch on the tensors' CUDA device, not the current one (models spread over GPUs)."""
    if tensor.device.type == "cuda" and not INTERPRETED:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
