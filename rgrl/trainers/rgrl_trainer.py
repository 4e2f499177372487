"""RGRL: reward-guided rollouts of the current policy, then a likelihood learner on them (docs/design.md §5.1).

Per generation round each process samples K completions per prompt with reward guidance (EntRGi or APS) from
the current LoRA policy, scores them with the reward functions (logged, and used by the optional weightings),
and the learner maximises

    ℓ_i  = Σ_t w_it · log p_θ(y_it | noised prompt, masked completion) / |y_i|
    loss = −(1/N) Σ_i a_i · ℓ_i          (the micro-batch's N completions)

with token weights w from the likelihood estimator (1 for the one-step estimator) and sample weights a (1 for the
paper's uniform version). `loss_normalizer: num_generations` divides by K instead of N, the reference's literal
scale (docs/design.md §8.7). Evaluation rollouts are unguided (docs/design.md §5.3).
"""

from __future__ import annotations

import logging

import torch

from rgrl.guidance import RewardGuidance
from rgrl.models.loading import num_logit_rows
from rgrl.rewards import RewardModelConfig, RewardModelFunction, VocabBridge
from rgrl.trainers.base import MaskedDiffusionTrainer
from rgrl.trainers.inputs import load_reward_model, weights_dtype
from rgrl.trainers.likelihood import sequence_log_likelihood
from rgrl.trainers.rgrl_config import RGRLConfig

logger = logging.getLogger(__name__)


def sample_weights(rewards: torch.Tensor, group_size: int, weighting: str, beta: float = 1.0) -> torch.Tensor:
    """Weights of the completions in the loss, mean 1 per group: [N] rewards (NaN = unscorable) -> [N].

    uniform: all 1. softmax: K·softmax(r/β) within each group. best_of_k: K on the group's best, 0 elsewhere.
    Unscorable completions get weight 0 under softmax and best_of_k.
    """
    if weighting == "uniform":
        return torch.ones_like(rewards)
    grouped = rewards.view(-1, group_size).nan_to_num(nan=-torch.inf)
    if weighting == "softmax":
        weights = (grouped / beta).softmax(dim=1)
    elif weighting == "best_of_k":
        weights = torch.zeros_like(grouped).scatter_(1, grouped.argmax(dim=1, keepdim=True), 1.0)
    else:
        raise ValueError(f"Unknown sample weighting {weighting!r}.")
    return (group_size * weights).nan_to_num(nan=0.0).view(-1)


class RGRLTrainer(MaskedDiffusionTrainer):
    """RGRL on TRL's GRPO loop, called as `GRPOTrainer` (arguments as `MaskedDiffusionTrainer`).

    Training rollouts are guided by `args.guidance_method` with the reward model `args.guidance_model`, by default
    the reward model among `reward_funcs` (one copy, shared); `guidance_method="none"` trains on unguided rollouts.
    """

    _name = "RGRL"
    _tag_names = ["trl", "rgrl", "masked-diffusion"]
    _paper = {
        "title": "Entropy Aware Reward Guidance for Diffusion Language Model Alignment",
        "id": "2602.05000",
        "citation": "@article{tejaswi2026entrgi,\n"
        "    title   = {Entropy Aware Reward Guidance for Diffusion Language Model Alignment},\n"
        "    author  = {Tejaswi, Atula and Rout, Litu and Caramanis, Constantine and Shakkottai, Sanjay and "
        "Sanghavi, Sujay},\n"
        "    year    = 2026,\n"
        "    eprint  = {arXiv:2602.05000},\n}",
    }
    _signal_key = "sample_weights"

    _config_class = RGRLConfig

    def _build_guidance(self, args: RGRLConfig, reward_funcs: list, tokenizer, model) -> RewardGuidance | None:
        if not args.guided:
            return None
        reward_model = self._guidance_reward_model(args, reward_funcs)
        bridge = VocabBridge(tokenizer, reward_model.tokenizer, num_rows=num_logit_rows(model),
                             fallback=args.bridge_fallback, split=args.bridge_split)
        logger.info(f"Vocabulary bridge to the guidance reward model: {bridge.summary()}")
        return RewardGuidance(args.guidance_config(), reward_model, bridge, self.family.stop_token_ids)

    @staticmethod
    def _guidance_reward_model(args: RGRLConfig, reward_funcs: list):
        """`args.guidance_model` (the copy a reward function loaded from the same name, if any), else the one reward
        model among the reward functions."""
        scorers = [f for f in reward_funcs if isinstance(f, RewardModelFunction)]
        if args.guidance_model is not None:
            shared = next((f.reward_model for f in scorers if f.path == args.guidance_model), None)
            config = RewardModelConfig(path=args.guidance_model, dtype=weights_dtype(args),
                                       trust_remote_code=args.trust_remote_code)
            return shared or load_reward_model(config, args)
        models = list({id(f.reward_model): f for f in scorers}.values())
        if len(models) == 1:
            return models[0].reward_model
        if not models:
            raise ValueError(
                f"RGRL guides its training rollouts (guidance_method={args.guidance_method!r}) with a reward model, "
                "but reward_funcs holds none: add one (a name such as 'toy:rm', or an rgrl.rewards.RewardModelFunction)"
                " or set guidance_model; guidance_method='none' trains on unguided rollouts.")
        raise ValueError(f"reward_funcs holds {len(models)} reward models ({', '.join(f.__name__ for f in models)}): "
                         "set guidance_model to the one that guides the rollouts.")

    def _likelihood_estimator(self) -> str:
        return self.args.likelihood_estimator

    def _per_sample_signal(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return sample_weights(rewards, group_size, self.args.sample_weighting, self.args.sample_weighting_beta)

    def _compute_loss(self, model, inputs: dict) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        log_probs = self._log_probs(model, inputs, 0)
        loglik = sequence_log_likelihood(log_probs, self._token_weights(inputs, 0), inputs["completion_mask"])
        if self.args.loss_normalizer == "num_generations":  # the reference's literal loss: Σ over the micro-batch / K
            normalizer = self.num_generations if mode == "train" else self.num_generations_eval
        else:
            normalizer = len(loglik)
        loss = -(inputs["sample_weights"] * loglik).sum() / normalizer
        self._log_world_means(mode, {"learner/loglik": loglik.detach().mean().item()})
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1)
