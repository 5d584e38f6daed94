"""verl: Delta-L as a loss aggregation mode, a registered policy loss, and a fused actor loss.

Works without verl for the functions; with verl importable, importing this module registers the
"delta-l", "delta-l-gspo" and "delta-l-cispo" policy losses (alpha = 1; ``register(alpha, policy=...)``
for another). Tested against verl 0.9.1.

(a) ``agg_loss``: verl's ``core_algos.agg_loss`` signature and semantics for its modes
    ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm": dp_size, batch_num_tokens, global_batch_size, loss_scale_factor as in
    verl), plus "delta-l": w_i = L_i^-alpha / (M * sum_j L_j^-alpha), M = loss_scale_factor (or the
    response width, like verl's "seq-mean-token-sum-norm"). The sum over j is the whole mini-batch
    on every data-parallel rank: compute it once per mini-batch, before verl splits it into
    micro-batches, and pass each micro-batch its slice as ``delta_l_weights``::

        w = dk.sequence_weights(response_mask.sum(-1), "delta-l", alpha=alpha, max_len=M,
                                group=dp_group)          # times dp_size, for the DDP/FSDP mean
        data["delta_l_weights"] = w                      # per-sample field: follows micro-batching

    Without it (dp_size must be 1) the weights are those of the micro-batch alone.
(b) ``compute_policy_loss``: verl's ``compute_policy_loss_vanilla`` (clip, dual clip
    ``clip_ratio_c``), ``_gspo`` or ``_cispo`` (``policy=``), with verl's rollout-correction weights
    ``rollout_is_weights`` on the policy term only, aggregated by ``agg_loss``;
    ``register(alpha, policy=...)`` (run at import when verl is importable, for the three) adds it
    to verl's registry as ``actor.policy_loss.loss_mode="delta-l"``, ``"delta-l-gspo"`` or
    ``"delta-l-cispo"``: verl's policy loss of that name with Delta-L aggregation. verl computes the
    rollout-correction weights itself (``algorithm.rollout_correction``: ``rollout_is`` token or
    sequence, a single threshold = TIS = dk's ``*_truncate`` with ``(None, t)``, ``"lower_upper"`` =
    IcePop = dk's ``*_mask`` with ``(lower, upper)``) and hands them to whichever loss is registered.
    Delta-L's M is ``loss_scale_factor``: under verl's engine (remove-padding, ``ppo_loss`` sets
    ``global_batch_info["loss_scale_factor"]``) a missing one is an error naming it, since the
    padded width there is the micro-batch's longest response. verl's ``ppo_loss``
    hands a policy loss only the micro-batch's tensors and ``config.global_batch_info`` (dp_size,
    batch_num_tokens, global_batch_size, loss_scale_factor), so the registered loss normalises over
    the micro-batch on one rank unless ``config.global_batch_info["delta_l_weights"]`` holds the
    micro-batch's slice of the mini-batch weights; verl's own ``agg_loss`` (entropy and KL terms)
    rejects that key, so whoever sets it must also point ``verl.workers.utils.losses.agg_loss`` at
    this module's ``agg_loss`` (same results for verl's modes). The fused actor (c) needs neither.
(c) ``fused_ppo_loss``: verl's actor loss (``verl.workers.utils.losses.ppo_loss``: policy loss,
    entropy bonus, KL loss) plus the log-prob computation before it, as one ``dk.policy_loss`` call on
    verl's remove-padding rows; tested against verl's ``ppo_loss`` fed by verl's own
    ``logprobs_from_logits``. The patch, for verl 0.9.1's FSDP engine
    (``verl/workers/engine/fsdp/transformer_impl.py``), keeps verl's path for the forward-only
    log-prob passes and fuses the training step (a sketch: it needs a GPU FSDP engine to run, which
    the tests here do not have)::

        class FusedFSDPEngine(FSDPEngineWithLMHead):
            def forward_step(self, micro_batch, loss_function, forward_only):
                if forward_only:
                    return super().forward_step(micro_batch, loss_function, forward_only)
                micro_batch = micro_batch.to(get_device_id())
                model_inputs, _ = self.prepare_model_inputs(micro_batch=micro_batch)
                with torch.autocast(device_type=get_device_name(), dtype=torch.bfloat16):
                    logits_rmpad = self.module(**model_inputs, use_cache=False).logits.squeeze(0)
                actor_config = loss_function.keywords["config"]  # partial(ppo_loss, config=...)
                loss, metrics = fused_ppo_loss(actor_config, logits_rmpad, micro_batch,
                                               loss_agg_mode="delta-l")
                return loss, {"loss": loss.detach().item(), "metrics": metrics}

    The policy loss is ``config.policy_loss.loss_mode``'s: "vanilla", "gspo" (dk's
    ``ratio_level="sequence"``), "cispo" (dk's ``objective="cispo"``), or "delta-l", "delta-l-gspo",
    "delta-l-cispo" (the same with Delta-L aggregation); Delta-L's M is ``max_len=`` or
    ``config.loss_scale_factor``, an error without either (or ``delta_l_weights``).
    It supports one temperature per micro-batch, no Ulysses sequence parallelism (the rows must be
    the whole micro-batch) and no rollout_is_weights; it checks and raises otherwise. Under Megatron's
    tensor parallelism pass the rank's vocabulary shard of the logits with ``vocab_start=tp_rank * (V //
    tp)`` and ``vocab_group=mpu.get_tensor_model_parallel_group()`` (in place of verl's
    ``vocab_parallel_log_probs_from_logits``).
(d) ``fused_linear_ppo_loss``: the same from the hidden states and ``lm_head.weight`` (like verl's
    ``use_fused_kernels``), through ``dk.linear_policy_loss``: no [total_nnz, V] logits at all. In
    the patch above, run the backbone instead of the whole model and pass its output::

        hidden_rmpad = self.module.model(**model_inputs, use_cache=False).last_hidden_state.squeeze(0)
        loss, metrics = fused_linear_ppo_loss(actor_config, hidden_rmpad, self.module.lm_head.weight,
                                              micro_batch, loss_agg_mode="delta-l")
"""
from __future__ import annotations

from typing import Optional

import torch

from ..aggregation import sequence_weights
from ..linear import linear_policy_loss
from ..loss import policy_loss

VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOSS_AGG_MODES = VERL_AGG_MODES + ("delta-l",)
# verl's kl_loss_type names -> dk kl_type ("abs", "full" and the straight-through "+" variants have no dk form)
KL_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def agg_weights(loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1, batch_num_tokens=None,
                global_batch_size=None, loss_scale_factor=None, *, alpha: float = 1.0,
                delta_l_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[bs] float64 w_i with agg_loss(loss_mat, loss_mask, ...) = sum_i w_i sum_t loss_mask * loss_mat."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    lengths = loss_mask.sum(-1)
    L = lengths.to(torch.float64)
    live = (L > 0).to(torch.float64)
    horizon = loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1]
    if loss_agg_mode == "delta-l":
        if delta_l_weights is not None:
            return delta_l_weights.to(torch.float64)
        if dp_size > 1:
            raise ValueError("delta_l_weights: required when dp_size > 1 "
                             "(the mini-batch's Delta-L weights over all ranks)")
        return sequence_weights(lengths.to(torch.int64), "delta-l", alpha=alpha, max_len=int(horizon),
                                dtype=torch.float64)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens: (global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = L.sum()
        return torch.full_like(L, float(dp_size)) / batch_num_tokens
    if loss_agg_mode == "token-sum":
        return torch.full_like(L, float(dp_size))
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size: required when dp_size > 1")
        global_batch_size = live.sum()
    w = live * dp_size / global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":
        return w / (lengths + 1e-8).to(torch.float64)  # verl's token mean: epsilon added in the mask's dtype
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return w / horizon
    return w


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None, *, alpha: float = 1.0,
             delta_l_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """verl's ``agg_loss`` (same arguments and results for its modes) with "delta-l" added."""
    w = agg_weights(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor,
                    alpha=alpha, delta_l_weights=delta_l_weights)
    row_sums = (loss_mat * loss_mask).sum(-1)
    return (w.to(row_sums.dtype) * row_sums).sum()


def _clip_options(config):
    clip_ratio = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    return low, high, config.get("clip_ratio_c", 3.0)


POLICY_LOSSES = ("vanilla", "gspo", "cispo")  # verl's compute_policy_loss_<name>
# verl's policy_loss.loss_mode -> (policy loss, Delta-L aggregation forced)
LOSS_MODES = {"vanilla": ("vanilla", False), "gspo": ("gspo", False), "cispo": ("cispo", False),
              "delta-l": ("vanilla", True), "delta-l-gspo": ("gspo", True), "delta-l-cispo": ("cispo", True)}


def _check_delta_l_horizon(info: dict, max_len=None) -> None:
    """Delta-L's M must be given in remove-padding mode, where the padded width is the micro-batch's longest
    response: verl's engine (``ppo_loss``) always sets ``global_batch_info["loss_scale_factor"]``."""
    if "loss_scale_factor" in info and info["loss_scale_factor"] is None and max_len is None \
            and info.get("delta_l_weights") is None:
        raise ValueError("loss_scale_factor: Delta-L's M (max_len) is required in remove-padding mode (the padded width "
                         "is only the micro-batch's longest response): set actor.loss_scale_factor to the maximum "
                         "response length, or pass the mini-batch's delta_l_weights")


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean",
                        config=None, rollout_is_weights=None, *, alpha: float = 1.0, policy: str = "vanilla"):
    """verl's policy loss ``compute_policy_loss_<policy>`` (vanilla, gspo or cispo), aggregated by ``agg_loss``.

    Same signature and results as verl's for its aggregation modes; ``loss_agg_mode="delta-l"`` uses
    ``config.global_batch_info["delta_l_weights"]`` when present. ``rollout_is_weights`` (verl's rollout
    correction weights) multiply the policy term only, as in verl. Returns (pg_loss, metrics).

    - "vanilla": clip, dual clip ``clip_ratio_c``; the log-ratio clamped to [-20, 20] (as verl);
    - "gspo": GSPO-token, s_i = exp(mean over i's response tokens of (log_prob - old)), the value
      sg(s_i) * exp(log_prob - sg(log_prob)) clipped like vanilla without the dual clip; the log-ratio
      clamped to [-20, 20] (verl clamps it at +10 only: equal whenever it is within [-20, 10]);
    - "cispo": -sg(clamp(r, 1 - clip_ratio_low, 1 + clip_ratio_high)) * A * log_prob (both sides, as verl).
    """
    if config is None:
        raise ValueError("config: the actor config (clip_ratio, clip_ratio_low/high/c, global_batch_info) is required")
    if policy not in POLICY_LOSSES:
        raise ValueError(f"policy: expected one of {POLICY_LOSSES}, got {policy!r}")
    low, high, c = _clip_options(config)
    if policy == "vanilla" and not c > 1.0:
        raise ValueError(f"clip_ratio_c: expected a value > 1, got {c!r}")
    info = dict(config.global_batch_info)
    if loss_agg_mode == "delta-l":
        _check_delta_l_horizon(info)

    def masked_mean(x):  # verl_F.masked_mean, dtypes included
        return (x * response_mask).sum() / (response_mask.sum() + 1e-8)

    negative_approx_kl = log_prob - old_log_prob
    if policy == "gspo":
        seq_lengths = response_mask.sum(-1).clamp(min=1)
        seq = (negative_approx_kl * response_mask).sum(-1) / seq_lengths
        log_ratio = torch.clamp(log_prob - log_prob.detach() + seq.detach().unsqueeze(-1), -20.0, 20.0)
        ppo_kl = masked_mean(-negative_approx_kl)
    else:
        log_ratio = torch.clamp(negative_approx_kl, -20.0, 20.0)
        ppo_kl = masked_mean(-log_ratio)
    ratio = torch.exp(log_ratio)
    clipfrac_lower = 0.0
    if policy == "cispo":
        clipped_ratio = torch.clamp(ratio, 1 - low, 1 + high)
        pg = -clipped_ratio.detach() * advantages * log_prob
        clipfrac = masked_mean((ratio != clipped_ratio).float())
    else:
        pg1 = -advantages * ratio
        pg2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
        pg = torch.maximum(pg1, pg2)
        clipfrac = masked_mean(torch.gt(pg2, pg1).float())
        if policy == "vanilla":
            pg3 = -advantages * c
            clipped = pg
            pg = torch.where(advantages < 0, torch.minimum(pg3, clipped), clipped)
            clipfrac_lower = masked_mean((torch.gt(clipped, pg3) * (advantages < 0).float())).detach().item()
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    pg_loss = agg_loss(pg, response_mask, loss_agg_mode, alpha=alpha, **info)
    metrics = {
        "actor/pg_clipfrac": clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": clipfrac_lower,
    }
    return pg_loss, metrics


def register(alpha: float = 1.0, name: Optional[str] = None, *, policy: str = "vanilla"):
    """Register ``compute_policy_loss(policy=policy)`` with Delta-L aggregation in verl's policy-loss registry.

    ``name`` defaults to "delta-l" (vanilla), "delta-l-gspo" or "delta-l-cispo"; then
    ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>`` selects it. Importing this module registers
    all three with alpha = 1. Raises ImportError without verl. Returns the registered function.
    """
    from verl.trainer.ppo.core_algos import register_policy_loss

    if policy not in POLICY_LOSSES:
        raise ValueError(f"policy: expected one of {POLICY_LOSSES}, got {policy!r}")
    if name is None:
        name = "delta-l" if policy == "vanilla" else f"delta-l-{policy}"

    def delta_l_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="delta-l", config=None,
                            rollout_is_weights=None):
        # the aggregation is Delta-L whatever actor.loss_agg_mode says (verl's config rejects "delta-l" there)
        return compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, "delta-l", config,
                                   rollout_is_weights, alpha=alpha, policy=policy)

    if policy != "vanilla":
        delta_l_policy_loss.__name__ = delta_l_policy_loss.__qualname__ = f"delta_l_{policy}_policy_loss"
    return register_policy_loss(name)(delta_l_policy_loss)


def _fused_rows(config, N: int, data, loss_agg_mode, alpha, arg: str, max_len=None):
    """The micro-batch as dk's rows: (positional args after the logits, keyword options) of policy_loss."""
    loss_mode = config.policy_loss.get("loss_mode", "vanilla") if config.get("policy_loss") is not None else "vanilla"
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"policy_loss.loss_mode: fused_ppo_loss computes {sorted(LOSS_MODES)}, got {loss_mode!r}")
    policy, forced_delta_l = LOSS_MODES[loss_mode]
    if "rollout_is_weights" in data.keys():
        raise ValueError("rollout_is_weights: per-token rollout correction weights are not supported by fused_ppo_loss")
    temperature = data["temperature"]
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 and not bool((temperature == temperature.reshape(-1)[0]).all()):
            raise ValueError("temperature: fused_ppo_loss needs one temperature for the micro-batch")
        temperature = float(temperature.reshape(-1)[0])
    input_ids = data["input_ids"]
    cu = input_ids.offsets().to(torch.int64)
    if N != int(cu[-1]):
        raise ValueError(f"{arg}: expected {int(cu[-1])} rows (the micro-batch's packed tokens), got {N}")
    prompt_lens = data["prompts"].offsets().diff().to(torch.int64)
    padded = data.select("response_mask", "old_log_probs", "advantages",
                         *(["ref_log_prob"] if config.use_kl_loss else [])).to_padded_tensor()
    response_mask = padded["response_mask"].to(torch.bool)
    R = response_mask.shape[1]
    if bool((prompt_lens <= 0).any()):
        raise ValueError("prompts: every sequence needs a prompt token (row t scores token t+1)")

    # row of response token j of sequence i: the one predicting it, cu[i] + prompt_len[i] + j - 1
    j = torch.arange(R, device=cu.device)
    rows = (cu[:-1] + prompt_lens - 1)[:, None] + j[None, :]
    response_lens = data["responses"].offsets().diff().to(torch.int64)
    present = j[None, :] < response_lens[:, None]
    scored_pad = response_mask & present
    scored_rows = rows[scored_pad]
    targets = torch.roll(input_ids.values(), shifts=-1, dims=0)  # verl's input_ids_rmpad_rolled

    def to_rows(x):
        out = torch.zeros(N, dtype=x.dtype, device=x.device)
        return out.index_copy(0, scored_rows, x[scored_pad])

    loss_mask = torch.zeros(N, dtype=torch.bool, device=cu.device)
    loss_mask[scored_rows] = True
    mode = loss_agg_mode or ("delta-l" if forced_delta_l else config.loss_agg_mode)
    delta_l_weights = data["delta_l_weights"] if "delta_l_weights" in data.keys() else None
    horizon = config.loss_scale_factor
    if mode == "delta-l":  # M: max_len, else verl's loss_scale_factor; the padded width is not M here
        _check_delta_l_horizon(dict(loss_scale_factor=horizon, delta_l_weights=delta_l_weights), max_len)
        horizon = max_len if max_len is not None else horizon
    w = agg_weights(response_mask, mode, data["dp_size"], data["batch_num_tokens"], data["global_batch_size"],
                    horizon, alpha=alpha, delta_l_weights=delta_l_weights)
    low, high, c = _clip_options(config)
    objective = dict(dual_clip=c)
    if policy == "gspo":
        objective = dict(ratio_level="sequence", dual_clip=None)
    elif policy == "cispo":
        objective = dict(objective="cispo", dual_clip=None)
    kl = {}
    if config.use_kl_loss:
        if config.kl_loss_type not in KL_TYPES:
            raise ValueError(f"kl_loss_type: expected one of {sorted(KL_TYPES)}, got {config.kl_loss_type!r}")
        kl = dict(ref_logprobs=to_rows(padded["ref_log_prob"]), kl_coef=config.kl_loss_coef,
                  kl_type=KL_TYPES[config.kl_loss_type])
    args = (targets, to_rows(padded["old_log_probs"]), to_rows(padded["advantages"]), cu)
    options = dict(loss_mask=loss_mask, weights=w, clip_low=low, clip_high=high, **objective,
                   entropy_coef=config.entropy_coeff, with_entropy=True, temperature=temperature, **kl)
    return args, options


def _verl_metrics(out):
    from verl.utils.metric import AggregationType, Metric

    # verl's names for the token means it logs (it averages them over micro-batches)
    names = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac_lower": "clipfrac_lower",
             "actor/entropy": "entropy", "actor/kl": "kl"}
    return {name: Metric(AggregationType.MEAN, out.metrics[key]) for name, key in names.items() if key in out.metrics}


def fused_ppo_loss(config, logits_rmpad: torch.Tensor, data, *, loss_agg_mode: Optional[str] = None,
                   alpha: float = 1.0, max_len: Optional[int] = None, backend: str = "auto",
                   vocab_start: Optional[int] = None, vocab_group=None):
    """verl's log-probs + ``ppo_loss`` (vanilla policy loss, entropy bonus, KL loss) as one ``dk.policy_loss``.

    config: verl's ActorConfig (clip ratios, clip_ratio_c, entropy_coeff, use_kl_loss, kl_loss_coef,
    kl_loss_type, loss_agg_mode, loss_scale_factor). logits_rmpad: [total_nnz, V], the model's
    logits for the micro-batch's packed rows (prompt and response of each sequence, no padding),
    before temperature scaling. data: verl's micro-batch TensorDict in no-padding mode (nested
    input_ids/prompts/responses/response_mask/old_log_probs/advantages, ref_log_prob with the KL
    loss; dp_size, batch_num_tokens, global_batch_size, temperature; optional delta_l_weights).
    Returns (loss, metrics) like ppo_loss (metrics as verl ``Metric`` means: pg_clipfrac, ppo_kl,
    pg_clipfrac_lower, entropy, and kl with the KL loss); the loss is differentiable w.r.t. logits_rmpad.

    The policy loss is ``config.policy_loss.loss_mode``'s: "vanilla", "gspo" (dk's ``ratio_level="sequence"``),
    "cispo" (``objective="cispo"``), or this module's "delta-l", "delta-l-gspo", "delta-l-cispo" (the same
    with Delta-L aggregation); ``loss_agg_mode`` overrides the aggregation. Delta-L's M is ``max_len``, else
    ``config.loss_scale_factor``; without either (and without ``delta_l_weights``) it is an error, since
    the micro-batch's padded width is only its longest response.

    Tensor parallelism (verl's Megatron actor, whose LM head is a ``ColumnParallelLinear``): pass this
    rank's vocabulary shard of the logits, all total_nnz rows and the columns [vocab_start, vocab_start +
    V_r), with ``vocab_start = tp_rank * (V // tp)`` for Megatron's equal split (the padded vocabulary V
    divides by tp; any shards that tile [0, V) work) and ``vocab_group =
    mpu.get_tensor_model_parallel_group()``. This replaces verl's ``vocab_parallel_log_probs_from_logits``
    (and ``vocab_parallel_entropy``) + ``ppo_loss``: every rank returns the same loss and metrics, and
    the gradient of this rank's columns (``dk.policy_loss``'s ``vocab_start``/``vocab_group``). Ulysses
    sequence parallelism is not wired here: the rows must be the whole micro-batch.
    """
    args, options = _fused_rows(config, logits_rmpad.shape[0], data, loss_agg_mode, alpha, "logits_rmpad", max_len)
    out = policy_loss(logits_rmpad, *args, backend=backend, vocab_start=vocab_start, vocab_group=vocab_group,
                      **options)
    return out.loss, _verl_metrics(out)


def fused_linear_ppo_loss(config, hidden_rmpad: torch.Tensor, weight: torch.Tensor, data, *, bias=None,
                          loss_agg_mode: Optional[str] = None, alpha: float = 1.0, max_len: Optional[int] = None,
                          backend: str = "auto", chunk_rows: Optional[int] = None,
                          vocab_start: Optional[int] = None, vocab_group=None, reduce_hidden_grad: bool = True):
    """``fused_ppo_loss`` from the last hidden states and the LM-head weight, as verl's ``use_fused_kernels``.

    hidden_rmpad: [total_nnz, H], the backbone's output for the micro-batch's packed rows (what verl's
    fused-kernel path hands ``FusedLinearForPPO``), weight: lm_head.weight [V, H] (and its bias, if
    any): the loss is ``fused_ppo_loss(config, hidden_rmpad @ weight.T + bias, data)`` computed by
    ``dk.linear_policy_loss``, with no [total_nnz, V] logits; differentiable w.r.t. hidden_rmpad,
    weight and bias. The engine patch is the ``fused_ppo_loss`` one with the backbone's output and
    ``lm_head.weight`` in place of the logits (verl's ``use_fused_kernels`` forward already returns
    the hidden states and skips the LM head).

    Tensor parallelism (Megatron): ``weight`` [V_r, H] and ``bias`` are this rank's rows of the
    column-parallel head (``output_layer.weight`` on this rank), ``vocab_start = tp_rank * (V // tp)``,
    ``vocab_group = mpu.get_tensor_model_parallel_group()``; hidden_rmpad is the same on every rank. The
    weight's and bias's gradients are this rank's rows; hidden's gradient is summed over the group by
    the op (``reduce_hidden_grad=True``), or left as this rank's part with ``reduce_hidden_grad=False``
    when hidden already went through Megatron's ``copy_to_tensor_model_parallel_region`` (whose backward
    all-reduces it, as ``ColumnParallelLinear``'s forward does).
    """
    args, options = _fused_rows(config, hidden_rmpad.shape[0], data, loss_agg_mode, alpha, "hidden_rmpad", max_len)
    out = linear_policy_loss(hidden_rmpad, weight, *args, bias=bias, backend=backend, chunk_rows=chunk_rows,
                             vocab_start=vocab_start, vocab_group=vocab_group, reduce_hidden_grad=reduce_hidden_grad,
                             **options)
    return out.loss, _verl_metrics(out)


try:  # with verl importable, loss_mode="delta-l" is there as soon as this module is imported
    import verl.trainer.ppo.core_algos  # noqa: F401
except ImportError:  # no verl: agg_loss, agg_weights and compute_policy_loss still work
    pass
else:
    for _policy in POLICY_LOSSES:  # "delta-l", "delta-l-gspo", "delta-l-cispo", alpha = 1; register(...) replaces one
        register(policy=_policy)
