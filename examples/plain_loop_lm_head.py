"""A plain PyTorch RLVR loop whose loss starts from the hidden states and the LM head: no logits.

    python examples/plain_loop_lm_head.py          # CPU, a few seconds

A trainer usually runs ``logits = lm_head(hidden)`` ([B, T, V], the largest tensor of the step,
and its gradient as large) and then the loss. Here the policy returns its last hidden states and
``dk.linear_policy_loss`` takes them with ``lm_head.weight`` (and bias): it builds the logits of a
chunk of scored rows at a time, and the gradients of the hidden states, the weight and the bias come
out of one pass. The old policy's log-probs, forward only, come from ``dk.linear_token_logprobs``
(no [N, V] tensor either; batch-invariant, so a row gets the same bits whatever batch it is in).

Toy task with a verifiable reward, as in ``plain_loop.py``: the prompt is one token d in 1..9, the
policy writes a completion ended by EOS (token 0) or cut at MAX_LEN; reward 1 when it starts with d.
"""
from __future__ import annotations

import torch
from torch import nn

import deltal_kernels as dk

V, H, EOS, MAX_LEN = 10, 16, 0, 8
PROMPTS, GROUP = 8, 4  # 8 prompts x 4 samples per step
CLIP = 0.2


class Policy(nn.Module):
    """A body (embedding + MLP of the current token) and an LM head, like any causal LM's split."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.body = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.lm_head = nn.Linear(H, V)

    def hidden(self, tokens):  # [B, T] -> [B, T, H]: what the LM head would project
        return self.body(self.embed(tokens))

    def forward(self, tokens):  # [B, T] -> [B, T, V]: only used to sample
        return self.lm_head(self.hidden(tokens))


def lm_head_loss(policy, inputs, targets, old_logp, advantages, mask, agg="delta-l", alpha=1.0):
    """The loss from the scored rows' hidden states and the LM head (no logits)."""
    mask = mask.bool()
    rows, cu_seqlens = dk.packing.pack(policy.hidden(inputs), mask)  # [N, H]: scored positions only
    per_row = advantages[:, None].expand_as(mask)
    return dk.linear_policy_loss(rows, policy.lm_head.weight, targets[mask], old_logp[mask], per_row[mask],
                                 cu_seqlens, bias=policy.lm_head.bias, agg=agg, alpha=alpha, max_len=MAX_LEN,
                                 clip_low=CLIP, clip_high=CLIP)


def materialised_loss(policy, inputs, targets, old_logp, advantages, mask, agg="delta-l", alpha=1.0):
    """The same loss through the logits, for comparison: lm_head first, then dk.policy_loss."""
    mask = mask.bool()
    rows, cu_seqlens = dk.packing.pack(policy(inputs), mask)  # [N, V]
    per_row = advantages[:, None].expand_as(mask)
    return dk.policy_loss(rows, targets[mask], old_logp[mask], per_row[mask], cu_seqlens, agg=agg, alpha=alpha,
                          max_len=MAX_LEN, clip_low=CLIP, clip_high=CLIP)


@torch.no_grad()
def rollout(policy, gen):
    """Sample GROUP completions per prompt; the old log-probs from the hidden states and the LM head."""
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
        mask[:, t] = (~done).float()
        done |= token == EOS
    inputs, targets = seq[:, :-1], seq[:, 1:]
    # the old policy's log-probs, forward only, from [B*T, H] hidden states (no [B*T, V] tensor)
    flat, _ = dk.linear_token_logprobs(policy.hidden(inputs).reshape(-1, H), policy.lm_head.weight,
                                       targets.reshape(-1), bias=policy.lm_head.bias, loss_mask=mask.reshape(-1) > 0)
    old_logp = flat.view(B, MAX_LEN)
    reward = (targets[:, 0] == prompts).float()
    grouped = reward.view(PROMPTS, GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    return inputs, targets, old_logp, advantages, mask, reward


def main(steps: int = 30, epochs: int = 2, seed: int = 0, agg: str = "delta-l", verbose: bool = True, lr: float = 0.03):
    """Train the toy policy; returns the mean reward of each step's rollouts."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = Policy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    history = []
    for step in range(steps):
        inputs, targets, old_logp, advantages, mask, reward = rollout(policy, gen)
        for _ in range(epochs):  # PPO epochs on the same rollouts: the ratio and clip matter
            out = lm_head_loss(policy, inputs, targets, old_logp, advantages, mask, agg=agg)
            opt.zero_grad()
            out.loss.backward()  # gradients of the body, lm_head.weight and lm_head.bias
            opt.step()
        history.append(reward.mean().item())
        if verbose and step % 5 == 0:
            print(f"step {step:3d}  reward {history[-1]:.3f}  loss {out.loss.item():+.4f}  "
                  f"clipfrac {out.metrics['clipfrac'].item():.3f}  mean length {mask.sum(1).mean().item():.2f}")
    return history


if __name__ == "__main__":
    main()
