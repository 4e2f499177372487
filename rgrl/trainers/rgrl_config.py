"""Configuration of the RGRL learner (docs/design.md §5.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rgrl.guidance import GUIDANCE_METHODS, GuidanceConfig
from rgrl.rewards.bridge import BRIDGE_FALLBACKS
from rgrl.trainers.config import MaskedDiffusionConfig
from rgrl.trainers.likelihood import ESTIMATORS

SAMPLE_WEIGHTINGS = ("uniform", "softmax", "best_of_k")
LOSS_NORMALIZERS = ("num_completions", "num_generations")


@dataclass
class RGRLConfig(MaskedDiffusionConfig):
    """`GRPOConfig` for RGRL: maximise the likelihood of reward-guided completions of the current policy.

    Parameters (beyond `MaskedDiffusionConfig`'s):
        guidance_method: the estimator guiding training rollouts (entrgi, aps, expectation), or none (unguided online
            SFT). guidance_steps (M), guidance_lr (η), guidance_measure_gain, guidance_chunk_rows and
            guidance_compile are the rest of `rgrl.guidance.GuidanceConfig` (`guidance_config()` builds it).
        guidance_model: the reward model guidance differentiates (path, Hub id or rgrl name such as "toy:rm"). Default:
            the reward model among the trainer's `reward_funcs` (its loaded copy is shared). bridge_fallback and
            bridge_split configure the vocabulary bridge from the dLLM to it.
        sample_weighting: how the K completions of a prompt are weighted in the loss: "uniform" (the paper's
            online SFT), "softmax" (K·softmax(r/β) over the group) or "best_of_k" (all weight on the best).
        sample_weighting_beta: β of the softmax weighting.
        likelihood_estimator: "one_step" (completion fully masked, prompt masked with p_mask_prompt; the paper's)
            or "elbo" (mask rate t ~ U(0,1) on the completion, masked positions weighted 1/t).
        loss_normalizer: what the micro-batch's summed, weighted log-likelihoods are divided by: "num_completions"
            (its rows: a mean, the default; the same for any split of a batch over processes) or "num_generations"
            (K, the reference's literal loss: larger by the prompts per micro-batch, so it depends on the split).
            With Adam the scale matters only through gradient clipping: the paper recipes reproduce the reference's
            clipping of its K-normalised loss with `max_grad_norm` = K / rows per device (0.5 for 8 rows, K = 4).

    RGRL has no ratio, clipping or KL: `beta` must be 0 and `num_iterations` 1, and GRPO's loss options
    (`loss_type`, `epsilon`, `epsilon_high`, `scale_rewards`, `use_bias_correction_kl`) must stay unset.
    """

    guidance_method: str = field(default="entrgi", metadata={
        "help": f"Estimator guiding training rollouts: {' | '.join(GUIDANCE_METHODS)} (none: unguided)."})
    guidance_steps: int = field(default=1, metadata={"help": "M: Adam steps on the logits per denoising step."})
    guidance_lr: float = field(default=0.5, metadata={"help": "η: learning rate of those Adam steps."})
    guidance_measure_gain: bool = field(default=False, metadata={
        "help": "Log guidance/reward_gain (one extra reward-model forward per denoising step)."})
    guidance_chunk_rows: int = field(default=512, metadata={
        "help": "Rows of the logits processed together in guidance's vocabulary-wide operations."})
    guidance_compile: bool = field(default=False, metadata={
        "help": "Fuse guidance's vocabulary-wide chains with torch.compile (compiled once per process; needs a C++ "
                "compiler on CPU, Triton on CUDA)."})
    guidance_model: str | None = field(default=None, metadata={
        "help": "Reward model guiding rollouts (path, Hub id, tiny:/toy: name); default: the reward model among "
                "reward_funcs."})
    bridge_fallback: str = field(default="eos", metadata={
        "help": f"Embedding of dLLM tokens the guidance model's vocabulary lacks: {' | '.join(BRIDGE_FALLBACKS)}."})
    bridge_split: bool = field(default=True, metadata={
        "help": "A dLLM token the guidance model writes as several tokens maps to the mean of their embeddings."})
    p_mask_prompt: float = field(default=0.3, metadata={"help": "Probability of masking each prompt token."})
    sample_weighting: str = field(
        default="uniform", metadata={"help": "uniform, softmax or best_of_k weighting of the K completions."}
    )
    sample_weighting_beta: float = field(default=1.0, metadata={"help": "Temperature β of softmax(r/β)."})
    likelihood_estimator: str = field(default="one_step", metadata={"help": "one_step or elbo."})
    loss_normalizer: str = field(
        default="num_completions",
        metadata={"help": "num_completions (a mean) or num_generations (K, the reference's literal scale)."},
    )
    scale_rewards: str = field(default="none", metadata={"help": "Unused by RGRL."})

    def __post_init__(self):
        super().__post_init__()
        self.guidance_config()  # validates the guidance fields
        if not self.guided and self.guidance_model is not None:
            raise ValueError(f"guidance_model={self.guidance_model!r} is set but guidance_method is 'none' (unguided "
                             "rollouts): remove it, or choose a guidance method.")
        if self.bridge_fallback not in BRIDGE_FALLBACKS:
            raise ValueError(f"bridge_fallback must be one of {BRIDGE_FALLBACKS}, got {self.bridge_fallback!r}.")
        if self.sample_weighting not in SAMPLE_WEIGHTINGS:
            raise ValueError(f"sample_weighting must be one of {SAMPLE_WEIGHTINGS}, got {self.sample_weighting!r}.")
        if self.sample_weighting_beta <= 0:
            raise ValueError(f"sample_weighting_beta must be > 0, got {self.sample_weighting_beta}.")
        if self.likelihood_estimator not in ESTIMATORS:
            raise ValueError(f"likelihood_estimator must be one of {ESTIMATORS}, got {self.likelihood_estimator!r}.")
        if self.loss_normalizer not in LOSS_NORMALIZERS:
            raise ValueError(f"loss_normalizer must be one of {LOSS_NORMALIZERS}, got {self.loss_normalizer!r}.")
        if self.beta != 0.0:
            raise ValueError(f"RGRL has no KL term: beta must be 0, got {self.beta}.")
        if self.num_iterations != 1:
            raise ValueError(f"RGRL learns once per rollout: num_iterations must be 1, got {self.num_iterations}.")
        defaults = type(self).__dataclass_fields__
        for name in ("loss_type", "epsilon", "epsilon_high", "scale_rewards", "use_bias_correction_kl"):
            if getattr(self, name) != defaults[name].default:
                raise ValueError(
                    f"RGRL does not use `{name}` (no advantages, ratio or KL); remove it. For a weighting of the "
                    "K completions by reward, set sample_weighting."
                )

    @property
    def guided(self) -> bool:
        return self.guidance_method != "none"

    def guidance_config(self) -> GuidanceConfig:
        """The guidance settings of training rollouts as `rgrl.guidance.GuidanceConfig` (which validates them)."""
        return GuidanceConfig(method=self.guidance_method, steps=self.guidance_steps, lr=self.guidance_lr,
                              measure_gain=self.guidance_measure_gain, chunk_rows=self.guidance_chunk_rows,
                              compile=self.guidance_compile)
