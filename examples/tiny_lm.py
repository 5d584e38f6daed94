"""A tiny character-level causal LM (a GRU) for the examples: tokenizer, model, sampling, packing.

Shared by ``variance_study.py`` and ``train_rlvr.py``. The GRU cell is written out with plain
tensor ops (no ``nn.GRU``) so that ``torch.func.vmap`` can take per-sequence gradients of it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import deltal_kernels as dk

BOS, EOS = "^", "$"
VOCAB = BOS + EOS + "0123456789+=."
STOI = {c: i for i, c in enumerate(VOCAB)}
EOS_ID = STOI[EOS]
REASONING_IDS = [STOI[c] for c in "0123456789+."]  # what free "reasoning" is written with


def encode(text: str) -> list:
    return [STOI[c] for c in text]


class TinyGRULM(nn.Module):
    def __init__(self, vocab: int = len(VOCAB), emb: int = 32, hidden: int = 64):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab, emb)
        self.ih = nn.Linear(emb, 3 * hidden)
        self.hh = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, vocab)

    def cell(self, xi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step; ``xi`` is the input projection ``ih(embed(token))``."""
        hr, hz, hn = self.hh(h).chunk(3, -1)
        xr, xz, xn = xi.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> next-token logits [B, T, V]."""
        xi = self.ih(self.embed(tokens))
        h = xi.new_zeros(tokens.shape[0], self.hidden)
        hs = []
        for t in range(tokens.shape[1]):
            h = self.cell(xi[:, t], h)
            hs.append(h)
        return self.head(torch.stack(hs, 1))

    @torch.no_grad()
    def sample(self, prompts: list, max_new: int, generator: torch.Generator):
        """Sample one response per prompt (lists of ids, any lengths) until EOS or ``max_new`` tokens.

        Returns (responses: list of id lists, each ending with EOS unless truncated, and the
        sampling log-probabilities of their tokens: list of float tensors)."""
        B = len(prompts)
        h = torch.zeros(B, self.hidden)
        # feed the prompts; a shorter prompt keeps its state once it has ended
        P = max(len(p) for p in prompts)
        for t in range(P):
            ids = torch.tensor([p[t] if t < len(p) else 0 for p in prompts])
            live = torch.tensor([t < len(p) for p in prompts])[:, None]
            h = torch.where(live, self.cell(self.ih(self.embed(ids)), h), h)
        out = torch.zeros(B, max_new, dtype=torch.long)
        logps = torch.zeros(B, max_new)
        lengths = torch.full((B,), max_new)
        done = torch.zeros(B, dtype=torch.bool)
        for t in range(max_new):
            logp = torch.log_softmax(self.head(h), -1)
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            out[:, t], logps[:, t] = tok, logp.gather(1, tok[:, None]).squeeze(1)
            ended = ~done & (tok == EOS_ID)
            lengths[ended] = t + 1
            done |= ended
            if bool(done.all()):
                break
            h = self.cell(self.ih(self.embed(tok)), h)
        return ([out[b, :lengths[b]].tolist() for b in range(B)],
                [logps[b, :lengths[b]].clone() for b in range(B)])


def make_batch(prompts: list, responses: list):
    """Right-padded [B, T] tokens of prompt+response and a [B, T] mask of the positions whose
    next-token prediction is a response token (the scored rows), with their targets."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    scored = torch.zeros(len(seqs), T, dtype=torch.bool)
    targets = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        s = p + r
        tokens[b, :len(s)] = torch.tensor(s)
        targets[b, :len(s) - 1] = torch.tensor(s[1:])
        scored[b, len(p) - 1:len(s) - 1] = True  # position t predicts token t+1
    return tokens, targets, scored


def make_prompts(n: int, generator: torch.Generator):
    """n prompts ``^a+b=`` (id lists) and their answers max(a, b)."""
    ab = torch.randint(0, 10, (n, 2), generator=generator).tolist()
    return [encode(f"^{a}+{b}=") for a, b in ab], [max(a, b) for a, b in ab]


def reward(response: list, answer: int) -> float:
    """The checker: 1 when the response ends with ``=d`` + EOS and d is the answer."""
    return float(len(response) >= 3 and response[-1] == EOS_ID and response[-3] == STOI["="]
                 and response[-2] == STOI[str(answer)])


def demonstration(answer: int, max_len: int, p_correct: float, generator: torch.Generator) -> list:
    """A base-model training response: free "reasoning" of log-normal length (median 10 tokens,
    the long tail of RLVR responses), then ``=d`` + EOS, right with probability ``p_correct``."""
    n = int(torch.empty(1).log_normal_(math.log(10.0), 0.8, generator=generator).round().clamp(0, max_len - 3))
    reasoning = [REASONING_IDS[i] for i in torch.randint(0, len(REASONING_IDS), (n,), generator=generator)]
    right = float(torch.rand(1, generator=generator)) < p_correct
    d = answer if right else int(torch.randint(0, 10, (1,), generator=generator))
    return reasoning + [STOI["="], STOI[str(d)], EOS_ID]


def pretrain_base(seed: int, *, steps: int, max_len: int, batch: int = 64, p_correct: float = 0.3,
                  lr: float = 1e-2, answer_weight: float = 10.0) -> TinyGRULM:
    """The "base model" RLVR starts from: a TinyGRULM fitted by plain next-token cross-entropy on
    noisy demonstrations, so it answers right some of the time with long-tailed response lengths."""
    torch.manual_seed(seed)
    model = TinyGRULM()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        prompts, answers = make_prompts(batch, gen)
        responses = [demonstration(a, max_len, p_correct, gen) for a in answers]
        tokens, targets, scored = make_batch(prompts, responses)
        per_token = torch.nn.functional.cross_entropy(model(tokens)[scored], targets[scored], reduction="none")
        # the answer is 1 token among ~13: weight it up so that a brief fit learns it
        is_answer = torch.zeros_like(per_token, dtype=torch.bool)
        ends = dk.packing.cu_seqlens_from_lengths(torch.tensor([len(r) for r in responses]))[1:]
        is_answer[ends - 2] = True  # the digit before EOS, in the packed response rows
        loss = (per_token * torch.where(is_answer, answer_weight, 1.0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def packed_loss_inputs(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor):
    """Padded [B, T, V] logits -> the packed response rows ``dk.policy_loss`` takes."""
    packed = dk.packing.pack(logits, scored)
    return packed.values, dk.packing.pack(targets, scored).values, packed.cu_seqlens
