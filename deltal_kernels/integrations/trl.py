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
- ``"grpo"``: TRL's per-micro-batch mean over completions of the per-completion token mean; our
  ``seq-mean-token-mean`` over the optimizer batch when no completion is fully masked (TRL counts
  a fully masked completion, e.g. one dropped by ``mask_truncated_completions``, in the mean; so
  does this trainer, to stay equal to TRL).
- ``"dr_grpo"``: TRL's sum / (micro-batch size * max_completion_length); our
  ``seq-mean-token-sum-norm`` with the same caveat.
- ``"bnpo"``: TRL's token mean over each micro-batch: a local normaliser, no global equivalent.

Differences from TRL's own loss, by construction:

- the per-token ratio is exp(clamp(logp - old, -20, 20)) and the k3 KL is clamped as in SPEC
  section 1 (TRL clamps neither); equal whenever |logp - old| < 20 and k3 < 10;
- ``delta`` (INTELLECT-2 two-sided clipping) is ``dual_clip``: the same objective when
  delta > 1 + epsilon_high, which this trainer requires;
- ``entropy_coef`` enters l_t and is weighted like the policy term (SPEC section 1); TRL adds a
  token-mean entropy bonus instead (and logs "policy_loss" and "entropy_coef", which this trainer
  does not). Adaptive entropy control is not supported;
- not supported (a clear error at construction): other loss types, sequence-level importance
  sampling, ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``, vLLM importance-sampling
  correction, ``use_bias_correction_kl`` with ``beta != 0``, MoE auxiliary loss, image inputs.

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

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..aggregation import sequence_weights
from ..linear import linear_policy_loss
from ..loss import policy_loss
from ..packing import pack, unpack

LOSS_TYPES = ("delta-l", "dapo", "grpo", "dr_grpo", "bnpo")


@dataclass
class DeltaLGRPOConfig(GRPOConfig):
    """``GRPOConfig`` with ``loss_type="delta-l"`` by default and Delta-L's alpha.

    Delta-L's M (``max_len``) is ``max_completion_length``. ``use_bias_correction_kl`` defaults to
    False here (dk's KL term is k3 alone; TRL's default multiplies it by the ratio).
    """

    loss_type: str = field(default="delta-l", metadata={
        "help": "'delta-l' (Delta-L, weights over the whole generation batch), or one of TRL's 'dapo', 'grpo', "
                "'dr_grpo', 'bnpo' computed by deltal_kernels."})
    delta_l_alpha: float = field(default=1.0, metadata={
        "help": "Delta-L's alpha in [0, 1]: 1 is the minimum-variance unbiased choice, 0 gives Dr. GRPO."})
    use_bias_correction_kl: bool = field(default=False, metadata={
        "help": "Not supported with beta != 0 (the KL term is k3 alone)."})
    dk_backend: str = field(default="auto", metadata={"help": "deltal_kernels backend for policy_loss."})
    dk_fused_lm_head: bool = field(default=True, metadata={
        "help": "Compute the loss from the last hidden state and lm_head (dk.linear_policy_loss, no logits) when "
                "the model allows it; False materialises the completion logits."})


def check_supported(args) -> None:
    """Raise a ValueError naming the option when ``args`` asks for something this trainer does not compute."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {args.loss_type!r}")
    alpha = getattr(args, "delta_l_alpha", 1.0)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"delta_l_alpha: expected a number in [0, 1], got {alpha!r}")
    unsupported = {
        "importance_sampling_level": args.importance_sampling_level != "token",
        "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
        "top_entropy_quantile": args.top_entropy_quantile < 1.0,
        "use_adaptive_entropy": args.use_adaptive_entropy,
        "vllm_importance_sampling_correction": args.use_vllm and args.vllm_importance_sampling_correction,
        "use_bias_correction_kl": args.beta != 0.0 and args.use_bias_correction_kl,
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{name}: {getattr(args, name)!r} is not supported by DeltaLGRPOTrainer "
                             "(see deltal_kernels.integrations.trl)")
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and not args.delta > 1.0 + epsilon_high:
        raise ValueError(f"delta: expected a value > 1 + epsilon_high = {1.0 + epsilon_high}, got {args.delta!r}")


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
        elif self.loss_type == "dapo":
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
        advantages = advantages[:, None].expand_as(scored) if advantages.dim() == 1 else advantages
        weights = self._sequence_weights(inputs, scored.sum(1), mode)
        opts = dict(clip_low=self.epsilon_low, clip_high=self.epsilon_high, dual_clip=self.args.delta,
                    temperature=self.temperature, backend=self.dk_backend)

        def packed(x):
            return pack(x, scored).values

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
                        entropy_coef=self.entropy_coef, with_entropy=True, **opts)
        self._log_like_trl(mode, scored, advantages, unpack(out.logprobs, scored), unpack(old, scored),
                           unpack(out.entropy, scored), None if ref is None else unpack(ref, scored))
        return out.loss

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
        """TRL's metrics (entropy, kl, clip_ratio/*), computed as GRPOTrainer._compute_loss does."""
        mask = mask.to(logps.dtype)

        def masked_seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        metrics = self._metrics[mode]
        if ref is not None:
            metrics["kl"].append(global_masked_mean(torch.exp(ref - logps) - (ref - logps) - 1))
        metrics["entropy"].append(global_masked_mean(entropies))
        coef_1 = torch.exp(logps - old)
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
