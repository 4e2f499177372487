"""End to end on the tiny checkpoints: reward guidance raises the reward model's discrete score over unguided
sampling at matching seeds, for every estimator, both families, and a reward model with its own tokenizer."""

import pytest
import torch

from rgrl.guidance import GuidanceConfig, RewardGuidance
from rgrl.models.loading import DLLMConfig
from rgrl.rewards import RewardModelConfig
from rgrl.sampling import DiffusionSampler, SamplerConfig

PROMPTS = ["Tell me about the ocean.", "Write about a dog.", "What does the robot carry?", "Describe warm tea."]
SAMPLES = 16  # per prompt: 64 rows per method


@pytest.fixture(scope="module", params=[("dream", "rm"), ("llada", "rm"), ("dream", "rm_mismatched"),
                                        ("llada", "rm_mismatched")], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    family, rm_name = request.param
    dllm = DLLMConfig(path=f"tiny:{family}", dtype="float32").load("cpu")
    rm_config = RewardModelConfig(path=f"tiny:{rm_name}", dtype="float32")
    reward_model = rm_config.load("cpu")
    bridge = rm_config.bridge(dllm.tokenizer, dllm.model.config.vocab_size, reward_model)
    return dllm, reward_model, bridge


def rewards(dllm, reward_model, guidance=None):
    sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family,
                               SamplerConfig(steps=8, completion_length=8, temperature=0.7), guidance)
    out = sampler.generate(PROMPTS, num_samples=SAMPLES, seed=0)
    return reward_model.score([p for p in PROMPTS for _ in range(SAMPLES)], out.texts), out


@pytest.mark.parametrize("method", ["entrgi", "aps", "expectation"])
def test_guidance_raises_the_discrete_reward_beyond_noise(pair, method):
    dllm, reward_model, bridge = pair
    unguided, _ = rewards(dllm, reward_model)
    guidance = RewardGuidance(GuidanceConfig(method=method, steps=3, lr=0.5), reward_model, bridge)
    guided, out = rewards(dllm, reward_model, guidance)
    gain = guided - unguided  # paired by row: same prompt, same seed
    standard_error = gain.std() / len(gain) ** 0.5
    assert gain.mean() > 3 * standard_error, (gain.mean().item(), standard_error.item())
    stats = out.stats.guidance
    assert stats.steps == 8 and stats.rm_forward_backward == 24
    assert stats.as_metrics()["reward_gain"] > 0  # the relaxed proposals improved within each step too


def test_unguided_sampling_is_reproducible_and_guidance_changes_it(pair):
    dllm, reward_model, bridge = pair
    first, a = rewards(dllm, reward_model)
    second, b = rewards(dllm, reward_model)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(first, second)
    guided, c = rewards(dllm, reward_model, RewardGuidance(GuidanceConfig(steps=1), reward_model, bridge))
    assert not torch.equal(a.completion_ids, c.completion_ids)
