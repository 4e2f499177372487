"""RGRL and diffu-GRPO trainers: likelihood estimators against direct computations, the learning signals and
losses against hand computations, masks shared within an inner iteration, and short runs on tiny checkpoints
(only LoRA weights move, TRL's metric contract, unguided evaluation, bit-exact resume)."""

import math

import datasets
import pytest
import torch
from peft import LoraConfig

from rgrl.models.loading import load_dllm
from rgrl.rewards import RewardModel, RewardModelFunction
from rgrl.trainers import (
    DiffuGRPOConfig,
    DiffuGRPOTrainer,
    RGRLConfig,
    RGRLTrainer,
    completion_log_probs,
    draw_noise,
    group_advantages,
    sample_weights,
    sequence_log_likelihood,
    token_weights,
)
from rgrl.trainers.base import _TRL_PRIVATE_SURFACE

K = 2
ROLLOUT = dict(diffusion_steps=4, max_completion_length=8, schedule="linear", temperature=0.9, top_k=50,
               deprioritize_eos=False)
GUIDANCE = dict(guidance_method="entrgi", guidance_steps=1, guidance_lr=0.5, guidance_measure_gain=True)
PROMPTS = ["Write about the cat and warm tea.", "Tell me why a dog likes old maps.",
           "Describe the ocean for my friend.", "Explain how a robot found fresh bread."]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reward_model():
    return RewardModel.from_pretrained("tiny:rm", dtype="float32")


def prompt_dataset(texts=PROMPTS):
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})


def lora_config(family):
    targets = family.lora_target_modules
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets if isinstance(targets, str)
                      else list(targets))


def config_kwargs(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, report_to="none",
                    per_device_train_batch_size=4, num_generations=K, max_steps=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", seed=0, dataloader_pin_memory=False, disable_tqdm=True,
                    **ROLLOUT)
    return {**defaults, **overrides}


def make_trainer(kind, tmp_path, reward_model, family_name="dream", eval_prompts=None, extra_rewards=(),
                 **overrides):
    """A fresh tiny model in a fresh trainer (PEFT wraps the model in place, so nothing is shared)."""
    loaded = load_dllm(f"tiny:{family_name}", dtype="float32")
    common = dict(train_dataset=prompt_dataset(), eval_dataset=prompt_dataset(eval_prompts) if eval_prompts else None,
                  processing_class=loaded.tokenizer, peft_config=lora_config(loaded.family))
    rewards = [RewardModelFunction(reward_model, "tiny_rm"), *extra_rewards]
    if kind == "rgrl":
        args = RGRLConfig(**config_kwargs(tmp_path, **{**GUIDANCE, **overrides}))
        return RGRLTrainer(loaded.model, rewards, args, **common)
    args = DiffuGRPOConfig(**config_kwargs(tmp_path, **overrides))
    return DiffuGRPOTrainer(loaded.model, rewards, args, **common)


def rollout_rows():
    """The rows TRL's RepeatSampler hands one process: each prompt K times in a row."""
    return [{"prompt": [{"role": "user", "content": text}]} for text in PROMPTS[:2] for _ in range(K)]


# ------------------------------------------------------------------------------------------------ likelihood
@pytest.mark.parametrize("family_name", ["dream", "llada"])
@pytest.mark.parametrize("estimator", ["one_step", "elbo"])
def test_completion_log_probs_match_direct_computation(family_name, estimator):
    """Batched, left-padded estimate == each row run alone on a hand-built canvas (Dream's logits shifted)."""
    loaded = load_dllm(f"tiny:{family_name}", dtype="float32")
    model, family = loaded.model.eval(), loaded.family
    generator = torch.Generator().manual_seed(0)
    canvas_length, length = 8, 6
    prompts = [torch.randint(5, 300, (n,), generator=generator) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((2, width), family.pad_token_id)
    prompt_mask = torch.zeros((2, width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        prompt_ids[row, width - len(ids):] = ids
        prompt_mask[row, width - len(ids):] = 1
    completion_ids = torch.randint(5, 300, (2, length), generator=generator)
    completion_ids[1, 4:] = family.pad_token_id  # a shorter completion, right-padded
    noise = draw_noise(prompt_mask, canvas_length, p_mask_prompt=0.5, estimator=estimator, generator=generator)
    prompt_noise, completion_noise = noise["prompt_noise"][:, 0], noise["completion_noise"][:, 0]

    with torch.no_grad():
        batched = completion_log_probs(model, family, prompt_ids, prompt_mask, completion_ids, prompt_noise,
                                       completion_noise)
        for row, ids in enumerate(prompts):
            prompt = ids.masked_fill(prompt_noise[row, width - len(ids):], family.mask_token_id)
            slots = torch.full((canvas_length,), family.pad_token_id)
            slots[:length] = completion_ids[row]
            slots = slots.masked_fill(completion_noise[row], family.mask_token_id)
            logits = model(input_ids=torch.cat([prompt, slots])[None]).logits[0].log_softmax(-1)
            for t in range(length):
                position = len(ids) + t - (1 if family.shifted_logits else 0)
                expected = logits[position, completion_ids[row, t]]
                assert batched[row, t].item() == pytest.approx(expected.item(), abs=1e-4)
    if estimator == "one_step":
        assert completion_noise.all()
    assert not (prompt_noise & ~prompt_mask.bool()).any(), "pads are never noised"


def test_one_step_noise_masks_whole_completion_and_only_real_prompt_tokens():
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    noise = draw_noise(prompt_mask, canvas_length=6, p_mask_prompt=1.0, iterations=3)
    assert noise["prompt_noise"].shape == (2, 3, 5) and noise["completion_noise"].shape == (2, 3, 6)
    assert torch.equal(noise["prompt_noise"], prompt_mask.bool().unsqueeze(1).expand(2, 3, 5))
    assert noise["completion_noise"].all() and torch.equal(noise["mask_rate"], torch.ones(2, 3))
    assert not draw_noise(prompt_mask, 6, p_mask_prompt=0.0)["prompt_noise"].any()


def test_elbo_weights_are_one_over_t_on_masked_tokens_and_unbiased():
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    completion_noise = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    mask_rate = torch.tensor([0.5, 0.25])
    weights = token_weights(completion_mask, completion_noise, mask_rate)
    assert torch.equal(weights, torch.tensor([[2.0, 0.0, 2.0, 0.0], [0.0, 4.0, 0.0, 0.0]]))
    log_probs = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-1.0, -2.0, -9.0, -9.0]])
    expected = torch.tensor([(2 * -1.0 + 2 * -3.0) / 3, (4 * -2.0) / 2])
    assert torch.allclose(sequence_log_likelihood(log_probs, weights, completion_mask), expected)

    # E_t E_mask[Σ_t w_t f_t] = Σ_t f_t: the 1/t weighting makes the masked sum an unbiased estimate.
    f = torch.linspace(-3, -0.5, 10)
    draws = draw_noise(torch.ones(1, 3), canvas_length=10, p_mask_prompt=0.0, estimator="elbo", iterations=40_000,
                       generator=torch.Generator().manual_seed(0))
    rate = draws["mask_rate"][0]
    assert rate.min() >= 1e-3 and rate.max() <= 1.0
    estimates = (draws["completion_noise"][0].float() / rate[:, None] * f).sum(-1)
    assert estimates.mean().item() == pytest.approx(f.sum().item(), rel=0.05)


# ------------------------------------------------------------------------------------------------ signals, losses
def test_diffu_grpo_advantages_are_mean_centred_not_std_scaled(tmp_path):
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 0.0, 0.0, 4.0])
    assert DiffuGRPOConfig(**config_kwargs(tmp_path)).scale_rewards == "none"
    assert torch.equal(group_advantages(rewards, 4), torch.tensor([-3.0, -2.0, -1.0, 6.0, -1.0, -1.0, -1.0, 3.0]))
    group_std = torch.tensor([1.0, 2.0, 3.0, 10.0]).std()
    scaled = group_advantages(rewards[:4], 4, "group")
    assert torch.allclose(scaled, torch.tensor([-3.0, -2.0, -1.0, 6.0]) / (group_std + 1e-4))
    with_nan = group_advantages(torch.tensor([1.0, math.nan, 3.0, 5.0]), 4)
    assert torch.equal(with_nan, torch.tensor([-2.0, 0.0, 0.0, 2.0]))


@pytest.mark.parametrize("value", ["false", "False", "true"])
def test_scale_rewards_boolean_strings_are_rejected(tmp_path, value):
    with pytest.raises(ValueError, match="'none'"):
        DiffuGRPOConfig(**config_kwargs(tmp_path, scale_rewards=value))


def test_rgrl_sample_weights():
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, math.nan, 3.0])
    assert torch.equal(sample_weights(rewards, 2, "uniform"), torch.ones(6))
    softmax = sample_weights(rewards, 2, "softmax", beta=0.5)
    first = torch.tensor([1.0, 2.0]).div(0.5).softmax(0) * 2
    assert torch.allclose(softmax[:2], first) and torch.allclose(softmax[4:], torch.tensor([0.0, 2.0]))
    assert torch.equal(sample_weights(rewards, 2, "best_of_k"), torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0, 2.0]))


# ------------------------------------------------------------------------------------------------ configs
def test_rgrl_config_rejects_what_rgrl_does_not_use(tmp_path):
    with pytest.raises(ValueError, match="no KL term"):
        RGRLConfig(**config_kwargs(tmp_path, beta=0.04))
    with pytest.raises(ValueError, match="num_iterations must be 1"):
        RGRLConfig(**config_kwargs(tmp_path, num_iterations=2))
    with pytest.raises(ValueError, match="loss_type"):
        RGRLConfig(**config_kwargs(tmp_path, loss_type="grpo"))
    with pytest.raises(ValueError, match="use_vllm"):
        RGRLConfig(**config_kwargs(tmp_path, use_vllm=True))
    with pytest.raises(ValueError, match="sample_weighting"):
        RGRLConfig(**config_kwargs(tmp_path, sample_weighting="best"))


def test_groups_must_sit_on_one_process(tmp_path, monkeypatch):
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    # 2 processes × 2 rows = 4 rows: TRL's global check passes, but each process would hold half a group.
    with pytest.raises(ValueError, match="must sit on one process"):
        RGRLConfig(**config_kwargs(tmp_path, per_device_train_batch_size=2, num_generations=4))


def test_unaligned_checkpoints_warn(tmp_path):
    with pytest.warns(UserWarning, match="generation boundary"):
        DiffuGRPOConfig(**config_kwargs(tmp_path, num_iterations=2, save_strategy="steps", save_steps=1))


def test_kl_needs_lora(tmp_path, reward_model):
    loaded = load_dllm("tiny:dream", dtype="float32")
    with pytest.raises(ValueError, match="needs LoRA"):
        DiffuGRPOTrainer(loaded.model, [RewardModelFunction(reward_model, "rm")],
                         DiffuGRPOConfig(**config_kwargs(tmp_path, beta=0.04)), train_dataset=prompt_dataset(),
                         processing_class=loaded.tokenizer)


# ------------------------------------------------------------------------------------------------ trainers
def test_diffu_grpo_same_mask_for_old_ref_and_current_and_zero_kl_at_start(tmp_path, reward_model):
    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, beta=0.04, num_iterations=2)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rollout_rows())
    noise = batch["prompt_noise"]
    assert noise.shape[:2] == (4, 2) and batch["old_per_token_logps"].shape == (4, 2, batch["completion_ids"].shape[1])
    assert not torch.equal(noise[:, 0], noise[:, 1]), "each inner iteration draws its own mask"
    mask = batch["completion_mask"].bool()
    trainer.model.eval()
    with torch.no_grad():
        for j in range(2):
            current = trainer._log_probs(trainer.model, batch, j)
            assert torch.equal(current[mask], batch["old_per_token_logps"][:, j][mask])
            assert torch.equal(current[mask], batch["ref_per_token_logps"][:, j][mask]), "zero KL at the start"
        other_mask = trainer._log_probs(trainer.model, {**batch, "prompt_noise": noise.flip(1)}, 0)
        assert not torch.allclose(other_mask[mask], batch["old_per_token_logps"][:, 0][mask])
    assert torch.equal(batch["advantages"], group_advantages(torch.tensor(trainer._logs["rewards"]["tiny_rm"]), K))
    rendered = trainer.family.render_prompt(trainer.processing_class, rollout_rows()[0]["prompt"])
    first = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()]
    assert trainer.processing_class.decode(first) == rendered, "prompts go through the dLLM's chat template"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_diffu_grpo_loss_matches_hand_computation(tmp_path, reward_model, loss_type):
    """TRL's loss on the diffusion log-probs of inner iteration j: the clipped surrogate, β·k3 KL and each loss
    type's normalisation, computed here directly from `completion_log_probs` with mask j."""
    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, beta=0.04, num_iterations=2, loss_type=loss_type)
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rollout_rows())
    rows, width = batch["completion_ids"].shape
    # old log-probs that put ratios on both sides of the clip range, advantages of both signs
    batch["old_per_token_logps"] = batch["old_per_token_logps"] + torch.linspace(-0.5, 0.5, width)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -2.0])
    trainer._step, trainer.current_gradient_accumulation_steps, j = 1, 1, 1  # the second inner iteration
    with torch.no_grad():
        log_probs = completion_log_probs(trainer.model, trainer.family, batch["prompt_ids"], batch["prompt_mask"],
                                         batch["completion_ids"], batch["prompt_noise"][:, j],
                                         batch["completion_noise"][:, j])
        ratio = (log_probs - batch["old_per_token_logps"][:, j]).exp()
        advantages = batch["advantages"].unsqueeze(1)
        surrogate = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
        delta = batch["ref_per_token_logps"][:, j] - log_probs
        per_token = surrogate + 0.04 * (delta.exp() - delta - 1)
        mask = batch["completion_mask"].float()
        expected = {
            "grpo": ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
            "bnpo": (per_token * mask).sum() / mask.sum(),
            "dr_grpo": (per_token * mask).sum() / (rows * trainer.args.max_completion_length),
            "dapo": (per_token * mask).sum() / (batch["num_items_in_batch"] / trainer.args.steps_per_generation),
        }[loss_type]
        assert 0 < ((ratio - 1).abs() > 0.2).float().mean() < 1, "some ratios clipped, some not"
        loss = trainer._compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    metrics = trainer._metrics["train"]
    assert {"kl", "entropy", "clip_ratio/region_mean", "learner/loglik"} <= set(metrics)
    assert metrics["learner/loglik"][-1] == pytest.approx(
        sequence_log_likelihood(log_probs, mask, batch["completion_mask"]).mean().item(), rel=1e-5)


def completion_length(prompts, completions, **kwargs):
    """A TRL-style reward function: characters in the completion."""
    return [float(len(c[-1]["content"])) for c in completions]


def test_weighted_reward_functions_make_the_signal(tmp_path, reward_model):
    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, extra_rewards=[completion_length],
                           reward_weights=[1.0, 0.5])
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rollout_rows())
    logged = trainer._logs["rewards"]
    combined = torch.tensor(logged["tiny_rm"]) + 0.5 * torch.tensor(logged["completion_length"])
    assert torch.allclose(batch["advantages"], group_advantages(combined, K))
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(combined.mean().item(), rel=1e-6)
    assert "rewards/completion_length/mean" in trainer._metrics["train"]


def test_rgrl_learner_raises_likelihood_of_guided_completions(tmp_path, reward_model):
    trainer = make_trainer("rgrl", tmp_path, reward_model)
    model = trainer.model
    model.train()
    batch = trainer._generate_and_score_completions(rollout_rows())
    assert torch.equal(batch["sample_weights"], torch.ones(4))
    trainer.current_gradient_accumulation_steps = 1
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = trainer._compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = trainer._compute_loss(model, batch).item()
    assert final < losses[0] - 0.05, f"loss {losses[0]:.3f} -> {final:.3f}"
    assert all(b < a for a, b in zip(losses, losses[1:] + [final]))


def test_rgrl_loss_scale_is_the_mean_or_the_references_sum_over_k(tmp_path, reward_model):
    """Default: the mean −Σ_i a_i·ℓ_i / N; `num_generations`: the reference's −Σ_i a_i·ℓ_i / K. With 4 rows =
    2 prompts × K = 2 they differ by the 2 prompts per micro-batch."""
    trainer = make_trainer("rgrl", tmp_path, reward_model)
    model = trainer.model
    model.train()
    batch = trainer._generate_and_score_completions(rollout_rows())
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        loglik = sequence_log_likelihood(trainer._log_probs(model, batch, 0), trainer._token_weights(batch, 0),
                                         batch["completion_mask"])
        assert trainer.args.loss_normalizer == "num_completions"
        mean = trainer._compute_loss(model, batch)
        trainer.args.loss_normalizer = "num_generations"
        reference = trainer._compute_loss(model, batch)
    assert reference.item() == pytest.approx(-loglik.sum().item() / K, rel=1e-6)
    assert mean.item() == pytest.approx(-loglik.mean().item(), rel=1e-6)
    assert reference.item() == pytest.approx(2 * mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss_normalizer"):
        RGRLConfig(**config_kwargs(tmp_path, loss_normalizer="tokens"))


@pytest.fixture(scope="module")
def rgrl_run(tmp_path_factory, reward_model):
    """Two RGRL steps and an unguided evaluation on tiny Dream; parameters before and after."""
    tmp_path = tmp_path_factory.mktemp("rgrl_run")
    trainer = make_trainer("rgrl", tmp_path, reward_model, eval_prompts=PROMPTS[:2], per_device_eval_batch_size=4)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    trainer.evaluate()
    after = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, before, after


def test_rgrl_step_changes_only_lora_weights(rgrl_run):
    trainer, before, after = rgrl_run
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "training changed nothing"
    assert all("lora_" in name for name in changed), sorted(changed - {n for n in changed if "lora_" in n})
    assert any("lora_B" in name for name in changed)


def test_trl_contract_metric_names(rgrl_run):
    """TRL 1.16's loop calls our overrides and logs TRL's metric names plus guidance/*; a TRL bump breaking the
    private surface the trainers rely on fails here."""
    trainer, _, _ = rgrl_run
    assert [name for name in _TRL_PRIVATE_SURFACE if not hasattr(trainer, name)] == []
    history = trainer.state.log_history
    train = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in train] == [1, 2]
    expected = {"reward", "reward_std", "rewards/tiny_rm/mean", "rewards/tiny_rm/std", "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "guidance/entropy_weight",
                "guidance/reward_gain", "guidance/seconds", "guidance/rollout_seconds", "guidance/learner_seconds",
                "learner/loglik", "grad_norm", "learning_rate", "rewards/non_finite", "learner/skipped_steps"}
    assert expected <= set(train[0]), expected - set(train[0])
    assert 0.0 < train[0]["guidance/entropy_weight"] <= 1.0
    assert train[-1]["rewards/non_finite"] == 0 and train[-1]["learner/skipped_steps"] == 0
    evaluation = next(entry for entry in history if "eval_reward" in entry)
    assert {"eval_rewards/tiny_rm/mean", "eval_completions/mean_length", "eval_loss"} <= set(evaluation)
    assert not any(key.startswith("eval_guidance/entropy") for key in evaluation), "evaluation rollouts are unguided"
    with pytest.raises(RuntimeError, match="causal log-prob path"):  # the guard against TRL's causal scoring
        trainer._get_per_token_logps_and_entropies(trainer.model, None, None, None)


def test_diffu_grpo_run_logs_zero_kl_first(tmp_path, reward_model):
    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, beta=0.04, max_steps=1,
                           gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["kl"] == 0.0 and {"clip_ratio/region_mean", "reward", "learner/loglik"} <= set(first)


def test_resume_matches_uninterrupted_run(tmp_path, reward_model):
    def adapter(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    full = make_trainer("rgrl", tmp_path / "full", reward_model, save_strategy="steps", save_steps=1)
    full.train()
    resumed = make_trainer("rgrl", tmp_path / "resumed", reward_model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-1"))
    expected, got = adapter(full), adapter(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    rewards = [entry["reward"] for entry in full.state.log_history if "reward" in entry]
    assert resumed.state.log_history[-2]["reward"] == rewards[-1]


def test_training_curves_show_every_reward_function(tmp_path):
    """The README's main job shows the ground-truth pass rate: each `rewards/<name>/mean` gets a panel (train and
    unguided eval), right after the combined reward."""
    from rgrl.trainers.callbacks import plot_curves, plotted_metrics

    history = [{"step": s, "reward": 0.1 * s, "rewards/rm/mean": 0.1 * s, "rewards/ground_truth/mean": 0.5,
                "completions/mean_length": 12.0} for s in (1, 2, 3)]
    history += [{"step": 3, "eval_reward": 0.2, "eval_rewards/ground_truth/mean": 0.7}]
    panels = plotted_metrics(history)
    assert panels[:3] == ["reward", "rewards/ground_truth/mean", "rewards/rm/mean"]
    assert plot_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 1000
