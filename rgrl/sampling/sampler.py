"""The denoising loop of a masked diffusion LM, with an optional reward-guidance hook (DESIGN.md §2).

Canvas: [pads | prompt | MASK × L], prompts left-padded and pads hidden by the attention mask. Each step:
one no-grad dLLM forward → logits aligned with positions (Dream's are shifted) → guidance hook → sample
tokens at the masked slots from softmax(logits/τ) with top-p/top-k → rank the masked slots by a confidence
rule → reveal the most confident ones (as many as the schedule says). The same code serves every family
through its `DiffusionFamily`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from rgrl.distributions import sample_tokens, tempered_probs
from rgrl.guidance import GuidanceStats, RewardGuidance
from rgrl.models.family import DiffusionFamily
from rgrl.sampling.confidence import CONFIDENCE_RULES, confidence
from rgrl.sampling.schedules import SCHEDULES, reveal_plan

# Ranks a deprioritised (stop-token) slot below every other slot but above slots that cannot be revealed.
_DEPRIORITIZED = -1e9


@dataclass
class SamplerConfig:
    """Settings of the denoising loop."""

    steps: int = 128  # T, denoising steps
    completion_length: int = 128  # L, masked slots after the prompt
    schedule: Literal["dream", "linear"] = "dream"
    block_length: int | None = None  # LLaDA-style blocks; None = one block
    alg: Literal["entropy", "maskgit_plus", "topk_margin", "low_confidence", "random"] = "entropy"
    alg_temp: float = 0.0  # > 0: draw the slots to reveal from softmax(confidence / alg_temp)
    temperature: float = 0.7  # τ
    top_p: float | None = 0.95
    top_k: int | None = None
    deprioritize_eos: bool = True  # slots whose drawn token ends the completion are revealed last
    confidence_from: Literal["guided", "unguided"] = "guided"
    eps: float = 1e-3  # Dream schedule's final timestep
    max_prompt_length: int | None = None  # longer prompts keep the end of their last user turn

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.alg not in CONFIDENCE_RULES:
            raise ValueError(f"alg must be one of {CONFIDENCE_RULES}, got {self.alg!r}.")
        if self.confidence_from not in ("guided", "unguided"):
            raise ValueError(f"confidence_from must be 'guided' or 'unguided', got {self.confidence_from!r}.")
        if self.steps < 1 or self.completion_length < 1:
            raise ValueError("steps and completion_length must be >= 1.")
        if self.temperature < 0 or self.alg_temp < 0:
            raise ValueError("temperature and alg_temp must be >= 0.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or unset: no nucleus filter), got {self.top_p}.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0 / unset: no top-k filter), got {self.top_k}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 (or unset), got {self.max_prompt_length}.")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}.")
        reveal_plan(self.schedule, self.completion_length, self.steps, self.block_length, self.eps)  # validates


@dataclass
class GenerationStats:
    """What one generation cost and what guidance did."""

    rows: int = 0
    dllm_forwards: int = 0  # batched forward passes (each row got this many)
    seconds: float = 0.0
    guidance: GuidanceStats = field(default_factory=GuidanceStats)


@dataclass
class SampleOutput:
    """Results for B rows (K samples of a prompt are K consecutive rows).

    prompt_ids/prompt_mask: [B, P] left-padded; completion_ids: [B, L]; completion_mask: [B, L], True up to and
    including the first stop token; texts: decoded completions (special tokens skipped, cut at the first stop
    token); history: per-step [B, L] canvases when recorded.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    stats: GenerationStats
    history: list[torch.Tensor] | None = None
    prompts: list | None = None  # one per row, as given to `denoise` (and to the reward model)

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)


def completion_mask(ids: torch.Tensor, stop_token_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, L] ids -> [B, L] bool: True up to and including the first stop token (all True without one)."""
    is_stop = torch.isin(ids, torch.tensor(stop_token_ids, device=ids.device)).long()
    return (is_stop.cumsum(dim=-1) - is_stop) == 0


class DiffusionSampler:
    """Generates completions with a masked diffusion LM, optionally reward-guided.

    Args:
        model: the dLLM (any module returning `.logits` [B, P+L, V] from input_ids and a 2-D attention mask).
        tokenizer: its tokenizer (left padding is used for prompts).
        family: the `DiffusionFamily` of model + tokenizer.
        config: loop settings.
        guidance: a `RewardGuidance`, or None for unguided sampling.
    """

    def __init__(self, model, tokenizer, family: DiffusionFamily, config: SamplerConfig,
                 guidance: RewardGuidance | None = None):
        self.model, self.tokenizer, self.family = model, tokenizer, family
        self.config, self.guidance = config, guidance
        self.plan = reveal_plan(config.schedule, config.completion_length, config.steps, config.block_length,
                                config.eps)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompts(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Render prompts (text or chat messages) with the chat template -> left-padded ids/mask [B, P].
        Pass prompts through `fit_prompts` first when `max_prompt_length` is set."""
        texts = [self.family.render_prompt(self.tokenizer, prompt) for prompt in prompts]
        encoded = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt",
                                 padding_side="left")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device).bool()

    def fit_prompts(self, prompts: list) -> list:
        """The prompts as the dLLM will see them: one whose rendering is longer than `max_prompt_length` tokens
        keeps the end of its last user turn (the chat template around it stays whole). The reward model is given
        these same prompts, so it scores the question the dLLM answered."""
        limit = self.config.max_prompt_length
        if limit is None:
            return list(prompts)
        fitted = [self._fit_prompt(prompt, limit) for prompt in prompts]
        cut = sum(a is not b for a, b in zip(prompts, fitted))
        if cut:
            warnings.warn(f"{cut} of {len(prompts)} prompts are longer than sampler.max_prompt_length={limit} tokens: "
                          "the start of their last user turn is cut (the reward model scores the cut prompts).",
                          stacklevel=2)
        return fitted

    def _fit_prompt(self, prompt, limit: int):
        def length(messages) -> int:
            text = self.family.render_prompt(self.tokenizer, messages)
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        overflow = length(messages) - limit
        if overflow <= 0:
            return prompt
        turn = max(i for i, m in enumerate(messages) if m["role"] == "user")
        content = self.tokenizer(messages[turn]["content"], add_special_tokens=False)["input_ids"]
        while True:  # re-tokenising the cut text can merge tokens differently: cut one more until it fits
            kept = content[overflow:]
            fitted = [*messages[:turn], {**messages[turn], "content": self.tokenizer.decode(kept)},
                      *messages[turn + 1:]]
            if length(fitted) <= limit:
                return fitted[turn]["content"] if isinstance(prompt, str) else fitted
            if not kept:
                raise ValueError(f"sampler.max_prompt_length={limit} is shorter than the chat template around a "
                                 f"prompt ({length(fitted)} tokens with an empty user turn); raise it.")
            overflow += 1

    def generate(self, prompts: list, num_samples: int = 1, seed: int | None = None,
                 record_history: bool = False) -> SampleOutput:
        """`num_samples` completions per prompt (consecutive rows); `SampleOutput.prompts` holds the prompts as the
        dLLM saw them (see `fit_prompts`)."""
        rows = self.fit_prompts([prompt for prompt in prompts for _ in range(num_samples)])
        prompt_ids, prompt_mask = self.encode_prompts(rows)
        return self.denoise(prompt_ids, prompt_mask, rows, seed=seed, record_history=record_history)

    @torch.no_grad()
    def denoise(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompts: list,
                seed: int | None = None, record_history: bool = False) -> SampleOutput:
        """Run the T denoising steps for left-padded prompts [B, P]; `prompts` (one per row) feed the reward model."""
        start = time.perf_counter()
        config, family = self.config, self.family
        batch, prompt_length = prompt_ids.shape
        length = config.completion_length
        device = prompt_ids.device
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: reproducible under set_seed
        generator = torch.Generator(device=device).manual_seed(seed)
        canvas = torch.cat([prompt_ids, prompt_ids.new_full((batch, length), family.mask_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones((batch, length), dtype=torch.bool)], 1)
        stop_ids = torch.tensor(family.stop_token_ids, device=device)
        stats = GenerationStats(rows=batch)
        history = [] if record_history else None
        scorer = self.guidance.scorer(prompts, length) if self.guidance is not None else None
        guidance_generator = None
        if self.guidance is not None and self.guidance.embedding_matrix.device != device:
            guidance_generator = torch.Generator(self.guidance.embedding_matrix.device).manual_seed(seed + 1)

        was_training = self.model.training
        self.model.eval()  # no dropout (LoRA included) in rollouts
        try:
            for step in self.plan:
                slots = canvas[:, prompt_length:]
                masked = slots == family.mask_token_id
                logits = self._completion_logits(canvas, attention_mask, length)
                stats.dllm_forwards += 1
                guided = logits
                if self.guidance is not None:
                    guided = self.guidance(
                        logits, slots, masked, scorer, family.stop_token_ids, config.temperature, config.top_p,
                        config.top_k, generator=guidance_generator or generator, stats=stats.guidance,
                    )
                self._reveal(slots, masked, guided, logits, step, stop_ids, generator)
                if history is not None:
                    history.append(slots.cpu().clone())
        finally:
            self.model.train(was_training)

        completion_ids = canvas[:, prompt_length:]
        keep = completion_mask(completion_ids, family.stop_token_ids)
        stats.seconds = time.perf_counter() - start
        return SampleOutput(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask.bool(),
            completion_ids=completion_ids,
            completion_mask=keep,
            texts=self.decode(completion_ids),
            stats=stats,
            history=history,
            prompts=list(prompts),
        )

    def decode(self, completion_ids: torch.Tensor) -> list[str]:
        """Completion texts, cut before the first stop token, special tokens skipped."""
        before_stop = completion_mask(completion_ids, self.family.stop_token_ids) & ~torch.isin(
            completion_ids, torch.tensor(self.family.stop_token_ids, device=completion_ids.device))
        rows = [ids[keep].tolist() for ids, keep in zip(completion_ids, before_stop)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _completion_logits(self, canvas: torch.Tensor, attention_mask: torch.Tensor, length: int):
        """Aligned fp32 logits of the completion slots [B, L, V], impossible tokens at -inf."""
        logits = self.family.completion_logits(self.model, canvas, attention_mask, length).float()
        logits[..., self.family.mask_token_id] = -math.inf  # never "reveal" a mask
        if self.family.num_tokens < logits.shape[-1]:
            logits[..., self.family.num_tokens:] = -math.inf  # embedding rows that are no token
        return logits

    def _reveal(self, slots, masked, guided, unguided, step, stop_ids, generator) -> None:
        """Sample tokens at the masked slots and write the `step.count` most confident into `slots` (in place)."""
        config = self.config
        if not masked.any():
            return
        rank_logits = guided[masked]  # [N, V]
        ids, probs = sample_tokens(rank_logits, config.temperature, config.top_p, config.top_k, generator)
        if config.confidence_from == "unguided":
            rank_logits = unguided[masked]
            probs = tempered_probs(rank_logits, config.temperature, config.top_p, config.top_k)
        scores = confidence(config.alg, probs, rank_logits, ids, generator).double()
        if config.alg_temp > 0:  # Gumbel-top-k = drawing slots without replacement from softmax(conf / alg_temp)
            uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
            scores = scores / config.alg_temp - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        if config.deprioritize_eos:
            scores = torch.where(torch.isin(ids, stop_ids), scores + _DEPRIORITIZED, scores)

        ranking = torch.full(slots.shape, -math.inf, dtype=scores.dtype, device=slots.device)
        ranking[masked] = scores
        ranking[:, : step.block_start] = -math.inf
        ranking[:, step.block_end:] = -math.inf
        proposal = torch.full_like(slots, self.family.mask_token_id)
        proposal[masked] = ids
        if step.count > 0:
            chosen = ranking.topk(step.count, dim=-1).indices  # [B, count]
            slots.scatter_(1, chosen, proposal.gather(1, chosen))
