"""`rgrl.train` under a launcher, recording what each process saw; driven by tests/test_distributed.py.

    [launcher ...] tests/distributed_worker.py --report DIR [--replay] RECIPE [--section.key value ...]

Runs the recipe exactly as `python -m rgrl.train` does (`load_training_recipe` + `run`) and writes, per process,
DIR/rank<r>.json with:
    world           accelerate's and torch.distributed's view of the processes, DeepSpeed's ZeRO stage
    rollouts        per generation round: this process's prompts, completion ids, the rewards its reward functions
                    returned for its own rows (before any gather), the torch seed it sampled with
    reward_models   every reward model (guidance and scoring): trainable?, ZeRO-partitioned?, part of the policy
                    or the optimizer?, checksum of its weights before and after training
    policy          how many policy weights ZeRO-3 partitioned (0 without ZeRO-3)
Rank 0 also writes DIR/initial_adapter.safetensors (the LoRA weights before the first optimizer step).

--replay makes rollouts a function of the prompt: each group of K copies is sampled alone with a seed hashed from
the prompt, so runs with different process counts sample the same completions for the same global batch and
their learners can be compared.

DeepSpeed on a CPU-only machine: under a DeepSpeed launch, accelerate 1.15's `PartialState` picks a backend only for
accelerator devices; on CPU it keeps `backend=None` and then reports `num_processes == 1, process_index == 0` on
every rank, although `deepspeed.comm` built a real 2-rank group (data would not be sharded, every rank would act as
the main process). `TrainingArguments` passes no backend on its DeepSpeed path, and `use_cpu` would drop DeepSpeed.
So this script creates the state itself with `backend="gloo"` (DeepSpeed's CPU accelerator also speaks gloo) and
tells the Trainer to reuse it (`training.accelerator_config.use_configured_state`). GPU runs need none of this.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from datetime import timedelta
from pathlib import Path

import torch

TIMEOUT = timedelta(seconds=float(os.environ.get("RGRL_TEST_DIST_TIMEOUT", "180")))


def main(argv: list[str]) -> None:
    replay = "--replay" in argv
    argv = [token for token in argv if token != "--replay"]
    if argv[:1] != ["--report"]:
        sys.exit("usage: distributed_worker.py --report DIR [--replay] RECIPE [--section.key value ...]")
    report_dir, recipe, overrides = Path(argv[1]), argv[2], argv[3:]

    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and not torch.cuda.is_available():
        from accelerate import PartialState

        PartialState(backend="gloo", timeout=TIMEOUT)
        overrides += ["--training.accelerator_config", "{use_configured_state: true}"]
    else:
        overrides += ["--training.ddp_timeout", str(int(TIMEOUT.total_seconds()))]

    from rgrl.train import load_training_recipe, run

    recorder = Recorder(report_dir, replay)
    loaded = load_training_recipe(recipe, overrides)
    trainer = run(loaded)
    recorder.finish(trainer)


class Recorder:
    """Wraps the trainers' rollout and the reward functions to record what this process saw."""

    def __init__(self, report_dir: Path, replay: bool):
        from rgrl.rewards import RewardModelFunction
        from rgrl.trainers.base import MaskedDiffusionTrainer

        self.report_dir = report_dir
        self.rollouts: list[dict] = []
        self.local_rewards: list[float] = []
        self.checksums_before: dict[int, float] = {}
        recorder = self

        score = RewardModelFunction.__call__

        def recorded_score(function, prompts, completions, **kwargs):
            values = score(function, prompts, completions, **kwargs)
            recorder.local_rewards.extend(values)
            return values

        RewardModelFunction.__call__ = recorded_score

        generate_and_score = MaskedDiffusionTrainer._generate_and_score_completions

        def recorded_round(trainer, inputs):
            if not recorder.rollouts:
                recorder.start(trainer)
            recorder.local_rewards.clear()
            seed = torch.initial_seed()
            batch = generate_and_score(trainer, inputs)
            recorder.rollouts.append({
                "mode": "train" if trainer.model.training else "eval",
                "step": trainer.state.global_step,
                "seed": seed,
                "prompts": [row["prompt"][-1]["content"] for row in inputs],
                "completion_ids": [ids[mask.bool()].tolist()
                                   for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])],
                "local_rewards": list(recorder.local_rewards),
            })
            return batch

        MaskedDiffusionTrainer._generate_and_score_completions = recorded_round

        if replay:
            rollout = MaskedDiffusionTrainer._rollout

            def replayed_rollout(trainer, prompts, _trainer=None):
                group = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
                merged: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "prompts_seen": []}
                with torch.random.fork_rng():
                    for start in range(0, len(prompts), group):
                        torch.manual_seed(zlib.crc32(json.dumps(prompts[start]).encode()))
                        out = rollout(trainer, prompts[start : start + group])
                        for key in merged:
                            merged[key] += out[key]
                return {**merged, "logprobs": None}

            MaskedDiffusionTrainer._rollout = replayed_rollout

    def start(self, trainer) -> None:
        """Before the first rollout (no optimizer step yet): reward-model checksums, rank 0's initial adapter."""
        for model in reward_models(trainer):
            self.checksums_before[id(model)] = checksum(model)
        if trainer.accelerator.is_main_process and not zero3_partitioned(trainer.model):
            from safetensors.torch import save_file

            policy = trainer.accelerator.unwrap_model(trainer.model)
            adapter = {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_" in name}
            self.report_dir.mkdir(parents=True, exist_ok=True)
            save_file(adapter, self.report_dir / "initial_adapter.safetensors")

    def finish(self, trainer) -> None:
        accelerator = trainer.accelerator
        plugin = accelerator.state.deepspeed_plugin
        policy_ids = {id(p) for p in trainer.model.parameters()}
        optimized = optimizer_parameter_ids(trainer.optimizer)
        report = {
            "world": {
                "num_processes": accelerator.num_processes,
                "process_index": accelerator.process_index,
                "distributed_type": str(accelerator.distributed_type),
                "torch_world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                "zero_stage": plugin.zero_stage if plugin is not None else None,
            },
            "rollouts": self.rollouts,
            "reward_models": [
                {
                    "trainable": any(p.requires_grad for p in model.parameters()),
                    "partitioned": any(hasattr(p, "ds_id") for p in model.parameters()),
                    "in_policy": any(id(p) in policy_ids for p in model.parameters()),
                    "in_optimizer": any(id(p) in optimized for p in model.parameters()),
                    "local_numel": sum(p.numel() for p in model.parameters()),
                    "checksum_before": self.checksums_before.get(id(model)),
                    "checksum_after": checksum(model),
                }
                for model in reward_models(trainer)
            ],
            "policy": {"zero3_partitioned": sum(hasattr(p, "ds_id") for p in trainer.model.parameters()),
                       "parameters": sum(1 for _ in trainer.model.parameters())},
        }
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"rank{accelerator.process_index}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.replace(path)


def reward_models(trainer) -> list[torch.nn.Module]:
    """The distinct reward-model modules of a trainer: the guidance model and those behind reward functions."""
    holders = [getattr(trainer, "guidance", None), *trainer.reward_funcs]
    models = {}
    for holder in holders:
        reward_model = getattr(holder, "reward_model", None)
        if reward_model is not None:
            models[id(reward_model.model)] = reward_model.model
    return list(models.values())


def checksum(model: torch.nn.Module) -> float:
    return sum(p.detach().double().sum().item() for p in model.parameters())


def zero3_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def optimizer_parameter_ids(optimizer) -> set[int]:
    """Ids of the tensors an optimizer updates: torch param groups, and DeepSpeed ZeRO's groups of the model's
    own (16-bit) parameters behind accelerate's wrapper."""
    ids = set()
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        for name in ("param_groups", "bit16_groups", "fp16_groups"):
            for group in getattr(candidate, name, None) or []:
                params = group["params"] if isinstance(group, dict) else group
                ids.update(id(p) for p in params)
    return ids


if __name__ == "__main__":
    main(sys.argv[1:])
