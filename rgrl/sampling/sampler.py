"""The denoising loop of a masked diffusion LM, with an optional reward-guidance hook (docs/design.md §2).

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
from typing import Literal, get_args

import torch

from rgrl.distributions import nucleus, sample_tokens, uniforms
from rgrl.guidance import GuidanceStats, RewardGuidance
from rgrl.models.family import DiffusionFamily, before_first_stop
from rgrl.models.flops import TransformerShape, soft_embedding_flops
from rgrl.models.layers import PromptCache
from rgrl.sampling.confidence import CONFIDENCE_RULES, ConfidenceRule, confidence
from rgrl.sampling.schedules import SCHEDULES, Schedule, reveal_plan

# Ranks a deprioritised (stop-token) slot below every other slot but above slots that cannot be revealed.
_DEPRIORITIZED = -1e9
# Which drawn tokens `deprioritize_eos` holds back: the tokenizer's EOS only (Dream's pad-like <|endoftext|>, as the
# paper's reference sampler), or also the chat template's end of turn (<|im_end|>, <|eot_id|>).
DeprioritizedTokens = Literal["eos", "eos_and_end_of_turn"]
DEPRIORITIZED_TOKEN_SETS = get_args(DeprioritizedTokens)
ConfidenceFrom = Literal["guided", "unguided"]  # rank slots by the guided or the unguided logits


@dataclass
class SamplerConfig:
    """Settings of the denoising loop."""

    steps: int = 128  # T, denoising steps
    max_completion_length: int = 128  # L, masked slots after the prompt
    schedule: Schedule = "dream"  # how many slots each step reveals: dream | linear
    block_length: int | None = None  # LLaDA-style blocks; None = one block
    alg: ConfidenceRule = "entropy"  # confidence rule ranking the masked slots
    alg_temp: float = 0.0  # > 0: draw the slots to reveal from softmax(confidence / alg_temp)
    temperature: float = 0.7  # τ
    top_p: float | None = 0.95  # nucleus filter (None: off)
    top_k: int | None = None  # top-k filter (None or 0: off)
    deprioritize_eos: bool = True  # slots whose drawn token is in `deprioritized_tokens` are revealed last
    deprioritized_tokens: DeprioritizedTokens = "eos"  # "eos": the tokenizer's EOS only
    confidence_from: ConfidenceFrom = "guided"  # rank slots by the guided or the unguided logits
    eps: float = 1e-3  # Dream schedule's final timestep
    max_prompt_length: int | None = None  # longer prompts keep the end of their last user turn
    # Cache mode (beyond the paper; both off by default). prompt_cache_refresh r >= 1: the prompt's keys/values are
    # computed by a full forward every r steps and at each block start, and reused in between (approximate).
    prompt_cache_refresh: int = 0
    # Also reveal, at each step, every slot whose drawn token has at least this probability (and skip the steps
    # left with nothing masked); None: reveal exactly as the schedule says.
    reveal_threshold: float | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.alg not in CONFIDENCE_RULES:
            raise ValueError(f"alg must be one of {CONFIDENCE_RULES}, got {self.alg!r}.")
        if self.deprioritized_tokens not in DEPRIORITIZED_TOKEN_SETS:
            raise ValueError(f"deprioritized_tokens must be one of {DEPRIORITIZED_TOKEN_SETS}, got "
                             f"{self.deprioritized_tokens!r}.")
        if self.confidence_from not in get_args(ConfidenceFrom):
            raise ValueError(f"confidence_from must be one of {get_args(ConfidenceFrom)}, got "
                             f"{self.confidence_from!r}.")
        if self.steps < 1 or self.max_completion_length < 1:
            raise ValueError("steps and max_completion_length must be >= 1.")
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
        if self.prompt_cache_refresh < 0:
            raise ValueError(f"prompt_cache_refresh must be >= 0 (0: off), got {self.prompt_cache_refresh}.")
        if self.reveal_threshold is not None and not 0 < self.reveal_threshold <= 1:
            raise ValueError(f"reveal_threshold must be in (0, 1] or None, got {self.reveal_threshold}.")
        reveal_plan(self.schedule, self.max_completion_length, self.steps, self.block_length, self.eps)  # validates


@dataclass
class GenerationStats:
    """What one generation cost and what guidance did."""

    rows: int = 0
    dllm_forwards: int = 0  # batched forward passes (each row got this many)
    dllm_tokens: int = 0  # Σ over forwards of rows × positions run (fewer with a reused prompt cache)
    dllm_attention_pairs: int = 0  # Σ over forwards of rows × queries × keys
    dllm_head_rows: int = 0  # Σ over forwards of the masked slots sent through the LM head
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
    before, stop_slot = before_first_stop(ids, stop_token_ids)
    return before | (torch.arange(ids.shape[-1], device=ids.device) == stop_slot.unsqueeze(-1))


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
        self.plan = reveal_plan(config.schedule, config.max_completion_length, config.steps, config.block_length,
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
            warnings.warn(f"{cut} of {len(prompts)} prompts are longer than max_prompt_length={limit} tokens: "
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
                raise ValueError(f"max_prompt_length={limit} is shorter than the chat template around a "
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
        length = config.max_completion_length
        device = prompt_ids.device
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: reproducible under set_seed
        generator = torch.Generator(device=device).manual_seed(seed)
        canvas = torch.cat([prompt_ids, prompt_ids.new_full((batch, length), family.mask_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones((batch, length), dtype=torch.bool)], 1)
        stats = GenerationStats(rows=batch)
        history = [] if record_history else None
        guide = None
        if self.guidance is not None:
            guidance_generator = generator
            if self.guidance.device != device:
                guidance_generator = torch.Generator(self.guidance.device).manual_seed(seed + 1)
            guide = self.guidance.bind(prompts, length, config.temperature, config.top_p, config.top_k,
                                       guidance_generator)

        was_training = self.model.training
        self.model.eval()  # no dropout (LoRA included) in rollouts
        cache = None
        if config.prompt_cache_refresh:
            cache = PromptCache(length=family.cacheable_prompt_length(prompt_length))
        try:
            for index, step in enumerate(self.plan):
                if not (canvas[:, prompt_length:] == family.mask_token_id).any():
                    break  # everything revealed early (reveal_threshold)
                if cache is not None:
                    new_block = index > 0 and step.block_start != self.plan[index - 1].block_start
                    cache.filling = index % config.prompt_cache_refresh == 0 or new_block
                self.denoise_step(canvas, attention_mask, step, guide, stats, generator, cache)
                if history is not None:
                    history.append(canvas[:, prompt_length:].cpu().clone())
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

    @torch.no_grad()
    def denoise_step(self, canvas: torch.Tensor, attention_mask: torch.Tensor, step, guide,
                     stats: GenerationStats, generator: torch.Generator, prompt_cache: PromptCache | None = None):
        """One denoising step on canvas [B, P + L] (the L completion slots last), in place: a dLLM forward (with the
        cache mode's `prompt_cache`, filling or reused), the guidance hook `guide` (from `RewardGuidance.bind`, or
        None), then sampling and revealing per `step` (a `RevealStep` of the plan)."""
        config = self.config
        slots = canvas[:, -config.max_completion_length:]
        masked = slots == self.family.mask_token_id
        logits = self._masked_logits(canvas, attention_mask, masked, prompt_cache)  # [N, V]
        queries = canvas.shape[1] - (prompt_cache.length if prompt_cache and not prompt_cache.filling else 0)
        stats.dllm_forwards += 1
        stats.dllm_tokens += canvas.shape[0] * queries
        stats.dllm_attention_pairs += canvas.shape[0] * queries * canvas.shape[1]
        stats.dllm_head_rows += logits.shape[0]
        guided = logits
        if guide is not None:
            unguided = logits.clone() if config.confidence_from == "unguided" else logits
            guided = guide(logits, slots, masked, stats.guidance)  # may update logits in place
            logits = unguided
        self._reveal(slots, masked, guided, logits, step, generator)

    def generation_flops(self, stats: GenerationStats) -> dict[str, int]:
        """FLOPs one generation spent (`rgrl.models.flops` counts, from the models' shapes and the widths run):
        "dllm" for the dLLM forwards (blocks over the positions run, LM head on the masked slots), "guidance" for
        the reward model's forward+backward passes (and the measure_gain forwards) with the soft-embedding products
        that feed them."""
        dllm = TransformerShape.from_config(self.model.config)
        flops = {"dllm": dllm.linear_flops(1, stats.dllm_tokens) + dllm.attention_flops(1, stats.dllm_attention_pairs, 1)
                 + dllm.head_flops(stats.dllm_head_rows)}
        guidance = stats.guidance
        if self.guidance is None or not guidance.steps:
            flops["guidance"] = 0
            return flops
        rm = TransformerShape.from_config(self.guidance.reward_model.model.config, head_rows=1)
        rows, columns = guidance.rm_input_shape
        cached = guidance.rm_cached_columns  # run once (prefix_forward), then attended to by every pass
        vocab_rows, embedding_dim = self.guidance.embedding_matrix.shape
        forward = rm.forward_flops(rows, columns - cached, keys=columns)
        prefix_forward = rm.forward_flops(rows, cached) if cached else 0
        flops["guidance"] = (
            prefix_forward
            + guidance.rm_forward_backward * (forward + rm.input_backward_flops(rows, columns - cached, keys=columns))
            + guidance.rm_forward * forward
            + soft_embedding_flops(guidance.relaxed_positions, vocab_rows, embedding_dim, backward=True)
            + soft_embedding_flops(guidance.relaxed_positions_forward, vocab_rows, embedding_dim, backward=False)
        )
        return flops

    def decode(self, completion_ids: torch.Tensor) -> list[str]:
        """Completion texts, cut before the first stop token, special tokens skipped."""
        before_stop, _ = before_first_stop(completion_ids, self.family.stop_token_ids)
        rows = [ids[keep].tolist() for ids, keep in zip(completion_ids, before_stop)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _masked_logits(self, canvas: torch.Tensor, attention_mask: torch.Tensor, masked: torch.Tensor,
                       prompt_cache: PromptCache | None = None):
        """Aligned fp32 logits [N, V] of the N masked completion slots (row order of `masked` [B, L]), impossible
        tokens at -inf. Only those slots go through the LM head."""
        logits = self.family.slot_logits(self.model, canvas, attention_mask, masked, prompt_cache).float()
        logits[:, self.family.mask_token_id] = -math.inf  # never "reveal" a mask
        if self.family.num_tokens < logits.shape[-1]:
            logits[:, self.family.num_tokens:] = -math.inf  # embedding rows that are no token
        return logits

    def _reveal(self, slots, masked, guided, unguided, step, generator) -> None:
        """Sample tokens at the masked slots from `guided` [N, V] and write the `step.count` most confident into
        `slots` (in place); with `confidence_from: unguided` the ranking reads `unguided` [N, V] instead."""
        config = self.config
        if not masked.any():
            return
        uniform = uniforms(guided.shape[0], config.temperature, generator, guided.device)
        ids, candidates = sample_tokens(guided, config.temperature, config.top_p, config.top_k, uniform)
        rank_logits = guided
        if config.confidence_from == "unguided":
            rank_logits = unguided
            candidates = nucleus(unguided, config.temperature, config.top_p, config.top_k)
        scores = confidence(config.alg, candidates, rank_logits, ids, generator).double()
        if config.alg_temp > 0:  # Gumbel-top-k = drawing slots without replacement from softmax(conf / alg_temp)
            uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
            scores = scores / config.alg_temp - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        if config.deprioritize_eos:
            family = self.family
            held_back = (family.eos_token_id,) if config.deprioritized_tokens == "eos" else family.stop_token_ids
            scores = torch.where(torch.isin(ids, torch.tensor(held_back, device=ids.device)),
                                 scores + _DEPRIORITIZED, scores)

        ranking = torch.full(slots.shape, -math.inf, dtype=scores.dtype, device=slots.device)
        ranking[masked] = scores
        ranking[:, : step.block_start] = -math.inf
        ranking[:, step.block_end:] = -math.inf
        revealable = ranking > -math.inf  # masked and inside the current block
        chosen = torch.zeros_like(revealable)
        if step.count > 0:  # rows with fewer slots left (reveal_threshold took some) just reveal them all
            chosen.scatter_(1, ranking.topk(step.count, dim=-1).indices, True)
        if config.reveal_threshold is not None:
            sure = torch.zeros_like(revealable)
            sure[masked] = candidates.probs_of(ids) >= config.reveal_threshold
            chosen |= sure
        proposal = torch.full_like(slots, self.family.mask_token_id)
        proposal[masked] = ids
        slots.copy_(torch.where(chosen & revealable, proposal, slots))
