"""Train a masked diffusion LM with RGRL or diffu-GRPO from a YAML recipe.

    python -m rgrl.train RECIPE.yaml [--section.key value | section.key=value ...] [--dry_run] [--help]
    accelerate launch [--config_file launch/….yaml] -m rgrl.train RECIPE.yaml [...]

A recipe has one section per argument of the trainer (`RGRLTrainer` / `DiffuGRPOTrainer`, called as TRL's
`GRPOTrainer`; see recipes/*.yaml; every key is validated, unknown keys are errors):

    trainer         rgrl | diffu_grpo
    model           `model`: the dLLM's name (`path`: folder, Hub id, tiny:/toy: name); the other keys (dtype,
                    attn_implementation, load_in_4bit (QLoRA), trust_remote_code, lora_target_modules and family
                    overrides) become `training.model_init_kwargs`
    lora            `peft_config`: r, alpha, dropout of the trained LoRA adapter (targets: the family's projections,
                    or model.lora_target_modules)
    data            `train_dataset` / `eval_dataset` (rgrl.data.PromptDataConfig); num_eval_prompts > 0 holds out
                    prompts for the unguided evaluation
    rewards         `reward_funcs`: reward models (`model: PATH`), TRL reward functions (`function: module:function`),
                    each with a weight (-> training.reward_weights)
    training        `args`: RGRLConfig or DiffuGRPOConfig -- GRPOConfig / TrainingArguments keys, the rollout
                    (temperature, top_p, top_k, max_completion_length, max_prompt_length, diffusion_steps, schedule,
                    alg, …) and, for rgrl, guidance (guidance_method, guidance_steps, guidance_lr, guidance_model, …)

`python -m rgrl.train --help` lists every key with its help text and default.
Everything is checked before any weights load; `--dry_run` stops there and prints the resolved configuration.
Outputs in `training.output_dir`: checkpoints, the final LoRA adapter (merge it with `python -m rgrl.merge`),
metrics.jsonl, training_curves.png and the recipe as run (recipe.yaml, secrets hidden). A non-empty output_dir needs
`training.resume_from_checkpoint` (a checkpoint folder, or `last`: the newest complete one) or
`training.overwrite_output_dir: true`. SIGTERM/SIGUSR1 checkpoint at the end of the current step and exit 0;
docs/reliability.md lists how every fault and bad input is handled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from rgrl import cli
from rgrl.data import PromptDataConfig, check_prompt_source
from rgrl.models.loading import DLLMConfig, check_model_dir, offline_hub_problem, resolve_checkpoint
from rgrl.recipe import RecipeError, build_dataclass, parse_overrides, read_recipe, to_plain, without_secrets
from rgrl.rewards import RewardModelConfig, import_function, reward_name
from rgrl.trainers.checkpoints import CheckpointError, check_checkpoint, latest_complete_checkpoint
from rgrl.trainers.diffu_grpo_config import DiffuGRPOConfig
from rgrl.trainers.rgrl_config import RGRLConfig

logger = logging.getLogger("rgrl.train")


# ------------------------------------------------------------------------------------------------ recipe schema
@dataclass
class LoraSection:
    """The LoRA adapter trained on the dLLM; its target modules are `model.lora_target_modules` (default: the
    family's attention and MLP projections)."""

    r: int = 32  # LoRA rank
    alpha: float = 32.0  # LoRA scale α (the update is scaled by α / r)
    dropout: float = 0.1  # LoRA dropout (off during rollouts)

    def __post_init__(self):
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1); got r={self.r}, "
                             f"alpha={self.alpha}, dropout={self.dropout}.")


@dataclass
class RewardSection:
    """One reward function: a reward model's discrete score (`model`) or a TRL reward function (`function`)."""

    model: str | None = None  # a reward model (path, Hub id or tiny: name)
    function: str | None = None  # "package.module:function", called as f(prompts, completions, **kwargs)
    name: str | None = None  # metric name rewards/<name>/...; default: the model's or function's name
    weight: float = 1.0  # its weight in the total reward (0: logged only)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # a reward model's weights' dtype
    max_length: int = 4096  # a reward model's longest input (longer ones keep their end)
    batch_size: int = 8  # completions a reward model scores per forward
    trust_remote_code: bool = False  # run a reward model checkpoint's own modeling code

    def __post_init__(self):
        if not math.isfinite(self.weight) or self.batch_size < 1 or self.max_length < 1:
            raise ValueError(f"a reward needs a finite weight, batch_size >= 1 and max_length >= 1; got "
                             f"weight={self.weight}, batch_size={self.batch_size}, max_length={self.max_length}.")

    @property
    def metric_name(self) -> str:
        if self.name:
            return self.name
        if self.model:
            return reward_name(self.model)
        return self.function.split(":")[-1]

    def model_config(self) -> RewardModelConfig:
        return RewardModelConfig(path=self.model, dtype=self.dtype, max_length=self.max_length,
                                 trust_remote_code=self.trust_remote_code)


@dataclass
class TrainingRecipe:
    trainer: Literal["rgrl", "diffu_grpo"] = "rgrl"  # rgrl | diffu_grpo
    model: DLLMConfig | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rewards: list[RewardSection] = field(default_factory=list)


@dataclass
class RGRLRecipe(TrainingRecipe):
    training: RGRLConfig | None = None


@dataclass
class DiffuGRPORecipe(TrainingRecipe):
    training: DiffuGRPOConfig | None = None


SCHEMAS = {"rgrl": RGRLRecipe, "diffu_grpo": DiffuGRPORecipe}
# Sections of earlier recipes, now fields of `training`
MOVED_SECTIONS = {
    "sampler": "temperature, top_p, top_k, max_completion_length (was completion_length), max_prompt_length, "
               "diffusion_steps (was steps), schedule, block_length, alg, alg_temp, deprioritize_eos, "
               "deprioritized_tokens, confidence_from, schedule_eps (was eps), prompt_cache_refresh, reveal_threshold",
    "guidance": "guidance_method, guidance_steps, guidance_lr, guidance_measure_gain, guidance_chunk_rows, "
                "guidance_compile",
    "guidance_model": "guidance_model (the path; default: the reward model among `rewards`), bridge_fallback, "
                      "bridge_split",
}
# `training` keys set from other sections
DERIVED_TRAINING_KEYS = {"reward_weights": "'rewards[i].weight'", "model_init_kwargs": "the `model` section"}


# ------------------------------------------------------------------------------------------------ loading + checks
@dataclass
class LoadedRecipe:
    recipe: TrainingRecipe
    raw: dict  # the recipe as given, overrides applied (saved as output_dir/recipe.yaml)
    path: Path
    notes: list[str]  # hardware checks a dry run on this machine could not make


def load_training_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                         dry_run: bool = False) -> LoadedRecipe:
    """Read, build and check a training recipe without loading any weights. Errors are `RecipeError`s."""
    path = Path(path)
    overrides = list(overrides or [])
    _check_moved_sections(path, overrides)
    trainer = _trainer_name(path, overrides)
    schema = SCHEMAS[trainer]
    raw = read_recipe(path, schema, overrides)
    training = raw.get("training")
    if not isinstance(training, dict):
        raise RecipeError(f"{path}: the recipe needs a `training` section (the {schema.__name__} arguments).")
    for key, owner in DERIVED_TRAINING_KEYS.items():
        if key in training:
            raise RecipeError(f"{path}: 'training.{key}' is set from {owner}; set it there and remove it here.")

    notes = []
    build_input = dict(raw, training=dict(training))
    hardware = _hardware_problems(raw, training)
    if hardware and not dry_run:
        raise RecipeError(f"{path}: this machine cannot run the recipe as written:\n" +
                          "\n".join(f"  - {problem}" for problem in hardware))
    notes += [f"{problem} (a dry run here does not stop on this)" for problem in hardware]
    if any(problem.startswith("training.bf16") for problem in hardware):
        build_input["training"]["use_cpu"] = True  # lets transformers accept bf16 here; not part of the recipe
    for key in ("eval_strategy", "save_strategy", "logging_strategy"):
        if build_input["training"].get(key) is False:  # YAML 1.1 reads an unquoted `no` as false
            build_input["training"][key] = "no"
    recipe = build_dataclass(schema, build_input, source=str(path))
    notes += check_recipe(recipe, path, dry_run)
    recipe.training.reward_weights = [reward.weight for reward in recipe.rewards]
    recipe.training.model_init_kwargs = {name: value for name, value in to_plain(recipe.model).items()
                                         if name not in ("path", "adapter")}
    return LoadedRecipe(recipe=recipe, raw=raw, path=path, notes=notes)


def _check_moved_sections(path: Path, overrides: list[str]) -> None:
    """A recipe (or override) written for the earlier layout gets the new keys named."""
    raw = read_recipe(path, TrainingRecipe)
    given = set(raw) | {key.split(".")[0] for key, _ in parse_overrides(overrides)}
    for section, keys in MOVED_SECTIONS.items():
        if section in given:
            raise RecipeError(f"{path}: the '{section}' section is now part of 'training' (the trainer's config), "
                              f"as the keys {keys}.")


def _trainer_name(path: Path, overrides: list[str]) -> str:
    raw = read_recipe(path, TrainingRecipe)
    trainer = raw.get("trainer", "rgrl")
    for key, value in parse_overrides(overrides):
        if key == "trainer":
            trainer = value
    if trainer not in SCHEMAS:
        raise RecipeError(f"{path}: 'trainer' must be one of {list(SCHEMAS)}, got {trainer!r}.")
    return trainer


def _uses_bf16(training: dict) -> bool:
    bf16 = training.get("bf16")
    return bool(bf16) if bf16 is not None else not training.get("fp16", False)


def _hardware_problems(raw: dict, training: dict) -> list[str]:
    """Every setting this machine cannot run, each with its fix (reported together)."""
    problems = []
    if not torch.cuda.is_available() and not training.get("use_cpu") and _uses_bf16(training):
        where = "set in the recipe" if training.get("bf16") else "GRPOConfig's default"
        problems.append(f"training.bf16 is on ({where}) but this machine has no CUDA GPU: set `training.bf16: false` "
                        "to train in float32 on the CPU")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if model.get("load_in_4bit"):
        problem = _four_bit_problem()
        if problem:
            problems.append(f"model.load_in_4bit is on but {problem}: set `model.load_in_4bit: false` on this "
                            "machine")
    return problems


def check_recipe(recipe: TrainingRecipe, path: Path, dry_run: bool) -> list[str]:
    """Cross-section checks that need no weights; returns notes on hardware checks a dry run skipped."""
    notes = []

    def fail(message: str):
        raise RecipeError(f"{path}: {message}")

    def check_model(name: str, where: str, trust_remote_code: bool = False, is_dllm: bool = False) -> None:
        try:
            resolved = resolve_checkpoint(name)  # local paths must exist; tiny: names are built (seconds, once)
            if is_dllm and os.path.isdir(resolved):
                check_model_dir(resolved, trust_remote_code)
        except (FileNotFoundError, ValueError) as error:
            fail(f"'{where}': {error}")
        offline = offline_hub_problem(name)
        if offline and not dry_run:
            fail(f"'{where}': {offline}.")
        if offline:
            notes.append(f"'{where}': {offline}")

    model = recipe.model
    if model is None:
        fail("the 'model' section (the dLLM to train, with at least `path`) is required.")
    check_model(model.path, "model.path", model.trust_remote_code, is_dllm=True)
    if model.adapter is not None:
        fail("'model.adapter' applies a trained adapter for evaluation; a training run trains a fresh one (to "
             "continue a run, set 'training.resume_from_checkpoint').")

    if not recipe.rewards:
        fail("'rewards' is empty: give at least one reward model (`- model: PATH`) or function (`- function: m:f`).")
    names = [reward.metric_name for reward in recipe.rewards]
    for i, reward in enumerate(recipe.rewards):
        if (reward.model is None) == (reward.function is None):
            fail(f"rewards[{i}] needs exactly one of 'model' (a reward model) and 'function' (module:function).")
        if reward.model is not None:
            check_model(reward.model, f"rewards[{i}].model")
        else:
            try:
                import_function(reward.function)
            except (ValueError, ImportError) as error:
                fail(f"rewards[{i}].function: {error}")
        if names.count(reward.metric_name) > 1:
            fail(f"two reward functions are named {reward.metric_name!r}; give them distinct 'name's.")

    args = recipe.training
    if isinstance(recipe, RGRLRecipe):
        reward_models = sorted({reward.model for reward in recipe.rewards if reward.model is not None})
        if args.guidance_model is not None:
            check_model(args.guidance_model, "training.guidance_model")
        elif args.guided and len(reward_models) != 1:
            fail(f"training.guidance_method is {args.guidance_method!r} and 'rewards' holds {len(reward_models)} "
                 "reward models: set 'training.guidance_model' to the reward model that guides rollouts (or "
                 "guidance_method: none).")

    try:
        check_prompt_source(recipe.data)
    except (ValueError, OSError) as error:
        fail(f"'data.path': {error}")

    if recipe.data.num_eval_prompts > 0:
        try:
            args.check_eval_batch()
        except ValueError as error:
            fail(f"invalid recipe in 'training': {error}")
    elif args.eval_strategy != "no":
        fail(f"training.eval_strategy is {args.eval_strategy.value!r} but there are no held-out prompts: set "
             "'data.num_eval_prompts' (the unguided evaluation set), or eval_strategy: 'no'.")
    if args.resume_from_checkpoint == "last":
        latest = latest_complete_checkpoint(args.output_dir)
        args.resume_from_checkpoint = None if latest is None else str(latest)
        found = latest or f"no complete checkpoint in {args.output_dir}, a fresh start"
        notes.append(f"training.resume_from_checkpoint 'last': {found}")
        logger.info(notes[-1])
    elif args.resume_from_checkpoint:
        try:
            check_checkpoint(args.resume_from_checkpoint)
        except CheckpointError as error:
            fail(f"'training.resume_from_checkpoint': {error}")
    else:
        output_dir = Path(args.output_dir)
        existing = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
        if existing and not args.overwrite_output_dir:
            shown = ", ".join(existing[:4]) + (", …" if len(existing) > 4 else "")
            fail(f"training.output_dir {args.output_dir!r} is not empty ({shown}). To continue that run set "
                 "`training.resume_from_checkpoint: last`; to train into it anyway (files may be overwritten) set "
                 "`training.overwrite_output_dir: true`; or choose another output_dir.")
    return notes


def _four_bit_problem() -> str | None:
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install 'rgrl[quant]')"
    return None


def describe(loaded: LoadedRecipe) -> str:
    """The resolved configuration as YAML: every section in full; for the training arguments, the ones the
    recipe sets plus those rgrl derives (secrets masked); and the batch arithmetic."""
    recipe = loaded.recipe
    sections = {f.name: to_plain(getattr(recipe, f.name)) for f in dataclasses.fields(recipe) if f.name != "training"}
    args = recipe.training
    plain_args = args.to_dict()  # masks *_token fields
    rollout = [name for name in cli.own_fields(type(args)) if name != "gradient_checkpointing"]
    derived = [*rollout, "temperature", "top_p", "top_k", "max_completion_length", *DERIVED_TRAINING_KEYS,
               "steps_per_generation", "generation_batch_size"]
    shown = [name for name in plain_args if name in loaded.raw["training"] or name in derived]
    world = args.world_size
    rows = args.per_device_train_batch_size * args.steps_per_generation
    plan = {
        "processes": world,
        "rows_per_process_per_rollout": rows,
        "prompts_per_rollout": rows * world // args.num_generations,
        "samples_per_prompt": args.num_generations,
        "optimizer_steps_per_rollout": args.steps_per_generation * args.num_iterations
        // args.gradient_accumulation_steps,
    }
    text = yaml.safe_dump({**sections, "training": {name: plain_args[name] for name in shown}}, sort_keys=False,
                          width=120)
    text += f"# training: other arguments keep {type(args).__name__}'s defaults\n"
    text += yaml.safe_dump({"batch_plan": plan}, sort_keys=False)
    for note in loaded.notes:
        text += f"# note: {note}\n"
    return text


# ------------------------------------------------------------------------------------------------ the run
def run(loaded: LoadedRecipe):
    """Load data and models, train, save the final adapter, and evaluate (unguided) on held-out prompts."""
    from peft import LoraConfig

    from rgrl.data import load_prompts
    from rgrl.rewards import RewardModelFunction
    from rgrl.trainers import DiffuGRPOTrainer, MetricsFileCallback, RGRLTrainer
    from rgrl.trainers.inputs import load_reward_model

    recipe, args = loaded.recipe, loaded.recipe.training
    logger.setLevel(logging.INFO if args.should_log else logging.WARNING)  # the main process reports

    train_dataset = load_prompts(recipe.data, "train")
    eval_dataset = load_prompts(recipe.data, "eval") if recipe.data.num_eval_prompts > 0 else None
    logger.info(f"{recipe.trainer}: {len(train_dataset)} training prompts, "
                f"{0 if eval_dataset is None else len(eval_dataset)} held-out prompts; output in {args.output_dir}")

    reward_models = {}  # one copy per distinct reward model (the trainer's guidance shares it)

    def reward_function(reward: RewardSection):
        if reward.function is not None:
            return import_function(reward.function)
        config = reward.model_config()
        key = dataclasses.astuple(config)
        if key not in reward_models:
            reward_models[key] = load_reward_model(config, args)
        return RewardModelFunction(reward_models[key], reward.metric_name, batch_size=reward.batch_size,
                                   path=reward.model)

    trainer_class = RGRLTrainer if isinstance(recipe, RGRLRecipe) else DiffuGRPOTrainer
    trainer = trainer_class(
        recipe.model.path, [reward_function(reward) for reward in recipe.rewards], args,
        train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=[MetricsFileCallback()],
        peft_config=LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout))

    trainer.accelerator.wait_for_everyone()  # every process checked output_dir before anything is written to it
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        (Path(args.output_dir) / "recipe.yaml").write_text(yaml.safe_dump(without_secrets(loaded.raw),
                                                                          sort_keys=False))
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        step = trainer.state.global_step
        if trainer.preemption.received:
            logger.warning(f"{trainer.preemption.received}: stopped after step {step} with checkpoint-{step} saved "
                           f"in {args.output_dir}; resume with --training.resume_from_checkpoint last.")
            return trainer
        trainer.save_model(args.output_dir)
        evaluated = any("eval_reward" in entry and entry.get("step") == step for entry in trainer.state.log_history)
        if eval_dataset is not None and not evaluated:  # the final policy's unguided evaluation
            trainer.evaluate()
    except RuntimeError as error:
        explained = collective_failure(error, args.ddp_timeout, trainer.state.global_step + 1)
        if explained is None:
            raise
        raise CollectiveError(explained) from error
    return trainer


class CollectiveError(RuntimeError):
    """A collective operation failed because another process is stuck or gone; the message says which."""


def collective_failure(error: BaseException, timeout: float, step: int | None = None) -> str | None:
    """An explanation of a timed-out or broken collective (gloo's or NCCL's error text), or None for other errors."""
    text = str(error)
    timed_out = re.search(r"Timed out waiting (\d+)ms for (\w+) operation|timed out|Timeout", text)
    closed = re.search(r"Connection (?:closed|reset) by peer(?: \[?([\w.-]+)\]?(:\d+)?)?", text)
    if not (timed_out or closed):
        return None
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    at = f" during training step {step}" if step is not None else ""
    if closed:
        peer = f" at {closed.group(1)}{closed.group(2) or ''}" if closed.group(1) else ""
        return (f"process {rank} of {world} lost its connection to another process{peer}{at}: that process died "
                "(see its log for why).")
    operation = f" (a {timed_out.group(2)} operation)" if timed_out.lastindex and timed_out.group(2) else ""
    return (f"process {rank} of {world} waited more than training.ddp_timeout={timeout:g} s{at} for the other "
            f"processes to join a collective{operation}: another process is stuck (frozen, swapping, a hung file "
            "system) or dead. If a step legitimately takes longer (long guided rollouts, slow checkpoint saves), "
            "raise training.ddp_timeout.")


def main(argv: list[str] | None = None) -> None:
    command = cli.parse_command_line("python -m rgrl.train", __doc__, argv, lambda: [RGRLRecipe, DiffuGRPORecipe])
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_training_recipe(command.recipe, command.overrides, dry_run=command.dry_run)
        if command.dry_run:
            print(describe(loaded), end="")
            print(f"# {command.recipe}: OK (dry run: no weights loaded)")
            return
        run(loaded)
    except CollectiveError as error:  # each process names itself
        sys.exit(f"error: {error}")
    except (RecipeError, CheckpointError, ConnectionError, PermissionError, FileNotFoundError,
            FloatingPointError) as error:
        _exit_once(f"error: {error}")
    except ValueError as error:
        if not _names_a_file(error):
            raise
        _exit_once(f"error: {error}")


def _names_a_file(error: ValueError) -> bool:
    """rgrl's input errors begin with the file they concern (data files, config.json, checkpoints)."""
    return bool(re.match(r"^[\w./~-]+\.\w+[:,]", str(error)))


def _exit_once(message: str) -> None:
    """Exit with `message` printed by the first process only: the same input error hits every process."""
    if os.environ.get("RANK", "0") == "0":
        sys.exit(message)
    sys.exit(1)


if __name__ == "__main__":
    main()
