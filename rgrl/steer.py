"""Test-time reward guidance and its evaluation: `python -m rgrl.steer RECIPE.yaml [--key value …] [--dry_run]`
(`--help` lists every recipe key).

For every seed, the recipe's prompts (a fresh subset per seed for the benchmarks) are sampled K times with each
method — `none` (unguided; Best-of-N with N = K is its Top@1), `expectation`, `aps`, `entrgi` — and every
completion is scored by the reward model's discrete path. Outputs in `output_dir`:

    <method>_seed<s>.jsonl   one line per prompt: prompt, K completions, their rewards, the best one
    summary.md / .csv        Top@1 and Avg@N (mean ± SEM over seeds) and the compute each method used
                             (dLLM forwards and RM forward+backward passes per sample, FLOPs and seconds per
                             prompt), plus a Best-of-N row at the compute of the costliest guided method

Best-of-N at equal compute draws N samples per prompt with N set on the first seed so that its FLOPs per prompt --
counted from the models' shapes and the widths run (`rgrl.models.flops`), generation and the reward model's
scoring of every sample -- match the costliest guided method's; `equal_compute_by: wall_time` sets N from measured
seconds instead (which drift with the machine's load). The table reports both ratios for the row.

Extra per-sample metrics (e.g. a ground-truth checker) are TRL-style functions named in `metrics`
("package.module:function", called as f(prompts=…, completions=…) -> list[float]); the table reports their mean
over the best sample of each prompt and over all samples.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from rgrl import cli
from rgrl.data import PromptDataConfig, check_prompt_source, load_prompts
from rgrl.guidance import GUIDANCE_METHODS, GuidanceConfig, RewardGuidance
from rgrl.models.flops import TransformerShape
from rgrl.models.loading import DLLMConfig, num_logit_rows
from rgrl.recipe import RecipeError, load_recipe, to_plain
from rgrl.rewards import RewardModelConfig, import_function
from rgrl.sampling import DiffusionSampler, SamplerConfig

logger = logging.getLogger("rgrl.steer")


@dataclass
class SteerRecipe:
    """A test-time recipe (see recipes/steer_*.yaml)."""

    model: DLLMConfig
    reward_model: RewardModelConfig
    prompts: PromptDataConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)  # M and η; `methods` picks the estimators
    methods: list[str] = field(default_factory=lambda: ["none", "expectation", "aps", "entrgi"])  # run each
    num_samples: int = 4  # K
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # one prompt subset and sampling seed each
    batch_size: int = 16  # rows per sampler call (a multiple of num_samples)
    equal_compute_bon: bool = True  # add a Best-of-N row at the compute of the costliest guided method
    equal_compute_by: Literal["flops", "wall_time"] = "flops"  # how Best-of-N's N matches the guided compute
    metrics: list[str] = field(default_factory=list)  # extra per-sample metrics, "package.module:function"
    output_dir: str = "outputs/steer"  # where the JSONL samples and the summary tables go
    device: str | None = None  # default: cuda if available, else cpu

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in GUIDANCE_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty list of {GUIDANCE_METHODS}, got {self.methods}.")
        if self.equal_compute_bon and "none" not in self.methods:
            raise ValueError("equal_compute_bon needs the unguided method 'none' in methods.")
        if self.num_samples < 1 or not self.seeds:
            raise ValueError("num_samples must be >= 1 and seeds non-empty.")
        if self.batch_size < self.num_samples or self.batch_size % self.num_samples:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_samples ({self.num_samples}).")


@dataclass
class MethodRun:
    """Results of one method on one seed: rewards [P, N] and the cost per sample."""

    texts: list[list[str]]  # [P][N]
    rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]  # name -> [P, N]
    dllm_forwards: float
    rm_forward_backward: float
    flops: float  # generation and discrete scoring, all prompts
    seconds: float
    entropy_weight: float | None  # mean EntRGi weight w of the guided proposals (None when unguided)


def main(argv: list[str] | None = None) -> None:
    command = cli.parse_command_line("python -m rgrl.steer", __doc__, argv, lambda: [SteerRecipe])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(command.recipe, SteerRecipe, command.overrides)
        check_before_loading(recipe)
    except (RecipeError, FileNotFoundError, ValueError, ImportError) as error:
        where = "" if str(error).startswith(command.recipe) else f"{command.recipe}: "
        sys.exit(f"error: {where}{error}")
    print(json.dumps(to_plain(recipe), indent=2))
    if command.dry_run:
        return
    run(recipe)


def check_before_loading(recipe: SteerRecipe) -> None:
    """Everything that can be checked without loading weights."""
    recipe.model.check_paths()
    recipe.reward_model.check_paths()
    try:
        check_prompt_source(recipe.prompts)
    except (ValueError, OSError) as error:
        raise ValueError(f"'prompts.path': {error}") from None
    for name in recipe.metrics:
        import_function(name)


def run(recipe: SteerRecipe) -> list[dict]:
    """Sample, score and tabulate every method and seed of `recipe`; returns the summary rows (also written)."""
    device = torch.device(recipe.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dllm = recipe.model.load(device)
    reward_model = recipe.reward_model.load(device)
    bridge = recipe.reward_model.bridge(dllm.tokenizer, num_logit_rows(dllm.model), reward_model)
    logger.info(f"vocabulary bridge: {bridge.summary()}")
    metric_functions = {name.rsplit(":", 1)[-1]: import_function(name) for name in recipe.metrics}

    warm_up = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, recipe.sampler)
    warm_up.generate(load_prompts(recipe.prompts, seed=recipe.seeds[0])["prompt"][:1], seed=0)  # kernels, caches

    runs: dict[str, list[MethodRun]] = {}
    equal_compute_n = None  # fixed from the first seed's timings, so every seed compares the same N
    for seed in recipe.seeds:
        prompts = load_prompts(recipe.prompts, seed=seed)["prompt"]
        for method in recipe.methods:
            guidance = None
            if method != "none":
                config = GuidanceConfig(method=method, steps=recipe.guidance.steps, lr=recipe.guidance.lr,
                                        measure_gain=recipe.guidance.measure_gain)
                guidance = RewardGuidance(config, reward_model, bridge, dllm.family.stop_token_ids)
            sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, recipe.sampler, guidance)
            result = sample_and_score(sampler, reward_model, prompts, recipe.num_samples, recipe.batch_size, seed,
                                      metric_functions, desc=f"seed {seed} {method}")
            write_jsonl(output_dir / f"{method}_seed{seed}.jsonl", prompts, result)
            runs.setdefault(method, []).append(result)

        guided = [m for m in recipe.methods if m != "none"]
        if recipe.equal_compute_bon and guided:
            if equal_compute_n is None:
                cost = (lambda r: r.flops) if recipe.equal_compute_by == "flops" else (lambda r: r.seconds)
                costliest = max(cost(runs[m][-1]) for m in guided)
                unguided = cost(runs["none"][-1])
                equal_compute_n = max(recipe.num_samples, round(recipe.num_samples * costliest / unguided))
                logger.info(f"Best-of-N at equal compute ({recipe.equal_compute_by}): N = {equal_compute_n}")
            n = equal_compute_n
            sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, recipe.sampler)
            result = sample_and_score(sampler, reward_model, prompts, n, max(n, recipe.batch_size // n * n), seed,
                                      metric_functions, desc=f"seed {seed} BoN N={n}")
            write_jsonl(output_dir / f"bon_equal_compute_seed{seed}.jsonl", prompts, result)
            runs.setdefault("bon_equal_compute", []).append(result)

    rows = summarize(runs, recipe.num_samples)
    write_summary(output_dir, rows, recipe)
    return rows


def sample_and_score(sampler: DiffusionSampler, reward_model, prompts: list, num_samples: int, batch_size: int,
                     seed: int, metric_functions: dict, desc: str) -> MethodRun:
    """Sample `num_samples` completions per prompt in batches of `batch_size` rows, and score them."""
    prompts_per_batch = max(1, batch_size // num_samples)
    rewards, texts, extra = [], [], {name: [] for name in metric_functions}
    forwards = rm_passes = seconds = weight_sum = flops = 0.0
    guided_steps = 0
    for start in tqdm(range(0, len(prompts), prompts_per_batch), desc=desc, unit="batch"):
        chunk = prompts[start : start + prompts_per_batch]
        # the same seed for every method at this (seed, batch): guided and unguided runs share their randomness
        out = sampler.generate(chunk, num_samples=num_samples, seed=seed * 1_000_003 + start)
        rows = out.prompts  # as the dLLM saw them (cut to sampler.max_prompt_length)
        rewards.append(reward_model.score(rows, out.texts).view(len(chunk), num_samples))
        flops += sum(sampler.generation_flops(out.stats).values()) + scoring_flops(reward_model, rows, out.texts)
        texts.extend(out.texts[i : i + num_samples] for i in range(0, len(out.texts), num_samples))
        for name, function in metric_functions.items():
            values = torch.tensor(function(prompts=rows, completions=out.texts), dtype=torch.float32)
            extra[name].append(values.view(len(chunk), num_samples))
        forwards += out.stats.dllm_forwards * out.stats.rows
        rm_passes += out.stats.guidance.rm_forward_backward * out.stats.rows
        seconds += out.stats.seconds
        weight_sum += out.stats.guidance.entropy_weight_sum
        guided_steps += out.stats.guidance.steps
    total = len(prompts) * num_samples
    return MethodRun(texts=texts, rewards=torch.cat(rewards), metrics={k: torch.cat(v) for k, v in extra.items()},
                     dllm_forwards=forwards / total, rm_forward_backward=rm_passes / total, flops=flops,
                     seconds=seconds,
                     entropy_weight=weight_sum / guided_steps if guided_steps else None)


def scoring_flops(reward_model, prompts: list, completions: list[str]) -> int:
    """FLOPs of the reward model's discrete scores of these pairs (one forward per conversation, unpadded)."""
    shape = TransformerShape.from_config(reward_model.model.config, head_rows=1)
    lengths = [len(reward_model.template.conversation_ids(p, c)) for p, c in zip(prompts, completions)]
    return sum(shape.forward_flops(1, min(n, reward_model.max_length)) for n in lengths)


def write_jsonl(path: Path, prompts: list, result: MethodRun) -> None:
    """One line per prompt, written to a temporary file and renamed (never half-written)."""
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for i, prompt in enumerate(prompts):
            rewards = result.rewards[i].tolist()
            best = int(result.rewards[i].argmax())
            line = {"prompt": prompt, "completions": result.texts[i], "rewards": rewards,
                    "best": result.texts[i][best], "best_reward": rewards[best]}
            for name, values in result.metrics.items():
                line[name] = values[i].tolist()
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, path)


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    if len(values) < 2:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def summarize(runs: dict[str, list[MethodRun]], num_samples: int) -> list[dict]:
    """One row per method: per-seed Top@1 / Avg@N / metrics, then mean ± SEM over seeds.

    Compute per prompt (means over seeds); the Best-of-N row at equal compute also gets its FLOPs and seconds as
    multiples of the costliest guided method's (by FLOPs).
    """
    def per_prompt(method: str, attribute: str) -> float:
        return statistics.fmean(getattr(r, attribute) / r.rewards.shape[0] for r in runs[method])

    guided = [m for m in runs if m not in ("none", "bon_equal_compute")]
    costliest = max(guided, key=lambda m: per_prompt(m, "flops")) if guided else None
    rows = []
    for method, per_seed in runs.items():
        n = per_seed[0].rewards.shape[1]
        name = {"none": f"unguided (BoN N={n})", "bon_equal_compute": f"BoN equal compute (N={n})"}.get(method, method)
        row = {"method": name, "N": n}
        best = [r.rewards.argmax(dim=1) for r in per_seed]
        row["top1"] = mean_sem([r.rewards.max(dim=1).values.mean().item() for r in per_seed])
        row["avg"] = mean_sem([r.rewards.mean().item() for r in per_seed])
        for metric in per_seed[0].metrics:
            row[f"{metric}@best"] = mean_sem([r.metrics[metric].gather(1, b[:, None]).mean().item()
                                              for r, b in zip(per_seed, best)])
            row[f"{metric}@avg"] = mean_sem([r.metrics[metric].mean().item() for r in per_seed])
        row["dllm_forwards_per_sample"] = statistics.fmean(r.dllm_forwards for r in per_seed)
        row["rm_fwd_bwd_per_sample"] = statistics.fmean(r.rm_forward_backward for r in per_seed)
        row["gflops_per_prompt"] = per_prompt(method, "flops") / 1e9
        row["seconds_per_prompt"] = per_prompt(method, "seconds")
        row["flops_vs_guided"] = row["seconds_vs_guided"] = None
        if method == "bon_equal_compute" and costliest is not None:
            row["flops_vs_guided"] = per_prompt(method, "flops") / per_prompt(costliest, "flops")
            row["seconds_vs_guided"] = per_prompt(method, "seconds") / per_prompt(costliest, "seconds")
        weights = [r.entropy_weight for r in per_seed if r.entropy_weight is not None]
        row["entropy_weight"] = statistics.fmean(weights) if weights else None
        rows.append(row)
    return rows


def write_summary(output_dir: Path, rows: list[dict], recipe: SteerRecipe) -> None:
    columns = [c for c in rows[0] if c != "method"]
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, tuple):
            return f"{value[0]:.3f} ± {value[1]:.3f}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = [
        f"# Test-time guidance: {recipe.model.path} guided by {recipe.reward_model.path}",
        "",
        f"K = {recipe.num_samples}, seeds {recipe.seeds}, T = {recipe.sampler.steps}, "
        f"L = {recipe.sampler.max_completion_length}, "
        f"τ = {recipe.sampler.temperature}, M = {recipe.guidance.steps}, η = {recipe.guidance.lr}. "
        "Top@1 = best RM score of the N samples of a prompt, Avg@N = their mean; mean ± SEM over seeds. "
        f"Best-of-N at equal compute: N matched by {recipe.equal_compute_by.replace('_', ' ')} to the costliest "
        "guided method; flops_vs_guided / seconds_vs_guided are its counted FLOPs and measured seconds as "
        "multiples of that method's (generation plus the reward model's scoring of every sample).",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += ["| " + row["method"] + " | " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    (output_dir / "summary.md.tmp").write_text(text)
    os.replace(output_dir / "summary.md.tmp", output_dir / "summary.md")
    with open(output_dir / "summary.csv.tmp", "w", newline="") as f:
        writer = csv.writer(f)
        header = ["method"]
        for c in columns:
            header += [c, f"{c}_sem"] if isinstance(rows[0][c], tuple) else [c]
        writer.writerow(header)
        for row in rows:
            values = [row["method"]]
            for c in columns:
                values += list(row[c]) if isinstance(row[c], tuple) else ["" if row[c] is None else row[c]]
            writer.writerow(values)
    os.replace(output_dir / "summary.csv.tmp", output_dir / "summary.csv")
    print(text)


if __name__ == "__main__":
    main()
