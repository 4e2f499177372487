"""`python -m rgrl.bench speed` and `cache`: their instruments, and runs at the smallest scale."""

import json

import pytest
import torch

from rgrl.bench import main
from rgrl.bench.speed import memory_traffic, paper_rollout_flops


def test_memory_traffic_counts_each_operand_once_and_views_not_at_all():
    a, b = torch.ones(1000), torch.ones(1000)
    assert memory_traffic(lambda: a + b) == 3 * 4000  # two reads, one write
    assert memory_traffic(lambda: a[:500].add_(1)) == 2 * 2000  # in place: read and write the view's 500 floats
    assert memory_traffic(lambda: a.view(10, 100).t()) == 0


def test_paper_rollout_model_adds_up_and_counts_the_head_on_masked_slots_only():
    rollout = paper_rollout_flops()
    assert rollout["total"] == sum(rollout["components"].values())
    # linear schedule: slot t of 128 is masked for 128 - t steps, so the masked head is about half of every row's
    assert 0.49 < rollout["components"]["dllm_head_masked_slots"] / rollout["dllm_head_all_completion_rows"] < 0.51
    assert 0 < rollout["dllm_prompt_share"] < 1 and 0 < rollout["rm_prefix_share"] < 1


def test_speed_bench_at_the_tiny_shape_matches_the_naive_guidance(tmp_path):
    main(["speed", "--shapes", "tiny", "--repeats", "1", "--oracle", "--rollout", "4", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speed.json").read_text())
    (tiny,) = report["shapes"]
    parts = {row["part"] for row in tiny["parts"]}
    assert {"dllm_layers", "dllm_head", "guidance_proposals", "rm_forward_backward", "guidance_update",
            "sample_reveal", "guidance", "guided_step", "unguided_step", "naive_guidance"} <= parts
    naive = tiny["agreement"]["naive"]
    assert naive["same_argmax"] and naive["max_abs_phi_difference"] < 1e-3  # of steps of size η = 0.5
    assert "| guided_step |" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.csv").read_text().count("\ntiny,") == len(parts)
    exact, cached = tiny["rollout"]
    assert exact["variant"] == "exact" and cached["variant"] == "prompt cache r=4"
    assert cached["flop_ratio"] > 1  # reused prompt keys/values: fewer counted FLOPs for the same steps


@pytest.mark.slow
def test_cache_bench_quick_writes_the_report_and_plot(tmp_path):
    main(["cache", "--quick", "--out", str(tmp_path), "--work", str(tmp_path / "runs")])
    report = json.loads((tmp_path / "cache.json").read_text())
    assert list(report["results"]) == ["exact", "prompt cache r=4", "threshold 0.9", "prompt cache r=4 + threshold 0.9"]
    text = (tmp_path / "cache.md").read_text()
    assert "| prompt cache r=4 | entrgi |" in text and (tmp_path / "cache.png").stat().st_size > 0


def test_compiled_traffic_counts_each_generated_kernel_buffer_once():
    """Adam's first step fused: one kernel reading φ and g and writing φ, against eight passes eagerly."""
    from types import SimpleNamespace

    from rgrl.bench.speed import Part, compiled_memory_traffic
    from rgrl.guidance.estimators import VocabularyKernels, adam_first_step

    param, gradient = torch.randn(4, 1000), torch.randn(4, 1000)
    guidance = SimpleNamespace(kernels=VocabularyKernels.compiled())
    part = Part(lambda: (param.clone(),), lambda phi: guidance.kernels.first_adam_step(phi, gradient, 0.5, 1e-8))
    fused = compiled_memory_traffic(part, guidance)
    assert 3 * param.numel() * 4 <= fused <= 3 * param.numel() * 4 + 64  # + its scalar arguments
    assert memory_traffic(lambda: adam_first_step(param.clone(), gradient, 0.5, 1e-8)) == (2 + 8) * param.numel() * 4
