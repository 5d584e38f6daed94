"""Forward-only per-token log-probs (and entropy) for the old and reference policies.

``token_logprobs(logits, targets)`` and ``linear_token_logprobs(hidden, weight, targets)`` return
(logprobs [N], entropy [N] or None) in float32 (float64 for float64 inputs on backend="torch"),
0 on rows outside ``loss_mask``, with no [N, V] allocation: the backend's forward row kernel reads
the logits once, and the linear form builds them one chunk of rows at a time.

Batch invariance: the same row gives the same bits alone or in any batch, whatever the chunking.
The row kernels reduce each row on its own (no cross-row reduction), and the linear form computes
every chunk's logits with a matmul of one fixed shape, [chunk_rows, H] @ [H, V] (the last chunk is
padded with zero rows), so the GEMM a row goes through does not depend on N, on the row's position
or on the mask. ``chunk_rows`` (default: min(256, a byte budget that depends on V and the dtype only))
is part of that shape: the same value gives the same bits. By default the shape is
min(256, the byte budget's rows), so a small batch pads at most 255 rows.
"""
from __future__ import annotations

import torch

from .dispatch import _load
from .parallel import check_shard_kernels, merged_rows, vocab_parallel_rows, vocab_shard
from .linear import (_LogitsShape, check_backend, check_linear, chunk_logits, head_dtype, head_operands,
                     resolve_chunk_rows)
from .validation import check_matrix, prepare

# the default fixed chunk shape of linear_token_logprobs: at most this many rows (fewer when the byte
# budget of one [rows, V] chunk says so); the last chunk is padded to it, so N < 256 wastes < 256 rows
FIXED_CHUNK_ROWS = 256


def _prepare(logits, targets, temperature, with_entropy, loss_mask, rows="the logits", vocab_size=None):
    """validation.prepare's checks of the arguments these functions share (logits may be a stand-in)."""
    N = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else 0
    dev = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    cu = torch.tensor([0, N], dtype=torch.int64, device=dev)
    return prepare(logits, targets, zeros, zeros, cu, loss_mask=loss_mask, ref_logprobs=None, weights=None,
                   agg="token-mean", alpha=1.0, max_len=None, clip_low=0.2, clip_high=0.2, dual_clip=None,
                   kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=temperature, with_entropy=with_entropy,
                   rows=rows, vocab_size=vocab_size)


def token_logprobs(logits, targets, *, temperature=1.0, with_entropy=False, loss_mask=None, backend="auto",
                   vocab_start=None, vocab_group=None):
    """log_softmax(logits / temperature)[targets] per row, and the entropy when ``with_entropy``.

    logits [N, V] (float32/float16/bfloat16; float64 on backend="torch"), targets [N] int, loss_mask
    [N] (rows outside it get 0 and cost nothing). Returns (logprobs [N], entropy [N] or None),
    detached, batch-invariant. vocab_group, vocab_start: the logits are this rank's vocabulary shard
    (see ``policy_loss``); every rank returns the whole rows' values.
    """
    check_matrix("logits", logits, "[N, V]")
    shard = vocab_shard(logits.shape, logits.device, targets, vocab_start, vocab_group, loss_mask)
    b = _prepare(logits, targets, temperature, with_entropy, loss_mask,
                 vocab_size=None if shard is None else shard.vocab_size)
    name = check_backend(backend, logits.device, logits.dtype, arg="logits")
    check_shard_kernels(shard, name)
    if shard is not None:
        with torch.no_grad():
            logp, entropy = vocab_parallel_rows(b, name, shard, inplace=False)
        return logp, (entropy if with_entropy else None)
    with torch.no_grad():
        logp, entropy, *_ = _load(name).forward_rows(b.logits.detach().contiguous(), b.targets, b.scored,
                                                     b.old_logprobs, None, b.advantages, b.params, b.need_entropy)
    return logp, (entropy if with_entropy else None)


def linear_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, with_entropy=False, loss_mask=None,
                          backend="auto", chunk_rows=None, vocab_start=None, vocab_group=None):
    """``token_logprobs(hidden @ weight.T + bias, ...)`` one fixed-shape chunk of rows at a time.

    hidden [N, H], weight [V, H] (nn.Linear layout), bias [V] or None. Rows outside ``loss_mask``
    never enter the matmul. Returns (logprobs [N], entropy [N] or None), detached, batch-invariant
    for a given ``chunk_rows`` (see the module docstring). Under ``torch.autocast`` the matmuls run
    in the autocast dtype, as ``F.linear`` would there. vocab_group, vocab_start: weight and bias
    are this rank's rows of a column-parallel head (see ``linear_policy_loss``).
    """
    N, H, V = check_linear(hidden, weight, bias)
    shard = vocab_shard((N, V), hidden.device, targets, vocab_start, vocab_group, loss_mask)
    dtype = head_dtype(hidden) or hidden.dtype
    b = _prepare(_LogitsShape(N, V, dtype, hidden.device), targets, temperature, with_entropy, loss_mask,
                 rows="the hidden states", vocab_size=None if shard is None else shard.vocab_size)
    name = check_backend(backend, hidden.device, dtype)
    check_shard_kernels(shard, name)
    # sharded, every rank runs the same chunks (a collective each): the rows of the widest shard's budget
    C = resolve_chunk_rows(chunk_rows, V if shard is None else max(shard.sizes), dtype, hidden.device)
    if chunk_rows is None:  # every chunk is padded to C rows: a small fixed shape wastes little on small batches
        C = min(C, FIXED_CHUNK_ROWS)
    module = _load(name)
    dev, cd = hidden.device, b.old_logprobs.dtype
    logp = torch.zeros(N, dtype=cd, device=dev)
    entropy = torch.zeros_like(logp)
    rows = b.scored.nonzero().squeeze(1)
    R = rows.numel()
    if R == 0:
        return logp, (entropy if with_entropy else None)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # the matmuls' dtype is chosen above
        hid = torch.zeros((C, H), dtype=dtype, device=dev)  # fixed shape: padded with zero rows
        logits = torch.empty((C, V), dtype=dtype, device=dev)
        tgt = torch.zeros(C, dtype=torch.int64, device=dev)
        scored = torch.zeros(C, dtype=torch.bool, device=dev)
        zero = torch.zeros(C, dtype=cd, device=dev)
        weight_d, bias_d = head_operands(weight, bias, dtype)
        for start in range(0, R, C):
            idx = rows[start:start + C]
            c = idx.numel()
            hid[:c] = hidden.detach().index_select(0, idx)
            hid[c:] = 0
            tgt[:c] = b.targets[idx]
            tgt[c:] = 0
            scored[:c] = True
            scored[c:] = False  # padding rows do no V work
            chunk_logits(hid, weight_d, bias_d, logits)
            if shard is None:
                lp, ent, *_ = module.forward_rows(logits, tgt, scored, zero, None, zero, b.params, b.need_entropy)
            else:
                _, _, lp, ent = merged_rows(module, logits, tgt, scored, shard, b.params.temperature, b.need_entropy)
            logp[idx] = lp[:c]
            entropy[idx] = ent[:c]
    return logp, (entropy if with_entropy else None)
