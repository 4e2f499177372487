"""The FLOP cost model (rgrl.models.flops) against torch's own count of every matrix product that ran.

`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of each matmul/bmm/attention kernel as it executes,
forward and backward; with eager attention every product of these models goes through it. The cost model's
counts from shapes and widths must equal it exactly: per pass, and for whole (guided) generations.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rgrl.guidance import GuidanceConfig, RewardGuidance
from rgrl.models.flops import TransformerShape, soft_embedding_flops
from rgrl.models.loading import DLLMConfig
from rgrl.rewards import RewardModelConfig
from rgrl.sampling import DiffusionSampler, SamplerConfig
from rgrl.steer import scoring_flops

PAIRS = [("toy:dream", "toy:rm"), ("toy:llada", "toy:rm_llada")]  # shifted/matched and unshifted/mismatched
PROMPTS = ["write about the sea using the word cat", "write about a garden"]


@pytest.fixture(scope="module", params=PAIRS, ids=lambda pair: pair[0])
def models(request):
    dllm_path, rm_path = request.param
    dllm = DLLMConfig(path=dllm_path, dtype="float32", attn_implementation="eager").load("cpu")
    rm_config = RewardModelConfig(path=rm_path, dtype="float32", attn_implementation="eager")
    reward_model = rm_config.load("cpu")
    bridge = rm_config.bridge(dllm.tokenizer, dllm.model.config.vocab_size, reward_model)
    return dllm, reward_model, bridge


def counted(function):
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def test_shape_reads_the_configs_and_counts_the_weights(models):
    dllm, reward_model, _ = models
    for model, shape in ((dllm.model, TransformerShape.from_config(dllm.model.config)),
                         (reward_model.model, TransformerShape.from_config(reward_model.model.config, head_rows=1))):
        matrices = sum(m.weight.numel() for m in model.modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))
        assert shape.num_parameters == matrices
        assert shape.weight_bytes(2) == 2 * matrices


def test_hand_count_of_a_small_shape():
    shape = TransformerShape(hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                             intermediate_size=8, vocab_size=10, head_rows=10)
    # per token per layer: q 4·4, k 4·2, v 4·2, o 4·4, gate/up/down 3·4·8 = 144 multiply-adds
    assert shape.linear_flops(rows=3, width=5) == 3 * 5 * 2 * 2 * 144
    # per row per layer: Q·Kᵀ and weights·V, 5·5 pairs × 2 heads × 2 dims each
    assert shape.attention_flops(rows=3, width=5) == 3 * 2 * 2 * (5 * 5 * 2 * 2) * 2
    assert shape.head_flops(positions=7) == 2 * 4 * 10 * 7
    assert shape.forward_flops(3, 5, head_positions=2) == (shape.linear_flops(3, 5) + shape.attention_flops(3, 5)
                                                           + shape.head_flops(6))
    assert shape.input_backward_flops(3, 5) == (shape.linear_flops(3, 5) + 2 * shape.attention_flops(3, 5)
                                                + shape.head_flops(15))
    assert shape.num_parameters == 2 * 144 + 10 * 4 + 10 * 4
    assert soft_embedding_flops(6, 10, 4, backward=False) == 2 * 6 * 10 * 4
    assert soft_embedding_flops(6, 10, 4, backward=True) == 4 * 6 * 10 * 4


def test_one_forward_and_an_input_backward_match_torchs_count(models):
    dllm, reward_model, _ = models
    shape = TransformerShape.from_config(dllm.model.config)
    ids = torch.randint(0, 50, (3, 21))
    mask = torch.ones_like(ids, dtype=torch.bool)
    total = counted(lambda: dllm.family.completion_logits(dllm.model, ids, mask, 9))
    assert total == shape.forward_flops(3, 21, head_positions=9)  # the LM head runs on the 9 slots' rows only

    rm_shape = TransformerShape.from_config(reward_model.model.config, head_rows=1)
    embeds = reward_model.input_embeddings(torch.randint(0, 50, (2, 13))).detach().requires_grad_(True)

    def forward_backward():
        reward_model.model(inputs_embeds=embeds).logits[:, 0].sum().backward()

    assert counted(forward_backward) == rm_shape.forward_flops(2, 13) + rm_shape.input_backward_flops(2, 13)


@pytest.mark.parametrize("method", [None, "entrgi", "aps"])
def test_generation_flops_equal_torchs_count_of_the_whole_generation(models, method):
    dllm, reward_model, bridge = models
    guidance = None
    if method is not None:
        config = GuidanceConfig(method=method, steps=2, measure_gain=True)
        guidance = RewardGuidance(config, reward_model, bridge, dllm.family.stop_token_ids)
    sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family,
                               SamplerConfig(steps=4, max_completion_length=8), guidance)
    outputs = []
    total = counted(lambda: outputs.append(sampler.generate(PROMPTS, num_samples=2, seed=0)))
    flops = sampler.generation_flops(outputs[0].stats)
    assert flops["dllm"] + flops["guidance"] == total
    assert (flops["guidance"] > 0) == (method is not None)


def test_scoring_flops_equal_torchs_count(models):
    _, reward_model, _ = models
    completions = ["the cat likes the map", "the fox sees the hill and the cat likes the lamp"]
    total = counted(lambda: [reward_model.score([p], [c]) for p, c in zip(PROMPTS, completions)])  # unpadded
    assert total == scoring_flops(reward_model, PROMPTS, completions)
