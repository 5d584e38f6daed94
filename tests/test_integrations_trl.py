"""TRL integration: DeltaLGRPOTrainer's loss and gradients against TRL's own GRPOTrainer.

A tiny randomly initialised Llama built from a config and a word-level tokenizer built locally (no
downloads). Both trainers get the same model weights and the same batch; the loss and every
parameter gradient must agree, for each of TRL's loss types we compute, with and without the KL
term. Delta-L is checked through TRL's own dr_grpo code (the clipped objective is positively
homogeneous in the advantage, so Delta-L equals dr_grpo with rescaled advantages), and by two real
optimizer steps with generation on CPU.
"""
import contextlib
import copy
import os

import pytest

pytest.importorskip("trl", reason="trl is not installed (requirements/dev.txt)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from cases import load_example  # noqa: E402
from deltal_kernels.integrations.trl import DeltaLGRPOConfig, DeltaLGRPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
K = 6  # max_completion_length
GA = 2  # gradient accumulation steps (TRL's normalisers divide by it)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny causal LM and its tokenizer, saved locally (the KL reference model is loaded from here)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def dataset():
    return Dataset.from_dict({"prompt": ["a b c", "d e", "f g h i", "j k"]})


def reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def common_args(tmp_path, **kw):
    opts = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=K,
                gradient_accumulation_steps=GA, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False, seed=0)
    opts.update(kw)
    return opts


def make_pair(model_dir, tmp_path, beta):
    """TRL's trainer and ours on identical float64 copies of the tiny model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = LlamaForCausalLM.from_pretrained(model_dir).double()
    trl_trainer = GRPOTrainer(copy.deepcopy(base), reward_funcs=reward_len, train_dataset=dataset(),
                              processing_class=tokenizer, args=GRPOConfig(**common_args(tmp_path / "trl", beta=beta)))
    ours = DeltaLGRPOTrainer(copy.deepcopy(base), reward_funcs=reward_len, train_dataset=dataset(),
                             processing_class=tokenizer,
                             args=DeltaLGRPOConfig(**common_args(tmp_path / "dk", beta=beta, dk_backend="torch")))
    for t in (trl_trainer, ours):
        t.model.train()  # train-mode normalisers (gradient accumulation)
        t.current_gradient_accumulation_steps = GA  # set by the training loop, which these calls bypass
    return trl_trainer, ours


def micro_batch(model, seed, *, with_old=True, with_ref=True):
    """One micro-batch in TRL's layout: left-padded prompts, right-padded ragged completions."""
    gen = torch.Generator().manual_seed(seed)
    B, P = 4, 3
    prompt_ids = torch.randint(3, len(WORDS), (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.int64)
    prompt_mask[1, 0] = prompt_mask[3, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, len(WORDS), (B, K), generator=gen)
    lengths = torch.tensor([6, 2, 4, 1])
    completion_mask = (torch.arange(K)[None, :] < lengths[:, None]).to(torch.int64)
    completion_ids[completion_mask == 0] = 0
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=gen, dtype=torch.float64),
                  # dapo's normaliser: active tokens of the whole generation batch (two micro-batches here)
                  num_items_in_batch=torch.tensor(2.0 * float(lengths.sum())))
    with torch.no_grad():  # the current log-probs, to place old/ref log-probs around them
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits[:, P - 1:-1]
        logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    if with_old:  # far enough from the current policy for both clip sides to act
        inputs["old_per_token_logps"] = logp + 0.6 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    if with_ref:
        inputs["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    return inputs


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected):
    # TRL computes its log-probs in float32 (trl/kernels/chunked_logprob.py) even for this float64
    # model, while dk runs in float64 here: the difference is TRL's float32 rounding, a few ulps (2^-23)
    tol = 1e-6
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=0)
    assert got[1].keys() == expected[1].keys() and len(expected[1]) > 0
    for name, g in expected[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=tol, atol=tol * g.abs().max().item(), msg=name)


@pytest.fixture(scope="module", params=[0.0, 0.05], ids=["beta0", "beta0.05"])
def pair(request, model_dir, tmp_path_factory):
    return make_pair(model_dir, tmp_path_factory.mktemp("runs"), request.param)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("with_old", [True, False], ids=["off-policy", "on-policy"])
def test_loss_and_gradients_equal_trl(pair, loss_type, with_old):
    trl_trainer, ours = pair
    trl_trainer.loss_type = ours.loss_type = loss_type
    trl_trainer.args.delta = ours.args.delta = None
    inputs = micro_batch(trl_trainer.model, seed=15, with_old=with_old, with_ref=trl_trainer.beta != 0)
    expected = loss_and_grads(trl_trainer, inputs)
    got = loss_and_grads(ours, inputs)
    assert_same(got, expected)

    # TRL's logging is kept: the same metrics, same values
    names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "clip_ratio/low_min", "clip_ratio/high_max"] + (["kl"] if trl_trainer.beta != 0 else [])
    for name in names:
        expected = trl_trainer._metrics["train"][name][-1]
        assert ours._metrics["train"][name][-1] == pytest.approx(expected, rel=1e-6), name
    if with_old:  # the batch exercises clipping on both sides
        assert trl_trainer._metrics["train"]["clip_ratio/low_mean"][-1] > 0
        assert trl_trainer._metrics["train"]["clip_ratio/high_mean"][-1] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_sided_clipping_delta_equals_trl(pair, loss_type):
    """TRL's ``delta`` (INTELLECT-2) is dk's dual clip when delta > 1 + epsilon_high."""
    trl_trainer, ours = pair
    trl_trainer.loss_type = ours.loss_type = loss_type
    inputs = micro_batch(trl_trainer.model, seed=15, with_ref=trl_trainer.beta != 0)
    trl_trainer.args.delta = ours.args.delta = None
    without = loss_and_grads(trl_trainer, inputs)
    trl_trainer.args.delta = ours.args.delta = 1.5
    try:
        expected = loss_and_grads(trl_trainer, inputs)
        got = loss_and_grads(ours, inputs)
    finally:
        trl_trainer.args.delta = ours.args.delta = None
    assert abs(expected[0] - without[0]) > 1e-4 * abs(without[0])  # delta changes the loss on this batch
    assert_same(got, expected)


class objective_of(object):
    """Set TRL options on both trainers of the (module-scoped) pair for one test, and put them back."""

    def __init__(self, trainers, **attributes):
        self.trainers, self.attributes = trainers, attributes

    def __enter__(self):
        self.saved = [{k: getattr(t, k) for k in self.attributes} for t in self.trainers]
        for t in self.trainers:
            for k, v in self.attributes.items():
                setattr(t, k, v)

    def __exit__(self, *exc):
        for t, saved in zip(self.trainers, self.saved):
            for k, v in saved.items():
                setattr(t, k, v)


OBJECTIVES = [  # (loss_type, importance_sampling_level, epsilon_high)
    ("grpo", "sequence", 0.28),  # GSPO as its paper runs it
    ("dapo", "sequence", 0.28),
    ("dr_grpo", "sequence", 0.28),
    ("cispo", "token", 1.3),  # TRL caps the ratio at epsilon_high (CISPO's epsilon_max)
    ("cispo", "sequence", 1.3),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
@pytest.mark.parametrize("with_old", [True, False], ids=["off-policy", "on-policy"])
@pytest.mark.parametrize("loss_type,level,epsilon_high", OBJECTIVES, ids=[f"{a}-{b}" for a, b, _ in OBJECTIVES])
def test_gspo_and_cispo_equal_trl(pair, loss_type, level, epsilon_high, with_old, fused):
    """importance_sampling_level="sequence" (dk's ratio_level="sequence") and loss_type="cispo" (dk's
    objective="cispo", clip_low=1, clip_high=epsilon_high - 1): loss, every gradient and TRL's metrics."""
    trl_trainer, ours = pair
    with objective_of((trl_trainer, ours), loss_type=loss_type, importance_sampling_level=level,
                      epsilon_high=epsilon_high), objective_of((ours,), dk_fused_lm_head=fused):
        inputs = micro_batch(trl_trainer.model, seed=24, with_old=with_old, with_ref=trl_trainer.beta != 0)
        expected = loss_and_grads(trl_trainer, inputs)
        got = loss_and_grads(ours, inputs)
        if fused:  # the fused path ran (the head reproduces the model's logits)
            assert ours._dk_head_checked is True
    assert_same(got, expected)
    if loss_type == "cispo":
        names = ["cispo_clip_ratio"]
    else:
        names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                 "clip_ratio/high_max"]
    names += ["entropy"] + (["kl"] if trl_trainer.beta != 0 else [])
    for name in names:
        assert ours._metrics["train"][name][-1] == pytest.approx(trl_trainer._metrics["train"][name][-1], rel=1e-6), name
    if with_old:  # the batch exercises the clip (one side at least; CISPO's cap)
        clipped = trl_trainer._metrics["train"]["cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/region_mean"]
        assert clipped[-1] > 0


def test_cispo_is_not_ppo_and_sequence_is_not_token(pair):
    """The options change the loss on this batch (the parity above is not a parity of the default objective)."""
    _, ours = pair
    inputs = micro_batch(ours.model, seed=17, with_ref=ours.beta != 0)
    with objective_of((ours,), loss_type="dapo", importance_sampling_level="token", epsilon_high=1.3):
        token = loss_and_grads(ours, inputs)[0]
    with objective_of((ours,), loss_type="dapo", importance_sampling_level="sequence", epsilon_high=1.3):
        sequence = loss_and_grads(ours, inputs)[0]
    with objective_of((ours,), loss_type="cispo", importance_sampling_level="token", epsilon_high=1.3):
        cispo = loss_and_grads(ours, inputs)[0]
    assert abs(sequence - token) > 1e-3 * abs(token) and abs(cispo - token) > 1e-3 * abs(token)


# ---- vLLM importance-sampling correction ---------------------------------------------------------
# vLLM is not installed here: TRL's own _generate_and_score_completions runs with use_vllm=True and
# its generation call replaced by fixed completions with "sampler" log-probs (the current model's,
# perturbed, one missing: vLLM returns None for a log-prob it could not compute). TRL then computes
# old_per_token_logps and its importance_sampling_ratio itself; both trainers get that batch.

COMPLETIONS = [[5, 9, 12, 1], [7, 3, 20, 14, 8, 1], [10, 11], [25, 4, 6, 1], [3, 3, 18], [21, 1],
               [13, 17, 9, 26, 5], [28, 1]]
PROMPTS = ["a b c", "a b c", "d e", "d e", "f g h i", "f g h i", "j k", "j k"]


def fake_vllm_generation(trainer, seed):
    """Replace the trainer's generation call by COMPLETIONS and perturbed log-probs of the current model.

    The noise is drawn afresh from `seed` at every call: each test that generates gets the same sampler
    log-probs whichever tests ran before it (one generator kept across calls made a case's batch depend on
    how many cases had generated before it in the process)."""

    def generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        assert len(prompt_ids) == len(COMPLETIONS)
        gen = torch.Generator().manual_seed(seed)
        logprobs = []
        for prompt, completion in zip(prompt_ids, COMPLETIONS):
            ids = torch.tensor([list(prompt) + completion])
            with torch.no_grad():
                logits = trainer.model(input_ids=ids).logits[0, len(prompt) - 1:-1] / trainer.temperature
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            logprobs.append((lp + 0.5 * torch.randn(lp.shape, generator=gen, dtype=lp.dtype)).tolist())
        logprobs[1][2] = None  # a log-prob the sampler did not return
        return [list(c) for c in COMPLETIONS], logprobs

    trainer._generate_single_turn = generate_single_turn


@pytest.fixture(scope="module")
def vllm_pair(model_dir, tmp_path_factory):
    trl_trainer, ours = make_pair(model_dir, tmp_path_factory.mktemp("vllm"), 0.0)
    for t in (trl_trainer, ours):
        t.use_vllm = t.vllm_importance_sampling_correction = True  # after construction: no vLLM to start
    fake_vllm_generation(trl_trainer, seed=21)
    return trl_trainer, ours


@contextlib.contextmanager
def perturbed(models, scale, seed):
    """The same small change to every model's parameters (the policy moved since generation), undone after."""
    saved = [copy.deepcopy(m.state_dict()) for m in models]
    gen = torch.Generator().manual_seed(seed)
    noise = {n: scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in models[0].named_parameters()}
    with torch.no_grad():
        for m in models:
            for n, p in m.named_parameters():
                p.add_(noise[n])
    try:
        yield
    finally:
        for m, state in zip(models, saved):
            m.load_state_dict(state)


VLLM_CASES = [(mode, loss_type, clip) for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
              for loss_type, clip in (("grpo", (0.5, 2.0)), ("dapo", (None, 1.5)))]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "logits"])
@pytest.mark.parametrize("mode,loss_type,clip", VLLM_CASES, ids=[f"{m}-{l}-{c[0]}-{c[1]}" for m, l, c in VLLM_CASES])
def test_vllm_importance_sampling_correction_equals_trl(vllm_pair, mode, loss_type, clip, fused):
    """vllm_importance_sampling_mode/_clip_min/_clip_max: dk's rollout_correction from the batch's
    sampling_per_token_logps gives TRL's loss (which multiplies by its precomputed ratio) and gradients."""
    trl_trainer, ours = vllm_pair
    attributes = dict(loss_type=loss_type, vllm_importance_sampling_mode=mode,
                      vllm_importance_sampling_clip_min=clip[0], vllm_importance_sampling_clip_max=clip[1])
    with objective_of((trl_trainer, ours), **attributes), objective_of((ours,), dk_fused_lm_head=fused):
        batch = trl_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
        # TRL's batch is float32 (its log-probs, advantages and ratio); the rest of these tests runs the loss in
        # float64, as TRL does with float64 inputs: the same values, widened (TRL's ratio keeps its float32 rounding)
        batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        ratio = batch["importance_sampling_ratio"]
        assert torch.isnan(batch["sampling_per_token_logps"][1, 2])  # TRL kept the missing log-prob as NaN
        with perturbed([trl_trainer.model, ours.model], 0.05, seed=22):
            expected = loss_and_grads(trl_trainer, dict(batch))
            got = loss_and_grads(ours, dict(batch))
            trl_trainer.use_vllm = False  # TRL's loss without the correction: the correction matters here
            try:
                uncorrected = loss_and_grads(trl_trainer, dict(batch))[0]
            finally:
                trl_trainer.use_vllm = True
    assert_same(got, expected)
    assert abs(uncorrected - expected[0]) > 1e-3 * abs(expected[0])
    # the batch exercises the bounds: some ratios at a bound (truncate) or zeroed (mask), some inside
    mask = batch["completion_mask"].bool()
    values = ratio.reshape(-1) if mode.startswith("sequence") else ratio[mask]
    bounds = torch.tensor([b for b in clip if b is not None], dtype=values.dtype)
    at_bound = (values == 0) if mode.endswith("mask") else (values[:, None] == bounds).any(1)
    assert 0 < int(at_bound.sum()) < values.numel()


def test_vllm_batch_does_not_depend_on_earlier_generations(vllm_pair):
    """The batch of test_vllm_importance_sampling_correction_equals_trl is the same whichever of its cases ran
    before (the module-scoped pair serves them all): a second generation gives the first one's sampler
    log-probs, old log-probs and ratio exactly. Guards the order dependence of issue 19: the cases' loss can be
    small enough (|loss| ~ 2e-3) for TRL's float32 rounding alone to exceed the 1e-6 relative tolerance."""
    trl_trainer, _ = vllm_pair
    attributes = dict(loss_type="grpo", vllm_importance_sampling_mode="token_mask",
                      vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)
    with objective_of((trl_trainer,), **attributes):
        first, second = (trl_trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
                         for _ in range(2))
    assert first.keys() == second.keys()
    for key in ("sampling_per_token_logps", "old_per_token_logps", "importance_sampling_ratio", "advantages"):
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_vllm_correction_needs_the_sampling_logprobs(vllm_pair):
    _, ours = vllm_pair
    inputs = micro_batch(ours.model, seed=15, with_ref=False)  # no sampling_per_token_logps
    with objective_of((ours,), loss_type="dapo"), pytest.raises(ValueError, match="sampling_per_token_logps"):
        ours.compute_loss(ours.model, inputs)


def test_entropy_bonus_is_weighted_like_the_policy_term(pair):
    """entropy_coef enters l_t (SPEC section 1): the loss moves by -coef * sum_i w_i sum_t H_t, with
    TRL's grpo weights w_i = 1 / (B * L_i * GA) here (TRL itself adds a token-mean bonus instead)."""
    _, ours = pair
    ours.loss_type = "grpo"
    inputs = micro_batch(ours.model, seed=15, with_ref=ours.beta != 0)
    base = loss_and_grads(ours, inputs)[0]
    ours.entropy_coef = 0.01
    try:
        bonus = loss_and_grads(ours, inputs)[0]
    finally:
        ours.entropy_coef = 0.0
    P = inputs["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = ours.model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
                            ).logits[:, P - 1:-1] / ours.temperature
    logp = torch.log_softmax(logits, -1)
    H = -(logp.exp() * logp).sum(-1)
    mask = inputs["completion_mask"].to(torch.float64)
    L = mask.sum(1)
    expected = -0.01 * ((H * mask).sum(1) / (L.numel() * L * GA)).sum()
    torch.testing.assert_close(bonus - base, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("steps_per_generation", [GA, 2 * GA])
def test_delta_l_is_trl_dr_grpo_with_rescaled_advantages(model_dir, tmp_path, alpha, steps_per_generation, level):
    """(level="sequence": Delta-L with GSPO's ratio, through TRL's sequence-level dr_grpo.)"""
    trl_trainer, ours = make_pair(model_dir, tmp_path, 0.0)
    trl_trainer.importance_sampling_level = ours.importance_sampling_level = level
    # a generation batch spanning one optimizer step, or two (then each step weighs its half twice)
    ours.args.steps_per_generation = steps_per_generation
    ours.loss_type, ours.delta_l_alpha, trl_trainer.loss_type = "delta-l", alpha, "dr_grpo"
    inputs = micro_batch(trl_trainer.model, seed=11, with_ref=False)
    L = inputs["completion_mask"].sum(1).to(torch.float64)
    inv = L ** -alpha
    # Delta-L weights of a generation batch whose micro-batches all look like this one
    inputs["delta_l_weights"] = inv / (K * inv.sum() * steps_per_generation)
    got = loss_and_grads(ours, inputs)
    # the optimizer step weighs completion i by w_i * steps_per_generation / GA = inv_i / (K * sum inv * GA);
    # TRL's dr_grpo weighs it 1 / (B * K * GA): scaling A_i by B * inv_i / sum inv turns one into the other
    B = L.numel()
    rescaled = dict(inputs, advantages=inputs["advantages"] * inv / inv.sum() * B)
    expected = loss_and_grads(trl_trainer, rescaled)
    assert_same(got, expected)


def test_generation_batch_weights_are_delta_l_over_the_batch(model_dir, tmp_path):
    from transformers import AutoTokenizer

    args = DeltaLGRPOConfig(**common_args(tmp_path, delta_l_alpha=0.75))
    trainer = DeltaLGRPOTrainer(model_dir, reward_funcs=reward_len, train_dataset=dataset(),
                                processing_class=AutoTokenizer.from_pretrained(model_dir), args=args)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in ["a b c", "a b c", "d e", "d e"]])
    L = batch["completion_mask"].sum(1).to(torch.float64)
    expected = L ** -0.75 / (K * (L ** -0.75).sum())
    torch.testing.assert_close(batch["delta_l_weights"], expected, rtol=1e-14, atol=0)


def test_two_optimizer_steps_with_delta_l(model_dir, tmp_path):
    from transformers import AutoTokenizer

    args = DeltaLGRPOConfig(**common_args(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-2,
                                          gradient_accumulation_steps=2, delta_l_alpha=1.0))
    trainer = DeltaLGRPOTrainer(model_dir, reward_funcs=reward_len, train_dataset=dataset(),
                                processing_class=AutoTokenizer.from_pretrained(model_dir), args=args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)  # every parameter got a gradient and an update
    logs = [entry for entry in trainer.state.log_history if "entropy" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"])) and entry["grad_norm"] > 0
        assert {"clip_ratio/region_mean", "clip_ratio/high_max"} <= entry.keys()


@pytest.mark.parametrize("option,options", [
    ("loss_type", dict(loss_type="sapo")),
    ("loss_type", dict(loss_type="vespo")),
    ("top_entropy_quantile", dict(top_entropy_quantile=0.5)),
    ("off_policy_mask_threshold", dict(off_policy_mask_threshold=0.5)),
    ("delta", dict(delta=1.1)),
    ("epsilon_high", dict(loss_type="cispo")),  # epsilon_high=0.28: a cap below 1
    ("epsilon_high", dict(loss_type="cispo", epsilon_high=None, epsilon=0.2)),  # TRL falls back to epsilon
    # vLLM's correction (checked before TRL looks for vLLM)
    ("vllm_importance_sampling_clip_max", dict(use_vllm=True, vllm_importance_sampling_mode="token_mask",
                                               vllm_importance_sampling_clip_max=None)),
    ("vllm_importance_sampling_clip_min", dict(use_vllm=True, vllm_importance_sampling_clip_min=-1.0)),
    ("vllm_importance_sampling_mode", dict(use_vllm=True, vllm_importance_sampling_mode="sequence_clip")),
], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_unsupported_options_are_refused_by_name(model_dir, tmp_path, option, options):
    args = DeltaLGRPOConfig(**common_args(tmp_path, **options))
    with pytest.raises(ValueError, match=option):
        DeltaLGRPOTrainer(model_dir, reward_funcs=reward_len, train_dataset=dataset(), args=args)


def test_options_that_are_passed_through_are_accepted(tmp_path):
    """What used to be refused: GSPO, CISPO (with a cap >= 1, delta ignored as TRL ignores it) and vLLM's
    correction (checked without starting vLLM: check_supported is what the constructor runs first)."""
    from deltal_kernels.integrations.trl import check_supported

    for options in (dict(importance_sampling_level="sequence", loss_type="grpo"),
                    dict(loss_type="cispo", epsilon_high=5.0, delta=1.1),
                    dict(use_vllm=True),  # TRL's defaults: sequence_mask, (None, 3.0)
                    *(dict(use_vllm=True, vllm_importance_sampling_mode=m, vllm_importance_sampling_clip_min=0.5)
                      for m in ("token_truncate", "token_mask", "sequence_truncate"))):
        check_supported(DeltaLGRPOConfig(**common_args(tmp_path, **options)))


def _two_process_worker(rank, world, port, model_dir, out_dir):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    args = DeltaLGRPOConfig(**common_args(out_dir, delta_l_alpha=0.75, gradient_accumulation_steps=1))
    trainer = DeltaLGRPOTrainer(model_dir, reward_funcs=reward_len, train_dataset=dataset(),
                                processing_class=AutoTokenizer.from_pretrained(model_dir), args=args)
    assert trainer.accelerator.num_processes == world and dist.is_initialized()
    trainer.model.train()
    prompts = [["a b c", "a b c", "d e", "d e"], ["f g h i", "f g h i", "j k", "j k"]][rank]
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in prompts])
    lengths = batch["completion_mask"].sum(1)
    everyone = [torch.zeros_like(lengths) for _ in range(world)]
    dist.all_gather(everyone, lengths)
    inv_all = torch.cat(everyone).to(torch.float64) ** -0.75
    # Delta-L over both processes' completions, times the world size for DDP's gradient mean
    expected = lengths.to(torch.float64) ** -0.75 / (K * inv_all.sum()) * world
    torch.testing.assert_close(batch["delta_l_weights"], expected, rtol=1e-14, atol=0)


def test_delta_l_weights_span_all_processes(model_dir, tmp_path):
    """Two gloo processes (accelerate's MULTI_CPU), different prompts per process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(2, port, model_dir, str(tmp_path)), nprocs=2, join=True)


def test_readme_trl_snippet(model_dir, tmp_path):
    snippet = load_example("use_with_trl")
    trainer = snippet.train(model_dir, reward_len, dataset(), K, output_dir=str(tmp_path), max_steps=1,
                            per_device_train_batch_size=4, num_generations=2, report_to="none", use_cpu=True,
                            bf16=False, save_strategy="no")
    assert isinstance(trainer, DeltaLGRPOTrainer) and trainer.loss_type == "delta-l"
    assert trainer.state.global_step == 1 and trainer.max_completion_length == K


@pytest.mark.parametrize("options", [dict(loss_type="dapo"),
                                     dict(loss_type="cispo", epsilon_high=1.2, importance_sampling_level="sequence"),
                                     dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2,
                                          learning_rate=5e-2)],
                         ids=["dapo", "cispo-sequence", "gspo-off-policy"])
def test_two_training_steps_log_what_trl_logs(model_dir, tmp_path, options):
    """End to end (generation, rewards, two optimizer steps, float32, dk's default backend): both trainers
    log the same losses, gradient norms and metrics (num_iterations=2: the second optimizer step reuses
    the first step's generation, off-policy, and GSPO's clip acts)."""
    from transformers import AutoTokenizer

    logs = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (DeltaLGRPOTrainer, DeltaLGRPOConfig)):
        args = config_cls(**common_args(tmp_path / trainer_cls.__name__, max_steps=2, logging_steps=1,
                                        **{"learning_rate": 1e-2, **options}))
        trainer = trainer_cls(model_dir, reward_funcs=reward_len, train_dataset=dataset(),
                              processing_class=AutoTokenizer.from_pretrained(model_dir), args=args)
        trainer.train()
        logs.append([entry for entry in trainer.state.log_history if "loss" in entry and "entropy" in entry])
    expected, got = logs
    assert len(expected) == len(got) == 2
    for e, g in zip(expected, got):
        assert g.get("completions/mean_length") == e.get("completions/mean_length")  # the same rollouts
        clip = "cispo_clip_ratio" if options["loss_type"] == "cispo" else "clip_ratio/region_mean"
        for name in ("loss", "grad_norm", "entropy", clip):
            # float32 throughout (TRL's chunked log-probs vs dk's kernels), one update in between
            assert g[name] == pytest.approx(e[name], rel=1e-5, abs=1e-7), name
    if options.get("num_iterations") == 2:  # off-policy: the clip acts, and not on everything
        assert expected[1]["clip_ratio/region_mean"] > 0 and expected[1]["grad_norm"] > 0


class HeadCalls:
    """Records how many rows of logits every lm_head call projects (its output's numel / V)."""

    def __init__(self, head):
        self.rows = []
        self.handle = head.register_forward_hook(lambda m, i, out: self.rows.append(out.numel() // out.shape[-1]))


@pytest.mark.parametrize("with_old", [True, False], ids=["off-policy", "on-policy"])
def test_fused_lm_head_is_the_default_and_equals_the_materialised_logits(pair, with_old):
    """dk_fused_lm_head (default True): the loss from the last hidden state and lm_head, with lm_head
    projecting one position per sequence only; loss and every gradient equal the logits path's."""
    _, ours = pair
    ours.loss_type = "dapo"
    assert ours.dk_fused_lm_head and ours.args.dk_fused_lm_head
    inputs = micro_batch(ours.model, seed=16, with_old=with_old, with_ref=ours.beta != 0)
    calls = HeadCalls(ours.model.get_output_embeddings())
    try:
        fused = loss_and_grads(ours, inputs)
        B = inputs["prompt_ids"].shape[0]
        # one position per sequence (the model's own, and the first call's check of lm_head): no [B, K, V] logits
        assert calls.rows and all(r == B for r in calls.rows) and ours._dk_head_checked is True
        ours.dk_fused_lm_head = False
        calls.rows.clear()
        materialised = loss_and_grads(ours, inputs)
        assert calls.rows == [B * (K + 1)]
    finally:
        ours.dk_fused_lm_head = True
        calls.handle.remove()
    # float64 model, float64 arithmetic on both paths: equal to float64 rounding of the reordered sums
    torch.testing.assert_close(fused[0], materialised[0], rtol=1e-12, atol=1e-15)
    assert fused[1].keys() == materialised[1].keys() and "lm_head.weight" in fused[1]
    for name, g in materialised[1].items():
        torch.testing.assert_close(fused[1][name], g, rtol=1e-10, atol=1e-12 * g.abs().max().item(), msg=name)
