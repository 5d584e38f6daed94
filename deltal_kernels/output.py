"""The result object of ``policy_loss`` and its metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. logits
    logprobs: torch.Tensor  # [N], detached, 0 where not scored
    entropy: Optional[torch.Tensor]  # [N], detached; None unless computed
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


def token_means(scored: torch.Tensor, **per_row: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mean of each per-row quantity over the scored rows (0 when no row is scored), detached.

    Quantities passed as None are left out. The per-row values must already be 0 on unscored rows.
    """
    count = scored.sum().clamp(min=1)
    return {name: (v.detach().sum() / count).to(v.dtype) for name, v in per_row.items() if v is not None}
