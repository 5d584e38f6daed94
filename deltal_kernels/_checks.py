"""Small helpers for argument errors that name the argument (SPEC section 3)."""
from __future__ import annotations

import torch


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    return f"{type(x).__name__} {x!r}"


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
