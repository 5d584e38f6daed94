"""TRL: a GRPOTrainer whose loss is one ``dk.policy_loss`` call on the packed completion logits.

    from deltal_kernels.integrations.trl import DeltaLGRPOConfig, DeltaLGRPOTrainer

    args = DeltaLGRPOConfig(output_dir="out", loss_type="delta-l", delta_l_alpha=1.0,
                            max_completion_length=1024)
    trainer = DeltaLGRPOTrainer(model, reward_funcs=reward, args=args, train_dataset=dataset)

The policy's logits of the completion positions are packed (no padding) with ``dk.packing`` and
the clipped objective, the k3 KL term (``beta``), the entropy and the aggregation all come from one
``dk.policy_loss`` call; TRL's generation, rewards, advantages and logging are untouched.

``loss_type`` and how each maps to a ``dk`` aggregation (``weights=`` per sequence, DDP mean over
ranks and TRL's gradient accumulation accounted for):

- ``"delta-l"``: Delta-L weights L_i^-alpha / (M sum_j L_j^-alpha) with M = max_completion_length,
  computed once per generation batch over every process's completions (``dk.sequence_weights``
  with the world group), so the optimizer step's gradient is the Delta-L gradient of the whole batch.
- ``"dapo"``: TRL's normaliser (active tokens of the whole generation batch, all processes) is our
  global ``token-mean``; identical.
- ``"cispo"``: ``objective="cispo"`` with TRL's cap: TRL weighs -A_t * logp_t by
  sg(min(r_t, epsilon_high)), which is ours with ``clip_low=1`` (no lower bound) and
  ``clip_high=epsilon_high - 1`` (so ``epsilon_high >= 1`` is required: TRL's default
  ``epsilon_high=None`` falls back to ``epsilon``, a cap below 1 that dk's clip cannot express);
  TRL's normaliser is dapo's (token mean over the generation batch), and so is ours. ``delta`` is
  ignored, as TRL ignores it for cispo.
- ``"grpo"``: TRL's per-micro-batch mean over completions of the per-completion token mean; our
  ``seq-mean-token-mean`` over the optimizer batch when no completion is fully masked (TRL counts
  a fully masked completion, e.g. one dropped by ``mask_truncated_completions``, in the mean; so
  does this trainer, to stay equal to TRL).
- ``"dr_grpo"``: TRL's sum / (micro-batch size * max_completion_length); our
  ``seq-mean-token-sum-norm`` with the same caveat.
- ``"bnpo"``: TRL's token mean over each micro-batch: a local normaliser, no global equivalent.

The other options of the objective (``dk.policy_loss``'s ``ratio_level``, ``objective`` and
``rollout_*``, for every loss type above, on both the fused and the logits path):

- ``importance_sampling_level="sequence"`` (GSPO): ``ratio_level="sequence"``. TRL's sequence-level
  ratio exp(mean_t(logp - old)) is one value per completion; dk's GSPO-token form has that value on
  every token and the same gradient, so loss and gradients equal TRL's for every loss type (with
  ``grpo`` it is GSPO exactly; TRL warns that the token-sum types weigh each sequence by its length).
- ``use_vllm`` with ``vllm_importance_sampling_correction`` (TRL's default when vLLM generates):
  ``rollout_logprobs`` = the batch's ``sampling_per_token_logps`` (the sampler's log-probs that TRL
  stores at generation), ``rollout_correction = vllm_importance_sampling_mode`` (the same four
  names: ``token_truncate``, ``token_mask``, ``sequence_truncate``, ``sequence_mask``) and
  ``rollout_clip = (vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max)``.
  dk recomputes TRL's ``importance_sampling_ratio`` in the loss from the same old and sampling
  log-probs (exp of their difference, or of its sum over the completion, clamped or zeroed outside
  the bounds, a NaN sampling log-prob counting as no correction) and multiplies the policy term
  only, as TRL does; dk clamps the exponent to [-20, 20] first (TRL does not), equal whenever the
  log-ratio is within that. At least one of the two bounds is required (TRL's mask modes accept
  none and then apply the unbounded ratio, which dk does not).

Differences from TRL's own loss, by construction:

- the per-token ratio is exp(clamp(logp - old, -20, 20)) and the k3 KL is clamped as in SPEC
  section 1 (TRL clamps neither); equal whenever |logp - old| < 20 and k3 < 10;
- ``delta`` (INTELLECT-2 two-sided clipping) is ``dual_clip``: the same objective when
  delta > 1 + epsilon_high, which this trainer requires (except with cispo, which ignores it);
- ``entropy_coef`` enters l_t and is weighted like the policy term (SPEC section 1); TRL adds a
  token-mean entropy bonus instead (and logs "policy_loss" and "entropy_coef", which this trainer
  does not). Adaptive entropy control is not supported;
- not supported (a clear error at construction): the other loss types (``sapo``, ``luspo``,
  ``vespo``), ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``, ``use_bias_correction_kl``
  with ``beta != 0``, vLLM importance-sampling correction without a bound, MoE auxiliary loss,
  image inputs.

Memory: by default (``dk_fused_lm_head=True``) the loss is computed from the model's last hidden
state and its ``lm_head`` with ``dk.linear_policy_loss``: no [B, K, V] or [N, V] logits, only one
chunk of scored rows at a time (the model is called with ``logits_to_keep=1`` and
``output_hidden_states=True``). It is used when the model exposes a plain ``nn.Linear`` output
embedding, has no logit soft-capping or logit scale, and its last hidden state reproduces its own
logits (checked on the first call, on the one position the model still projects); otherwise, or
with ``dk_fused_lm_head=False``, the padded completion logits [B, K, V] are materialised and
``dk.policy_loss`` runs on their packed copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..aggregation import sequence_weights
from ..linear import linear_policy_loss
from ..loss import policy_loss
from ..packing import pack, unpack

LOSS_TYPES = ("delta-l", "dapo", "grpo", "dr_grpo", "bnpo", "cispo")
ROLLOUT_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL's = dk's names


@dataclass
class DeltaLGRPOConfig(GRPOConfig):
    """``GRPOConfig`` with ``loss_type="delta-l"`` by default and Delta-L's alpha.

    Delta-L's M (``max_len``) is ``max_completion_length``. ``use_bias_correction_kl`` defaults to
    False here (dk's KL term is k3 alone; TRL's default multiplies it by the ratio).
    """

    loss_type: str = field(default="delta-l", metadata={
        "help": "'delta-l' (Delta-L, weights over the whole generation batch), or one of TRL's 'dapo', 'grpo', "
                "'dr_grpo', 'bnpo', 'cispo' computed by deltal_kernels."})
    delta_l_alpha: float = field(default=1.0, metadata={
        "help": "Delta-L's alpha in [0, 1]: 1 is the minimum-variance unbiased choice, 0 gives Dr. GRPO."})
    use_bias_correction_kl: bool = field(default=False, metadata={
        "help": "Not supported with beta != 0 (the KL term is k3 alone)."})
    dk_backend: str = field(default="auto", metadata={"help": "deltal_kernels backend for policy_loss."})
    dk_fused_lm_head: bool = field(default=True, metadata={
        "help": "Compute the loss from the last hidden state and lm_head (dk.linear_policy_loss, no logits) when "
                "the model allows it; False materialises the completion logits."})


def _vllm_correction(obj) -> bool:
    """Does ``obj`` (a GRPOConfig or a GRPOTrainer) correct for the vLLM sampler's log-probs?"""
    return bool(getattr(obj, "use_vllm", False) and getattr(obj, "vllm_importance_sampling_correction", False))


def check_supported(args) -> None:
    """Raise a ValueError naming the option when ``args`` asks for something this trainer does not compute."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {args.loss_type!r} "
                         "(DeltaLGRPOTrainer does not compute TRL's other loss types)")
    alpha = getattr(args, "delta_l_alpha", 1.0)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"delta_l_alpha: expected a number in [0, 1], got {alpha!r}")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level: expected 'token' or 'sequence', got "
                         f"{args.importance_sampling_level!r}")
    unsupported = {
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "use_adaptive_entropy": args.use_adaptive_entropy,
        "use_bias_correction_kl": args.beta != 0.0 and args.use_bias_correction_kl,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{name}: {getattr(args, name)!r} is not supported by DeltaLGRPOTrainer "
                             "(see deltal_kernels.integrations.trl)")
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type == "cispo":
        if not epsilon_high >= 1.0:
            raise ValueError(f"epsilon_high: loss_type='cispo' caps the ratio at epsilon_high, which "
                             f"DeltaLGRPOTrainer needs >= 1 (dk's clip_high = epsilon_high - 1), got {epsilon_high!r} "
                             "(epsilon_high=None falls back to epsilon; CISPO/ScaleRL use e.g. 4 or 5)")
    elif args.delta is not None and not args.delta > 1.0 + epsilon_high:
        raise ValueError(f"delta: expected a value > 1 + epsilon_high = {1.0 + epsilon_high}, got {args.delta!r}")
    if _vllm_correction(args):
        mode = args.vllm_importance_sampling_mode
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"vllm_importance_sampling_mode: expected one of {ROLLOUT_MODES}, got {mode!r}")
        lo, hi = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
        for name, bound in (("vllm_importance_sampling_clip_min", lo), ("vllm_importance_sampling_clip_max", hi)):
            if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound >= 0):
                raise ValueError(f"{name}: expected None or a finite number >= 0, got {bound!r}")
        if lo is None and hi is None:
            raise ValueError("vllm_importance_sampling_clip_max: DeltaLGRPOTrainer needs at least one of "
                             "vllm_importance_sampling_clip_min/max with vllm_importance_sampling_correction "
                             "(dk has no unbounded importance weight, which TRL's mask modes apply without bounds)")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"vllm_importance_sampling_clip_min: {lo!r} exceeds vllm_importance_sampling_clip_max "
                             f"{hi!r}")


class DeltaLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` computing the loss with ``dk.policy_loss``; see the module docstring."""

    def __init__(self, model, reward_funcs=None, args=None, **kwargs):
        if args is not None:
            check_supported(args)  # before the model is loaded
        super().__init__(model, reward_funcs, args, **kwargs)
        check_supported(self.args)
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE auxiliary loss is not supported by DeltaLGRPOTrainer")
        self.delta_l_alpha = getattr(self.args, "delta_l_alpha", 1.0)
        self.dk_backend = getattr(self.args, "dk_backend", "auto")
        self.dk_fused_lm_head = getattr(self.args, "dk_fused_lm_head", True)
        self._dk_head_checked = None  # None: not yet checked on a forward; then True/False

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.loss_type == "delta-l":
            # once per generation batch, over every process's completions (DDP averages the gradients)
            lengths = _scored_mask(output).sum(1)
            group = dist.group.WORLD if self.accelerator.num_processes > 1 else None
            output["delta_l_weights"] = sequence_weights(lengths, "delta-l", alpha=self.delta_l_alpha,
                                                         max_len=self.max_completion_length, group=group,
                                                         dtype=torch.float64)
        return output

    def _sequence_weights(self, inputs, lengths: torch.Tensor, mode: str) -> torch.Tensor:
        """[B] float64 w_i of this micro-batch's completions, with TRL's accumulation and DDP normalisation."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        B = lengths.numel()
        L = lengths.to(torch.float64)
        ones = torch.ones_like(L)
        if self.loss_type == "delta-l":
            # the weights sum the generation batch's loss; an optimizer step covers
            # accumulation / steps_per_generation of it
            scale = self.args.steps_per_generation / accumulation if mode == "train" else 1.0
            w = inputs["delta_l_weights"].to(torch.float64) * scale
        elif self.loss_type in ("dapo", "cispo"):  # TRL: the same normaliser
            normalizer = inputs["num_items_in_batch"].to(torch.float64).clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            w = ones / normalizer
        elif self.loss_type == "grpo":
            w = 1.0 / (B * L.clamp(min=1.0) * accumulation)
        elif self.loss_type == "dr_grpo":
            w = ones / (B * self.max_completion_length * accumulation)
        else:  # bnpo
            w = ones / (L.sum().clamp(min=1.0) * accumulation)
        return w  # float64: policy_loss takes it to the logits' compute dtype

    def _compute_loss(self, model, inputs):
        if "pixel_values" in inputs:
            raise ValueError("pixel_values: image inputs are not supported by DeltaLGRPOTrainer")
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        K = completion_ids.size(1)
        scored = _scored_mask(inputs).bool()

        ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([prompt_mask, completion_mask], 1)
        advantages = inputs["advantages"]
        advantages_trl = advantages[:, None] if advantages.dim() == 1 else advantages  # TRL's shape, for metrics
        advantages = advantages_trl.expand_as(scored)
        weights = self._sequence_weights(inputs, scored.sum(1), mode)
        opts = dict(temperature=self.temperature, backend=self.dk_backend)

        def packed(x):
            return pack(x, scored).values

        objective = self._dk_objective(inputs, packed)

        targets = packed(completion_ids)
        head = self._dk_lm_head(model)
        if head is not None:
            # the last hidden state and lm_head: no logits beyond the one position the model still projects
            with self.accelerator.autocast():
                outputs = model(input_ids=ids, attention_mask=attention, logits_to_keep=1, use_cache=False,
                                output_hidden_states=True)
            last = outputs.hidden_states[-1]
            head = self._dk_check_head(head, last[:, -1], outputs.logits[:, -1])
        if head is not None:
            rows, cu_seqlens = pack(last[:, -(K + 1):-1], scored)
            weight, bias = head.weight, head.bias
            if torch.is_autocast_enabled(rows.device.type):  # the dtype autocast would run lm_head in
                dtype = torch.get_autocast_dtype(rows.device.type)
            else:
                dtype = torch.promote_types(rows.dtype, weight.dtype)
            rows, weight = rows.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)

            def loss_call(old, adv, w, **kw):
                return linear_policy_loss(rows, weight, targets, old, adv, cu_seqlens, bias=bias, weights=w, **kw)
        else:
            # the model's own (unfused) forward; position j of the last K+1 predicts token j+1
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=K + 1,
                               use_cache=False).logits[:, :-1]
            rows, cu_seqlens = pack(logits, scored)

            def loss_call(old, adv, w, **kw):
                return policy_loss(rows, targets, old, adv, cu_seqlens, weights=w, **kw)

        weights = weights.to(rows.device)
        if "old_per_token_logps" in inputs:
            old = packed(inputs["old_per_token_logps"])
        else:  # on-policy, as in TRL: the old log-probs are the current ones (the same computation), detached
            with torch.no_grad():
                zeros = weights.new_zeros(weights.shape)
                old = loss_call(torch.zeros_like(targets, dtype=torch.float32), zeros, zeros, **opts).logprobs
        ref = packed(inputs["ref_per_token_logps"]) if self.beta != 0.0 else None
        out = loss_call(old, packed(advantages), weights, ref_logprobs=ref, kl_coef=self.beta, kl_type="k3",
                        entropy_coef=self.entropy_coef, with_entropy=True, **objective, **opts)
        self._log_like_trl(mode, scored, advantages_trl, unpack(out.logprobs, scored), unpack(old, scored),
                           unpack(out.entropy, scored), None if ref is None else unpack(ref, scored))
        return out.loss

    def _dk_objective(self, inputs, packed) -> dict:
        """dk.policy_loss's objective options from TRL's (see the module docstring)."""
        cispo = self.loss_type == "cispo"
        options = dict(ratio_level=self.importance_sampling_level, objective="cispo" if cispo else "ppo",
                       # TRL's cispo: sg(min(r, epsilon_high)) = sg(clamp(r, 1 - 1, 1 + (epsilon_high - 1)))
                       clip_low=1.0 if cispo else self.epsilon_low,
                       clip_high=self.epsilon_high - 1.0 if cispo else self.epsilon_high,
                       dual_clip=None if cispo else self.args.delta)
        if _vllm_correction(self):
            if inputs.get("sampling_per_token_logps") is None:
                raise ValueError("sampling_per_token_logps: vllm_importance_sampling_correction needs the sampler's "
                                 "log-probs in the batch (TRL stores them when vLLM generates)")
            options.update(rollout_logprobs=packed(inputs["sampling_per_token_logps"]),
                           rollout_correction=self.vllm_importance_sampling_mode,
                           rollout_clip=(self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max))
        return options

    def _dk_lm_head(self, model):
        """The model's lm_head when the fused path can replace its logits, else None (see the module docstring)."""
        if not self.dk_fused_lm_head or self._dk_head_checked is False:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        if getattr(self.accelerator, "is_fsdp2", False) or type(unwrapped).__name__.startswith("FullyShardedData"):
            return None  # sharded parameters: lm_head.weight is not the whole matrix outside the forward
        get = getattr(unwrapped, "get_output_embeddings", None)
        head = get() if get is not None else None
        if type(head) is not torch.nn.Linear:
            return None
        config = unwrapped.config.get_text_config() if hasattr(unwrapped.config, "get_text_config") else unwrapped.config
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                return None  # the model changes its logits after lm_head
        return head

    def _dk_check_head(self, head, last_hidden, logits):
        """On the first call: does lm_head(last hidden state) give the model's logits? Else never fuse."""
        if self._dk_head_checked is None:
            with torch.no_grad():
                mine = head(last_hidden.to(head.weight.dtype)).to(torch.float32)
                theirs = logits.to(torch.float32)
                scale = float(theirs.abs().max()) if theirs.numel() else 0.0
                tol = 1e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-5
                self._dk_head_checked = bool(((mine - theirs).abs() <= tol * (1.0 + scale)).all())
            if not self._dk_head_checked:
                import warnings

                warnings.warn("dk_fused_lm_head: lm_head(last hidden state) does not reproduce this model's logits; "
                              "DeltaLGRPOTrainer materialises the logits instead", stacklevel=2)
        return head if self._dk_head_checked else None

    def _log_like_trl(self, mode, mask, advantages, logps, old, entropies, ref):
        """TRL's metrics (entropy, kl, clip_ratio/* or cispo_clip_ratio), computed as GRPOTrainer._compute_loss
        does: with importance_sampling_level="sequence" the ratio and its clip flags are one value per completion.
        ``advantages`` in TRL's shape ([B, 1] or [B, K])."""
        mask = mask.to(logps.dtype)

        def masked_seq_mean(x):
            if x.shape[1] == 1:  # one value per completion
                return x.squeeze(1)
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # one value per completion: every completion counts once
                local = torch.stack([x.sum(), x.new_tensor(float(x.shape[0]))])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if ref is not None:
            metrics["kl"].append(global_masked_mean(torch.exp(ref - logps) - (ref - logps) - 1))
        metrics["entropy"].append(global_masked_mean(entropies))
        log_ratio = logps - old
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
        coef_1 = torch.exp(log_ratio)
        if self.loss_type == "cispo":
            is_clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).to(logps.dtype)
            metrics["cispo_clip_ratio"].append(global_masked_mean(is_clipped))
            return
        is_low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).to(logps.dtype)
        is_high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).to(logps.dtype)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(is_low, is_high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(is_low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(is_high))).item())


def _scored_mask(batch) -> torch.Tensor:
    """TRL's loss mask: the completion mask, times the tool mask in multi-turn tool use."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if batch.get("tool_mask") is not None else mask
