"""Reward guidance at one denoising step (docs/design.md §3): EntRGi, APS and the expectation estimator.

The dLLM logits φ at the N currently masked positions are optimised for M Adam steps (fresh optimiser every
denoising step, lr η) to raise a differentiable reward model's score. The reward model reads, at each masked
position, a mix of the soft embedding s = softmax(φ/τ) @ Ê and the embedding h = Ê[x] of a hard sample
x ~ top-p/top-k(softmax(φ/τ)):

    e = s + stopgrad(w · (h − s))          forward value (1 − w)·s + w·h, gradient through s only

with w = H(softmax φ)/log V for EntRGi, w = 1 for APS (straight-through) and w = 0 for the expectation
estimator. Ê is the reward model's input-embedding matrix re-indexed into the dLLM vocabulary (VocabBridge).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from rgrl.distributions import normalized_entropy, sample_tokens, scale_logits, uniforms
from rgrl.models.family import before_first_stop

GuidanceMethod = Literal["entrgi", "aps", "expectation", "none"]
GUIDANCE_METHODS = get_args(GuidanceMethod)


@dataclass
class GuidanceConfig:
    """How reward gradients steer sampling. The temperature, top-p and top-k come from the sampler."""

    method: GuidanceMethod = "entrgi"  # entrgi | aps | expectation | none (unguided)
    steps: int = 3  # M: Adam steps on φ per denoising step
    lr: float = 0.5  # η
    # Log the reward of the updated proposals (guidance/reward_after, reward_gain): one extra RM forward per denoising
    # step, about half of guidance's FLOPs at M = 1 (a frozen RM's input backward costs about one forward), a sixth
    # at M = 3 (docs/design.md §3).
    measure_gain: bool = False
    chunk_rows: int = 512  # rows of φ [N, V] processed together in the vocabulary-wide operations
    # Fuse each vocabulary-wide chain (proposals, the soft path's gradient, Adam's first step) into a few kernels with
    # torch.compile: fewer passes over φ and fewer chunk temporaries, the same math (docs/performance.md).
    compile: bool = False

    def __post_init__(self):
        if self.method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance method must be one of {GUIDANCE_METHODS}, got {self.method!r}.")
        if self.steps < 1:
            raise ValueError(f"guidance steps (M) must be >= 1, got {self.steps}.")
        if self.lr <= 0:
            raise ValueError(f"guidance lr (η) must be > 0, got {self.lr}.")
        if self.chunk_rows < 1:
            raise ValueError(f"guidance chunk_rows must be >= 1, got {self.chunk_rows}.")


def entropy_weight(method: str, logits: torch.Tensor) -> torch.Tensor:
    """Weight w of the hard embedding per position: [N, V] -> [N], no gradient."""
    if method == "entrgi":
        return normalized_entropy(logits.detach())
    if method == "aps":
        return logits.new_ones(logits.shape[0])
    if method == "expectation":
        return logits.new_zeros(logits.shape[0])
    raise ValueError(f"No entropy weight for guidance method {method!r}.")


def soft_embeddings(logits: torch.Tensor, embedding_matrix: torch.Tensor, temperature: float) -> torch.Tensor:
    """s = softmax(φ/τ) @ Ê: [N, V] x [V, d] -> [N, d] in Ê's dtype (τ = 0: unscaled, as for greedy sampling)."""
    return scale_logits(logits, temperature).softmax(dim=-1).to(embedding_matrix.dtype) @ embedding_matrix


def soft_embedding_grad(
    logits: torch.Tensor, grad_embeds: torch.Tensor, embedding_matrix: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The gradient through s = softmax(φ/τ) @ Ê: dL/dφ [N, V] from φ [N, V] and dL/ds [N, d].

    With q = softmax(φ/τ) and G = (dL/ds / τ) @ Êᵀ [N, V]: dL/dφ = q ⊙ (G − ⟨q, G⟩) (τ = 0 counts as 1). Recomputing
    q here instead of keeping autograd's copy is what lets guidance work on φ a chunk of rows at a time.
    """
    probs = scale_logits(logits, temperature).softmax(dim=-1)
    scaled_grad = grad_embeds / temperature if temperature > 0 else grad_embeds
    grad = (scaled_grad.to(embedding_matrix.dtype) @ embedding_matrix.T).float()
    return grad.sub_(torch.linalg.vecdot(probs, grad).unsqueeze(-1)).mul_(probs)


def mixed_embeddings(
    logits: torch.Tensor,
    embedding_matrix: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward-model input embeddings at masked positions, forward value e = (1 − w)·s + w·h (no autograd).

    Args:
        logits: φ [N, V].
        embedding_matrix: Ê [V, d], frozen.
        weight: w [N] in [0, 1].
        temperature: τ; 0 means greedy, as in the sampler: the soft part is softmax(φ) (unscaled).
        uniform: [N] uniforms in [0, 1) for the hard draws (None: greedy, the argmax, as for τ = 0).
    Returns:
        e [N, d] in Ê's dtype. Its gradient w.r.t. φ is the soft path's: `soft_embedding_grad`.
    """
    scaled = scale_logits(logits, temperature)  # shared by the soft embedding and the draw (τ = 1 on scaled logits)
    soft = scaled.softmax(dim=-1).to(embedding_matrix.dtype) @ embedding_matrix
    hard = embedding_matrix[sample_tokens(scaled, 1.0, top_p, top_k, uniform)[0]]
    return soft + weight.to(soft.dtype).unsqueeze(-1) * (hard - soft)


def proposal_chunk(
    logits: torch.Tensor,
    embedding_matrix: torch.Tensor,
    method: str,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals of rows φ [n, V]: the reward model's input embeddings e [n, d] and their weights w [n]."""
    weight = entropy_weight(method, logits)
    return mixed_embeddings(logits, embedding_matrix, weight, temperature, top_p, top_k, uniform), weight


def adam_first_step(param: torch.Tensor, gradient: torch.Tensor, lr: float, eps: float) -> None:
    """Adam's first step from zero state, in place on param [n, V]: param −= lr·g/(|g| + eps)."""
    param.addcdiv_(gradient, gradient.abs().add_(eps), value=-lr)


@dataclass(frozen=True)
class VocabularyKernels:
    """The vocabulary-wide chains guidance runs on a chunk of rows of φ, eager or each compiled into a few kernels."""

    proposals: Callable = proposal_chunk
    soft_gradient: Callable = soft_embedding_grad
    first_adam_step: Callable = adam_first_step

    @classmethod
    def compiled(cls) -> VocabularyKernels:
        """The same functions through torch.compile (shapes dynamic: the number of masked rows changes every step)."""
        return cls(*(_compiled(function) for function in (proposal_chunk, soft_embedding_grad, adam_first_step)))


def _compiled(function: Callable) -> Callable:
    compiled = torch.compile(function, dynamic=True)

    def run(*args):
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler (CPU) or Triton (CUDA)
            raise RuntimeError(
                f"guidance.compile: torch.compile could not build {function.__name__} ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). It needs a C++ compiler on CPU and Triton on "
                "CUDA; set guidance.compile: false to run the same math eagerly.") from error

    run.__name__ = function.__name__
    return run


def row_chunks(num_rows: int, chunk_rows: int) -> list[slice]:
    """Slices covering 0..num_rows in pieces of at most chunk_rows."""
    return [slice(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]


@dataclass
class GuidanceStats:
    """Running totals over the denoising steps of one generation."""

    steps: int = 0
    entropy_weight_sum: float = 0.0  # mean w of the proposals at each step's first Adam step
    reward_before_sum: float = 0.0  # mean RM score of the proposals before the Adam steps
    reward_after_sum: float = 0.0  # ... and after them (only when measure_gain)
    rm_forward_backward: int = 0
    rm_forward: int = 0
    rm_input_shape: tuple[int, int] = (0, 0)  # [rows, columns] of every RM input of this generation
    rm_cached_columns: int = 0  # leading columns run once per generation and reused from the key/value cache
    relaxed_positions: int = 0  # Σ over RM forward+backward passes of the masked positions N (rows of φ)
    relaxed_positions_forward: int = 0  # ... over the measure_gain forwards
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list, repr=False)

    def as_metrics(self) -> dict[str, float]:
        n = max(self.steps, 1)
        metrics = {
            "entropy_weight": self.entropy_weight_sum / n,
            "reward_before": self.reward_before_sum / n,
            "rm_forward_backward": float(self.rm_forward_backward),
            "rm_forward": float(self.rm_forward),
            "seconds": self.seconds,
        }
        if self.rm_forward:
            metrics["reward_after"] = self.reward_after_sum / n
            metrics["reward_gain"] = (self.reward_after_sum - self.reward_before_sum) / n
        return metrics


class RewardGuidance:
    """Steers a dLLM's logits at masked positions with a reward model's gradients.

    Args:
        config: the estimator and its optimiser settings.
        reward_model: a `rgrl.rewards.RewardModel` (frozen, differentiable embedding path).
        bridge: a `rgrl.rewards.VocabBridge` from the dLLM vocabulary to the reward model's.
        stop_token_ids: the dLLM tokens that end a response (EOS, end of turn). The reward model reads a response up
            to and including its first stop slot, which stands where its chat template writes the end of turn: in Ê
            every stop token is the RM's end-of-turn embedding, so a one-hot φ scores exactly as the discrete path
            (whose text ends before the stop token and gets the template's end of turn), and the stop slot's logits
            receive reward gradient -- guidance can move where a response ends.
    """

    def __init__(self, config: GuidanceConfig, reward_model, bridge, stop_token_ids: tuple[int, ...]):
        if config.method == "none":
            raise ValueError("RewardGuidance needs a guidance method; 'none' means unguided sampling.")
        if not stop_token_ids:
            raise ValueError("RewardGuidance needs the dLLM's stop token ids (EOS and end of turn).")
        self.config = config
        self.reward_model = reward_model
        self.stop_token_ids = tuple(stop_token_ids)
        embedding_matrix = bridge.embedding_matrix(reward_model.input_embeddings)  # Ê [V, d]
        with torch.no_grad():
            end_of_turn = torch.tensor([reward_model.template.end_of_turn_id], device=embedding_matrix.device)
            embedding_matrix[list(self.stop_token_ids)] = reward_model.input_embeddings(end_of_turn).to(
                embedding_matrix.dtype)
        self.embedding_matrix = embedding_matrix
        self.kernels = VocabularyKernels.compiled() if config.compile else VocabularyKernels()

    @property
    def device(self) -> torch.device:
        return self.embedding_matrix.device

    def bind(self, prompts: list, num_slots: int, temperature: float, top_p: float | None, top_k: int | None,
             generator: torch.Generator | None = None) -> GuidanceHook:
        """The guidance of one generation: these prompts (one per row), `num_slots` response slots, the sampler's
        settings, and the generator of its hard draws (on the guidance device)."""
        scorer = self.reward_model.embedding_scorer(prompts, num_slots=num_slots)
        return GuidanceHook(self, scorer, temperature, top_p, top_k, generator)

    def response_embeddings(self, tokens: torch.Tensor, masked: torch.Tensor, masked_embeds: torch.Tensor):
        """[B, L] canvas tokens, [B, L] masked flags, [N, d] embeddings at masked slots -> [B, L, d]."""
        revealed = self.embedding_matrix[tokens.clamp(max=self.embedding_matrix.shape[0] - 1)]
        return revealed.masked_scatter(masked.unsqueeze(-1), masked_embeds)

    def first_stop(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids -> (keep [B, L] bool: slots strictly before the first stop token; stop_slot [B] long: the
        first stop token's slot, L when there is none)."""
        return before_first_stop(ids, self.stop_token_ids)


class GuidanceHook:
    """`RewardGuidance` bound to one generation; the sampler calls it once per denoising step.

    Works on φ [N, V] in place, `config.chunk_rows` rows at a time for everything that spans the vocabulary (softmax,
    entropy, soft embedding, hard draw, the soft path's gradient, the Adam update): besides φ, only the Adam moments
    (M >= 2) and one chunk's temporaries are ever as wide as the vocabulary.
    """

    def __init__(self, guidance: RewardGuidance, scorer, temperature, top_p, top_k, generator):
        self.guidance, self.scorer = guidance, scorer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = generator

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor,
                 stats: GuidanceStats | None = None) -> torch.Tensor:
        """Guide one denoising step.

        Args:
            logits: φ [N, V], the aligned fp32 dLLM logits at the N masked slots (impossible tokens at -inf), in the
                row order of `masked`; updated in place when it lives on the guidance device.
            tokens: [B, L] current canvas of the completion slots (mask id where masked).
            masked: [B, L] bool, the slots still masked (N of them).
        Returns:
            the optimised φ [N, V] (no grad) on `logits`' device.
        """
        if logits.shape[0] == 0:
            return logits
        start = time.perf_counter()
        config = self.guidance.config
        tokens, masked = tokens.to(self.guidance.device), masked.to(self.guidance.device)
        phi = logits.to(device=self.guidance.device, dtype=torch.float32)  # the same tensor when it already lives there
        adam = FreshAdam(phi, lr=config.lr, steps=config.steps, first_step=self.guidance.kernels.first_adam_step)
        for step in range(config.steps):
            embeds, weight = self.proposals(phi)
            rewards = self.rewards(phi, embeds.requires_grad_(), tokens, masked)
            with torch.enable_grad():
                (grad_embeds,) = torch.autograd.grad(-rewards.sum(), embeds)
            self.update(adam, phi, grad_embeds)
            if step == 0 and stats is not None:
                stats.reward_before_sum += rewards.detach().mean().item()
                stats.entropy_weight_sum += weight.mean().item()
        if stats is not None:
            stats.steps += 1
            stats.rm_forward_backward += config.steps
            stats.rm_input_shape = self.scorer.input_shape
            stats.rm_cached_columns = self.scorer.cached_columns
            stats.relaxed_positions += config.steps * phi.shape[0]
            if config.measure_gain:
                stats.reward_after_sum += self.rewards(phi, self.proposals(phi)[0], tokens, masked).mean().item()
                stats.rm_forward += 1
                stats.relaxed_positions_forward += phi.shape[0]
            stats.seconds += time.perf_counter() - start
        return phi if phi.device == logits.device else phi.to(logits.device)

    @torch.no_grad()
    def proposals(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh proposals from φ [N, V]: the reward model's input embeddings e [N, d] and their weights w [N]."""
        guidance, config = self.guidance, self.guidance.config
        matrix = guidance.embedding_matrix
        uniform = uniforms(phi.shape[0], self.temperature, self.generator, phi.device)
        embeds = matrix.new_empty((phi.shape[0], matrix.shape[1]))
        weight = phi.new_empty(phi.shape[0])
        for rows in row_chunks(phi.shape[0], config.chunk_rows):
            embeds[rows], weight[rows] = guidance.kernels.proposals(phi[rows], matrix, config.method, self.temperature,
                                                                    self.top_p, self.top_k,
                                                                    None if uniform is None else uniform[rows])
        return embeds, weight

    def rewards(self, phi: torch.Tensor, embeds: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor):
        """Rewards [B] of the responses holding `embeds` [N, d] at the masked slots, as far as φ's argmax ends them;
        differentiable in `embeds` when it requires grad (the sampler runs under no_grad; this pass may not)."""
        guidance = self.guidance
        with torch.no_grad():
            keep, stop_slot = guidance.first_stop(tokens.masked_scatter(masked, phi.argmax(dim=-1)))
        with torch.set_grad_enabled(embeds.requires_grad):
            return self.scorer(guidance.response_embeddings(tokens, masked, embeds), keep, stop_slot)

    def update(self, adam: FreshAdam, phi: torch.Tensor, grad_embeds: torch.Tensor) -> None:
        """One Adam step on φ [N, V] in place, from the reward's gradient w.r.t. the proposals' embeddings [N, d]."""
        chunks = row_chunks(phi.shape[0], self.guidance.config.chunk_rows)
        matrix, soft_gradient = self.guidance.embedding_matrix, self.guidance.kernels.soft_gradient
        adam.step((rows, soft_gradient(phi[rows], grad_embeds[rows], matrix, self.temperature)) for rows in chunks)


class FreshAdam:
    """Adam on φ [N, V] from zero state (torch.optim.Adam's update, default betas/eps), given its gradient in chunks.

    The first step is the closed form lr·g/(|g| + eps); the moment buffers (each as large as φ) exist only when more
    steps follow (M >= 2), so M = 1 — the RGRL rollout setting — never holds a full gradient. `first_step` is
    `adam_first_step` or its compiled form.
    """

    def __init__(self, param: torch.Tensor, lr: float, steps: int, betas=(0.9, 0.999), eps: float = 1e-8,
                 first_step: Callable = adam_first_step):
        self.param, self.lr, self.betas, self.eps, self.first_step = param, lr, betas, eps, first_step
        self.count = 0
        self.exp_avg = torch.empty_like(param) if steps > 1 else None
        self.exp_avg_sq = torch.empty_like(param) if steps > 1 else None

    @torch.no_grad()
    def step(self, gradients) -> None:
        """One step; `gradients` yields (rows, g [rows, V]) covering φ, each computed before its rows change."""
        self.count += 1
        for rows, gradient in gradients:
            self._step_rows(rows, gradient)
            del gradient  # free this chunk's gradient before the generator computes the next one

    def _step_rows(self, rows: slice, gradient: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        param = self.param[rows]
        if self.count == 1:
            self.first_step(param, gradient, self.lr, self.eps)
            if self.exp_avg is not None:
                self.exp_avg[rows] = (1 - beta1) * gradient
                self.exp_avg_sq[rows] = (1 - beta2) * gradient.square()
            return
        exp_avg, exp_avg_sq = self.exp_avg[rows], self.exp_avg_sq[rows]
        exp_avg.mul_(beta1).add_(gradient, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        bias1, bias2 = 1 - beta1**self.count, 1 - beta2**self.count
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-self.lr / bias1)
