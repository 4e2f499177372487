"""What RGRL and diffu-GRPO share: TRL's GRPO loop with masked-diffusion rollouts and likelihoods.

Both trainers keep TRL's data pipeline (RepeatSampler, generation buffer, shuffling into micro-batches), reward
functions, logging, checkpointing and eval loop. They replace what assumes a causal LM:

  rollout      `rollout_func` (TRL's public seam) runs `rgrl.sampling.DiffusionSampler` with the current policy in
               eval mode (no dropout, LoRA included); prompts are rendered with the dLLM's chat template there.
  batch        `_generate_and_score_completions`: rewards → one signal per completion (advantages or weights),
               padded tensors, and the random masks of the likelihood estimator drawn once per rollout and
               stored in the batch (so they travel with their rows through TRL's shuffle and split).
  log-probs    `rgrl.trainers.likelihood` instead of TRL's causal path (`_get_per_token_logps_and_entropies`
               is guarded: it would score clean completions visible to a bidirectional model; diffu-GRPO answers
               it with the diffusion log-probs, so TRL's own loss runs on them).

  faults       rows without a finite total reward get no signal (and are counted), a NaN/inf loss or gradient
               skips the optimizer step, a NaN/inf adapter is never saved, SIGTERM/SIGUSR1 checkpoint and stop,
               checkpoints get a completion marker (`rgrl.trainers.guards`, `rgrl.trainers.checkpoints`).

The constructor takes `GRPOTrainer`'s arguments: models and reward models by name are loaded by
`rgrl.trainers.inputs`, the rollout's settings come from the config (`MaskedDiffusionConfig.sampler_config()`).
Subclasses supply `_per_sample_signal`, `_compute_loss` and optionally `_behaviour_log_probs` and `_build_guidance`.
Pinned to TRL 1.16: the private methods overridden or called here are listed in `_TRL_PRIVATE_SURFACE`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import time
import warnings

import torch
from accelerate.utils import gather_object
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from rgrl.models.family import DiffusionFamily
from rgrl.rewards import reward_name
from rgrl.sampling import DiffusionSampler
from rgrl.trainers.checkpoints import CheckpointMarker
from rgrl.trainers.config import MaskedDiffusionConfig
from rgrl.trainers.guards import NonFiniteStepGuard, PreemptionCallback, any_process
from rgrl.trainers.inputs import check_prompt_dataset, load_policy, reward_functions
from rgrl.trainers.likelihood import completion_log_probs, draw_noise, token_weights

logger = logging.getLogger(__name__)
# transformers 5 deprecates `is_gradient_checkpointing`, which TRL 1.16 and peft still read (every rollout, in TRL)
_CHECKPOINTING_DEPRECATION = "`is_gradient_checkpointing` is deprecated"

# TRL 1.16 internals this module relies on (a TRL bump must re-check them; tests/test_trainers.py has a contract test).
_TRL_PRIVATE_SURFACE = (
    "_generate", "_calculate_rewards", "_generate_and_score_completions", "_compute_loss",
    "_get_per_token_logps_and_entropies", "_metrics", "_logs", "_pending_metrics", "_pending_extra_logs", "_step",
    "reward_func_names", "reward_weights", "num_generations_eval", "num_iterations",
    "current_gradient_accumulation_steps",
)

def total_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, F] rewards per function (NaN: the function did not score the row, TRL's None) and [F] weights -> [N]
    weighted sums over the functions that scored the row; NaN where none did or where the sum is not finite
    (a function returned ±inf or NaN-producing values)."""
    total = (rewards_per_func * weights).nansum(dim=1)
    unscored = rewards_per_func.isnan().all(dim=1)
    return total.masked_fill(unscored | ~total.isfinite(), math.nan)


class MaskedDiffusionTrainer(GRPOTrainer, metaclass=abc.ABCMeta):
    """`GRPOTrainer` whose rollouts and log-likelihoods are those of a masked diffusion LM; called as `GRPOTrainer`.

    Args:
        model: the dLLM: a name (local folder, Hub id, or rgrl's `tiny:`/`toy:` checkpoints), loaded with
            `args.model_init_kwargs`, or a loaded model. Its tokenizer and family are inferred. With `peft_config`,
            TRL wraps it in a LoRA adapter (targets default to the family's projections), and the reference model
            of a KL term is the same model with the adapter disabled.
        reward_funcs: TRL reward functions (callables `f(prompts, completions, **kwargs) -> list[float]`) and reward
            models by name (scored by `rgrl.rewards.RewardModelFunction`: the decoded completion, rendered with the
            reward model's chat template; the model stays out of TRL's hands, which would shard it under ZeRO-3).
        args: the trainer's config (`RGRLConfig` / `DiffuGRPOConfig`), rollout settings included; default: the
            config's defaults.
        train_dataset, eval_dataset: prompts in a `prompt` column (text or chat messages).
        processing_class: the dLLM tokenizer (default: the model's own).
        family: the model's `DiffusionFamily` (default: inferred from its config and `args.model_init_kwargs`).
    """

    _signal_key = "advantages"  # name of the per-completion learning signal in the batch
    _config_class = MaskedDiffusionConfig

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: MaskedDiffusionConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        *,
        family: DiffusionFamily | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path
            args = self._config_class(output_dir=f"{reward_name(name)}-{type(self).__name__.removesuffix('Trainer')}")
        if not isinstance(args, self._config_class):
            raise TypeError(f"{type(self).__name__} needs a {self._config_class.__name__}, got {type(args).__name__}.")
        check_prompt_dataset(train_dataset, "train_dataset")
        check_prompt_dataset(eval_dataset, "eval_dataset")
        if args.beta != 0.0 and peft_config is None:
            raise ValueError(
                "A KL term (beta > 0) needs LoRA: pass the base model and a `peft_config`; the reference model is the "
                "base model with the adapter disabled."
            )
        if args.beta != 0.0 and hasattr(model, "peft_config"):
            raise ValueError(
                "With beta > 0, pass the base model plus `peft_config`, not a PeftModel: TRL would otherwise train "
                "against a frozen copy of the adapter instead of the base model."
            )
        model, processing_class, self.family = load_policy(model, args, processing_class, family)
        if peft_config is not None and getattr(peft_config, "target_modules", False) is None:
            targets = self.family.lora_target_modules
            peft_config = dataclasses.replace(
                peft_config, target_modules=targets if isinstance(targets, str) else list(targets))
        reward_funcs = reward_functions(reward_funcs, args)
        if not reward_funcs:
            raise ValueError("reward_funcs is empty: give at least one reward function or reward model name.")
        self.sampler_config = args.sampler_config()
        self.guidance = self._build_guidance(args, reward_funcs, processing_class, model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.generation_config = GenerationConfig(  # TRL reads the stop ids (clipped_ratio) and the pad id here
            eos_token_id=list(self.family.stop_token_ids), pad_token_id=self.family.pad_token_id
        )
        self._rollout_seconds = 0.0  # total time in _generate_and_score_completions, for the learner's share
        self.non_finite_loss = False  # a micro-batch loss of this optimizer step was NaN/inf (read by the guard)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'", category=UserWarning)
            warnings.filterwarnings("ignore", message=_CHECKPOINTING_DEPRECATION, category=FutureWarning)
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
                rollout_func=self._rollout,
            )
        self.step_guard = NonFiniteStepGuard(self)
        self.preemption = PreemptionCallback(self)
        for callback in (self.step_guard, self.preemption, CheckpointMarker(self)):
            self.add_callback(callback)

    def _build_guidance(self, args, reward_funcs: list, tokenizer, model):
        """The `RewardGuidance` of training rollouts, or None (diffu-GRPO: unguided)."""
        return None

    # ------------------------------------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _per_sample_signal(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """World rewards [N] (groups of `group_size` consecutive rows, NaN = unscorable) -> signal [N]."""

    def _behaviour_log_probs(self, batch: dict, mode: str) -> dict:
        """Extra no-grad log-probs to store in the batch (diffu-GRPO: old and reference)."""
        return {}

    def _guidance(self, mode: str):
        """The `RewardGuidance` of rollouts in `mode`: training rollouts only (evaluation is unguided)."""
        return self.guidance if mode == "train" else None

    def _likelihood_estimator(self) -> str:
        return "one_step"

    # ------------------------------------------------------------------------------------------------ rollout
    def _rollout(self, prompts: list, trainer=None) -> dict:
        """TRL's rollout seam: this process's prompts (K consecutive copies each) -> unpadded ids per row, and
        the prompts as the dLLM saw them (`prompts_seen`: cut to `max_prompt_length`)."""
        mode = "train" if self.model.training else "eval"
        guidance = self._guidance(mode)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CHECKPOINTING_DEPRECATION, category=FutureWarning)
            with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
            ) as policy:
                sampler = DiffusionSampler(policy, self.processing_class, self.family, self.sampler_config, guidance)
                with self.accelerator.autocast(), profiling_context(self, "DiffusionSampler.generate"):
                    sample = sampler.generate(prompts)  # eval mode inside, mode restored
        metrics = {"guidance/sampler_seconds": sample.stats.seconds}
        if guidance is not None:
            stats = sample.stats.guidance.as_metrics()
            metrics["guidance/seconds"] = stats.pop("seconds")
            metrics.update({f"guidance/{name}": value for name, value in stats.items()})
        self._log_world_means(mode, metrics)
        return {
            "prompt_ids": [ids[keep].tolist() for ids, keep in zip(sample.prompt_ids, sample.prompt_mask)],
            "completion_ids": [ids[keep].tolist() for ids, keep in zip(sample.completion_ids, sample.completion_mask)],
            "logprobs": None,
            "prompts_seen": sample.prompts,
        }

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, torch.Tensor]:
        """One rollout round on this process's rows -> the training batch (B-major tensors)."""
        start = time.perf_counter()
        mode = "train" if self.model.training else "eval"
        prompts = [row["prompt"] for row in inputs]
        prompt_ids, completion_ids, _, completions, _, extra, _, _ = self._generate(prompts)
        prompts = extra["prompts_seen"]  # the reward functions score the prompts the dLLM answered (maybe cut)
        rewards_per_func = self._calculate_rewards(inputs, prompts, completions, completion_ids)  # [N_world, F]
        rewards = total_rewards(rewards_per_func, self.reward_weights.to(rewards_per_func.device))
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # rows without a finite total reward are left out of the group statistics and get no learning signal
        signal = self._per_sample_signal(rewards, group_size).masked_fill(rewards.isnan(), 0.0)
        self._log_rewards(mode, prompts, completions, rewards_per_func, rewards, signal, group_size)

        batch = self._pad(prompt_ids, completion_ids)
        rank, rows = self.accelerator.process_index, len(prompts)
        batch[self._signal_key] = signal[rank * rows : (rank + 1) * rows]
        batch["num_items_in_batch"] = self.accelerator.gather(batch["completion_mask"].sum()).sum()
        batch.update(draw_noise(
            batch["prompt_mask"], self.args.max_completion_length, self.args.p_mask_prompt,
            self._likelihood_estimator(), iterations=self.num_iterations if mode == "train" else 1,
        ))
        batch.update(self._behaviour_log_probs(batch, mode))
        elapsed = time.perf_counter() - start
        self._rollout_seconds += elapsed
        self._log_world_means(mode, {"guidance/rollout_seconds": elapsed})
        return batch

    def _pad(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Prompts left-padded, completions right-padded, with 0/1 masks: [B, P] and [B, C]."""
        device, pad_id = self.accelerator.device, self.family.pad_token_id

        def padded(rows, side):
            tensors = [torch.tensor(row, dtype=torch.long, device=device) for row in rows]
            ids = pad_sequence(tensors, batch_first=True, padding_value=pad_id, padding_side=side)
            ones = [torch.ones_like(t) for t in tensors]
            return ids, pad_sequence(ones, batch_first=True, padding_value=0, padding_side=side)

        prompt_ids, prompt_mask = padded(prompt_ids, "left")
        completion_ids, completion_mask = padded(completion_ids, "right")
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "completion_ids": completion_ids, "completion_mask": completion_mask}

    # ------------------------------------------------------------------------------------------------ learner
    def _log_probs(self, model, inputs: dict, iteration: int) -> torch.Tensor:
        """[B, C] log-probs of the completions under `model`, with the batch's `iteration`-th noise draw."""
        return completion_log_probs(
            model, self.family, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
            inputs["prompt_noise"][:, iteration], inputs["completion_noise"][:, iteration],
        )

    def _token_weights(self, inputs: dict, iteration: int) -> torch.Tensor:
        return token_weights(inputs["completion_mask"], inputs["completion_noise"][:, iteration],
                             inputs["mask_rate"][:, iteration])

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        raise RuntimeError(
            "TRL's causal log-prob path does not apply to masked diffusion LMs; use rgrl.trainers.likelihood."
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, rollout_before = time.perf_counter(), self._rollout_seconds
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.non_finite_loss = True  # NonFiniteStepGuard skips this optimizer step
        learner = time.perf_counter() - start - (self._rollout_seconds - rollout_before)
        self._log_world_means("train", {"guidance/learner_seconds": learner})
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (and, in checkpoints, the rest) -- never an adapter holding NaN/inf values."""
        bad = [name for name, p in self.model.named_parameters()
               if p.requires_grad and not getattr(p, "ds_tensor", p).isfinite().all()]
        if any_process(bool(bad), self.accelerator.device):
            where = f" ({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''})" if bad else " (on another process)"
            raise FloatingPointError(
                f"Not saving to {output_dir or self.args.output_dir}: the trained weights hold NaN/inf values{where} "
                f"at step {self.state.global_step}. Resume from the last checkpoint with a lower learning_rate, "
                "and check the reward functions (metric rewards/non_finite) and learner/skipped_steps."
            )
        super().save_model(output_dir, _internal_call)

    # ------------------------------------------------------------------------------------------------ metrics
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the running count of skipped optimizer steps (kept across resumes)
            earlier = next((e["learner/skipped_steps"] for e in reversed(self.state.log_history)
                            if "learner/skipped_steps" in e), 0)
            logs["learner/skipped_steps"] = earlier + self.step_guard.take_skipped()
        super().log(logs, start_time)

    def _log_world_means(self, mode: str, metrics: dict[str, float]) -> None:
        """Append the mean over processes of each value (every process must pass the same names, in order)."""
        values = torch.tensor([list(metrics.values())], dtype=torch.float32, device=self.accelerator.device)
        means = self.accelerator.gather(values).mean(dim=0).tolist()
        for name, value in zip(metrics, means):
            self._metrics[mode][name].append(value)

    def _log_rewards(self, mode, prompts, completions, rewards_per_func, rewards, signal, group_size) -> None:
        """TRL's reward metrics and completion logs, from world tensors ([N, F], [N], [N])."""
        metrics = self._metrics[mode]
        # statistics over finite values only; a metric with no finite value this round is not logged for it
        for i, name in enumerate(self.reward_func_names):
            values = rewards_per_func[:, i][rewards_per_func[:, i].isfinite()]
            if len(values):
                metrics[f"rewards/{name}/mean"].append(values.mean().item())
                metrics[f"rewards/{name}/std"].append(nanstd(values).item() if len(values) > 1 else 0.0)
        finite = rewards[rewards.isfinite()]
        if len(finite):
            metrics["reward"].append(finite.mean().item())
            metrics["reward_std"].append(nanstd(finite).item() if len(finite) > 1 else 0.0)
        non_finite = int(rewards.isnan().sum())
        metrics["rewards/non_finite"].append(float(non_finite))
        if non_finite and self.accelerator.is_main_process:
            culprits = [name for i, name in enumerate(self.reward_func_names)
                        if not rewards_per_func[:, i][rewards.isnan()].isfinite().all()]
            logger.warning(f"{non_finite} of {len(rewards)} completions have no finite total reward (NaN/inf from "
                           f"{', '.join(culprits)}): they get no learning signal and are left out of the reward "
                           "statistics.")
        if group_size > 1:
            group_std = nanstd(rewards.view(-1, group_size), dim=1)
            group_std = group_std[group_std.isfinite()]
            if len(group_std):
                metrics["frac_reward_zero_std"].append(torch.isclose(group_std, torch.zeros_like(group_std))
                                                       .float().mean().item())

        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend(signal.tolist())

        # What reward functions logged through TRL's `log_extra` / `log_metric` kwargs, gathered in sorted order.
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            local = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(local).view(-1, 2).sum(dim=0).tolist()
            metrics[name].append(total / max(count, 1))
        self._pending_metrics.clear()
