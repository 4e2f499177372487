"""The trainers in TRL's `GRPOTrainer` call shape (`model`, `reward_funcs`, `args`, `train_dataset`, `peft_config`):
models by name (rgrl names, local folders, Hub ids) or loaded, reward models by name next to Python functions,
rollout and guidance settings as config fields that are really used, guidance built from the config (or an error),
dataset problems caught at construction, and no deprecation warning per rollout."""

import math
import warnings

import datasets
import pytest
import torch
import transformers
from peft import LoraConfig

from rgrl.data import PromptDataConfig, load_prompts
from rgrl.models.loading import load_dllm, resolve_checkpoint
from rgrl.rewards import RewardModelFunction
from rgrl.toy.world import ground_truth
from rgrl.trainers import DiffuGRPOConfig, DiffuGRPOTrainer, RGRLConfig, RGRLTrainer

K = 2


def toy_prompts(rows=4):
    return load_prompts(PromptDataConfig(source="toy", num_prompts=rows))


def config(cls=RGRLConfig, tmp_path="unused", **overrides):
    settings = dict(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, report_to="none",
                    per_device_train_batch_size=4, num_generations=K, max_steps=1, logging_steps=1,
                    save_strategy="no", seed=0, dataloader_pin_memory=False, disable_tqdm=True,
                    diffusion_steps=4, max_completion_length=8, reward_weights=None)
    return cls(**{**settings, **overrides})


def rollout_rows(dataset, groups=2):
    return [{"prompt": dataset[i]["prompt"]} for i in range(groups) for _ in range(K)]


def test_model_and_reward_model_by_name_with_a_python_reward(tmp_path):
    """The GRPOTrainer script shape: model="toy:dream", reward_funcs=[function, "toy:rm"], a LoraConfig without
    targets. The model, its tokenizer and family load natively; the reward model loads once and guides rollouts;
    the logged rewards are exactly the reward model's scores and the function's values."""
    trainer = RGRLTrainer(model="toy:dream", reward_funcs=[ground_truth, "toy:rm"],
                          args=config(tmp_path=tmp_path, reward_weights=[0.0, 1.0]), train_dataset=toy_prompts(),
                          peft_config=LoraConfig(r=4, lora_alpha=8))
    assert trainer.family.name == "dream" and trainer.processing_class is not None
    assert trainer.reward_func_names == ["ground_truth", "rm"]
    scorer = trainer.reward_funcs[1]
    assert isinstance(scorer, RewardModelFunction) and scorer.path == "toy:rm"
    assert trainer.guidance.reward_model is scorer.reward_model, "guided by the reward model among reward_funcs"
    lora = trainer.model.peft_config["default"]
    assert set(lora.target_modules) == set(trainer.family.lora_target_modules), "LoRA targets default to the family's"

    trainer.model.train()
    rows = rollout_rows(trainer.train_dataset)
    batch = trainer._generate_and_score_completions(rows)
    prompts, completions = trainer._logs["prompt"], trainer._logs["completion"]
    expected_rm = scorer.reward_model.score(prompts, [c[-1]["content"] for c in completions]).tolist()
    assert list(trainer._logs["rewards"]["rm"]) == pytest.approx(expected_rm, abs=1e-5)
    assert list(trainer._logs["rewards"]["ground_truth"]) == ground_truth(prompts, completions)
    assert torch.equal(batch["sample_weights"], torch.ones(len(rows)))
    assert "guidance/entropy_weight" in trainer._metrics["train"], "training rollouts are guided"


def test_model_as_a_local_folder_and_as_a_loaded_model(tmp_path):
    folder = resolve_checkpoint("toy:llada")
    by_path = DiffuGRPOTrainer(model=folder, reward_funcs=["toy:rm_llada"], args=config(DiffuGRPOConfig, tmp_path),
                               train_dataset=toy_prompts())
    assert by_path.family.name == "llada" and by_path.guidance is None
    assert next(by_path.model.parameters()).dtype == torch.float32, "bf16 off: weights load in float32"

    loaded = load_dllm("toy:dream", dtype="float32").model  # no tokenizer given: the model's own is loaded
    trainer = RGRLTrainer(model=loaded, reward_funcs=["toy:rm"], args=config(tmp_path=tmp_path),
                          train_dataset=toy_prompts())
    assert trainer.family.name == "dream"
    assert trainer.processing_class.convert_ids_to_tokens(trainer.family.mask_token_id) == "<|mask|>"


def test_hub_id_goes_to_rgrls_native_loader(tmp_path, monkeypatch):
    """A Hub id is loaded by rgrl's loader (transformers' AutoModel with the native Dream/LLaDA classes), not by
    TRL's AutoModelForCausalLM: the requests are served from the toy checkpoint here (no Hub access in tests)."""
    requested = []
    local = resolve_checkpoint("toy:dream")

    def serve(original):
        def from_pretrained(name, *args, **kwargs):
            requested.append(name)
            return original(local if name == "Dream-org/Dream-v0-Instruct-7B" else name, *args, **kwargs)
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", serve(transformers.AutoModel.from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        serve(transformers.AutoTokenizer.from_pretrained))
    trainer = RGRLTrainer(model="Dream-org/Dream-v0-Instruct-7B", reward_funcs=["toy:rm"],
                          args=config(tmp_path=tmp_path), train_dataset=toy_prompts())
    assert requested.count("Dream-org/Dream-v0-Instruct-7B") == 2  # the model and its tokenizer
    assert trainer.family.name == "dream"


def test_rollout_and_guidance_settings_are_config_fields_and_are_used(tmp_path):
    args = config(tmp_path=tmp_path, temperature=0.3, top_p=1.0, top_k=0, max_completion_length=6, diffusion_steps=3,
                  schedule="linear", guidance_steps=2, guidance_lr=0.25)
    trainer = RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm"], args=args, train_dataset=toy_prompts())
    sampler = trainer.sampler_config
    assert (sampler.temperature, sampler.top_p, sampler.top_k, sampler.max_completion_length, sampler.steps) == (
        0.3, None, None, 6, 3), "TRL's 'off' values (top_p 1.0, top_k 0) switch the filters off"
    assert (trainer.guidance.config.steps, trainer.guidance.config.lr) == (2, 0.25)
    assert (args.temperature, args.max_completion_length) == (0.3, 6), "nothing replaced the user's settings"
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rollout_rows(trainer.train_dataset))
    assert batch["completion_ids"].shape[1] <= 6 and batch["completion_noise"].shape[-1] == 6
    assert trainer._metrics["train"]["guidance/rm_forward_backward"][-1] == 2 * 3, "M Adam steps at each of T steps"


def test_settings_that_cannot_be_honoured_are_errors(tmp_path):
    with pytest.raises(ValueError, match="does not support `generation_kwargs`"):
        config(tmp_path=tmp_path, generation_kwargs={"temperature": 0.5})
    with pytest.raises(ValueError, match="invalid rollout setting.*schedule"):
        config(tmp_path=tmp_path, schedule="cosine")
    with pytest.raises(ValueError, match="guidance method must be one of"):
        config(tmp_path=tmp_path, guidance_method="ppo")
    with pytest.raises(ValueError, match="guidance_method is 'none'"):
        config(tmp_path=tmp_path, guidance_method="none", guidance_model="toy:rm")
    with pytest.raises(ValueError, match="model_init_kwargs: unknown key"):
        config(tmp_path=tmp_path, model_init_kwargs={"torch_dtype": "float32"})
    with pytest.raises(TypeError, match="sampler_config"):  # the sampler is configured by the config only
        RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm"], args=config(tmp_path=tmp_path),
                    train_dataset=toy_prompts(), sampler_config=None)


def test_rgrl_without_a_guidance_reward_model_is_an_error_unless_unguided(tmp_path):
    with pytest.raises(ValueError, match="reward_funcs holds none.*guidance_method='none'"):
        RGRLTrainer(model="toy:dream", reward_funcs=[ground_truth], args=config(tmp_path=tmp_path),
                    train_dataset=toy_prompts())
    unguided = RGRLTrainer(model="toy:dream", reward_funcs=[ground_truth],
                           args=config(tmp_path=tmp_path, guidance_method="none"), train_dataset=toy_prompts())
    assert unguided.guidance is None
    with pytest.raises(ValueError, match="holds 2 reward models.*set guidance_model"):
        RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm", "toy:rm_llada"], args=config(tmp_path=tmp_path),
                    train_dataset=toy_prompts())
    chosen = RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm", "toy:rm_llada"],
                         args=config(tmp_path=tmp_path, guidance_model="toy:rm"), train_dataset=toy_prompts())
    assert chosen.guidance.reward_model is chosen.reward_funcs[0].reward_model


@pytest.mark.parametrize("problem,message", [
    (datasets.Dataset.from_dict({"question": ["Hi"]}), "train_dataset has no 'prompt' column"),
    (datasets.Dataset.from_dict({"prompt": []}), "train_dataset is empty"),
])
def test_dataset_problems_are_errors_at_construction(problem, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm"], args=config(tmp_path=tmp_path), train_dataset=problem)
    with pytest.raises(ValueError, match=message.replace("train_", "eval_")):
        RGRLTrainer(model="toy:dream", reward_funcs=["toy:rm"], args=config(tmp_path=tmp_path),
                    train_dataset=toy_prompts(), eval_dataset=problem)


def test_no_checkpointing_deprecation_warning_per_rollout(tmp_path):
    """TRL reads transformers' deprecated `is_gradient_checkpointing` at every rollout; rgrl keeps it quiet."""
    trainer = DiffuGRPOTrainer(model="toy:dream", reward_funcs=["toy:rm"],
                               args=config(DiffuGRPOConfig, tmp_path, activation_checkpointing=True),
                               train_dataset=toy_prompts())
    trainer.model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            trainer._generate_and_score_completions(rollout_rows(trainer.train_dataset))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_trl_reward_model_quick_start_with_the_class_names_changed(tmp_path, monkeypatch):
    """TRL's GRPOTrainer quick start with a reward model (`GRPOTrainer(model=..., reward_funcs="<reward model id>",
    args=GRPOConfig(...), train_dataset=dataset)`) with the classes renamed to RGRL's and toy ids. Everything else is
    TRL's defaults (bf16, 8 rows, K = 8) and the RGRL paper's rollout defaults, except what this CPU-only machine and
    a short test need: `use_cpu` (transformers' requirement for bf16 without a GPU), one step, no reporting, and the
    toy dLLM's 16 slots and steps."""
    monkeypatch.chdir(tmp_path)
    training_args = RGRLConfig(output_dir="dream-RGRL", use_cpu=True, max_steps=1, report_to="none",
                               max_completion_length=16, diffusion_steps=16)
    trainer = RGRLTrainer(model="toy:dream", reward_funcs="toy:rm", args=training_args, train_dataset=toy_prompts(8))
    trainer.train()
    first, last = trainer.state.log_history[0], trainer.state.log_history[-1]
    assert next(trainer.model.parameters()).dtype == torch.bfloat16, "bf16 training loads bfloat16 weights"
    assert {"rewards/rm/mean", "guidance/entropy_weight"} <= set(first), "guided rollouts, scored by the RM"
    assert trainer.state.global_step == 1 and math.isfinite(last["train_loss"])


def test_rollouts_are_profiled_through_trl(tmp_path, monkeypatch):
    """The sampler runs inside TRL's `profiling_context`: its time reaches TRL's profiling entries (wandb, MLflow,
    trackio) beside TRL's own (the reward functions')."""
    from trl.extras.profiling import ProfilingContext

    profiled = []
    monkeypatch.setattr(ProfilingContext, "_log_metrics", lambda self, duration: profiled.append((self.name, duration)))
    trainer = DiffuGRPOTrainer(model="toy:dream", reward_funcs=["toy:rm"], args=config(DiffuGRPOConfig, tmp_path),
                               train_dataset=toy_prompts())
    trainer.model.train()
    trainer._generate_and_score_completions(rollout_rows(trainer.train_dataset))
    names = [name for name, _ in profiled]
    assert names == ["DiffuGRPOTrainer.DiffusionSampler.generate", "DiffuGRPOTrainer.rm",
                     "DiffuGRPOTrainer._calculate_rewards"]
    assert all(duration > 0 for _, duration in profiled)
