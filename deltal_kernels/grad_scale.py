"""grad *= scale in place on a GPU, with the scale read on the device (no host sync).

The fused path's gradient is written for a loss scale of 1; a scaled loss ((loss / k).backward(),
a GradScaler) hands its scale to the backward as a 0-dim device tensor. Reading it on the host
would stall the stream every step, so this kernel reads it itself: every program exits at once when
it is 1, and otherwise multiplies in float32 and rounds once to the gradient's dtype.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK = 4096
PROGRAMS_PER_SM = 8  # a persistent grid: few programs, each striding over the tensor


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for base in range(start, n, step):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def _programs(t: torch.Tensor) -> int:
    blocks = triton.cdiv(t.numel(), BLOCK)
    if t.device.type == "cuda":
        return max(1, min(blocks, torch.cuda.get_device_properties(t.device).multi_processor_count * PROGRAMS_PER_SM))
    return max(1, min(blocks, 4))  # Triton's interpreter (tests)


def scale_on_device_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    if not grad.is_contiguous():
        raise ValueError("grad: expected a contiguous tensor")
    if scale.numel() != 1 or scale.device != grad.device:
        raise ValueError(f"scale: expected one value on {grad.device}, got shape {tuple(scale.shape)} on {scale.device}")
    with torch.cuda.device(grad.device) if grad.device.type == "cuda" else contextlib.nullcontext():
        _scale_kernel[(_programs(grad),)](grad, scale.reshape(1).to(torch.float32), grad.numel(), BLOCK=BLOCK)

