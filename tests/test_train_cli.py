"""`python -m rgrl.train`: every shipped training recipe passes --dry_run, every bad recipe gets its error before
any weights load, and an end-to-end run on the tiny checkpoints writes what it promises (adapter, checkpoints,
metrics.jsonl, training_curves.png, wandb/tensorboard logs) and merges into a plain model directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rgrl.recipe import RecipeError
from rgrl.train import load_training_recipe, main

REPO = Path(__file__).resolve().parent.parent
TRAINING_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("steer_"))


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root


def write_recipe(tmp_path, base="tiny_dream.yaml", **sections):
    """A copy of recipes/<base> with sections updated (a None value deletes a key)."""
    recipe = yaml.safe_load((REPO / "recipes" / base).read_text())
    for section, changes in sections.items():
        if isinstance(changes, dict):
            target = recipe.setdefault(section, {})
            for key, value in changes.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        elif changes is None:
            recipe.pop(section, None)
        else:
            recipe[section] = changes
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipes_exist():
    expected = {"wildchat_dream.yaml", "wildchat_llada.yaml", "lmsys_dream.yaml", "lmsys_llada.yaml",
                "wildchat_dream_diffu_grpo.yaml", "wildchat_llada_diffu_grpo.yaml", "lmsys_dream_diffu_grpo.yaml",
                "lmsys_llada_diffu_grpo.yaml", "tiny_dream.yaml", "tiny_llada.yaml", "tiny_dream_diffu_grpo.yaml"}
    assert expected <= set(TRAINING_RECIPES)


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_training_recipe_dry_run(name, capsys, tmp_path):
    main([f"recipes/{name}", "--dry_run", "--training.output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK (dry run: no weights loaded)")
    # the resolved recipe starts at its first section; DeepSpeed may log its accelerator detection to stdout before it
    printed = yaml.safe_load(out[out.index("trainer:"):].removesuffix("OK (dry run: no weights loaded)\n"))
    assert {"temperature", "max_completion_length", "diffusion_steps", "schedule"} <= set(printed["training"])
    assert not {"sampler", "guidance", "guidance_model"} & set(printed), "rollout settings are training fields"


def test_paper_values_of_the_dream_recipes():
    rgrl = load_training_recipe("recipes/wildchat_dream.yaml", dry_run=True).recipe
    args = rgrl.training
    assert (args.learning_rate, args.max_steps, args.num_generations, args.per_device_train_batch_size) == (
        5e-6, 500, 4, 8)
    assert (args.save_steps, args.seed, args.p_mask_prompt, args.beta, args.num_iterations) == (100, 42, 0.3, 0.0, 1)
    assert (rgrl.lora.r, rgrl.lora.alpha, rgrl.lora.dropout, rgrl.model.load_in_4bit) == (32, 32, 0.1, True)
    assert (args.guidance_method, args.guidance_steps, args.guidance_lr) == ("entrgi", 1, 0.5)
    assert (args.diffusion_steps, args.max_completion_length, args.temperature, args.top_p, args.top_k) == (
        128, 128, 0.9, 0.95, 50)
    sampler = args.sampler_config()
    assert (sampler.steps, sampler.max_completion_length, sampler.temperature, sampler.top_p, sampler.top_k) == (
        128, 128, 0.9, 0.95, 50)
    assert args.model_init_kwargs["dtype"] == "bfloat16" and args.model_init_kwargs["load_in_4bit"] is True
    aps = load_training_recipe("recipes/wildchat_dream.yaml", ["training.guidance_method=aps",
                                                               "training.guidance_compile=true"], dry_run=True).recipe
    assert aps.training.guidance_config().method == "aps" and aps.training.guidance_config().compile is True
    assert args.guidance_config().compile is False
    baseline = load_training_recipe("recipes/wildchat_dream_diffu_grpo.yaml", dry_run=True).recipe.training
    assert (baseline.per_device_train_batch_size, baseline.gradient_accumulation_steps, baseline.beta,
            baseline.scale_rewards, baseline.epsilon) == (4, 2, 0.04, "none", 0.2)


def test_dry_run_cli_subprocess():
    result = subprocess.run([sys.executable, "-m", "rgrl.train", "recipes/tiny_dream.yaml", "--dry_run",
                             "--training.diffusion_steps", "4", "training.temperature=0.5"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout[result.stdout.index("trainer:"):])["training"]
    assert (printed["diffusion_steps"], printed["temperature"]) == (4, 0.5) and "OK (dry run" in result.stdout


@pytest.mark.parametrize("command", ["rgrl.train", "rgrl.steer"])
def test_help_lists_every_key_with_help_and_default(command, capsys):
    """One front for both commands: --help prints every recipe key, its default and its help text."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(command).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^  \S+  \(", line)]
    assert len(keys) > 50 and [lines[i] for i in keys if not lines[i + 1].startswith("      ")] == [], "help text"
    if command == "rgrl.train":
        from rgrl.trainers import RGRLConfig

        assert "training.temperature  (float, default: 0.9)" in out
        assert "τ of the rollout sampler" in out
        assert "training.guidance_method  (str, default: 'entrgi')" in out
        assert "model.dtype  (float32 | bfloat16 | float16, default: 'bfloat16')" in out
        assert "rewards[i].weight" in out and "lora.r" in out
        assert "training.loss_type  (str, default: 'grpo')" in out, "diffu-GRPO's own defaults are listed too"
        import dataclasses

        missing = [f.name for f in dataclasses.fields(RGRLConfig) if f.init and f"training.{f.name}" not in out]
        assert missing == []
    else:
        assert "sampler.steps  (int, default: 128)" in out and "guidance.lr  (float, default: 0.5)" in out
        assert "prompts.num_eval_prompts" in out and "held-out prompts" in out


# ------------------------------------------------------------------------------------------------ bad recipes
BAD_RECIPES = {
    "unknown key": (dict(training={"learnig_rate": 0.1}),
                    ["unknown key 'training.learnig_rate'", "Did you mean 'training.learning_rate'", "recipe.yaml"]),
    "earlier sampler section": (dict(sampler={"steps": 3}), ["'sampler' section is now part of 'training'",
                                                             "diffusion_steps (was steps)"]),
    "wrong type": (dict(training={"diffusion_steps": "many"}), ["'training.diffusion_steps' must be an integer"]),
    "bad rollout value": (dict(training={"schedule": "cosine"}), ["invalid rollout setting", "schedule"]),
    "bad guidance value": (dict(training={"guidance_method": "ppo"}), ["guidance method must be one of"]),
    "wrong trainer": (dict(trainer="ppo"), ["'trainer' must be one of"]),
    "rgrl-only key": (dict(trainer="diffu_grpo"), ["unknown key 'training.guidance_"]),
    "generation batch not divisible by K": (dict(training={"per_device_train_batch_size": 6}),
                                            ["generation_batch_size (6)", "num_generations (4)"]),
    "reward weights in training": (dict(training={"reward_weights": [1.0]}), ["'rewards[i].weight'"]),
    "model kwargs in training": (dict(training={"model_init_kwargs": {"dtype": "float32"}}), ["the `model` section"]),
    "unsupported TRL option": (dict(training={"use_vllm": True}), ["does not support `use_vllm`"]),
    "unsupported loss option": (dict(training={"top_entropy_quantile": 0.2}), ["`top_entropy_quantile`"]),
    "KL in RGRL": (dict(training={"beta": 0.04}), ["RGRL has no KL term"]),
    "scale_rewards string": (dict(training={"scale_rewards": "false"}), ["ambiguous", "'none'"]),
    "missing model": (dict(model={"path": "./no/such/model"}), ["'model.path'", "./no/such/model"]),
    "missing guidance model": (dict(training={"guidance_model": "/no/rm"}), ["'training.guidance_model'", "/no/rm"]),
    "missing reward model": (dict(rewards=[{"model": "./no_rm"}]), ["'rewards[0].model'"]),
    "bad reward function": (dict(rewards=[{"function": "no_such_module:score"}]),
                            ["rewards[0].function", "no_such_module"]),
    "no rewards": (dict(rewards=[]), ["'rewards' is empty"]),
    "missing data": (dict(data={"path": "recipes/data/none.jsonl"}), ["'data.path'", "none.jsonl"]),
    "missing checkpoint": (dict(training={"resume_from_checkpoint": "outputs/none/checkpoint-7"}),
                           ["'training.resume_from_checkpoint'"]),
    "guidance without a reward model": (dict(rewards=[{"function": "rgrl.toy.world:ground_truth"}]),
                                        ["'rewards' holds 0 reward models", "training.guidance_model"]),
    "unused guidance model": (dict(training={"guidance_method": "none", "guidance_model": "tiny:rm"}),
                              ["guidance_model='tiny:rm' is set but guidance_method is 'none'"]),
    "eval without held-out prompts": (dict(data={"num_eval_prompts": 0}), ["data.num_eval_prompts"]),
    "eval groups split": (dict(training={"per_device_eval_batch_size": 6}), ["eval batch size", "6"]),
    "no training section": (dict(training=None), ["needs a `training` section"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_errors(case, tmp_path):
    sections, fragments = BAD_RECIPES[case]
    path = write_recipe(tmp_path, **sections)
    with pytest.raises(RecipeError) as error:
        load_training_recipe(path, dry_run=True)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_bad_override_names_the_closest_key(tmp_path):
    with pytest.raises(RecipeError, match="Did you mean 'training.guidance_lr'"):
        load_training_recipe("recipes/tiny_dream.yaml", ["--training.guidance_lr_", "0.1"], dry_run=True)


def test_unquoted_no_is_the_strategy_no():
    args = load_training_recipe("recipes/tiny_dream.yaml", ["--training.save_strategy", "no"], dry_run=True)
    assert args.recipe.training.save_strategy == "no"


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(write_recipe(tmp_path, training={"diffusion_stpes": 3})), "--dry_run"])
    assert "unknown key 'training.diffusion_stpes'" in str(exit_info.value.code)


def test_unaligned_checkpoints_warn(tmp_path):
    path = write_recipe(tmp_path, "tiny_dream_diffu_grpo.yaml", training={"save_steps": 1})
    with pytest.warns(UserWarning, match="generation boundary"):
        load_training_recipe(path, dry_run=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_gpu_only_settings_fail_clearly_on_cpu(tmp_path):
    with pytest.raises(RecipeError, match="load_in_4bit is on but this machine has no CUDA GPU"):
        load_training_recipe(write_recipe(tmp_path, model={"load_in_4bit": True}))
    with pytest.raises(RecipeError, match="training.bf16 is on .* no CUDA GPU"):
        load_training_recipe(write_recipe(tmp_path, training={"bf16": None}))
    notes = load_training_recipe("recipes/wildchat_dream.yaml", dry_run=True).notes
    assert any("load_in_4bit" in note for note in notes) and any("bf16" in note for note in notes)


# ------------------------------------------------------------------------------------------------ end to end
HUB_TOKEN = "hf_SENTINELtoken0123456789"  # given on the command line: must not reach any file the run writes


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python -m rgrl.train recipes/tiny_dream.yaml` for 2 steps, reporting to wandb (offline) and tensorboard."""
    out = tmp_path_factory.mktemp("tiny_dream")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(out), "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    command = [sys.executable, "-m", "rgrl.train", "recipes/tiny_dream.yaml", "--training.output_dir", str(out),
               "--training.max_steps", "2", "--training.save_steps", "2", "--training.eval_steps", "2",
               "--training.report_to", "[wandb, tensorboard]", "--training.hub_token", HUB_TOKEN]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_end_to_end_outputs(tiny_run):
    out = tiny_run
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "checkpoint-2" / "optimizer.pt").is_file()
    assert (out / "training_curves.png").stat().st_size > 1000
    assert yaml.safe_load((out / "recipe.yaml").read_text())["trainer"] == "rgrl"
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if "loss" in e]
    assert [e["step"] for e in train] == [1, 2]
    assert {"reward", "rewards/rm/mean", "guidance/reward_before", "completions/mean_length"} <= set(train[0])
    assert "guidance/reward_gain" not in train[0]  # measure_gain (an extra RM forward per step) is off by default
    assert any("eval_reward" in e and e["step"] == 2 for e in entries)
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard wrote no events"


def test_tokens_reach_no_written_file(tiny_run):
    """training_args.bin (output folder and checkpoints), recipe.yaml, wandb's run files (config, recorded command
    line), tensorboard's events: none holds the token given with --training.hub_token."""
    files = [path for path in tiny_run.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"training_args.bin", "recipe.yaml"} <= names and any(n.startswith("events.out") for n in names)
    assert any(path.name == "training_args.bin" and "checkpoint-2" in path.parts for path in files)
    leaking = [str(path) for path in files if HUB_TOKEN.encode() in path.read_bytes()]
    assert leaking == []
    assert yaml.safe_load((tiny_run / "recipe.yaml").read_text())["training"]["hub_token"] == "<hidden>"


def test_merged_adapter_loads_as_a_plain_model(tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from rgrl.merge import merge_adapter
    from rgrl.models.loading import load_dllm

    merged_dir = merge_adapter(tiny_run, tmp_path / "merged", dtype="float32")
    merged = AutoModel.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = load_dllm("tiny:dream", dtype="float32").model
    policy = PeftModel.from_pretrained(base, str(tiny_run)).eval()
    ids = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(FileExistsError):
        merge_adapter(tiny_run, merged_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_dream.yaml", "tiny_llada.yaml", "tiny_dream_diffu_grpo.yaml"])
def test_tiny_recipe_trains_as_shipped(name, tmp_path):
    command = [sys.executable, "-m", "rgrl.train", f"recipes/{name}", "--training.output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in entries if "eval_reward" in e] == [2, 4]
    assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / "adapter_model.safetensors").is_file()
