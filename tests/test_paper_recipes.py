"""The paper recipes are what docs/design.md says they are: every shipped paper recipe resolves to its row of the
rollout-settings table, and the defaults the paper's runs depend on hold (no gain measurement in training, the
LLaDA bridge as its comment says)."""

import re
from pathlib import Path

import pytest

from rgrl.bench import toy as bench
from rgrl.recipe import load_recipe
from rgrl.steer import SteerRecipe
from rgrl.train import load_training_recipe
from rgrl.trainers import RGRLConfig

DESIGN = Path("docs/design.md")
TABLE_START, TABLE_END = "<!-- rollout-settings-table", "<!-- end rollout-settings-table -->"
COLUMNS = ("schedule", "alg", "τ", "top-p", "top-k", "T", "L", "blocks", "held back", "confidence from", "M", "η")


def paper_recipes() -> list[str]:
    """Every shipped recipe of a paper run: all but the CPU ones (tiny_*, toy_*, steer_tiny_*, steer_toy_*)."""
    names = sorted(p.name for p in Path("recipes").glob("*.yaml"))
    return [n for n in names if not re.match(r"(steer_)?(tiny|toy)_", n)]


def documented_rows() -> dict[str, tuple[str, ...]]:
    """recipe file name -> the table's values (as written) for the columns in COLUMNS."""
    text = DESIGN.read_text()
    block = text[text.index(TABLE_START) : text.index(TABLE_END)]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[0] == "recipes" and tuple(header[1 : 1 + len(COLUMNS)]) == COLUMNS, header
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            assert name not in rows, f"{name} is listed twice"
            rows[name] = tuple(cells[1 : 1 + len(COLUMNS)])
    return rows


def _value(value) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def resolved_row(name: str) -> tuple[str, ...]:
    """The recipe's rollout settings, resolved by the same loaders the commands use, in the table's notation."""
    path = f"recipes/{name}"
    if name.startswith("steer_"):
        recipe = load_recipe(path, SteerRecipe)
        guidance = recipe.guidance  # steer runs every method in `methods`; M and η are the guided ones'
        guided = any(method != "none" for method in recipe.methods)
        sampler = recipe.sampler
    else:
        args = load_training_recipe(path, dry_run=True).recipe.training
        guided = isinstance(args, RGRLConfig) and args.guided
        guidance = args.guidance_config() if guided else None
        sampler = args.sampler_config()
    held_back = "nothing"
    if sampler.deprioritize_eos:
        held_back = {"eos": "EOS", "eos_and_end_of_turn": "EOS + end of turn"}[sampler.deprioritized_tokens]
    return (
        sampler.schedule, sampler.alg, _value(sampler.temperature), _value(sampler.top_p),
        _value(sampler.top_k), _value(sampler.steps), _value(sampler.max_completion_length),
        _value(sampler.block_length), held_back, sampler.confidence_from if guided else "–",
        _value(guidance.steps) if guided else "–", _value(guidance.lr) if guided else "–",
    )


def test_every_paper_recipe_is_in_the_table_once():
    assert sorted(documented_rows()) == paper_recipes()
    assert len(paper_recipes()) == 14


@pytest.mark.parametrize("name", paper_recipes())
def test_shipped_recipe_resolves_to_its_documented_row(name):
    assert resolved_row(name) == documented_rows()[name]


def test_rgrl_llada_rollouts_rank_by_entropy_and_the_llada_baseline_keeps_d1s_sampler():
    """The paper's RGRL-LLaDA sampler ranks slots by entropy, as for Dream; d1's LLaDA sampler (the diffu-GRPO
    baseline) uses low_confidence in blocks, with no top-p/top-k."""
    for dataset in ("wildchat", "lmsys"):
        rgrl = load_training_recipe(f"recipes/{dataset}_llada.yaml", dry_run=True).recipe.training.sampler_config()
        dream = load_training_recipe(f"recipes/{dataset}_dream.yaml", dry_run=True).recipe.training.sampler_config()
        assert rgrl == dream
        baseline = load_training_recipe(f"recipes/{dataset}_llada_diffu_grpo.yaml",
                                        dry_run=True).recipe.training.sampler_config()
        assert (baseline.alg, baseline.block_length, baseline.top_p, baseline.top_k) == ("low_confidence", 64,
                                                                                        None, None)


def test_training_recipes_do_not_pay_for_the_gain_metric_but_the_bench_does():
    """measure_gain costs one reward-model forward per denoising step: off unless asked for."""
    for path in sorted(Path("recipes").glob("*.yaml")):
        if path.name.startswith("steer_") or "diffu_grpo" in path.name:
            continue
        args = load_training_recipe(path, dry_run=True).recipe.training
        assert args.guidance_measure_gain is False, path
    rgrl_variants = [overrides for label, _, overrides in bench.TRAINING_VARIANTS if label.startswith("RGRL")]
    assert rgrl_variants and all(" ".join(bench.MEASURE_GAIN) in " ".join(o) for o in rgrl_variants)


@pytest.mark.parametrize("name", ["wildchat_dream.yaml", "lmsys_dream.yaml", "wildchat_llada.yaml", "lmsys_llada.yaml"])
def test_rgrl_paper_recipes_clip_as_the_reference(name):
    """The reference clips its loss Σ/K (rows per device / K times rgrl's mean) at 1.0; with Adam (scale-invariant)
    that is rgrl's mean loss clipped at K / rows per device."""
    args = load_training_recipe(f"recipes/{name}", dry_run=True).recipe.training
    assert args.loss_normalizer == "num_completions"
    rows_per_micro_batch = args.per_device_train_batch_size
    assert args.max_grad_norm * rows_per_micro_batch / args.num_generations == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["wildchat_llada.yaml", "lmsys_llada.yaml"])
def test_llada_bridge_settings_are_what_the_recipe_comment_says(name):
    """The comment promises: pieces -> their mean (bridge_split), no RM spelling at all -> a zero vector."""
    text = Path("recipes", name).read_text()
    assert "the mean of the pieces' embeddings" in text and "a zero embedding" in text
    args = load_training_recipe(f"recipes/{name}", dry_run=True).recipe.training
    assert (args.bridge_split, args.bridge_fallback) == (True, "zero")
