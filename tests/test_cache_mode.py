"""The sampler's cache mode (beyond the paper): prompt keys/values reused across steps, and threshold reveals."""

from types import SimpleNamespace

import pytest
import torch

from rgrl.models.family import FamilyError
from rgrl.models.layers import PromptCache
from rgrl.models.loading import DLLMConfig
from rgrl.sampling import DiffusionSampler, SamplerConfig

PROMPTS = ["Tell me about the ocean.", "Hi", "Write a long story about a dog and a cat."]  # left padding


@pytest.fixture(scope="module", params=["dream", "llada"])
def dllm(request):
    return DLLMConfig(path=f"tiny:{request.param}", dtype="float32").load("cpu")


def test_reusing_the_prompt_cache_right_after_filling_gives_the_full_forward_logits(dllm):
    sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, SamplerConfig(steps=4, max_completion_length=6))
    prompt_ids, prompt_mask = sampler.encode_prompts(PROMPTS)
    mask_id = dllm.family.mask_token_id
    canvas = torch.cat([prompt_ids, torch.full((3, 6), mask_id)], dim=1)
    canvas[:, -6:-3] = torch.randint(10, 100, (3, 3))  # some slots already revealed
    attention_mask = torch.cat([prompt_mask, torch.ones(3, 6, dtype=torch.bool)], dim=1)
    masked = canvas[:, -6:] == mask_id
    with torch.no_grad():
        full = sampler._masked_logits(canvas, attention_mask, masked)
        cache = PromptCache(length=dllm.family.cacheable_prompt_length(prompt_ids.shape[1]))
        filled = sampler._masked_logits(canvas, attention_mask, masked, cache)
        cache.filling = False
        reused = sampler._masked_logits(canvas, attention_mask, masked, cache)
        # after a reveal the cached prompt keys/values are stale (bidirectional attention): an approximation
        changed = canvas.clone()
        changed[:, -1] = 42
        stale = sampler._masked_logits(changed, attention_mask, changed[:, -6:] == mask_id, cache)
        cache.filling = True
        exact = sampler._masked_logits(changed, attention_mask, changed[:, -6:] == mask_id, cache)
    finite = torch.isfinite(full)
    assert torch.equal(filled[finite], full[finite])
    assert torch.allclose(reused[finite], full[finite], atol=1e-5)
    assert len(cache.keys) == dllm.model.config.num_hidden_layers
    assert not torch.allclose(stale, exact, atol=1e-6)


def test_refreshing_every_step_is_the_exact_sampler(dllm):
    def generate(**cache_mode):
        config = SamplerConfig(steps=6, max_completion_length=6, schedule="linear", temperature=0.7, **cache_mode)
        return DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, config).generate(PROMPTS, seed=3)

    exact = generate()
    assert torch.equal(generate(prompt_cache_refresh=1).completion_ids, exact.completion_ids)
    reused = generate(prompt_cache_refresh=3)
    assert reused.stats.dllm_forwards == exact.stats.dllm_forwards == 6
    assert not (reused.completion_ids == dllm.family.mask_token_id).any()


class CertainModel(torch.nn.Module):
    """A "dLLM" certain of token 7 everywhere (probability ≈ 1)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 512)
        logits[..., 7] = 50.0
        return SimpleNamespace(logits=logits)


def test_reveal_threshold_reveals_every_certain_slot_and_skips_the_rest(dllm):
    family = dllm.family
    config = SamplerConfig(steps=8, max_completion_length=8, schedule="linear", temperature=1.0, reveal_threshold=0.9)
    model = CertainModel()
    out = DiffusionSampler(model, dllm.tokenizer, family, config).generate(["x"], seed=0)
    assert (out.completion_ids == 7).all()
    assert out.stats.dllm_forwards == model.calls == 1  # all 8 slots were sure at the first step
    # without the threshold the schedule's one slot per step holds
    out = DiffusionSampler(CertainModel(), dllm.tokenizer, family, SamplerConfig(
        steps=8, max_completion_length=8, schedule="linear", temperature=1.0)).generate(["x"], seed=0)
    assert out.stats.dllm_forwards == 8


def test_cache_mode_settings_are_checked(dllm):
    with pytest.raises(ValueError, match="prompt_cache_refresh"):
        SamplerConfig(prompt_cache_refresh=-1)
    with pytest.raises(ValueError, match="reveal_threshold"):
        SamplerConfig(reveal_threshold=1.5)
    sampler = DiffusionSampler(CertainModel(), dllm.tokenizer, dllm.family,
                               SamplerConfig(steps=2, max_completion_length=2, prompt_cache_refresh=2))
    with pytest.raises(FamilyError, match="native"):
        sampler.generate(["x"], seed=0)
