"""The benchmark's shapes and its batches, drawn like RL rollouts.

A rollout batch packs S sequences back to back: each is a prompt (rows not scored) followed by a
response (scored rows, ``loss_mask``). Response lengths have the long tail of RL sampling: most
answers are short, a few run to the maximum length ``max_len`` and are truncated there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import deltal_kernels as dk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# the loss every implementation computes: DAPO-style clip-higher, a k3 KL term, Delta-L aggregation
LOSS_OPTIONS = dict(agg="delta-l", alpha=1.0, clip_low=0.2, clip_high=0.28, kl_coef=0.001, kl_type="k3",
                    temperature=1.0)


def max_len_for(N: int) -> int:
    """M of a benchmark batch of N rows: the rollout's maximum response length grows with the batch,
    up to the paper's 8192."""
    return max(64, min(8192, N // 4))


@dataclass(frozen=True)
class Case:
    N: int  # rows (tokens) in the packed batch
    V: int  # vocabulary size
    dtype: str  # key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def max_len(self) -> int:
        return max_len_for(self.N)

    @property
    def label(self) -> str:
        return f"N={self.N} V={self.V} {self.dtype}"


# the issue's target shapes: CPU, and SPEC section 4's GPU example
TARGET_CPU = Case(2048, 32000, "fp32")
TARGET_GPU = Case(16384, 151936, "bf16")


def grid(Ns, Vs, dtypes):
    return [Case(N, V, d) for d in dtypes for V in Vs for N in Ns]


GRIDS = {
    # about a minute on 2 cores: the target shape, plus one step down in V and in N for the plot
    "cpu": [Case(2048, 8192, "fp32"), Case(512, 32000, "fp32"), TARGET_CPU],
    "cpu-quick": [TARGET_CPU],
    "cuda": grid((4096, 16384, 65536), (32000, 128256, 151936), ("bf16", "fp32")),
    # the largest V the one-read schedule is designed for (README: performance model) last
    "cuda-quick": [TARGET_GPU, Case(16384, 32000, "fp32"), Case(2048, 262144, "bf16")],
}


@dataclass
class Batch:
    """policy_loss's inputs besides the logits, plus the facts the byte counts need."""
    targets: torch.Tensor  # [N] int64
    old_logprobs: torch.Tensor  # [N] float32
    ref_logprobs: torch.Tensor  # [N] float32
    advantages: torch.Tensor  # [S] float32, one per sequence (GRPO)
    cu_seqlens: torch.Tensor  # [S+1] int32
    loss_mask: torch.Tensor  # [N] bool: response rows
    max_len: int

    @property
    def scored_rows(self) -> int:
        return int(self.loss_mask.sum())

    def kwargs(self) -> dict:
        """Keyword arguments of ``dk.policy_loss`` after the logits."""
        return dict(targets=self.targets, old_logprobs=self.old_logprobs, advantages=self.advantages,
                    cu_seqlens=self.cu_seqlens, loss_mask=self.loss_mask, ref_logprobs=self.ref_logprobs,
                    max_len=self.max_len, **LOSS_OPTIONS)


def rollout_lengths(N: int, max_len: int, gen: torch.Generator):
    """(prompt, response) row counts of sequences that fill exactly N rows.

    Responses are log-normal (median max_len / 4, long right tail) and capped at max_len, as
    truncated rollouts are; prompts are uniform in [max_len / 32, max_len / 8). The last sequence is
    cut where the batch ends.
    """
    prompts, responses, total = [], [], 0
    while total < N:
        p = int(torch.randint(max(1, max_len // 32), max(2, max_len // 8), (), generator=gen))
        r = float(max_len / 4 * torch.exp(0.9 * torch.randn((), generator=gen)))
        r = int(min(max_len, max(1, round(r))))
        p = min(p, N - total)
        r = min(r, N - total - p)
        prompts.append(p)
        responses.append(r)
        total += p + r
    return prompts, responses


def make_batch(case: Case, device, seed: int = 0):
    """(logits [N, V] in the case's dtype, Batch) on ``device``.

    Old and reference log-probs sit near the true ones, so some ratios fall outside the clip range
    and the KL term is small, as a few steps into training.
    """
    gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed)
    prompts, responses = rollout_lengths(case.N, case.max_len, gen)
    lengths = torch.tensor([p + r for p, r in zip(prompts, responses)])
    mask = torch.cat([torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
                      for p, r in zip(prompts, responses)])
    cu_seqlens = dk.packing.cu_seqlens_from_lengths(lengths).to(torch.int32)
    S = lengths.numel()
    logits = torch.empty(case.N, case.V, dtype=case.torch_dtype, device=device)
    targets = torch.randint(0, case.V, (case.N,), generator=gen).to(device)
    true_logp = torch.empty(case.N, device=device)
    rows = max(1, (1 << 26) // case.V)  # draw and score the logits a slab at a time: no [N, V] float32
    for start in range(0, case.N, rows):
        end = min(case.N, start + rows)
        slab = torch.randn(end - start, case.V, device=device, generator=device_gen) * 2.0
        logits[start:end] = slab.to(case.torch_dtype)
        z = logits[start:end].float()
        true_logp[start:end] = z.gather(1, targets[start:end, None]).squeeze(1) - torch.logsumexp(z, -1)
    noise = lambda scale: (torch.randn(case.N, generator=gen) * scale).to(device)  # noqa: E731
    batch = Batch(targets=targets, old_logprobs=true_logp + noise(0.1), ref_logprobs=true_logp + noise(0.1),
                  advantages=torch.randn(S, generator=gen).to(device), cu_seqlens=cu_seqlens.to(device),
                  loss_mask=mask.to(device), max_len=case.max_len)
    return logits, batch
