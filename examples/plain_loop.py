"""The minimal replacement of a hand-written GRPO loss by ``dk.policy_loss``, in a plain PyTorch loop.

    python examples/plain_loop.py          # CPU, a few seconds

Before: the usual hand-written loss on padded [B, T] tensors (``handwritten_grpo_loss`` below)
materialises a [B, T, V] log-softmax and normalises per micro-batch. After (``dk_loss``): the
scored positions are packed and one call computes log-probs, ratios, clipping and the
aggregation, Delta-L here; ``agg="grpo"`` gives back exactly the hand-written loss (the test checks).

Toy task with a verifiable reward: the prompt is one token d in 1..9, the policy (a bigram model)
writes a completion ended by EOS (token 0) or cut at MAX_LEN; reward 1 when it starts with d.
"""
from __future__ import annotations

import torch
from torch import nn

import deltal_kernels as dk

V, EOS, MAX_LEN = 10, 0, 8
PROMPTS, GROUP = 8, 4  # 8 prompts x 4 samples per step
CLIP = 0.2


def handwritten_grpo_loss(logits, targets, old_logp, advantages, mask):
    """Before: GRPO's loss as it is usually written. logits [B, T, V]; the rest [B, T] / [B]."""
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    A = advantages[:, None]
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - CLIP, 1 + CLIP))
    return ((pg * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def dk_loss(logits, targets, old_logp, advantages, mask, agg="delta-l", alpha=1.0):
    """After: the same inputs, one fused call. Returns dk's PolicyLossOutput (loss, logprobs, metrics)."""
    mask = mask.bool()
    rows, cu_seqlens = dk.packing.pack(logits, mask)  # [N, V]: scored positions only, no padding
    per_row = advantages[:, None].expand_as(mask)  # advantages per row: never ambiguous with [S]
    return dk.policy_loss(rows, targets[mask], old_logp[mask], per_row[mask], cu_seqlens,
                          agg=agg, alpha=alpha, max_len=MAX_LEN, clip_low=CLIP, clip_high=CLIP)


class BigramPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(V, V)  # logits of the next token given the current one

    def forward(self, tokens):  # [B, T] -> [B, T, V]
        return self.table(tokens)


@torch.no_grad()
def rollout(policy, gen):
    """Sample GROUP completions per prompt; returns the padded batch the loss needs."""
    prompts = torch.randint(1, V, (PROMPTS,), generator=gen).repeat_interleave(GROUP)
    B = prompts.numel()
    seq = torch.full((B, MAX_LEN + 1), EOS)
    seq[:, 0] = prompts
    mask = torch.zeros(B, MAX_LEN)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(MAX_LEN):
        probs = torch.softmax(policy(seq[:, t]), -1)
        token = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        seq[:, t + 1] = torch.where(done, EOS, token)
        mask[:, t] = (~done).float()  # scored: every completion token up to and including EOS
        done |= token == EOS
    inputs, targets = seq[:, :-1], seq[:, 1:]
    logits = policy(inputs)
    old_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    reward = (targets[:, 0] == prompts).float()
    grouped = reward.view(PROMPTS, GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    return inputs, targets, old_logp, advantages, mask, reward


def main(steps: int = 30, epochs: int = 2, seed: int = 0, agg: str = "delta-l", verbose: bool = True):
    """Train the toy policy; returns the mean reward of each step's rollouts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = BigramPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=0.3)
    history = []
    for step in range(steps):
        inputs, targets, old_logp, advantages, mask, reward = rollout(policy, gen)
        for _ in range(epochs):  # PPO epochs on the same rollouts: the ratio and clip matter
            out = dk_loss(policy(inputs), targets, old_logp, advantages, mask, agg=agg)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        history.append(reward.mean().item())
        if verbose and step % 5 == 0:
            print(f"step {step:3d}  reward {history[-1]:.3f}  loss {out.loss.item():+.4f}  "
                  f"clipfrac {out.metrics['clipfrac'].item():.3f}  mean length {mask.sum(1).mean().item():.2f}")
    return history


if __name__ == "__main__":
    main()
