"""`python -m rgrl.bench cache`: what the sampler's cache mode (beyond the paper) costs in quality, in the toy world.

A fixed grid of settings — exact sampling; the prompt's keys/values reused for 4 steps (`prompt_cache_refresh: 4`);
threshold reveals (`reveal_threshold: 0.9`); both — each runs the toy test-time recipe (recipes/steer_toy_<family>.yaml:
the same prompts, seeds and K for every setting) with unguided sampling and the three estimators. The report gives,
per setting and method, Top@1 and Avg@N of the reward model, the ground-truth pass rate of the best sample (mean ±
SEM over seeds), the counted dLLM forwards and GFLOP per prompt and the wall time, and the change against exact
sampling; the plot shows the trade-off (compute saved against Top@1 and ground truth). The toy world's prompts are
short, so the prompt cache saves little compute here: the speed side at paper shapes is `python -m rgrl.bench speed
--rollout`. `quick` shrinks everything to a smoke test (numbers meaningless), used by CI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rgrl import cli

SETTINGS = {  # name -> sampler overrides
    "exact": [],
    "prompt cache r=4": ["--sampler.prompt_cache_refresh", "4"],
    "threshold 0.9": ["--sampler.reveal_threshold", "0.9"],
    "prompt cache r=4 + threshold 0.9": ["--sampler.prompt_cache_refresh", "4", "--sampler.reveal_threshold", "0.9"],
}


@dataclass
class CacheOptions:
    """`python -m rgrl.bench cache` options."""

    family: Literal["dream", "llada"] = "dream"  # the toy world's dLLM family
    out: str = "docs/results"  # where cache.md, cache.json and cache.png go
    work: str = "outputs/bench_cache"  # where the runs' own outputs go
    quick: bool = False  # a smoke test: 1 seed, 4 prompts, meaningless numbers


def main(argv: list[str] | None = None) -> None:
    options = cli.parse_options("python -m rgrl.bench cache", __doc__, argv, CacheOptions)
    report = run(options.family, Path(options.work), options.quick)
    report["command"] = cli.command_string("python -m rgrl.bench cache", argv)
    write_report(report, Path(options.out))


def run(family: str, work: Path, quick: bool) -> dict:
    from rgrl import steer
    from rgrl.bench.toy import versions
    from rgrl.recipe import load_recipe

    scale = ["--seeds", "[1]", "--prompts.num_prompts", "4", "--batch_size", "16"] if quick else []
    results, started = {}, time.time()
    for name, overrides in SETTINGS.items():
        output = work / name.replace(" ", "_").replace("=", "").replace("+", "and")
        recipe = load_recipe(f"recipes/steer_toy_{family}.yaml", steer.SteerRecipe,
                             [*scale, "--equal_compute_bon", "false", "--output_dir", str(output), *overrides])
        results[name] = steer.run(recipe)
    return {"family": family, "settings": SETTINGS, "results": results, "minutes": (time.time() - started) / 60,
            "versions": versions()}


def _value(cell):
    return cell[0] if isinstance(cell, (list, tuple)) else cell


def _difference(cell, base) -> tuple[float, float] | None:
    """cell − base, each a (mean, SEM) over seeds, with the SEM of a difference of independent means."""
    if cell is None or base is None:
        return None
    return cell[0] - base[0], (cell[1] ** 2 + base[1] ** 2) ** 0.5


def _fmt(cell) -> str:
    if cell is None:
        return "–"
    if isinstance(cell, (list, tuple)):
        return f"{cell[0]:.3f} ± {cell[1]:.3f}"
    return f"{cell:.3g}" if isinstance(cell, float) else str(cell)


def _fmt_versions(versions: dict | None) -> str:
    if not versions:
        return "code version not recorded"
    return ", ".join(f"{name} {value}" for name, value in versions.items())


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    exact = {row["method"]: row for row in report["results"]["exact"]}
    columns = [("Top@1", "top1"), ("Avg@N", "avg"), ("ground truth @best", "ground_truth@best"),
               ("dLLM forwards / sample", "dllm_forwards_per_sample"), ("GFLOP / prompt", "gflops_per_prompt"),
               ("s / prompt", "seconds_per_prompt")]
    lines = ["# Cache mode in the toy world", "",
             f"`{report['command']}` — {report['family']} family, recipes/steer_toy_{report['family']}.yaml, "
             f"{report['minutes']:.1f} min, {_fmt_versions(report.get('versions'))}. Mean ± SEM over seeds; Δ is against "
             "exact sampling (same prompts and seeds), "
             "± the SEM of a difference of independent means.",
             "", "| setting | method | " + " | ".join(label for label, _ in columns)
             + " | Δ Top@1 | Δ ground truth | GFLOP vs exact |", "|" + "---|" * (len(columns) + 5)]
    for name, rows in report["results"].items():
        for row in rows:
            base = exact[row["method"]]
            delta_top1 = delta_gt = None
            if name != "exact":
                delta_top1 = _difference(row["top1"], base["top1"])
                delta_gt = _difference(row.get("ground_truth@best"), base.get("ground_truth@best"))
            ratio = row["gflops_per_prompt"] / base["gflops_per_prompt"]
            lines.append(f"| {name} | {row['method']} | " + " | ".join(_fmt(row.get(key)) for _, key in columns)
                         + f" | {_fmt(delta_top1)} | {_fmt(delta_gt)} | {_fmt(ratio)} |")
    (out / "cache.md").write_text("\n".join(lines) + "\n")
    (out / "cache.json").write_text(json.dumps(report, indent=1, default=list))
    plot(report, out / "cache.png")
    print(f"report: {out / 'cache.md'}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = {row["method"]: row for row in report["results"]["exact"]}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "top1", "Top@1 (RM)"), (axes[1], "ground_truth@best", "ground truth @best")):
        for method, base in exact.items():
            xs, ys, errors = [], [], []
            for name, rows in report["results"].items():
                row = next(r for r in rows if r["method"] == method)
                if row.get(key) is None:
                    continue
                xs.append(base["gflops_per_prompt"] / row["gflops_per_prompt"])
                ys.append(_value(row[key]))
                errors.append(row[key][1] if isinstance(row[key], (list, tuple)) else 0.0)
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
        ax.set_xlabel("compute saved: exact GFLOP / setting GFLOP")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Cache mode in the toy world: quality against compute saved (one point per setting)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
