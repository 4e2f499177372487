"""The denoising loop (docs/design.md §2): schedules, confidence rules, blocks, EOS deprioritisation, logit shift."""

import math
from types import SimpleNamespace

import pytest
import torch

from rgrl.distributions import nucleus
from rgrl.models.family import resolve_family
from rgrl.toy.tiny import build_tokenizer
from rgrl.sampling import (
    DiffusionSampler,
    SamplerConfig,
    completion_mask,
    confidence,
    reveal_counts,
    reveal_plan,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("qwen")


def family_for(tokenizer, model_type):
    config = SimpleNamespace(model_type=model_type, mask_token_id=tokenizer.mask_token_id, vocab_size=512)
    overrides = {"mask_token_id": tokenizer.mask_token_id} if model_type == "llada" else None
    return resolve_family(config, tokenizer, overrides)


class ScriptedModel(torch.nn.Module):
    """A 'dLLM' whose raw logit row at position i strongly predicts token script(i, input_ids)."""

    def __init__(self, script, vocab_size=512):
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        for i in range(length):
            logits[:, i] = self.script(i, input_ids)
        return SimpleNamespace(logits=logits)


def one_hot_logits(token, vocab_size=512, high=20.0):
    row = torch.zeros(vocab_size)
    row[token] = high
    return row


def test_dream_schedule_matches_the_native_counts():
    counts = reveal_counts("dream", 128, 128)
    assert counts == [0] + [1] * 126 + [2]
    assert sum(reveal_counts("dream", 100, 37)) == 100
    assert reveal_counts("linear", 128, 32) == [4] * 32
    assert reveal_counts("linear", 10, 4) == [3, 3, 2, 2]


def test_block_plan_splits_steps_evenly_and_rejects_bad_shapes():
    plan = reveal_plan("linear", max_completion_length=8, steps=4, block_length=4)
    assert [(s.block_start, s.block_end, s.count) for s in plan] == [(0, 4, 2), (0, 4, 2), (4, 8, 2), (4, 8, 2)]
    with pytest.raises(ValueError, match="divide"):
        reveal_plan("linear", max_completion_length=8, steps=4, block_length=3)
    with pytest.raises(ValueError, match="divisible"):
        reveal_plan("linear", max_completion_length=8, steps=3, block_length=4)


def test_confidence_rules_against_direct_formulas():
    logits = torch.randn(5, 7)
    ids = torch.tensor([0, 1, 2, 3, 4])
    candidates = nucleus(logits, temperature=0.5)  # unfiltered: the whole vocabulary
    probs = (logits / 0.5).softmax(-1)
    assert torch.allclose(confidence("entropy", candidates, logits, ids), (probs * probs.log()).sum(-1))
    assert torch.allclose(confidence("maskgit_plus", candidates, logits, ids), probs[torch.arange(5), ids])
    top = probs.sort(-1, descending=True).values
    assert torch.allclose(confidence("topk_margin", candidates, logits, ids), top[:, 0] - top[:, 1])
    assert torch.allclose(confidence("low_confidence", candidates, logits, ids),
                          logits.softmax(-1)[torch.arange(5), ids])
    random_conf = confidence("random", candidates, logits, ids, torch.Generator().manual_seed(0))
    assert random_conf.shape == (5,) and ((0 <= random_conf) & (random_conf < 1)).all()
    # filtered: the rules read the renormalised kept distribution; a token outside it has probability 0
    kept = torch.full_like(logits, -math.inf).scatter(-1, logits.topk(3).indices, logits.topk(3).values)
    filtered = (kept / 0.5).softmax(-1)
    candidates = nucleus(logits, temperature=0.5, top_k=3)
    assert torch.allclose(confidence("entropy", candidates, logits, ids),
                          torch.special.xlogy(filtered, filtered).sum(-1), atol=1e-6)
    assert torch.allclose(confidence("maskgit_plus", candidates, logits, ids), filtered[torch.arange(5), ids])
    top = filtered.sort(-1, descending=True).values
    assert torch.allclose(confidence("topk_margin", candidates, logits, ids), top[:, 0] - top[:, 1])
    assert confidence("topk_margin", nucleus(logits, 0.5, top_k=1), logits, ids).eq(1.0).all()


def test_completion_mask_includes_the_first_stop_token():
    ids = torch.tensor([[5, 6, 7, 8], [5, 9, 6, 9], [9, 5, 5, 5]])
    assert completion_mask(ids, (9,)).tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]


@pytest.mark.parametrize("model_type,shifted", [("Dream", True), ("llada", False)])
def test_sampler_honours_the_family_logit_shift(tokenizer, model_type, shifted):
    """Raw row i predicts token 100 + i: a shifted family must put token 100 + (p - 1) at position p."""
    family = family_for(tokenizer, model_type)
    assert family.shifted_logits is shifted
    model = ScriptedModel(lambda i, ids: one_hot_logits(100 + i))
    sampler = DiffusionSampler(model, tokenizer, family, SamplerConfig(steps=4, max_completion_length=8, temperature=0))
    out = sampler.generate(["hello there"], num_samples=1)
    prompt_length = out.prompt_ids.shape[1]
    positions = torch.arange(prompt_length, prompt_length + 8)
    expected = 100 + positions - 1 if shifted else 100 + positions
    assert out.completion_ids[0].tolist() == expected.tolist()
    assert model.calls == 4 and out.stats.dllm_forwards == 4


def test_each_step_reveals_as_planned_and_blocks_are_respected(tokenizer):
    family = family_for(tokenizer, "llada")
    config = SamplerConfig(steps=8, max_completion_length=8, schedule="linear", block_length=4, temperature=1.0,
                           alg="random", top_p=None)
    sampler = DiffusionSampler(ScriptedModel(lambda i, ids: torch.randn(512)), tokenizer, family, config)
    out = sampler.generate(["a", "bb"], num_samples=2, seed=0, record_history=True)
    assert len(out.history) == 8
    previous = torch.full((4, 8), family.mask_token_id)
    for step, canvas in enumerate(out.history):
        masked = canvas == family.mask_token_id
        newly = (previous == family.mask_token_id) & ~masked
        assert (newly.sum(-1) == 1).all()  # linear: 8 slots over 8 steps
        if step < 4:
            assert masked[:, 4:].all()  # right of the current block: never revealed
        previous = canvas
    assert not (out.completion_ids == family.mask_token_id).any()


def test_mask_token_and_padding_rows_are_never_sampled(tokenizer):
    family = family_for(tokenizer, "llada")
    # the model prefers the mask token, then a padding row beyond the tokenizer
    def script(i, ids):
        row = torch.zeros(512)
        row[family.mask_token_id] = 30.0
        row[500] = 20.0
        return row

    config = SamplerConfig(steps=2, max_completion_length=4, temperature=1.0, top_p=None)
    out = DiffusionSampler(ScriptedModel(script), tokenizer, family, config).generate(["x"], seed=0)
    assert (out.completion_ids < family.num_tokens).all()
    assert not (out.completion_ids == family.mask_token_id).any()


def test_eos_is_revealed_last_when_deprioritised(tokenizer):
    family = family_for(tokenizer, "llada")
    eos = family.eos_token_id

    def script(i, ids):  # EOS is very likely at every position, ordinary tokens less so
        row = torch.zeros(512)
        row[eos] = 8.0 if i % 2 else 1.0
        row[120] = 4.0
        return row

    def first_revealed_token(deprioritize):
        config = SamplerConfig(steps=6, max_completion_length=6, schedule="linear", alg="maskgit_plus",
                               temperature=0, deprioritize_eos=deprioritize)
        out = DiffusionSampler(ScriptedModel(script), tokenizer, family, config).generate(["x"], record_history=True)
        first = int((out.history[0][0] != family.mask_token_id).nonzero()[0])
        return int(out.completion_ids[0, first])

    assert first_revealed_token(deprioritize=True) != eos
    assert first_revealed_token(deprioritize=False) == eos


@pytest.mark.parametrize("model_type", ["Dream", "llada"])
def test_only_the_tokenizers_eos_is_held_back_by_default(model_type):
    """A slot certain to be end of turn is committed first by default (as the paper's reference sampler); EOS is
    held back; `deprioritized_tokens: eos_and_end_of_turn` holds back both."""
    tokenizer = build_tokenizer("qwen" if model_type == "Dream" else "llama3")
    mask = tokenizer.convert_tokens_to_ids("<|mask|>" if model_type == "Dream" else "<|mdm_mask|>")
    config = SimpleNamespace(model_type=model_type, mask_token_id=mask, vocab_size=512)
    family = resolve_family(config, tokenizer, {"mask_token_id": mask})
    eos, eot = family.eos_token_id, family.end_of_turn_token_id
    assert eot is not None and eot != eos
    shift = 1 if family.shifted_logits else 0  # Dream: the logit at position i predicts position i + 1

    def script(i, ids):  # the last slot: certainly end of turn; the one before: certainly EOS; the rest less sure
        row = torch.zeros(512)
        row[120] = 4.0
        if i + shift == ids.shape[1] - 1:
            row[eot] = 30.0
        elif i + shift == ids.shape[1] - 2:
            row[eos] = 30.0
        return row

    def reveal_order(**options):
        sampler_config = SamplerConfig(steps=4, max_completion_length=4, schedule="linear", alg="maskgit_plus",
                                       temperature=0, **options)
        out = DiffusionSampler(ScriptedModel(script), tokenizer, family, sampler_config).generate(
            ["x"], record_history=True)
        before = torch.full_like(out.history[0], family.mask_token_id)
        order = []
        for after in out.history:  # one slot per step
            (slot,) = ((after[0] != family.mask_token_id) & (before[0] == family.mask_token_id)).nonzero()[:, 0]
            order.append(int(out.completion_ids[0, slot]))
            before = after
        return order

    assert SamplerConfig().deprioritized_tokens == "eos"
    assert reveal_order() == [eot, 120, 120, eos]
    assert reveal_order(deprioritized_tokens="eos_and_end_of_turn")[:2] == [120, 120]
    assert set(reveal_order(deprioritized_tokens="eos_and_end_of_turn")[2:]) == {eos, eot}
    with pytest.raises(ValueError, match="deprioritized_tokens"):
        SamplerConfig(deprioritized_tokens="everything")


def test_same_seed_same_samples_and_texts_are_cut_at_the_stop(tokenizer):
    family = family_for(tokenizer, "Dream")
    eot = family.end_of_turn_token_id

    def script(i, ids):
        row = torch.randn(512, generator=torch.Generator().manual_seed(i))
        row[eot] = 5.0 if i == 12 else -5.0
        return row

    config = SamplerConfig(steps=4, max_completion_length=8, temperature=1.0, top_p=0.9)
    sampler = DiffusionSampler(ScriptedModel(script), tokenizer, family, config)
    a = sampler.generate(["hello"], num_samples=3, seed=7)
    b = sampler.generate(["hello"], num_samples=3, seed=7)
    c = sampler.generate(["hello"], num_samples=3, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    for ids, keep, text in zip(a.completion_ids, a.completion_mask, a.texts):
        stops = (ids == eot).nonzero()
        if len(stops):
            cut = int(stops[0])
            assert keep.sum() == cut + 1
            assert text == tokenizer.decode(ids[:cut], skip_special_tokens=True)


class ScriptedGuidance:
    """Stand-in guidance that adds a fixed bias to the logits, to test where the sampler looks."""

    def __init__(self, bias):
        self.bias = bias
        self.device = torch.device("cpu")
        self.calls = 0

    def bind(self, prompts, num_slots, temperature, top_p, top_k, generator):
        def guide(logits, tokens, masked, stats):
            self.calls += 1
            return logits.add_(self.bias)  # in place, as the real hook does

        return guide


def test_guidance_runs_every_step_and_confidence_can_come_from_unguided_logits(tokenizer):
    family = family_for(tokenizer, "llada")

    def script(i, ids):  # unguided: slot order by confidence is left to right (decreasing peak)
        row = torch.zeros(512)
        row[130] = 10.0 - 0.5 * (i % 16)
        return row

    bias = torch.zeros(512)
    bias[140] = 30.0  # guidance makes token 140 certain everywhere

    def run(confidence_from):
        guidance = ScriptedGuidance(bias)
        config = SamplerConfig(steps=4, max_completion_length=4, schedule="linear", alg="topk_margin",
                               temperature=0, confidence_from=confidence_from)
        out = DiffusionSampler(ScriptedModel(script), tokenizer, family, config, guidance).generate(
            ["x"], record_history=True)
        assert guidance.calls == 4
        return out

    out = run("unguided")
    assert (out.completion_ids == 140).all()  # tokens come from the guided logits
    order = [int(((h[0] != family.mask_token_id).int() - (p[0] != family.mask_token_id).int()).argmax())
             for p, h in zip([torch.full((1, 4), family.mask_token_id)] + out.history[:-1], out.history)]
    prompt_length = out.prompt_ids.shape[1]
    peaks = [10.0 - 0.5 * ((prompt_length + j) % 16) for j in range(4)]
    assert order == sorted(range(4), key=lambda j: -peaks[j])


def test_sampler_config_validation():
    with pytest.raises(ValueError, match="alg"):
        SamplerConfig(alg="best")
    with pytest.raises(ValueError, match="schedule"):
        SamplerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="block_length"):
        SamplerConfig(max_completion_length=10, block_length=4)
    assert math.isclose(SamplerConfig().temperature, 0.7)
