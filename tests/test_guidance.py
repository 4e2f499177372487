"""Guidance math (docs/design.md §3) checked against direct autograd computations, with a linear stand-in reward."""

import math
from types import SimpleNamespace

import pytest
import torch

from rgrl.distributions import entropy, filter_logits, normalized_entropy, sample_tokens
from rgrl.guidance import GuidanceConfig, GuidanceStats, RewardGuidance, entropy_weight, mixed_embeddings
from rgrl.guidance.estimators import _FreshAdam

V, D = 11, 5


def test_filter_logits_top_p_keeps_smallest_nucleus_and_top_k_the_largest():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.75 > 0.7: stop after the 2nd
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [True, True, True, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))
    assert kept.tolist() == [True, False, False, False]  # always at least one token
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [True, True, True, False]
    kept = torch.isfinite(filter_logits(logits, top_p=0.8, top_k=2))
    assert kept.tolist() == [True, True, False, False]
    assert torch.equal(filter_logits(logits, top_p=1.0, top_k=None), logits)


def test_sample_tokens_never_draws_filtered_tokens_and_greedy_is_argmax():
    logits = torch.randn(2000, V, generator=torch.Generator().manual_seed(0))
    ids, probs = sample_tokens(logits, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(1))
    allowed = torch.topk(logits, 3, dim=-1).indices
    assert (allowed == ids.unsqueeze(-1)).any(-1).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2000))
    greedy, _ = sample_tokens(logits, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1))


def test_entropy_weight_is_one_for_uniform_and_zero_for_one_hot():
    uniform = torch.zeros(3, V)
    one_hot = torch.full((3, V), -math.inf)
    one_hot[:, 4] = 0.0
    assert torch.allclose(normalized_entropy(uniform), torch.ones(3))
    assert torch.allclose(normalized_entropy(one_hot), torch.zeros(3))
    # -inf entries (mask token, padding rows) are not possible tokens: uniform over the rest is still 1
    partly_impossible = uniform.clone()
    partly_impossible[:, :3] = -math.inf
    assert torch.allclose(normalized_entropy(partly_impossible), torch.ones(3))
    logits = torch.randn(4, V)
    p = logits.softmax(-1)
    assert torch.allclose(entropy(logits), -(p * p.log()).sum(-1), atol=1e-6)
    assert torch.allclose(entropy_weight("entrgi", logits), entropy(logits) / math.log(V), atol=1e-6)
    assert torch.equal(entropy_weight("aps", logits), torch.ones(4))
    assert torch.equal(entropy_weight("expectation", logits), torch.zeros(4))


def _naive_mixed(logits, matrix, weight, temperature, top_p, top_k, seed):
    """The EntRGi input written out: forward (1-w)·soft + w·hard, gradient through soft only."""
    soft = (logits / temperature).softmax(-1) @ matrix
    hard_ids, _ = sample_tokens(logits.detach(), temperature, top_p, top_k, torch.Generator().manual_seed(seed))
    hard = matrix[hard_ids]
    value = (1 - weight[:, None]) * soft + weight[:, None] * hard
    return value, soft


@pytest.mark.parametrize("method", ["entrgi", "aps", "expectation"])
def test_mixed_embeddings_forward_value_and_gradient(method):
    torch.manual_seed(0)
    matrix = torch.randn(V, D)
    target = torch.randn(6, D)
    logits = torch.randn(6, V, requires_grad=True)
    weight = entropy_weight(method, logits)
    e = mixed_embeddings(logits, matrix, weight, 0.7, 0.95, None, torch.Generator().manual_seed(3))
    value, soft = _naive_mixed(logits, matrix, weight, 0.7, 0.95, None, seed=3)
    assert torch.allclose(e, value, atol=1e-6)
    (grad,) = torch.autograd.grad((e * target).sum(), logits)
    (soft_grad,) = torch.autograd.grad((soft * target).sum(), logits)
    assert torch.allclose(grad, soft_grad, atol=1e-6)
    if method == "expectation":
        assert torch.allclose(e, soft, atol=1e-6)
    if method == "aps":
        hard_ids, _ = sample_tokens(logits.detach(), 0.7, 0.95, None, torch.Generator().manual_seed(3))
        assert torch.allclose(e, matrix[hard_ids], atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_fresh_adam_matches_torch_adam(steps):
    torch.manual_seed(0)
    start = torch.randn(4, V)
    gradients = [torch.randn(4, V) for _ in range(steps)]
    ours = start.clone()
    adam = _FreshAdam(ours, lr=0.5)
    reference = start.clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=0.5)
    for g in gradients:
        adam.step(g)
        reference.grad = g.clone()
        torch_adam.step()
    assert torch.allclose(ours, reference.detach(), atol=1e-5)
    if steps == 1:  # the closed-form first step: η·g/(|g|+ε)
        assert torch.allclose(ours, start - 0.5 * gradients[0] / (gradients[0].abs() + 1e-8), atol=1e-6)


END_OF_TURN = 0  # the stand-in reward model's end-of-turn row
STOP = 10  # the dLLM stop token of these tests


class LinearReward:
    """Stand-in reward model: r_b = Σ_{kept slots} <embedding, u> + <end of turn, u>, where the end of turn is the
    first stop slot's embedding when the row has one (else the template's own, row END_OF_TURN)."""

    def __init__(self, u: torch.Tensor, weight: torch.Tensor):
        self.u, self.input_embeddings = u, torch.nn.Embedding.from_pretrained(weight)
        self.template = SimpleNamespace(end_of_turn_id=END_OF_TURN)
        self.calls = 0

    def embedding_scorer(self, prompts, num_slots):
        return LinearScorer(self, len(prompts), num_slots)


class LinearScorer:
    def __init__(self, reward, rows, num_slots):
        self.reward, self.num_slots, self.input_shape = reward, num_slots, (rows, num_slots + 1)

    def __call__(self, embeds, keep, stop_slot):
        self.reward.calls += 1
        rows = torch.arange(len(embeds))
        has_stop = stop_slot < self.num_slots
        end = torch.where(has_stop.unsqueeze(-1), embeds[rows, stop_slot.clamp(max=self.num_slots - 1)],
                          self.reward.input_embeddings.weight[END_OF_TURN])
        return ((embeds @ self.reward.u) * keep).sum(-1) + end @ self.reward.u


class IdentityBridge:
    def embedding_matrix(self, embeddings):
        return embeddings.weight.clone()


def _guidance(method, steps, lr, u, matrix, measure_gain=False):
    config = GuidanceConfig(method=method, steps=steps, lr=lr, measure_gain=measure_gain)
    return RewardGuidance(config, LinearReward(u, matrix), IdentityBridge(), stop_token_ids=(STOP,))


def _expected_guided_expectation(logits_masked, matrix, u, steps, lr, temperature):
    """Naive: M torch.optim.Adam steps on φ maximising Σ <softmax(φ/τ) @ Ê, u> (expectation estimator)."""
    phi = logits_masked.clone().requires_grad_(True)
    adam = torch.optim.Adam([phi], lr=lr)
    for _ in range(steps):
        adam.zero_grad()
        loss = -(((phi / temperature).softmax(-1) @ matrix) @ u).sum()
        loss.backward()
        adam.step()
    return phi.detach()


@pytest.mark.parametrize("steps,lr", [(1, 0.5), (3, 0.25)])
def test_guidance_step_equals_naive_adam_on_masked_logits(steps, lr):
    torch.manual_seed(0)
    B, L = 2, 4
    matrix, u = torch.randn(V, D), torch.randn(D)
    logits = torch.randn(B, L, V)
    logits[..., STOP] = -math.inf  # no stop token anywhere, as in the sampler when a slot cannot stop
    tokens = torch.randint(0, 8, (B, L))
    masked = torch.tensor([[True, False, True, True], [False, True, True, False]])
    tokens[masked] = 9  # the mask id; no stop token among the revealed ones
    guidance = _guidance("expectation", steps, lr, u, matrix)
    scorer = guidance.scorer(["p", "q"], L)
    stats = GuidanceStats()
    # no stop token anywhere, so every slot counts and the naive objective is the same
    guided = guidance(logits, tokens, masked, scorer, temperature=0.7, top_p=None, top_k=None,
                      generator=torch.Generator().manual_seed(0), stats=stats)
    expected = _expected_guided_expectation(logits[masked], matrix, u, steps, lr, 0.7)
    assert torch.allclose(guided[masked], expected, atol=1e-5)
    assert torch.equal(guided[~masked], logits[~masked])  # revealed slots untouched
    assert stats.rm_forward_backward == steps and stats.steps == 1
    assert guidance.reward_model.calls == steps


def test_guidance_uses_a_fresh_optimiser_every_denoising_step():
    torch.manual_seed(0)
    matrix, u = torch.randn(V, D), torch.randn(D)
    logits = torch.randn(1, 3, V)
    logits[..., STOP] = -math.inf
    tokens = torch.full((1, 3), 9)
    masked = torch.ones(1, 3, dtype=torch.bool)
    guidance = _guidance("expectation", 1, 0.5, u, matrix)
    scorer = guidance.scorer(["p"], 3)
    kwargs = dict(temperature=1.0, top_p=None, top_k=None)
    first = guidance(logits, tokens, masked, scorer, **kwargs)
    second = guidance(first, tokens, masked, scorer, **kwargs)
    # each call's single step is the closed form η·g/(|g|+ε) of that call's gradient: no momentum carried over
    for before, after in ((logits, first), (first, second)):
        phi = before[masked].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-((phi.softmax(-1) @ matrix) @ u).sum(), phi)
        assert torch.allclose(after[masked], phi.detach() - 0.5 * g / (g.abs() + 1e-8), atol=1e-5)


def test_guidance_raises_the_reward_of_the_relaxed_proposals():
    torch.manual_seed(1)
    matrix, u = torch.randn(V, D), torch.randn(D)
    logits = torch.randn(3, 6, V)
    tokens = torch.full((3, 6), 9)
    masked = torch.ones(3, 6, dtype=torch.bool)
    for method in ("entrgi", "aps", "expectation"):
        guidance = _guidance(method, 3, 0.5, u, matrix, measure_gain=True)
        stats = GuidanceStats()
        guidance(logits, tokens, masked, guidance.scorer(["a", "b", "c"], 6), 0.7, 0.95, None,
                 torch.Generator().manual_seed(0), stats)
        metrics = stats.as_metrics()
        assert metrics["reward_gain"] > 0, method
        assert stats.rm_forward == 1 and stats.rm_forward_backward == 3


def test_the_first_stop_slot_is_read_as_the_end_of_turn_and_later_slots_are_not():
    matrix, u = torch.randn(V, D), torch.randn(D)
    guidance = _guidance("expectation", 1, 0.5, u, matrix)
    ids = torch.tensor([[1, 2, STOP, 3, STOP], [STOP, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    keep, stop_slot = guidance.first_stop(ids)
    assert keep.tolist() == [
        [True, True, False, False, False],
        [False, False, False, False, False],
        [True, True, True, True, True],
    ]
    assert stop_slot.tolist() == [2, 0, 5]
    # In Ê every stop token is the reward model's end of turn, so a one-hot φ reads as the discrete path does.
    assert torch.equal(guidance.embedding_matrix[STOP], matrix[END_OF_TURN])
    assert torch.equal(guidance.embedding_matrix[:STOP], matrix[:STOP])

    # A masked slot whose argmax is the stop token ends the response there: it is read as the end of turn and its
    # logits get the reward gradient (guidance can move the end); the slots after it get none.
    logits = torch.randn(1, 4, V)
    logits[0, 1, STOP] = 5.0  # slot 1 predicts the stop token
    logits[0, 2:, STOP] = -math.inf
    tokens = torch.full((1, 4), 9)
    masked = torch.ones(1, 4, dtype=torch.bool)
    guided = guidance(logits, tokens, masked, guidance.scorer(["p"], 4), 1.0, None, None)
    assert not torch.equal(guided[0, 0], logits[0, 0])
    assert (guided[0, 1] - logits[0, 1]).abs().max() > 0.4  # a closed-form Adam step: |Δ| = η where g ≠ 0
    assert torch.equal(guided[0, 2:], logits[0, 2:])
    # The direct computation: the gradient at the stop slot is that of <softmax(φ) @ Ê, u> with Ê's stop row.
    phi = logits[0, 1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(-(phi.softmax(-1) @ guidance.embedding_matrix @ u), phi)
    torch.testing.assert_close(guided[0, 1], logits[0, 1] - 0.5 * g / (g.abs() + 1e-8), atol=1e-5, rtol=0)


def test_zero_temperature_guidance_is_greedy_and_finite():
    """τ = 0 means greedy in the sampler; guidance then relaxes softmax(φ) (unscaled) instead of dividing by 0."""
    torch.manual_seed(2)
    matrix, u = torch.randn(V, D), torch.randn(D)
    logits = torch.randn(2, 3, V)
    logits[..., STOP] = -math.inf
    tokens = torch.full((2, 3), 9)
    masked = torch.ones(2, 3, dtype=torch.bool)
    for method in ("entrgi", "aps", "expectation"):
        guidance = _guidance(method, 2, 0.5, u, matrix)
        greedy = guidance(logits, tokens, masked, guidance.scorer(["a", "b"], 3), 0.0, 0.95, None,
                          torch.Generator().manual_seed(0))
        assert torch.isfinite(greedy[..., :STOP]).all(), method
    weight = torch.full((4,), 0.3)
    phi = torch.randn(4, V)
    mixed = mixed_embeddings(phi, matrix, weight, 0.0, None, None)
    expected = 0.7 * (phi.softmax(-1) @ matrix) + 0.3 * matrix[phi.argmax(-1)]
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_guidance_config_validation():
    with pytest.raises(ValueError, match="method"):
        GuidanceConfig(method="magic")
    with pytest.raises(ValueError, match="steps"):
        GuidanceConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        GuidanceConfig(lr=0.0)
    with pytest.raises(ValueError, match="unguided"):
        RewardGuidance(GuidanceConfig(method="none"), LinearReward(torch.zeros(D), torch.zeros(V, D)), IdentityBridge(),
                       stop_token_ids=(STOP,))
