"""README, "Use it in your trainer", TRL: run by tests/test_integrations_trl.py::test_readme_trl_snippet."""
from deltal_kernels.integrations.trl import DeltaLGRPOConfig, DeltaLGRPOTrainer


def train(model, reward_fn, dataset, max_len, **config):
    args = DeltaLGRPOConfig(loss_type="delta-l", delta_l_alpha=1.0,  # the paper: 1 (CountDown), 0.75 (math)
                            max_completion_length=max_len, **config)  # Delta-L's M
    trainer = DeltaLGRPOTrainer(model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()  # TRL's loop, generation and logging; the loss is one dk.policy_loss call
    return trainer
