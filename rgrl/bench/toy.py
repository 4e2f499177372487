"""`python -m rgrl.bench toy [--quick] [--out DIR]`: the paper's claims in the toy world (report in docs/results/).

`toy` checks the paper's claims in the toy world (rgrl/toy), where a ground-truth checker says whether a completion
follows its instruction and the reward model only approximates it. Run from the repository root (it reads the toy
recipes in recipes/):

  1. test time, per family: unguided sampling (its Top@1 is Best-of-N, N = K), Best-of-N at equal compute,
     expectation, APS and EntRGi (recipes/steer_toy_<family>.yaml) — Top@1 and Avg@N of the reward model and the
     ground-truth pass rate of the best sample, mean ± SEM over seeds, and the FLOPs and seconds each spent;
  2. an ablation of EntRGi over M ∈ {1, 3} and η ∈ {0.25, 0.5, 1};
  3. training, per family: RGRL-EntRGi, RGRL-APS and diffu-GRPO with the same prompts and steps
     (recipes/toy_<family>.yaml and recipes/toy_<family>_diffu_grpo.yaml, RGRL with `training.guidance_measure_gain` on for
     the guidance-gain column) — curves of the training reward and of the unguided held-out reward and ground-truth
     pass rate.

It writes `toy.md` (tables, the exact command, versions, wall time), `toy.json` and PNG plots into `--out`; the runs'
own outputs (samples, checkpoints) go to `--work`. `--quick` shrinks everything to a smoke test (numbers
meaningless), used by CI. `--jobs N` runs the six (family, section) parts as N processes at once; `--merge DIR…`
writes one report from the reports of parts run separately (`--families`/`--skip`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Literal, get_args

from rgrl import cli

Family = Literal["dream", "llada"]
FAMILIES = get_args(Family)
Section = Literal["test_time", "ablation", "training"]
SECTIONS = get_args(Section)
ABLATION_STEPS = (1, 3)
ABLATION_LRS = (0.25, 0.5, 1.0)
MEASURE_GAIN = ["--training.guidance_measure_gain", "true"]  # the report's guidance-gain column; off in the recipes (cost)
TRAINING_VARIANTS = (  # (label, recipe pattern, overrides)
    ("RGRL-EntRGi", "recipes/toy_{family}.yaml", MEASURE_GAIN),
    ("RGRL-APS", "recipes/toy_{family}.yaml", ["--training.guidance_method", "aps", *MEASURE_GAIN]),
    ("diffu-GRPO", "recipes/toy_{family}_diffu_grpo.yaml", []),
)


@dataclass
class Scale:
    """How much of the benchmark runs: the full one, or a smoke test."""

    seeds: list[int]
    num_prompts: int
    max_steps: int  # twice the toy recipes' 40: long enough for reward hacking to show
    eval_steps: int

    @classmethod
    def full(cls) -> Scale:
        return cls(seeds=[1, 2, 3], num_prompts=64, max_steps=80, eval_steps=10)

    @classmethod
    def quick(cls) -> Scale:
        return cls(seeds=[1], num_prompts=4, max_steps=2, eval_steps=1)


@dataclass
class ToyOptions:
    """`python -m rgrl.bench toy` options."""

    out: str = "docs/results"  # where the report and plots go
    work: str = "outputs/bench_toy"  # where the runs' own outputs go
    quick: bool = False  # a smoke test: tiny sizes, meaningless numbers
    families: list[Family] = field(default_factory=lambda: list(FAMILIES))  # the toy dLLMs benchmarked
    skip: list[Section] = field(default_factory=list)  # sections not run
    jobs: int = 1  # run the (family, section) parts in this many processes at once (same results)
    merge: list[str] | None = None  # run nothing: merge the reports (toy.json) in these folders, parts run apart

    def __post_init__(self):
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}.")


def main(argv: list[str] | None = None) -> None:
    options = cli.parse_options("python -m rgrl.bench toy", __doc__, argv, ToyOptions)
    command = cli.command_string("python -m rgrl.bench toy", argv)
    if options.merge:
        merge_reports(Path(options.out), [Path(part) for part in options.merge], command)
        return
    toy(Path(options.out), Path(options.work), Scale.quick() if options.quick else Scale.full(), options.families,
        set(options.skip), command, jobs=options.jobs, quick=options.quick)


def toy(out: Path, work: Path, scale: Scale, families: list[str], skip: set[str], command: str,
        jobs: int = 1, quick: bool = False) -> Path:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"command": command, "versions": versions(), "families": families, "seeds": scale.seeds,
              "num_prompts": scale.num_prompts, "test_time": {}, "ablation": {}, "training": {}, "seconds": {}}
    if jobs > 1:
        run_parts_in_parallel(report, work, families, [s for s in SECTIONS if s not in skip], jobs, quick)
        families = []  # done
    for family in families:
        if "test_time" not in skip:
            t0 = time.perf_counter()
            report["test_time"][family] = steer_rows(family, scale, work / f"steer_{family}")
            report["seconds"][f"test_time_{family}"] = time.perf_counter() - t0
        if "ablation" not in skip:
            t0 = time.perf_counter()
            report["ablation"][family] = ablation(family, scale, work / f"ablation_{family}")
            report["seconds"][f"ablation_{family}"] = time.perf_counter() - t0
        if "training" not in skip:
            t0 = time.perf_counter()
            report["training"][family] = {
                label: train_history(recipe.format(family=family), overrides, scale,
                                     work / f"train_{family}_{label.lower()}")
                for label, recipe, overrides in TRAINING_VARIANTS
            }
            report["seconds"][f"training_{family}"] = time.perf_counter() - t0
    report["seconds"]["total"] = time.perf_counter() - start
    return write_report(report, out)


def merge_reports(out: Path, part_dirs: list[Path], command: str) -> Path:
    """One report from the reports of separately run parts (same code, seeds and prompts), e.g. `--skip` runs."""
    parts = [json.loads((part / "toy.json").read_text()) for part in part_dirs]
    for key in ("versions", "seeds", "num_prompts"):
        if any(part[key] != parts[0][key] for part in parts):
            raise SystemExit(f"error: the parts differ in {key!r}; merge only parts of one code version and scale.")
    report = {"command": command + " (parts: " + "; ".join(part["command"] for part in parts) + ")",
              "versions": parts[0]["versions"], "families": sorted({f for part in parts for f in part["families"]}),
              "seeds": parts[0]["seeds"], "num_prompts": parts[0]["num_prompts"], "test_time": {}, "ablation": {},
              "training": {}, "seconds": {}}
    for part in parts:
        merge_part(report, part)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(report, out)


def merge_part(report: dict, part: dict) -> None:
    """Add a part's sections and timings to `report` (a family's section may come from one part only)."""
    for section in SECTIONS:
        for family, result in part[section].items():
            if family in report[section]:
                raise SystemExit(f"error: two parts both hold {section} of {family}.")
            report[section][family] = result
            report["seconds"][f"{section}_{family}"] = part["seconds"][f"{section}_{family}"]


def write_report(report: dict, out: Path) -> Path:
    """toy.json, the plots and toy.md into `out`."""
    (out / "toy.json").write_text(json.dumps(report, indent=1, default=_plain))
    plot_test_time(report, out / "toy_test_time.png")
    for family, variants in report["training"].items():
        plot_training(family, variants, out / f"toy_training_{family}.png")
    write_markdown(report, out / "toy.md")
    print((out / "toy.md").read_text())
    return out / "toy.md"


# ------------------------------------------------------------------------------------------------ runs
def run_parts_in_parallel(report: dict, work: Path, families: list[str], sections: list[str], jobs: int,
                          quick: bool) -> None:
    """Each (family, section) as its own `python -m rgrl.bench toy` process, `jobs` at a time; their reports are
    merged into `report`. Every part seeds its own runs, so the numbers are those of the serial benchmark."""
    from concurrent.futures import ThreadPoolExecutor

    def part(family: str, section: str) -> dict:
        part_dir = work / "parts" / f"{family}_{section}"
        command = [sys.executable, "-m", "rgrl.bench", "toy", "--families", family, "--out", str(part_dir),
                   "--work", str(work), "--skip", *[s for s in SECTIONS if s != section], *(["--quick"] * quick)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"bench part {family}/{section} failed:\n{result.stderr[-4000:]}")
        return json.loads((part_dir / "toy.json").read_text())

    parts = [(family, section) for family in families for section in sections]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda args: part(*args), parts):
            merge_part(report, result)


def steer_overrides(scale: Scale, output_dir: Path) -> list[str]:
    return ["--seeds", json.dumps(scale.seeds), "--prompts.num_prompts", str(scale.num_prompts),
            "--output_dir", str(output_dir)]


def steer_rows(family: str, scale: Scale, output_dir: Path, extra: list[str] | None = None) -> list[dict]:
    from rgrl import steer
    from rgrl.recipe import load_recipe

    recipe = load_recipe(f"recipes/steer_toy_{family}.yaml", steer.SteerRecipe,
                         steer_overrides(scale, output_dir) + (extra or []))
    return steer.run(recipe)


def ablation(family: str, scale: Scale, output_dir: Path) -> list[dict]:
    rows = []
    for steps in ABLATION_STEPS:
        for lr in ABLATION_LRS:
            extra = ["--methods", "[entrgi]", "--equal_compute_bon", "false", "--guidance.steps", str(steps),
                     "--guidance.lr", str(lr)]
            (row,) = steer_rows(family, scale, output_dir / f"M{steps}_lr{lr}", extra)
            rows.append({"M": steps, "lr": lr, **row})
    return rows


def train_history(recipe: str, overrides: list[str], scale: Scale, output_dir: Path) -> list[dict]:
    """Train one variant; its log history (train and eval entries)."""
    from rgrl.train import load_training_recipe, run

    overrides = overrides + ["--training.output_dir", str(output_dir), "--training.report_to", "none",
                             "--training.max_steps", str(scale.max_steps),
                             "--training.eval_steps", str(scale.eval_steps),
                             "--training.save_steps", str(scale.max_steps)]
    trainer = run(load_training_recipe(recipe, overrides))
    return trainer.state.log_history


def versions() -> dict:
    import torch
    import transformers
    import trl

    import rgrl

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"rgrl": rgrl.__version__, "commit": commit, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"}


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


# ------------------------------------------------------------------------------------------------ report
def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]:.3f} ± {value[1]:.3f}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(key)) for _, key in columns) + " |" for row in rows]
    return lines


def _evaluations(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry]


def _eval_metric(history: list[dict], name: str) -> str:
    """'first → last' of an evaluation metric, with its best value and step in between when that is neither."""
    key = f"eval_rewards/{name}/mean" if name != "reward" else "eval_reward"
    values = _evaluations(history, key)
    if not values:
        return "–"
    best_step, best = max(values, key=lambda item: item[1])
    peak = f" (best {best:.3f} at step {best_step})" if best_step not in (values[0][0], values[-1][0]) else ""
    return f"{values[0][1]:.3f} → {values[-1][1]:.3f}{peak}"


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# The toy world: reward guidance and RGRL on a CPU",
        "",
        "Generated by `" + report["command"] + "` (from the repository root). "
        f"Seeds {report['seeds']}, {report['num_prompts']} prompts per seed. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["seconds"].items()) + ".",
        "",
    ]
    test_columns = [("method", "method"), ("N", "N"), ("RM Top@1", "top1"), ("RM Avg@N", "avg"),
                    ("pass rate of best", "ground_truth@best"), ("pass rate, all samples", "ground_truth@avg"),
                    ("mean w", "entropy_weight"), ("GFLOP / prompt", "gflops_per_prompt"),
                    ("s / prompt", "seconds_per_prompt"), ("FLOPs ÷ guided", "flops_vs_guided"),
                    ("time ÷ guided", "seconds_vs_guided")]
    for family, rows in report["test_time"].items():
        lines += [f"## Test time: toy {family}", "",
                  "Top@1 = best reward-model score of a prompt's N samples, Avg@N = their mean; the pass rate is the "
                  "ground truth (the reward model never sees it); mean ± SEM over seeds. Best-of-N at equal compute "
                  "draws N samples so that its counted FLOPs (generation and scoring, `rgrl.models.flops`) match "
                  "the costliest guided method's; its FLOPs and measured seconds as multiples of that method's are "
                  "the last two columns.", ""]
        lines += _table(rows, test_columns) + [""]
    for family, rows in report["ablation"].items():
        lines += [f"## Ablation of EntRGi: toy {family}", ""]
        lines += _table(rows, [("M", "M"), ("η", "lr"), ("RM Top@1", "top1"), ("RM Avg@N", "avg"),
                               ("pass rate of best", "ground_truth@best"), ("pass rate, all", "ground_truth@avg"),
                               ("s / prompt", "seconds_per_prompt")]) + [""]
    for family, variants in report["training"].items():
        lines += [f"## Training: toy {family}", "",
                  "Same prompts and steps for every method. The training reward of RGRL is measured on its guided "
                  "rollouts, diffu-GRPO's on unguided ones; the held-out evaluation is unguided for all "
                  "(first → last evaluation). Training reward: mean over the last 10 steps. Guidance gain: RM score "
                  "of the proposals as the RM reads them (APS: hard samples; EntRGi: the entropy-weighted mix), "
                  "after minus before the Adam steps, mean over denoising and training steps.",
                  "",
                  "| method | training reward | guidance gain | held-out RM reward (unguided) | "
                  "held-out pass rate (unguided) |",
                  "|---|---|---|---|---|"]
        for label, history in variants.items():
            train = [e["reward"] for e in history if "reward" in e and "eval_reward" not in e]
            final = f"{fmean(train[-10:]):.3f}" if train else "–"
            gains = [e["guidance/reward_gain"] for e in history if "guidance/reward_gain" in e]
            gain = f"{fmean(gains):.3f}" if gains else "–"
            lines.append(f"| {label} | {final} | {gain} | {_eval_metric(history, 'reward')} | "
                         f"{_eval_metric(history, 'ground_truth')} |")
        lines += ["", f"![training curves](toy_training_{family}.png)", ""]
    if report["test_time"]:
        lines += ["![test-time results](toy_test_time.png)", ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def plot_test_time(report: dict, path: Path) -> None:
    if not report["test_time"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(report["test_time"])
    panels = [("top1", "RM Top@1"), ("ground_truth@best", "ground-truth pass rate of the best sample")]
    fig, axes = plt.subplots(len(families), 2, figsize=(12, 3.6 * len(families)), squeeze=False)
    for row_axes, family in zip(axes, families):
        rows = report["test_time"][family]
        names = [r["method"].replace(" (", "\n(") for r in rows]
        for ax, (key, title) in zip(row_axes, panels):
            means = [r[key][0] if r.get(key) else 0.0 for r in rows]
            sems = [r[key][1] if r.get(key) else 0.0 for r in rows]
            ax.bar(range(len(rows)), means, yerr=sems, capsize=4, color="tab:blue")
            ax.set_xticks(range(len(rows)), names, fontsize=7)
            ax.set_title(f"toy {family}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(family: str, variants: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "training reward (RGRL: guided rollouts)", False),
              ("eval_reward", "held-out RM reward (unguided)", True),
              ("eval_rewards/ground_truth/mean", "held-out ground-truth pass rate (unguided)", True)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (key, title, is_eval) in zip(axes, panels):
        for label, history in variants.items():
            points = [(e["step"], e[key]) for e in history if key in e and (is_eval or "eval_reward" not in e)]
            if points:
                ax.plot(*zip(*points), marker="o" if is_eval else None, markersize=3, label=label)
        ax.set_title(f"toy {family}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
