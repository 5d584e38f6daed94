"""The fused LM head: the policy loss from hidden states and the LM-head weight, no [N, V] logits.

``linear_policy_loss(hidden, weight, ...)`` is ``policy_loss(hidden @ weight.T + bias, ...)``
computed chunk by chunk over the scored rows. The aggregation weights are known before the
forward (they depend on the mask and lengths only), so the gradient of every chunk is final as
soon as the chunk is reduced: one pass, no recompute, per chunk of C scored rows

    logits  = hidden_c @ weight.T (+ bias)          [C, V], input dtype, fp32 accumulation (torch)
    backend.forward_grad_rows(logits, ..., out=logits)   forward terms and dL/dlogits in place
    grad_hidden_c  = dlogits @ weight                [C, H]
    grad_weight   += dlogits.T @ hidden_c            [V, H], float32 accumulator (or weight.grad)
    grad_bias     += dlogits.sum(0)                  [V],    float32

(backends without ``forward_grad_rows``, i.e. ``torch``, run ``forward_rows`` then ``grad_rows``
into the same chunk). Unscored rows are gathered out first and never enter a matmul. The chunk
buffer [C, V] is the only [rows, V] temporary (half-precision weights add V-blocks of the dW
product, at most a quarter of it); C comes from ``chunk_rows`` or a byte budget.

Objectives whose dL/dlogp_t needs every row first (GSPO's sequence ratio, CISPO, rollout
correction, separately weighted KL/entropy) run two passes instead (``_LinearStatsFn``): the
forward keeps logp, entropy and lse per row; the [N]-sized objective runs through autograd
(``reference.objective_terms``, as ``policy_loss`` does); the backward rebuilds each chunk's logits.

The forward computes the gradients of the loss itself (seed 1); the backward multiplies them by
the incoming d_loss in float32 on the device (no host sync). Gradients are first order: a
``create_graph=True`` backward through the op raises.

Under ``torch.autocast`` the head's matmuls run in the autocast dtype, as ``F.linear`` would run
them there (``head_dtype``): hidden, weight and bias are cast to it (the weight once per call), the
logits and dL/dlogits chunks hold it, and each input's gradient comes back in its own dtype.

``validation.prepare`` checks every argument; it is handed a data-less stand-in for the logits
(``_LogitsShape``: the right shape, dtype and device, no storage), so the same checks and row view
serve both ops without an [N, V] allocation.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._checks import describe
from .dispatch import _load, resolve_backend, weighted_sum
from .loss import kernel_output, objective_output
from .output import PolicyLossOutput
from .parallel import check_shard_kernels, merged_rows, vocab_shard
from .validation import check_matrix, prepare

# default byte budget of the [C, V] chunk buffer, per device type
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
DEFAULT_CHUNK_BYTES = 256 << 20


class _LogitsShape(torch.Tensor):
    """A storage-less tensor with the logits' shape, dtype and device, for ``validation.prepare``.

    Only its metadata may be read; any op on it is a bug and raises.
    """

    @staticmethod
    def __new__(cls, N: int, V: int, dtype: torch.dtype, device: torch.device):
        return torch.Tensor._make_wrapper_subclass(cls, (N, V), dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"deltal_kernels internal error: {func} on the logits stand-in, which holds no data")


def head_dtype(hidden) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs ``F.linear(hidden, ...)`` in, or None outside autocast (or where
    autocast leaves the inputs as they are: float64)."""
    dev = hidden.device.type
    if hidden.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def check_linear(hidden, weight, bias):
    """Check hidden [N, H], weight [V, H] and bias [V] (names in every error); returns (N, H, V).

    Outside autocast the three share one dtype; under autocast each is cast to the autocast dtype,
    as ``F.linear`` does, so float32/float16/bfloat16 may mix (float64 may not)."""
    check_matrix("hidden", hidden, "[N, H]")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a tensor [V, H], got {describe(weight)}")
    N, H = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight: expected shape [V, H={H}] (nn.Linear layout), got {describe(weight)}")
    amp = head_dtype(hidden) is not None

    def same_dtype(name, x):
        if x.dtype == hidden.dtype or (amp and x.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            return
        raise TypeError(f"{name}: expected the hidden states' dtype {hidden.dtype}, got {x.dtype}"
                        + ("" if amp else " (only under torch.autocast may they differ: both are then cast)"))

    same_dtype("weight", weight)
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected a tensor on {hidden.device} (the hidden states' device), "
                         f"got one on {weight.device}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight: the vocabulary dimension V is 0")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected None or a tensor [V], got {describe(bias)}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape [V]=({V},), got {describe(bias)}")
        same_dtype("bias", bias)
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected a tensor on {hidden.device}, got one on {bias.device}")
    return N, H, V


def resolve_chunk_rows(chunk_rows, V: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else the device's byte budget over one row of logits."""
    if chunk_rows is None:
        budget = CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES)
        rows = budget // (V * torch.empty((), dtype=dtype).element_size())
        return max(8, rows - rows % 8) if rows >= 8 else max(1, rows)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected None or a positive int, got {chunk_rows!r}")
    return chunk_rows


def check_backend(backend, device, dtype, arg="hidden") -> str:
    name = resolve_backend(backend, device)
    if name != "torch" and dtype == torch.float64:
        raise TypeError(f"{arg}: backend {name!r} takes float32, float16 or bfloat16; float64 runs on backend='torch'")
    return name


def chunk_logits(hidden_c, weight, bias, out):
    """out[:C] = hidden_c @ weight.T (+ bias): the input dtype, fp32 accumulation inside torch's matmul."""
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=out)
    return torch.addmm(bias, hidden_c, weight.t(), out=out)


def _add_weight_grad(acc, dlogits, hidden_c, block_rows):
    """acc[V, H] += dlogits.T @ hidden_c. A float32 accumulator of half inputs takes the product in
    V-blocks so the half-precision temporary stays [block_rows, H]."""
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.t(), hidden_c)
        return
    V = acc.shape[0]
    for v0 in range(0, V, block_rows):
        v1 = min(V, v0 + block_rows)
        acc[v0:v1] += torch.mm(dlogits[:, v0:v1].t(), hidden_c).to(acc.dtype)


class _Prepared:
    """Everything the chunk loop needs, computed once by ``linear_policy_loss``."""

    def __init__(self, batch, name, chunk_rows, need_grads, accumulate, dtype, shard=None, reduce_hidden_grad=True):
        self.b = batch
        self.backend = name
        self.chunk_rows = chunk_rows
        self.need_hidden, self.need_weight, self.need_bias = need_grads
        self.accumulate = accumulate
        self.dtype = dtype  # of the matmuls and the logits chunks: the inputs', or autocast's
        self.shard = shard  # parallel.VocabShard: the weight is this rank's rows of the head, or None
        self.reduce_hidden_grad = reduce_hidden_grad  # sum hidden's gradient over the shard's group


def head_operands(weight, bias, dtype):
    """weight and bias detached and in the matmuls' dtype (a copy only under autocast)."""
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _rows_grad_into(grad_hidden, dlogits, weight, sl, idx):
    """grad_hidden[rows] = dlogits @ weight, cast to grad_hidden's dtype where autocast made them differ."""
    if idx is None and grad_hidden.dtype == dlogits.dtype:
        torch.mm(dlogits, weight, out=grad_hidden[sl])
    elif idx is None:
        grad_hidden[sl] = torch.mm(dlogits, weight)
    else:
        grad_hidden.index_copy_(0, idx, torch.mm(dlogits, weight).to(grad_hidden.dtype))


def _autocast_off(fn):
    """The chunk loops pick their matmuls' dtype themselves (``prep.dtype``): autocast must not recast them."""
    @functools.wraps(fn)
    def run(*args):
        device_type = next(a for a in args if isinstance(a, torch.Tensor)).device.type
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return run


@_autocast_off
def _run_chunks(hidden, weight, bias, prep: _Prepared):
    """The chunk loop. Returns the [N] row outputs and the gradients of the loss (seed 1) that were asked for."""
    b = prep.b
    N, H = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, prep.dtype
    cd = b.old_logprobs.dtype
    module = _load(prep.backend)
    fused = hasattr(module, "forward_grad_rows")
    want_grad = prep.need_hidden or prep.need_weight or prep.need_bias
    p = b.params

    logp = torch.zeros(N, dtype=cd, device=dev)
    entropy = torch.zeros_like(logp)
    loss_rows = torch.zeros_like(logp)
    kl = torch.zeros_like(logp)
    flags = torch.zeros(N, dtype=torch.uint8, device=dev)

    grad_hidden = torch.zeros_like(hidden) if prep.need_hidden else None
    if prep.need_weight:
        if prep.accumulate:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight = weight.grad
        else:
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(dtype, torch.float32), device=dev)
    else:
        grad_weight = None
    grad_bias = torch.zeros(V, dtype=torch.promote_types(dtype, torch.float32), device=dev) if prep.need_bias else None

    rows = b.scored.nonzero().squeeze(1)  # unscored rows never enter a matmul
    R = rows.numel()
    all_scored = R == N
    C = min(prep.chunk_rows, max(R, 1))
    buffer = torch.empty((C, V), dtype=dtype, device=dev) if R else None
    block_rows = max(1, min(V, (C * V) // (4 * max(H, 1))))  # half-precision dW temporaries <= 1/4 of the buffer
    weight_d, bias_d = head_operands(weight, bias, dtype)
    hidden_d = hidden.detach()

    for start in range(0, R, C):
        end = min(R, start + C)
        c = end - start
        if all_scored:
            idx = None
            hid = hidden_d[start:end].to(dtype)
            sl = slice(start, end)
        else:
            idx = rows[start:end]
            hid = hidden_d.index_select(0, idx).to(dtype)
            sl = idx
        logits = chunk_logits(hid, weight_d, bias_d, buffer[:c])
        targets = b.targets[sl]
        scored = b.scored[sl]
        old, adv = b.old_logprobs[sl], b.advantages[sl]
        ref = None if b.ref_logprobs is None else b.ref_logprobs[sl]
        if want_grad and fused:
            lp, ent, _, lr, _, k, fl = module.forward_grad_rows(
                logits, targets, scored, old, ref, adv, p, b.need_entropy, b.row_weights[sl], 1.0, logits)
        else:
            lp, ent, lse, lr, dlogp, k, fl = module.forward_rows(logits, targets, scored, old, ref, adv, p,
                                                                 b.need_entropy)
            if want_grad:
                w = b.row_weights[sl]
                module.grad_rows(logits, targets, lse, ent, w * dlogp, w * -p.entropy_coef, p.temperature, logits)
        for full, part in ((logp, lp), (entropy, ent), (loss_rows, lr), (kl, k), (flags, fl)):
            full[sl] = part
        if not want_grad:
            continue
        dlogits = logits  # the chunk now holds dL/dlogits (unweighted rows are exact zeros)
        if prep.need_hidden:
            _rows_grad_into(grad_hidden, dlogits, weight_d, sl, idx)
        if prep.need_weight:
            _add_weight_grad(grad_weight, dlogits, hid, block_rows)
        if prep.need_bias:
            grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)

    if prep.accumulate:  # already in weight.grad
        grad_weight = None
    return (logp, entropy, loss_rows, kl, flags), (grad_hidden, grad_weight, grad_bias)


def _scaled(grad: Optional[torch.Tensor], d_loss: torch.Tensor, out_dtype: torch.dtype, rows_per_step: int):
    """grad * d_loss computed in float32 (float64 for float64), in ``out_dtype``, with no host sync.

    Out of place: the saved gradient stays valid for another backward through the same graph
    (retain_graph=True, gradcheck); it is freed with the graph's saved tensors after the last one.
    """
    if grad is None:
        return None
    scale = d_loss.to(torch.promote_types(grad.dtype, torch.float32))
    if grad.dtype == scale.dtype:
        return (grad * scale).to(out_dtype)
    out = torch.empty_like(grad, dtype=out_dtype)
    for s in range(0, grad.shape[0], rows_per_step):  # half precision: through float32 a block of rows at a time
        out[s:s + rows_per_step] = grad[s:s + rows_per_step].to(scale.dtype) * scale
    return out


class _LinearPolicyLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, prep):
        (logp, entropy, loss_rows, kl, flags), grads = _run_chunks(hidden, weight, bias, prep)
        loss = weighted_sum(prep.b.row_weights, loss_rows)
        ctx.mark_non_differentiable(logp, entropy, kl, flags)
        ctx.set_materialize_grads(False)
        # the gradients are intermediates of this op: saved so that autograd frees them after backward
        ctx.present = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.accumulate = prep.accumulate
        ctx.backward_calls = 0
        ctx.rows_per_step = max(1, (16 << 20) // (4 * max(hidden.shape[1], 1)))
        return loss, logp, entropy, kl, flags

    @staticmethod
    def backward(ctx, d_loss, *_):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_policy_loss: double backward is not supported (its gradients are first "
                               "order); call backward without create_graph=True")
        ctx.backward_calls += 1
        if ctx.accumulate and ctx.backward_calls > 1:
            raise RuntimeError("accumulate_weight_grad: the weight's gradient was added to weight.grad once, in "
                               "the forward; a second backward through the same graph (retain_graph=True) would "
                               "add hidden's and bias's gradients again but not the weight's. Call backward once, "
                               "or pass accumulate_weight_grad=False.")
        return _LinearPolicyLossFn._first_order(ctx, d_loss)

    @staticmethod
    @once_differentiable
    def _first_order(ctx, d_loss):
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (next(saved) if present else None for present in ctx.present)
        if d_loss is None:
            return None, None, None, None
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        gh = _scaled(grad_hidden, d_loss, h_dtype, ctx.rows_per_step)
        gb = _scaled(grad_bias, d_loss, b_dtype, ctx.rows_per_step) if grad_bias is not None else None
        if ctx.accumulate:
            # already added to weight.grad for a seed of 1: the loss must not have been scaled
            torch._assert_async(d_loss == 1, "linear_policy_loss(accumulate_weight_grad=True): the loss was "
                                             "scaled before backward; scale through weights= instead")
            gw = None
        else:
            gw = _scaled(grad_weight, d_loss, w_dtype, ctx.rows_per_step)
        return gh, gw, gb, None


def _chunk_rows_iter(b, C):
    """(slice or index tensor of the chunk's rows, index tensor or None) over the scored rows, C at a time."""
    rows = b.scored.nonzero().squeeze(1)
    R, N = rows.numel(), b.scored.numel()
    for start in range(0, R, C):
        end = min(R, start + C)
        if R == N:
            yield slice(start, end), None
        else:
            idx = rows[start:end]
            yield idx, idx


class _LinearStatsFn(torch.autograd.Function):
    """logp_t and H_t of every row from hidden @ weight.T + bias, chunk by chunk (the two-pass schedule).

    For objectives whose dL/dlogp_t needs every row first (GSPO's sequence ratio, CISPO, rollout
    correction, separately weighted KL/entropy), and for a vocabulary-sharded head: the forward keeps
    only lse (sharded: the merged m and log s); the backward rebuilds each chunk's logits (a fourth
    matmul), writes dL/dlogits into it and runs the two gradient matmuls. Sharded, each chunk's
    statistics are merged over the group (one all-gather per chunk; every rank runs the same chunks).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, prep):
        b = prep.b
        N, V = hidden.shape[0], weight.shape[0]
        module = _load(prep.backend)
        cd = b.old_logprobs.dtype
        logp = torch.zeros(N, dtype=cd, device=hidden.device)
        entropy, lse = torch.zeros_like(logp), torch.zeros_like(logp)
        shard = prep.shard
        log_s = None if shard is None else torch.zeros_like(logp)  # sharded, lse holds the merged m
        zeros = torch.zeros(N, dtype=cd, device=hidden.device)
        params = b.params._replace(kl_type=0, kl_coef=0.0, entropy_coef=0.0)  # statistics only
        C = min(prep.chunk_rows, max(int(b.scored.sum()), 1))
        buffer = torch.empty((C, V), dtype=prep.dtype, device=hidden.device)
        hd = hidden.detach()
        wd, bd = head_operands(weight, bias, prep.dtype)
        for sl, idx in _chunk_rows_iter(b, C):
            hid = (hd[sl] if idx is None else hd.index_select(0, idx)).to(prep.dtype)
            logits = chunk_logits(hid, wd, bd, buffer[:hid.shape[0]])
            if shard is None:
                lp, ent, ls, *_ = module.forward_rows(logits, b.targets[sl], b.scored[sl], zeros[sl], None,
                                                      zeros[sl], params, b.need_entropy)
                logp[sl], entropy[sl], lse[sl] = lp, ent, ls
            else:
                rows = merged_rows(module, logits, b.targets[sl], b.scored[sl], shard, params.temperature,
                                   b.need_entropy)
                logp[sl], entropy[sl], lse[sl], log_s[sl] = rows.logp, rows.entropy, rows.m, rows.log_s
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(hidden, weight, bias, lse, entropy, log_s)
        ctx.prep = prep
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, d_logp, d_entropy, _):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_policy_loss: double backward is not supported (its gradients are first "
                               "order); call backward without create_graph=True")
        return _LinearStatsFn._first_order(ctx, d_logp, d_entropy)

    @staticmethod
    @once_differentiable
    @_autocast_off
    def _first_order(ctx, d_logp, d_entropy):
        hidden, weight, bias, lse, entropy, log_s = ctx.saved_tensors
        prep = ctx.prep
        shard = prep.shard
        b = prep.b
        module = _load(prep.backend)
        g = d_logp if d_logp is not None else torch.zeros_like(lse)
        h = d_entropy if d_entropy is not None else torch.zeros_like(lse)
        g, h = torch.where(b.scored, g, 0.0).to(lse.dtype), torch.where(b.scored, h, 0.0).to(lse.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        V, H = weight.shape
        cdt = torch.promote_types(prep.dtype, torch.float32)
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if need_w else None
        gb = torch.zeros(V, dtype=cdt, device=weight.device) if need_b and bias is not None else None
        C = min(prep.chunk_rows, max(int(b.scored.sum()), 1))
        buffer = torch.empty((C, V), dtype=prep.dtype, device=hidden.device)
        block_rows = max(1, min(V, (C * V) // (4 * max(H, 1))))
        wd, bd = head_operands(weight, bias, prep.dtype)
        for sl, idx in _chunk_rows_iter(b, C):
            hid = (hidden[sl] if idx is None else hidden.index_select(0, idx)).to(prep.dtype)
            logits = chunk_logits(hid, wd, bd, buffer[:hid.shape[0]])
            if shard is None:
                module.grad_rows(logits, b.targets[sl], lse[sl], entropy[sl], g[sl], h[sl], b.params.temperature,
                                 logits)
            else:
                module.shard_grad_rows(logits, b.targets[sl], shard.start, lse[sl], log_s[sl], entropy[sl], g[sl],
                                       h[sl], b.params.temperature, logits)
            if gh is not None:
                _rows_grad_into(gh, logits, wd, sl, idx)
            if gw is not None:
                _add_weight_grad(gw, logits, hid, block_rows)
            if gb is not None:
                gb += logits.sum(0, dtype=gb.dtype)
        if gh is not None and shard is not None and prep.reduce_hidden_grad:
            # each rank's head rows give part of dL/dhidden: the whole of it on every rank
            import torch.distributed as dist

            dist.all_reduce(gh, group=shard.group)
        return (gh, None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), None)


def check_accumulate(weight):
    """accumulate_weight_grad=True adds to weight.grad in the forward: refused where that forward is not
    followed by exactly one backward of its own graph."""
    if not weight.is_leaf:
        raise ValueError("weight: accumulate_weight_grad=True needs a leaf weight (its .grad is accumulated into)")
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        # non-reentrant activation checkpointing runs the forward again inside the backward
        raise RuntimeError("accumulate_weight_grad: saved-tensor hooks are active (activation checkpointing or "
                           "offloading): a checkpointed forward runs again in the backward and would add the "
                           "weight's gradient twice. Call linear_policy_loss outside the checkpointed region, or "
                           "pass accumulate_weight_grad=False.")


def linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, cu_seqlens, *, bias=None, loss_mask=None,
                       ref_logprobs=None, weights=None, agg="delta-l", alpha=1.0, max_len=None, clip_low=0.2,
                       clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
                       ratio_level="token", objective="ppo", rollout_logprobs=None, rollout_correction=None,
                       rollout_clip=(None, 3.0), kl_entropy_agg=None, kl_entropy_weights=None,
                       with_entropy=False, inplace_backward=False, backend="auto", chunk_rows=None,
                       accumulate_weight_grad=False, vocab_start=None, vocab_group=None,
                       reduce_hidden_grad=True, sequence_group=None, row_index=None) -> PolicyLossOutput:
    """``policy_loss(hidden @ weight.T + bias, ...)`` without the [N, V] logits (SPEC section 2.1).

    Token-level PPO (the default objective) runs in one pass: each chunk's gradient is final when the
    chunk is reduced. ``ratio_level="sequence"``, ``objective="cispo"``, a rollout correction or
    ``kl_entropy_agg``/``kl_entropy_weights`` need every row's log-prob before any dL/dlogp_t is known:
    they run a statistics pass in the forward and rebuild each chunk's logits in the backward (a fourth
    matmul), with the same memory bound.

    hidden [N, H] and weight [V, H] (nn.Linear layout), bias [V] or None, all one dtype (float32,
    float16, bfloat16; float64 on backend="torch") and device; the other arguments and options are
    those of ``policy_loss``. ``loss`` is differentiable w.r.t. hidden, weight and bias.

    chunk_rows: scored rows per chunk (default: a byte budget of the [chunk_rows, V] buffer, 64 MiB
    on CPU, 512 MiB on CUDA). ``inplace_backward`` is accepted for signature parity and has no effect:
    every chunk's gradient is written into the chunk itself. accumulate_weight_grad=True adds the
    weight's gradient straight into ``weight.grad`` (a leaf) during the forward instead of holding a
    float32 [V, H] accumulator; the loss must then be backpropagated unscaled (d_loss == 1, checked
    on the device).

    vocab_group, vocab_start: weight [V_r, H] and bias [V_r] are this rank's rows of a column-parallel
    head, the vocabulary ids [vocab_start, vocab_start + V_r) (``parallel``); hidden is the same on
    every rank. It runs the two-pass schedule with each chunk's statistics merged over the group.
    Every rank returns the same loss; weight's and bias's gradients are this rank's rows; hidden's
    is summed over the group (an all-reduce in the backward) unless ``reduce_hidden_grad=False``, for
    a framework whose layer already all-reduces it (Megatron's column-parallel linear does).
    sequence_group, row_index: sequence-parallel rows, as in ``policy_loss``.
    """
    N, H, V = check_linear(hidden, weight, bias)
    shard = vocab_shard((N, V), hidden.device, targets, vocab_start, vocab_group, loss_mask)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad: expected a bool, got {reduce_hidden_grad!r}")
    dtype = head_dtype(hidden) or hidden.dtype
    stand_in = _LogitsShape(N, V, dtype, hidden.device)
    b = prepare(stand_in, targets, old_logprobs, advantages, cu_seqlens, loss_mask=loss_mask,
                ref_logprobs=ref_logprobs, weights=weights, agg=agg, alpha=alpha, max_len=max_len,
                clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_type=kl_type,
                entropy_coef=entropy_coef, temperature=temperature, with_entropy=with_entropy,
                ratio_level=ratio_level, objective=objective, rollout_logprobs=rollout_logprobs,
                rollout_correction=rollout_correction, rollout_clip=rollout_clip, kl_entropy_agg=kl_entropy_agg,
                kl_entropy_weights=kl_entropy_weights, rows="the hidden states",
                vocab_size=None if shard is None else shard.vocab_size, row_index=row_index,
                sequence_group=sequence_group)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward: expected a bool, got {inplace_backward!r}")
    if not isinstance(accumulate_weight_grad, bool):
        raise TypeError(f"accumulate_weight_grad: expected a bool, got {accumulate_weight_grad!r}")
    name = check_backend(backend, hidden.device, dtype)
    check_shard_kernels(shard, name)
    # sharded, every rank must run the same chunks (a collective each): rows from the widest shard
    C = resolve_chunk_rows(chunk_rows, V if shard is None else max(shard.sizes), dtype, hidden.device)

    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    if accumulate_weight_grad and need[1]:
        check_accumulate(weight)
    prep = _Prepared(b, name, C, need, accumulate_weight_grad and need[1], dtype, shard, reduce_hidden_grad)
    if not b.objective.is_default or shard is not None:
        # dL/dlogp_t needs every row's logp first (or, sharded, the merged statistics): statistics pass,
        # [N]-sized objective, recompute in backward
        if accumulate_weight_grad:
            raise ValueError("accumulate_weight_grad: needs the one-pass schedule (token-level PPO, no rollout "
                             "correction, kl_entropy_agg=None, no vocab_group)")

        if any(need):
            logp, entropy, _ = _LinearStatsFn.apply(hidden, weight, bias, prep)
        else:
            with torch.no_grad():
                logp, entropy, _ = _LinearStatsFn.apply(hidden, weight, bias, prep)
        return objective_output(b, logp, entropy)
    if any(need):
        loss, logp, entropy, kl, flags = _LinearPolicyLossFn.apply(hidden, weight, bias, prep)
    else:
        (logp, entropy, loss_rows, kl, flags), _ = _run_chunks(hidden, weight, bias, prep)
        loss = weighted_sum(b.row_weights, loss_rows)

    return kernel_output(b, loss, logp, entropy, kl, flags)
