"""The training arguments both masked-diffusion trainers share: `GRPOConfig` plus the rollout's settings."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import get_args

import torch
from trl import GRPOConfig

from rgrl.models.loading import DLLMConfig
from rgrl.recipe import is_secret
from rgrl.sampling import CONFIDENCE_RULES, SCHEDULES, SamplerConfig
from rgrl.sampling.sampler import DEPRIORITIZED_TOKEN_SETS, ConfidenceFrom

# GRPOConfig options whose code paths these trainers replace or cannot honour: any value but TRL's default is an
# error naming the option. (vllm_* options only act with use_vllm.)
UNSUPPORTED_OPTIONS = {
    "use_vllm": "rollouts run on rgrl's diffusion sampler",
    "use_transformers_continuous_batching": "rollouts run on rgrl's diffusion sampler",
    "use_transformers_paged": "rollouts run on rgrl's diffusion sampler",
    "generation_kwargs": "decoding is set by the rollout fields (temperature, top_p, top_k, diffusion_steps, …)",
    "cache_implementation": "masked diffusion models decode without a KV cache",
    "min_p": "the sampler supports temperature, top_p and top_k",
    "repetition_penalty": "the sampler supports temperature, top_p and top_k",
    "chat_template_kwargs": "prompts are rendered by the family's chat template",
    "mask_truncated_completions": "not implemented for diffusion rollouts",
    "pad_to_multiple_of": "batches are padded by rgrl",
    "cast_lm_head_to_fp32": "log-probs are computed in float32 already",
    "use_liger_kernel": "the native Dream/LLaDA models are not patched by Liger",
    "sync_ref_model": "the reference model is the base model with the LoRA adapter disabled",
    "top_entropy_quantile": "not implemented for diffusion likelihoods",
    "entropy_coef": "not implemented for diffusion likelihoods",
    "use_adaptive_entropy": "not implemented for diffusion likelihoods",
    "off_policy_mask_threshold": "not implemented for diffusion likelihoods",
    "delta": "not implemented for diffusion likelihoods",
    "importance_sampling_level": "ratios are per token",
    "router_aux_loss_coef": "Dream and LLaDA are dense models",
    "multi_objective_aggregation": "rewards are summed with `reward_weights`, then turned into the learning signal",
}

_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


@dataclass
class MaskedDiffusionConfig(GRPOConfig):
    """`GRPOConfig` for masked diffusion LMs; base of `RGRLConfig` and `DiffuGRPOConfig`.

    The rollout is configured here, with TRL's names where TRL has one (`temperature`, `top_p` (1.0: off), `top_k`
    (0: off), `max_completion_length` (L, the masked slots after the prompt), `max_prompt_length`), plus the
    diffusion settings (`diffusion_steps` T, `schedule`, `block_length`, `alg`, `deprioritize_eos`, …);
    `sampler_config()` turns them into the sampler's `rgrl.sampling.SamplerConfig`, which validates them. Defaults
    are the paper's RGRL rollouts (T = L = 128, τ 0.9, top-p 0.95, top-k 50, linear schedule, entropy ranking).

    `model_init_kwargs` configure a model given to the trainer by name: the fields of `rgrl.models.DLLMConfig`
    (`dtype`, default float32 unless bf16/fp16 training; `attn_implementation`, `load_in_4bit`, family overrides).
    Gradient checkpointing is on by default, under transformers' current name `activation_checkpointing`.
    """

    # rollout: TRL's fields, with the paper's RGRL rollout values
    temperature: float = field(default=0.9, metadata={"help": "τ of the rollout sampler (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus filter of the rollout sampler (1.0: off)."})
    top_k: int = field(default=50, metadata={"help": "Top-k filter of the rollout sampler (0: off)."})
    max_completion_length: int | None = field(
        default=128, metadata={"help": "L: masked completion slots after the prompt."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longer prompts keep the end of their last user turn (None: no limit)."})
    # rollout: the diffusion sampler's own settings (rgrl.sampling.SamplerConfig)
    diffusion_steps: int = field(default=128, metadata={"help": "T: denoising steps per rollout."})
    schedule: str = field(default="linear", metadata={
        "help": f"How many slots each step reveals: {' | '.join(SCHEDULES)}."})
    block_length: int | None = field(default=None, metadata={
        "help": "LLaDA-style semi-autoregressive blocks of this many slots (None: one block)."})
    alg: str = field(default="entropy", metadata={
        "help": f"Confidence rule ranking the masked slots: {' | '.join(CONFIDENCE_RULES)}."})
    alg_temp: float = field(default=0.0, metadata={
        "help": "> 0: draw the slots to reveal from softmax(confidence / alg_temp) instead of the top ones."})
    deprioritize_eos: bool = field(default=False, metadata={
        "help": "Reveal slots whose drawn token is a held-back stop token last."})
    deprioritized_tokens: str = field(default="eos", metadata={
        "help": f"Which drawn tokens deprioritize_eos holds back: {' | '.join(DEPRIORITIZED_TOKEN_SETS)}."})
    confidence_from: str = field(default="guided", metadata={
        "help": f"Rank slots by the guided or the unguided logits: {' | '.join(get_args(ConfidenceFrom))}."})
    schedule_eps: float = field(default=1e-3, metadata={"help": "Final timestep of the dream schedule."})
    prompt_cache_refresh: int = field(default=0, metadata={
        "help": "Cache mode: recompute the prompt's keys/values every r steps (0: off, exact)."})
    reveal_threshold: float | None = field(default=None, metadata={
        "help": "Cache mode: also reveal every slot whose drawn token has at least this probability (None: off)."})

    p_mask_prompt: float = field(
        default=0.3, metadata={"help": "Probability of masking each prompt token in the likelihood estimate."}
    )
    activation_checkpointing: bool | None = field(
        default=True, metadata={"help": "Trade compute for memory (gradient checkpointing)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train into a non-empty output_dir without resuming (its files may be "
                                         "overwritten). Without it, a non-empty output_dir needs "
                                         "resume_from_checkpoint."}
    )

    def __post_init__(self):
        if self.gradient_checkpointing is not None:  # the deprecated name, as TRL's docs still spell it
            self.activation_checkpointing = self.gradient_checkpointing
        self._check_ranges()
        if isinstance(self.scale_rewards, str) and self.scale_rewards.lower() in ("true", "false"):
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} is ambiguous (a string, not a boolean): use 'none' (no "
                "division by the reward std), 'group' or 'batch'."
            )
        for name, reason in UNSUPPORTED_OPTIONS.items():  # before GRPOConfig resolves any of them
            if getattr(self, name) != _GRPO_DEFAULTS[name]:
                raise ValueError(
                    f"{type(self).__name__} does not support `{name}` ({reason}); remove it (TRL's default is "
                    f"{_GRPO_DEFAULTS[name]!r}, got {getattr(self, name)!r})."
                )
        super().__post_init__()
        if self.scale_rewards not in ("none", "group", "batch"):
            raise ValueError(f"scale_rewards must be 'none', 'group' or 'batch', got {self.scale_rewards!r}.")
        if not 0.0 <= self.p_mask_prompt <= 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1], got {self.p_mask_prompt}.")
        rows = self.per_device_train_batch_size * self.steps_per_generation
        if rows % self.num_generations:
            raise ValueError(
                f"The {self.num_generations} samples of a prompt must sit on one process: "
                f"per_device_train_batch_size × steps_per_generation = {self.per_device_train_batch_size} × "
                f"{self.steps_per_generation} = {rows} must be a multiple of num_generations={self.num_generations}."
            )
        if self.eval_strategy != "no":
            self.check_eval_batch()
        self.sampler_config()  # validates the rollout fields
        self._check_model_init_kwargs()
        self._warn_unaligned_checkpoints()

    def sampler_config(self) -> SamplerConfig:
        """The rollout sampler's settings (TRL's "off" values top_p = 1.0 and top_k = 0 become None)."""
        try:
            return SamplerConfig(
                steps=self.diffusion_steps, max_completion_length=self.max_completion_length, schedule=self.schedule,
                block_length=self.block_length, alg=self.alg, alg_temp=self.alg_temp, temperature=self.temperature,
                top_p=None if self.top_p == 1.0 else self.top_p, top_k=self.top_k or None,
                deprioritize_eos=self.deprioritize_eos, deprioritized_tokens=self.deprioritized_tokens,
                confidence_from=self.confidence_from, eps=self.schedule_eps, max_prompt_length=self.max_prompt_length,
                prompt_cache_refresh=self.prompt_cache_refresh, reveal_threshold=self.reveal_threshold)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{type(self).__name__}: invalid rollout setting: {error}") from None

    def _check_model_init_kwargs(self) -> None:
        """`model_init_kwargs` are `DLLMConfig` fields (a model given by name loads with them); `adapter` is for
        evaluating a trained policy, not for training a fresh adapter."""
        kwargs = self.model_init_kwargs or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"model_init_kwargs must be a mapping, got {kwargs!r}.")
        valid = {f.name for f in dataclasses.fields(DLLMConfig)} - {"path", "adapter"}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ValueError(f"model_init_kwargs: unknown key(s) {unknown}; a model given by name loads with the "
                             f"fields of rgrl.models.loading.DLLMConfig: {', '.join(sorted(valid))}.")

    # (name, predicate, requirement) of the numeric arguments neither TRL nor transformers range-checks
    _RANGES = (
        ("learning_rate", lambda v: v > 0, "> 0"),
        ("max_steps", lambda v: v == -1 or v >= 1, ">= 1 (or -1: train num_train_epochs epochs)"),
        ("num_train_epochs", lambda v: v > 0, "> 0"),
        ("per_device_train_batch_size", lambda v: v >= 1, ">= 1"),
        ("per_device_eval_batch_size", lambda v: v >= 1, ">= 1"),
        ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
        ("num_generations", lambda v: v >= 1, ">= 1"),
        ("num_iterations", lambda v: v >= 1, ">= 1"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("max_grad_norm", lambda v: v is None or v >= 0, ">= 0 (0: no clipping)"),
        ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("adam_epsilon", lambda v: v > 0, "> 0"),
        ("warmup_steps", lambda v: v >= 0, ">= 0"),
        ("logging_steps", lambda v: v > 0, "> 0"),
        ("save_steps", lambda v: v > 0, "> 0"),
        ("eval_steps", lambda v: v is None or v > 0, "> 0"),
        ("save_total_limit", lambda v: v is None or v >= 1, ">= 1 (or unset: keep every checkpoint)"),
        ("ddp_timeout", lambda v: v >= 1, ">= 1 second"),
        ("seed", lambda v: v >= 0, ">= 0"),
        ("beta", lambda v: v >= 0, ">= 0"),
        ("epsilon", lambda v: v >= 0, ">= 0"),
    )

    def _check_ranges(self) -> None:
        problems = [f"{name} must be {requirement}, got {getattr(self, name)!r}"
                    for name, valid, requirement in self._RANGES
                    if hasattr(self, name) and isinstance(getattr(self, name), (int, float, type(None)))
                    and not valid(getattr(self, name))]
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @cached_property
    def _setup_devices(self):
        """transformers hands `ddp_timeout` to the process group on accelerators but not on a CPU (gloo), where a
        collective then waits forever for a stuck process. Start the gloo group with the timeout here first;
        accelerate adopts an existing group."""
        on_cpu = self.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=self.ddp_backend or "gloo", timeout=self.ddp_timeout_delta)
        return super()._setup_devices

    def __getstate__(self):
        """Pickles of the arguments (`training_args.bin` in the output folder and every checkpoint) carry no
        tokens or keys: those fields are None there."""
        return {name: (None if is_secret(name) else value) for name, value in self.__dict__.items()}

    def __deepcopy__(self, memo):  # a deep copy keeps the secrets (pickling drops them)
        import copy

        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def check_eval_batch(self) -> None:
        """Eval groups must sit on one process too (called when an evaluation will run)."""
        group = self.num_generations_eval or self.num_generations
        if self.per_device_eval_batch_size % group:
            raise ValueError(
                f"per_device_eval_batch_size={self.per_device_eval_batch_size} must be a multiple of the eval group "
                f"size num_generations_eval={group}, so the samples of a prompt sit on one process."
            )

    def _warn_unaligned_checkpoints(self) -> None:
        if self.save_strategy != "steps" or self.save_steps < 1:
            return
        block = self.steps_per_generation * self.num_iterations
        if (int(self.save_steps) * self.gradient_accumulation_steps) % block:
            warnings.warn(
                f"save_steps={self.save_steps} is not on a generation boundary (every {block} micro-steps = "
                f"steps_per_generation × num_iterations, with gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}): a run resumed from such a checkpoint regenerates the "
                "interrupted rollout and differs from an uninterrupted run.",
                stacklevel=3,
            )
