"""Guidance math (docs/design.md §3) checked against the naive references in tests/oracles.py (full-vocabulary sort,
autograd, torch.optim.Adam), with a linear stand-in reward."""

import math
from types import SimpleNamespace

import pytest
import torch

from rgrl import distributions
from rgrl.distributions import entropy, normalized_entropy, nucleus, sample_tokens
from rgrl.guidance import GuidanceConfig, GuidanceStats, RewardGuidance, entropy_weight, mixed_embeddings
from rgrl.guidance.estimators import FreshAdam, row_chunks, soft_embedding_grad, soft_embeddings
from tests import oracles

V, D = 11, 5


def test_nucleus_keeps_the_smallest_nucleus_then_the_top_k():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()

    def kept(**filters):
        candidates = nucleus(logits, 1.0, **filters)
        return sorted(candidates.ids[0][candidates.probs[0] > 0].tolist())

    assert kept(top_p=0.7) == [0, 1]  # 0.5 < 0.7, 0.75 > 0.7: stop after the 2nd
    assert kept(top_p=0.8) == [0, 1, 2]
    assert kept(top_p=0.01) == [0]  # always at least one token
    assert kept(top_k=3) == [0, 1, 2]
    assert kept(top_p=0.8, top_k=2) == [0, 1]
    assert kept(top_p=1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (0.7, 0.95, None), (0.9, 0.95, 50), (1.0, 0.5, 3), (0.7, None, 7), (1.3, None, None), (0.0, 0.95, None),
])
def test_sampling_equals_the_full_sort_oracle(monkeypatch, temperature, top_p, top_k):
    """Same ids for the same uniforms, same kept probabilities — including rows whose nucleus is wider than the
    first candidate list (flat rows), which fall back to a full sort."""
    monkeypatch.setattr(distributions, "NUCLEUS_WIDTH", 4)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 97, generator=generator) * torch.rand(300, 1, generator=generator) * 6
    logits[:, 13] = -math.inf  # an impossible token (the mask)
    uniform = distributions.uniforms(300, temperature, generator, "cpu")
    ids, candidates = sample_tokens(logits, temperature, top_p, top_k, uniform)
    assert torch.equal(ids, oracles.sample(logits, temperature, top_p, top_k, uniform))
    expected = oracles.filtered_probs(logits, temperature, top_p, top_k)
    ours = torch.zeros_like(expected).scatter_add(-1, candidates.ids.expand(300, -1), candidates.probs)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not (ids == 13).any()


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


@pytest.mark.parametrize("method", ["entrgi", "aps", "expectation"])
def test_mixed_embeddings_value_and_soft_path_gradient(method):
    torch.manual_seed(0)
    matrix = torch.randn(V, D)
    logits = torch.randn(6, V)
    weight = entropy_weight(method, logits)
    uniform = torch.rand(6)
    e = mixed_embeddings(logits, matrix, weight, 0.7, 0.95, None, uniform)
    soft = (logits / 0.7).softmax(-1) @ matrix
    hard = matrix[oracles.sample(logits, 0.7, 0.95, None, uniform)]
    assert torch.allclose(e, (1 - weight[:, None]) * soft + weight[:, None] * hard, atol=1e-6)
    if method == "expectation":
        assert torch.allclose(e, soft, atol=1e-6)
    if method == "aps":
        assert torch.allclose(e, hard, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0])
def test_soft_embedding_grad_equals_autograd(temperature):
    torch.manual_seed(0)
    matrix, target = torch.randn(V, D), torch.randn(6, D)
    logits = torch.randn(6, V, requires_grad=True)
    soft = soft_embeddings(logits, matrix, temperature)
    (expected,) = torch.autograd.grad((soft * target).sum(), logits)
    assert torch.allclose(soft_embedding_grad(logits.detach(), target, matrix, temperature), expected, atol=1e-6)


@pytest.mark.parametrize("steps,chunk_rows", [(1, 4), (3, 4), (3, 100)])
def test_fresh_adam_in_chunks_matches_torch_adam(steps, chunk_rows):
    torch.manual_seed(0)
    start = torch.randn(10, V)
    gradients = [torch.randn(10, V) for _ in range(steps)]
    ours = start.clone()
    adam = FreshAdam(ours, lr=0.5, steps=steps)
    reference = start.clone().requires_grad_(True)
    torch_adam = torch.optim.Adam([reference], lr=0.5)
    for g in gradients:
        adam.step((rows, g[rows]) for rows in row_chunks(10, chunk_rows))
        reference.grad = g.clone()
        torch_adam.step()
    assert torch.allclose(ours, reference.detach(), atol=1e-5)
    assert (adam.exp_avg is None) == (steps == 1)  # M = 1 never allocates the moments
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
        self.cached_columns = 0

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


def _guidance(method, steps, lr, u, matrix, measure_gain=False, chunk_rows=512, compile=False):
    config = GuidanceConfig(method=method, steps=steps, lr=lr, measure_gain=measure_gain, chunk_rows=chunk_rows,
                            compile=compile)
    return RewardGuidance(config, LinearReward(u, matrix), IdentityBridge(), stop_token_ids=(STOP,))


def _hook(guidance, rows, slots, temperature=0.7, top_p=None, top_k=None, seed=0):
    return guidance.bind(["p"] * rows, slots, temperature, top_p, top_k, torch.Generator().manual_seed(seed))


GUIDANCE_CASES = [("expectation", 1, 0.5, None, None), ("expectation", 3, 0.25, None, None),
                  ("entrgi", 3, 0.5, 0.95, None), ("aps", 1, 0.5, 0.9, 4), ("entrgi", 2, 0.5, None, 3)]


def _compiled_case(case):  # each compiles its own kernels (seconds on a CPU): one by default, the rest in -m slow
    return pytest.param(*case, True, id=f"compiled-{case[0]}-{case[1]}",
                        marks=() if case[:2] == ("entrgi", 3) else pytest.mark.slow)


@pytest.mark.parametrize("method,steps,lr,top_p,top_k,compile", [
    *[pytest.param(*case, False, id=f"eager-{case[0]}-{case[1]}") for case in GUIDANCE_CASES],
    *map(_compiled_case, GUIDANCE_CASES)])
def test_guidance_step_equals_the_naive_reference(method, steps, lr, top_p, top_k, compile):
    """Chunked, in place, closed-form first step — and still the paper's M Adam steps on φ, sample for sample; the
    same with the vocabulary chains compiled into fused kernels (guidance.compile)."""
    torch.manual_seed(0)
    B, L = 2, 4
    matrix, u = torch.randn(V, D), torch.randn(D)
    tokens = torch.randint(0, 8, (B, L))
    masked = torch.tensor([[True, False, True, True], [False, True, True, False]])
    tokens[masked] = 9  # the mask id; no stop token among the revealed ones
    phi = torch.randn(int(masked.sum()), V)
    phi[:, STOP] = -math.inf  # no stop token anywhere, so every slot counts and the naive objective is the same
    start = phi.clone()
    guidance = _guidance(method, steps, lr, u, matrix, chunk_rows=2, compile=compile)
    stats = GuidanceStats()
    guided = _hook(guidance, B, L, top_p=top_p, top_k=top_k)(phi, tokens, masked, stats)

    def reward(embeds, _phi):
        return embeds @ u  # per slot; summed by the caller: the same objective as Σ_rows

    expected = oracles.guided_logits(start, guidance.embedding_matrix, reward, method, steps, lr, 0.7, top_p, top_k,
                                     torch.Generator().manual_seed(0))
    assert guided.data_ptr() == phi.data_ptr()  # updated in place: no second copy of φ
    assert torch.allclose(guided, expected, atol=1e-5)
    assert stats.rm_forward_backward == steps and stats.steps == 1
    assert guidance.reward_model.calls == steps


def test_guidance_uses_a_fresh_optimiser_every_denoising_step():
    torch.manual_seed(0)
    matrix, u = torch.randn(V, D), torch.randn(D)
    tokens = torch.full((1, 3), 9)
    masked = torch.ones(1, 3, dtype=torch.bool)
    guide = _hook(_guidance("expectation", 1, 0.5, u, matrix), 1, 3, temperature=1.0)
    logits = torch.randn(3, V)
    logits[:, STOP] = -math.inf
    first = guide(logits.clone(), tokens, masked)
    second = guide(first.clone(), tokens, masked)
    # each call's single step is the closed form η·g/(|g|+ε) of that call's gradient: no momentum carried over
    for before, after in ((logits, first), (first, second)):
        phi = before.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-((phi.softmax(-1) @ matrix) @ u).sum(), phi)
        assert torch.allclose(after, phi.detach() - 0.5 * g / (g.abs() + 1e-8), atol=1e-5)


def test_guidance_raises_the_reward_of_the_relaxed_proposals():
    torch.manual_seed(1)
    matrix, u = torch.randn(V, D), torch.randn(D)
    tokens = torch.full((3, 6), 9)
    masked = torch.ones(3, 6, dtype=torch.bool)
    logits = torch.randn(18, V)
    for method in ("entrgi", "aps", "expectation"):
        guidance = _guidance(method, 3, 0.5, u, matrix, measure_gain=True)
        stats = GuidanceStats()
        _hook(guidance, 3, 6, top_p=0.95)(logits.clone(), tokens, masked, stats)
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
    logits = torch.randn(4, V)
    logits[1, STOP] = 5.0  # slot 1 predicts the stop token
    logits[2:, STOP] = -math.inf
    tokens = torch.full((1, 4), 9)
    masked = torch.ones(1, 4, dtype=torch.bool)
    guided = _hook(guidance, 1, 4, temperature=1.0)(logits.clone(), tokens, masked)
    assert not torch.equal(guided[0], logits[0])
    assert (guided[1] - logits[1]).abs().max() > 0.4  # a closed-form Adam step: |Δ| = η where g ≠ 0
    assert torch.equal(guided[2:], logits[2:])
    # The direct computation: the gradient at the stop slot is that of <softmax(φ) @ Ê, u> with Ê's stop row.
    phi = logits[1].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(-(phi.softmax(-1) @ guidance.embedding_matrix @ u), phi)
    torch.testing.assert_close(guided[1], logits[1] - 0.5 * g / (g.abs() + 1e-8), atol=1e-5, rtol=0)


def test_zero_temperature_guidance_is_greedy_and_finite():
    """τ = 0 means greedy in the sampler; guidance then relaxes softmax(φ) (unscaled) instead of dividing by 0."""
    torch.manual_seed(2)
    matrix, u = torch.randn(V, D), torch.randn(D)
    logits = torch.randn(6, V)
    logits[:, STOP] = -math.inf
    tokens = torch.full((2, 3), 9)
    masked = torch.ones(2, 3, dtype=torch.bool)
    for method in ("entrgi", "aps", "expectation"):
        guidance = _guidance(method, 2, 0.5, u, matrix)
        greedy = _hook(guidance, 2, 3, temperature=0.0, top_p=0.95)(logits.clone(), tokens, masked)
        assert torch.isfinite(greedy[:, :STOP]).all(), method
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
    with pytest.raises(ValueError, match="chunk_rows"):
        GuidanceConfig(chunk_rows=0)
    with pytest.raises(ValueError, match="unguided"):
        RewardGuidance(GuidanceConfig(method="none"), LinearReward(torch.zeros(D), torch.zeros(V, D)), IdentityBridge(),
                       stop_token_ids=(STOP,))


def test_guidance_compile_compiles_every_vocabulary_chain_and_names_the_fix_when_it_cannot(monkeypatch):
    compiled = []

    def failing_compile(function, dynamic):
        compiled.append((function.__name__, dynamic))

        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(function, RuntimeError("no C++ compiler found"), None)
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    guidance = _guidance("entrgi", 1, 0.5, torch.randn(D), torch.randn(V, D), compile=True)
    assert compiled == [("proposal_chunk", True), ("soft_embedding_grad", True), ("adam_first_step", True)]
    tokens, masked = torch.full((1, 2), 9), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="guidance.compile: false"):
        _hook(guidance, 1, 2)(torch.randn(2, V), tokens, masked)
