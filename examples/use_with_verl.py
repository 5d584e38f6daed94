"""README, "Use it in your trainer", verl: run by tests/test_integrations_verl.py::test_readme_verl_snippet."""
import deltal_kernels as dk
from deltal_kernels.integrations import verl as dk_verl

# the policy loss, by name: actor_rollout_ref.actor.policy_loss.loss_mode=delta-l
dk_verl.register(alpha=1.0)


def mini_batch_weights(response_mask, max_response_length, dp_group=None):
    """Delta-L's weights over the whole mini-batch on every rank: once, before verl's micro-batching."""
    return dk.sequence_weights(response_mask.sum(-1), "delta-l", alpha=1.0, max_len=max_response_length,
                               group=dp_group)


def actor_loss(actor_config, logits_rmpad, micro_batch):
    """The fused actor: verl's log-probs + ppo_loss as one dk.policy_loss on the remove-padding rows."""
    return dk_verl.fused_ppo_loss(actor_config, logits_rmpad, micro_batch, loss_agg_mode="delta-l")
