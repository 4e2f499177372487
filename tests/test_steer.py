"""`python -m rgrl.steer`: recipes validate before loading, a tiny run writes the per-method JSONL and the table."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from rgrl import steer
from rgrl.recipe import RecipeError, load_recipe

RECIPES = sorted(Path("recipes").glob("steer_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_steer_recipe_passes_dry_run(recipe, capsys):
    steer.main([str(recipe), "--dry_run"])
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["methods"] and resolved["num_samples"] >= 1


def test_paper_protocol_values():
    recipe = load_recipe("recipes/steer_reward_bench_2_dream.yaml", steer.SteerRecipe)
    assert (recipe.num_samples, recipe.seeds, recipe.prompts.num_prompts) == (4, [1, 2, 3], 64)
    assert (recipe.sampler.steps, recipe.sampler.max_completion_length, recipe.sampler.temperature) == (128, 128, 0.7)
    assert (recipe.sampler.top_p, recipe.sampler.top_k, recipe.sampler.alg) == (0.95, None, "entropy")
    assert recipe.sampler.deprioritize_eos and (recipe.guidance.steps, recipe.guidance.lr) == (3, 0.5)


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


BASE = """
model: {path: tiny:dream, dtype: float32}
reward_model: {path: tiny:rm, dtype: float32}
prompts: {source: local, path: recipes/data/tiny_prompts.jsonl, field: prompt, num_prompts: 2}
"""


@pytest.mark.parametrize("extra,message", [
    ("methodz: [none]", "unknown key 'methodz'. Did you mean 'methods'?"),
    ("guidance: {stpes: 2}", "unknown key 'guidance.stpes'. Did you mean 'guidance.steps'?"),
    ("methods: [none, magic]", "methods must be a non-empty list"),
    ("num_samples: 3\nbatch_size: 8", "multiple of num_samples"),
    ("sampler: {steps: many}", "'sampler.steps' must be an integer"),
    ("sampler: {alg: best}", "'sampler.alg' must be one of"),
])
def test_bad_recipes_fail_before_loading_with_a_clear_message(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_recipe(write(tmp_path, BASE + extra), steer.SteerRecipe)


def test_missing_paths_are_reported_before_any_weights_load(tmp_path, capsys):
    bad_model = BASE.replace("tiny:dream", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="nowhere"):
        steer.main([write(tmp_path, bad_model)])
    bad_metric = BASE + "metrics: ['rgrl.toy_missing:check']"
    with pytest.raises(SystemExit, match="rgrl.toy_missing"):
        steer.main([write(tmp_path, bad_metric)])


def test_mean_sem_is_the_standard_error_of_the_mean():
    mean, sem = steer.mean_sem([1.0, 2.0, 4.0])
    assert math.isclose(mean, 7 / 3)
    assert math.isclose(sem, torch.tensor([1.0, 2.0, 4.0]).std().item() / math.sqrt(3), rel_tol=1e-6)
    assert steer.mean_sem([5.0]) == (5.0, 0.0)


def test_summary_top1_and_avg_against_a_direct_computation():
    rewards = [torch.tensor([[0.0, 1.0], [3.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 4.0]])]
    runs = {"none": [steer.MethodRun(texts=[], rewards=r, metrics={"gt": (r > 1.5).float()}, dllm_forwards=8,
                                     rm_forward_backward=0, flops=1e9, seconds=1.0, entropy_weight=None)
                     for r in rewards]}
    (row,) = steer.summarize(runs, num_samples=2)
    assert row["top1"][0] == pytest.approx((2.0 + 2.5) / 2)  # seed means of the per-prompt maxima
    assert row["avg"][0] == pytest.approx((1.5 + 1.5) / 2)
    assert row["gt@best"][0] == pytest.approx((0.5 + 0.5) / 2)  # best sample of each prompt passes or not


def test_tiny_run_writes_jsonl_and_tables(tmp_path):
    recipe_path = write(tmp_path, BASE + f"""
sampler: {{steps: 4, max_completion_length: 4}}
guidance: {{steps: 1}}
methods: [none, entrgi]
num_samples: 2
seeds: [1, 2]
batch_size: 4
metrics: ['tests.test_steer:completion_length']
output_dir: {tmp_path / 'out'}
device: cpu
""")
    steer.main([recipe_path])
    out = tmp_path / "out"
    for name in ("none_seed1", "entrgi_seed2", "bon_equal_compute_seed1"):
        lines = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == 2
        assert lines[0]["best_reward"] == max(lines[0]["rewards"])
        assert lines[0]["completion_length"] == [len(c) for c in lines[0]["completions"]]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"].split(" (")[0] for r in rows] == ["unguided", "entrgi", "BoN equal compute"]
    assert float(rows[1]["rm_fwd_bwd_per_sample"]) == 4.0  # M = 1 per step, T = 4
    assert "| entrgi |" in (out / "summary.md").read_text()
    assert "completion_length@best" in rows[0]


@pytest.mark.parametrize("equal_compute_by", ["flops", "wall_time"])
def test_best_of_n_at_equal_compute_takes_n_from_counted_flops(tmp_path, equal_compute_by):
    """N = K × (costliest guided method's cost per prompt) / (unguided cost per prompt), cost by FLOPs by default."""
    recipe_path = write(tmp_path, BASE + f"""
sampler: {{steps: 4, max_completion_length: 4}}
guidance: {{steps: 2}}
methods: [none, aps, entrgi]
num_samples: 2
seeds: [1]
batch_size: 4
equal_compute_by: {equal_compute_by}
output_dir: {tmp_path / 'out'}
device: cpu
""")
    steer.main([recipe_path])
    rows = {r["method"].split(" (")[0]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    column = "gflops_per_prompt" if equal_compute_by == "flops" else "seconds_per_prompt"
    guided = max(float(rows[m][column]) for m in ("aps", "entrgi"))
    expected_n = max(2, round(2 * guided / float(rows["unguided"][column])))
    assert int(rows["BoN equal compute"]["N"]) == expected_n
    if equal_compute_by == "flops":  # equal by construction, up to rounding N and the batches' padding
        assert float(rows["BoN equal compute"]["flops_vs_guided"]) == pytest.approx(1.0, abs=1.0 / expected_n + 0.05)
    assert float(rows["BoN equal compute"]["seconds_vs_guided"]) > 0
    assert rows["entrgi"]["flops_vs_guided"] == ""  # only the Best-of-N row is compared


def completion_length(prompts, completions, **kwargs):
    """A TRL-style per-sample metric for the test above."""
    return [float(len(c)) for c in completions]
