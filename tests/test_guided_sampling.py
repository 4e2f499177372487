"""End to end on the tiny checkpoints: reward guidance raises the reward model's discrete score over unguided
sampling at matching seeds, for every estimator, both families, and a reward model with its own tokenizer."""

import pytest
import torch

from rgrl.guidance import GuidanceConfig, RewardGuidance, entropy_weight, mixed_embeddings
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
                               SamplerConfig(steps=8, max_completion_length=8, temperature=0.7), guidance)
    out = sampler.generate(PROMPTS, num_samples=SAMPLES, seed=0)
    return reward_model.score([p for p in PROMPTS for _ in range(SAMPLES)], out.texts), out


@pytest.mark.parametrize("method", ["entrgi", "aps", "expectation"])
def test_guidance_raises_the_discrete_reward_beyond_noise(pair, method):
    dllm, reward_model, bridge = pair
    unguided, _ = rewards(dllm, reward_model)
    guidance = RewardGuidance(GuidanceConfig(method=method, steps=3, lr=0.5, measure_gain=True), reward_model, bridge,
                              dllm.family.stop_token_ids)
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
    guided, c = rewards(dllm, reward_model, RewardGuidance(GuidanceConfig(steps=1), reward_model, bridge,
                                                                     dllm.family.stop_token_ids))
    assert not torch.equal(a.completion_ids, c.completion_ids)


COMPLETION = "Our team writes about the garden today!"  # every dLLM token of it maps 1-to-1 onto the RM's tokens


@pytest.mark.parametrize("which_stop", ["eos", "end_of_turn"])
def test_one_hot_phi_with_the_stop_slot_in_the_window_scores_as_the_discrete_path(pair, which_stop):
    """The first stop slot stands where the RM template writes its end of turn (mapped to it for a mismatched RM,
    e.g. LLaDA's <|eot_id|> -> the tiny mismatched RM's <|end|>): a one-hot φ gives exactly the discrete score."""
    dllm, reward_model, bridge = pair
    family = dllm.family
    stop = family.eos_token_id if which_stop == "eos" else family.end_of_turn_token_id
    guidance = RewardGuidance(GuidanceConfig(method="entrgi"), reward_model, bridge, family.stop_token_ids)
    end_of_turn = reward_model.template.end_of_turn_id
    assert reward_model.template.split_ids(PROMPTS[0])[1][0] == end_of_turn
    assert torch.equal(guidance.embedding_matrix[stop], reward_model.input_embeddings.weight[end_of_turn])

    ids = dllm.tokenizer(COMPLETION, add_special_tokens=False).input_ids
    assert bridge.index[ids].tolist() == reward_model.tokenizer(COMPLETION, add_special_tokens=False).input_ids
    length = len(ids) + 4
    tokens = torch.tensor([ids + [stop] + ids[:3], ids + ids[:4]])  # row 1: no stop, cut at L by the template
    phi = torch.full((2 * length, guidance.embedding_matrix.shape[0]), -torch.inf)
    phi[torch.arange(2 * length), tokens.flatten()] = 0.0  # one-hot φ at every slot (all masked)
    masked = torch.ones_like(tokens, dtype=torch.bool)
    weight = entropy_weight("entrgi", phi)
    embeds = mixed_embeddings(phi, guidance.embedding_matrix, weight, 0.7, 0.95, None)
    keep, stop_slot = guidance.first_stop(tokens)
    assert stop_slot.tolist() == [len(ids), length]
    rewards = guidance.bind([PROMPTS[0], PROMPTS[1]], length, 0.7, 0.95, None).rewards(phi, embeds, tokens, masked)
    texts = [COMPLETION, dllm.tokenizer.decode(tokens[1].tolist(), skip_special_tokens=True)]
    torch.testing.assert_close(rewards, reward_model.score(PROMPTS[:2], texts), atol=1e-5, rtol=0)


def test_the_stop_slot_gets_reward_gradient_and_the_slots_after_it_none(pair):
    dllm, reward_model, bridge = pair
    family = dllm.family
    guidance = RewardGuidance(GuidanceConfig(method="entrgi", steps=1), reward_model, bridge, family.stop_token_ids)
    torch.manual_seed(0)
    length, stop_at = 8, 4
    logits = torch.randn(length, guidance.embedding_matrix.shape[0])
    logits[..., list(family.stop_token_ids)] = -torch.inf
    logits[stop_at, family.end_of_turn_token_id] = 5.0  # slot 4's most likely token ends the turn
    tokens = torch.full((1, length), family.mask_token_id)
    masked = torch.ones_like(tokens, dtype=torch.bool)
    guide = guidance.bind(PROMPTS[:1], length, 0.7, 0.95, None, torch.Generator().manual_seed(0))
    guided = guide(logits.clone(), tokens, masked)
    change = (guided - logits).nan_to_num().abs().amax(dim=-1)  # the first Adam step moves each entry by ≤ η
    assert (change[: stop_at + 1] > 0.4).all(), change  # the stop slot too: guidance can move the end
    assert (change[stop_at + 1 :] == 0).all(), change
