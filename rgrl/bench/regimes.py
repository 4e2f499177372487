"""`python -m rgrl.bench regimes [--quick] [--jobs N] [--out DIR] [--work DIR] [--report-only] [--merge JSON]`: when
do EntRGi and RGRL win? Sweeps over the toy world's knobs (`python -m rgrl.toy build
--difficulty/--entropy/--robust-rm/--seed`), report in docs/results/regimes.md.

The grid is fixed here, before any run (`Grid.full`):

  test time, across the entropy knob (low, mid, high; easy difficulty, standard reward model): unguided sampling,
      expectation, APS, EntRGi and Best-of-N at equal compute (recipes/steer_toy_dream.yaml, pointed at the world)
      — Top@1, Avg@N, ground-truth pass rate of the best sample, mean w; mean ± SEM over the steer seeds;
  training, across the difficulty knob (easy, medium, hard; low entropy) × the reward model (standard, robust):
      RGRL-EntRGi, RGRL-APS and diffu-GRPO (recipes/toy_dream.yaml, recipes/toy_dream_diffu_grpo.yaml, pointed at
      the world), each with every training seed — held-out ground-truth pass rate and reward-model score of
      unguided samples at equal steps and at equal compute (counted FLOPs of the model passes), mean ± SEM over
      seeds;

and all of it for every world seed (the second world seed checks that the map does not hang on one world).

Every unit of work (a world's dLLM or reward model, a steer run, a training run) is a `python -m rgrl.bench regimes
--unit …` process whose result is a small JSON file in `results` (default: OUT/regimes_units, committed with the
report); its heavy outputs (checkpoints, runs, logs) go under `work`. Finished units are never rerun, so an interrupted
sweep resumes where it stopped — in another session or on another machine too: a world whose result is there but
whose checkpoint is not is built again when a run still needs it (a rebuild can differ in low bits). `--report-only`
writes the report from whatever has finished (cells not yet run are listed as such). Units run `jobs` at a time, in
an order that completes whole seeds first. `--quick` shrinks everything to a smoke test (reduced worlds, a tiny grid;
numbers meaningless), used by CI. `merge JSON` starts the report from an earlier regimes.json (from before unit
results were kept), cell by cell replaced by the finished units. A world build whose recorded knob values differ from
what its level sets now (a level recalibrated after it ran) is marked STALE in the report, with every cell built on it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rgrl import cli
from rgrl.bench.toy import _evaluations, _table, versions
from rgrl.toy import SHIPPED_CHECKPOINTS
from rgrl.toy.build import REPORT_FILE
from rgrl.toy.world import WorldConfig

METHODS = ("none", "expectation", "aps", "entrgi")  # the steer recipe's methods (Best-of-N at equal compute added)
TRAINING_VARIANTS = {  # label -> (recipe, overrides)
    "RGRL-EntRGi": ("recipes/toy_dream.yaml", []),
    "RGRL-APS": ("recipes/toy_dream.yaml", ["--training.guidance_method", "aps"]),
    "diffu-GRPO": ("recipes/toy_dream_diffu_grpo.yaml", []),
}
GROUND_TRUTH = "eval_rewards/ground_truth/mean"
HELD_OUT_REWARD = "eval_reward"
ROLLOUT_GROUND_TRUTH = "rewards/ground_truth/mean"  # of the training rollouts: RGRL's guided, diffu-GRPO's unguided
ROLLOUT_STEPS = 5  # the rollouts' pass rate is read over the first steps, before the policy has moved much


@dataclass(frozen=True)
class Grid:
    """The sweeps' cells and sizes."""

    world_seeds: tuple[int, ...]
    entropy_levels: tuple[str, ...]  # test-time sweep (difficulty easy, standard RM)
    difficulty_levels: tuple[str, ...]  # training sweep (entropy low)
    reward_models: tuple[str, ...]  # training sweep: "standard", "robust"
    seeds: tuple[int, ...]  # steer seeds, and training seeds per method per cell
    num_prompts: int  # steer prompts per seed
    max_steps: int  # training steps
    eval_steps: int
    quick: bool = False

    @classmethod
    def full(cls) -> Grid:
        return cls(world_seeds=(0, 1), entropy_levels=("low", "mid", "high"),
                   difficulty_levels=("easy", "medium", "hard"), reward_models=("standard", "robust"),
                   seeds=(1, 2, 3), num_prompts=32, max_steps=40, eval_steps=10)

    @classmethod
    def quick_grid(cls) -> Grid:
        return cls(world_seeds=(0,), entropy_levels=("low",), difficulty_levels=("easy",),
                   reward_models=("standard",), seeds=(1, 2), num_prompts=4, max_steps=2, eval_steps=1, quick=True)


# ------------------------------------------------------------------------------------------------ units
def dllm_unit(world_seed: int, difficulty: str, entropy: str) -> str:
    return f"dllm_s{world_seed}_{difficulty}_{entropy}"


def rm_unit(world_seed: int, entropy: str, reward_model: str) -> str:
    """The reward model depends on the words (entropy) and the negatives, not on the difficulty (the preference
    pairs never read how often the corpus uses the word), so one serves every difficulty."""
    return f"rm_s{world_seed}_{entropy}_{reward_model}"


def steer_unit(world_seed: int, entropy: str) -> str:
    return f"steer_s{world_seed}_{entropy}"


def train_unit(world_seed: int, difficulty: str, reward_model: str, label: str, seed: int) -> str:
    return f"train_s{world_seed}_{difficulty}_{reward_model}_{label}_seed{seed}"


TRAINING_CELL_ORDER = (("hard", "standard"), ("easy", "standard"), ("hard", "robust"), ("easy", "robust"),
                       ("medium", "standard"), ("medium", "robust"))
# The shipped checkpoints are world seed 0 at the default knobs (easy, low entropy, standard reward model): the full
# grid reads them instead of building them again (a rebuild now differs in low bits, see rgrl.toy.build).
SHIPPED_UNITS = frozenset({"dllm_s0_easy_low", "rm_s0_low_standard"})


def plan(grid: Grid) -> list[str]:
    """Every unit of the grid in priority order; `run_grid` starts the first one whose worlds exist
    (`dependencies`). Per world seed: the longest builds first (the hard dLLM, the high-entropy world), then the
    test-time runs at the extremes of the entropy knob, then the training cells in `TRAINING_CELL_ORDER` (hard
    prompts first; all seeds of a cell together, so a partial sweep has whole cells), then the middle levels."""
    units = []
    for world_seed in grid.world_seeds:
        cells = [cell for cell in TRAINING_CELL_ORDER
                 if cell[0] in grid.difficulty_levels and cell[1] in grid.reward_models]
        entropies = [grid.entropy_levels[0], grid.entropy_levels[-1], *grid.entropy_levels[1:-1]]
        extremes, middle = entropies[:2], entropies[2:]
        units += [dllm_unit(world_seed, difficulty, "low") for difficulty, _ in cells[:1]]
        for entropy in extremes:
            units += [dllm_unit(world_seed, "easy", entropy), rm_unit(world_seed, entropy, "standard"),
                      steer_unit(world_seed, entropy)]
        for difficulty, reward_model in cells:
            units += [dllm_unit(world_seed, difficulty, "low"), rm_unit(world_seed, "low", reward_model)]
            units += [train_unit(world_seed, difficulty, reward_model, label, seed)
                      for seed in grid.seeds for label in TRAINING_VARIANTS]
        for entropy in middle:
            units += [dllm_unit(world_seed, "easy", entropy), rm_unit(world_seed, entropy, "standard"),
                      steer_unit(world_seed, entropy)]
    return list(dict.fromkeys(units))


def dependencies(unit: str) -> list[str]:
    """The world builds a run reads."""
    kind, seed_part, *rest = unit.split("_")
    world_seed = int(seed_part[1:])
    if kind == "steer":
        return [dllm_unit(world_seed, "easy", rest[0]), rm_unit(world_seed, rest[0], "standard")]
    if kind == "train":
        return [dllm_unit(world_seed, rest[0], "low"), rm_unit(world_seed, "low", rest[1])]
    return []


def run_unit(unit: str, sweep: Sweep) -> None:
    """Do one unit in this process and write its result to the sweep's results folder."""
    grid, work = sweep.grid, sweep.work
    kind, seed_part, *rest = unit.split("_")
    world_seed = int(seed_part[1:])
    result: dict = {"unit": unit}
    started = time.perf_counter()
    if unit in SHIPPED_UNITS and not grid.quick:
        result["report"] = json.loads((SHIPPED_CHECKPOINTS / REPORT_FILE).read_text())
        result["report"]["shipped"] = True
        if kind == "rm":  # measured as a build measures it now (the shipped report predates this measure)
            from rgrl.rewards import RewardModel
            from rgrl.toy.build import RMTraining, pairwise_accuracy

            reward_model = RewardModel.from_pretrained(str(SHIPPED_CHECKPOINTS / "rm"), dtype="float32")
            result["report"]["checkpoints"]["rm"]["degenerate_pair_accuracy"] = pairwise_accuracy(
                reward_model, RMTraining().eval_pairs, seed=world_seed + 2000, degenerate_fraction=1.0)
    elif kind == "dllm":
        difficulty, entropy = rest
        result["report"] = build_world(work / "worlds" / unit, grid, world_seed, difficulty, entropy, "dream")
    elif kind == "rm":
        entropy, reward_model = rest
        result["report"] = build_world(work / "worlds" / unit, grid, world_seed, "easy", entropy, "rm",
                                       robust=reward_model == "robust")
    elif kind == "steer":
        (entropy,) = rest
        result["rows"] = steer(work, grid, world_seed, entropy)
    elif kind == "train":
        difficulty, reward_model, label, seed = rest[0], rest[1], rest[2], int(rest[3].removeprefix("seed"))
        result["history"], result["flops_per_step"] = train(work, grid, world_seed, difficulty, reward_model, label,
                                                             seed)
    else:
        raise SystemExit(f"error: unknown unit {unit!r}")
    result["seconds"] = time.perf_counter() - started
    path = sweep.result_path(unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, default=_plain))
    os.replace(tmp, path)


def build_world(out: Path, grid: Grid, world_seed: int, difficulty: str, entropy: str, checkpoint: str,
                robust: bool = False) -> dict:
    from rgrl.toy.__main__ import main as toy_main

    argv = ["build", "--out", str(out), "--only", checkpoint, "--seed", str(world_seed), "--difficulty", difficulty,
            "--entropy", entropy, "--threads", "1", "--no-guided-eval", *(["--robust-rm"] * robust),
            *(["--quick"] * grid.quick)]
    toy_main(argv)
    return json.loads((out / "build_report.json").read_text())


def world_paths(work: Path, grid: Grid, world_seed: int, difficulty: str, entropy: str,
                reward_model: str) -> tuple[str, str]:
    """(dLLM directory, reward-model directory) of a world."""
    paths = []
    for unit, name in ((dllm_unit(world_seed, difficulty, entropy), "dream"),
                       (rm_unit(world_seed, entropy, reward_model), "rm")):
        shipped = unit in SHIPPED_UNITS and not grid.quick
        paths.append(str(SHIPPED_CHECKPOINTS / name if shipped else work / "worlds" / unit / name))
    return paths[0], paths[1]


def steer(work: Path, grid: Grid, world_seed: int, entropy: str) -> list[dict]:
    from rgrl import steer as steer_module
    from rgrl.recipe import load_recipe

    dllm, rm = world_paths(work, grid, world_seed, "easy", entropy, "standard")
    overrides = ["--model.path", dllm, "--reward_model.path", rm, "--seeds", json.dumps(list(grid.seeds)),
                 "--prompts.num_prompts", str(grid.num_prompts), "--methods", f"[{','.join(METHODS)}]",
                 "--output_dir", str(work / "steer" / steer_unit(world_seed, entropy))]
    return steer_module.run(load_recipe("recipes/steer_toy_dream.yaml", steer_module.SteerRecipe, overrides))


def train(work: Path, grid: Grid, world_seed: int, difficulty: str, reward_model: str, label: str,
          seed: int) -> tuple[list[dict], float]:
    from rgrl.train import load_training_recipe, run

    dllm, rm = world_paths(work, grid, world_seed, difficulty, "low", reward_model)
    recipe, overrides = TRAINING_VARIANTS[label]
    rewards = f"[{{model: {rm}, name: rm, dtype: float32}}, {{function: 'rgrl.toy.world:ground_truth', weight: 0.0}}]"
    overrides = [*overrides, "--model.path", dllm, "--rewards", rewards, "--training.seed", str(seed),
                 "--training.output_dir", str(work / "train" / train_unit(world_seed, difficulty, reward_model, label,
                                                                          seed)),
                 "--training.report_to", "none", "--training.max_steps", str(grid.max_steps),
                 "--training.eval_steps", str(grid.eval_steps), "--training.save_steps", str(grid.max_steps),
                 "--training.overwrite_output_dir", "true"]  # a unit without a result starts over
    if grid.quick:  # a smaller batch and held-out set, as the toy world's smoke test uses
        overrides += ["--training.per_device_train_batch_size", "8", "--training.per_device_eval_batch_size", "8",
                      "--data.num_eval_prompts", "2"]
    if label.startswith("RGRL"):
        overrides += ["--training.guidance_model", rm]
    loaded = load_training_recipe(recipe, overrides)
    trainer = run(loaded)
    if trainer.state.global_step != grid.max_steps:  # stopped early (a SIGTERM checkpoints and exits 0): no result
        raise SystemExit(f"error: the run stopped at step {trainer.state.global_step} of {grid.max_steps}; "
                         "rerun the sweep to train this unit again")
    return trainer.state.log_history, step_flops(loaded.recipe, dllm, rm)


def step_flops(recipe, dllm_path: str, rm_path: str) -> float:
    """Counted FLOPs of one training step (`rgrl.models.flops`): the rollout's T dLLM forwards, guidance's M
    reward-model forward + input backward per denoising step (RGRL), the reward model's discrete scores, and the
    learner's forward + backward (3 forwards per iteration) of the dLLM; at the mean width of the toy prompts as the
    dLLM's chat template renders them."""
    from transformers import AutoConfig

    from rgrl.data import PromptDataConfig, load_prompts
    from rgrl.models.flops import TransformerShape
    from rgrl.models.loading import load_tokenizer

    dllm = TransformerShape.from_config(AutoConfig.from_pretrained(dllm_path))
    rm = TransformerShape.from_config(AutoConfig.from_pretrained(rm_path), head_rows=1)
    tokenizer = load_tokenizer(dllm_path)
    prompts = load_prompts(PromptDataConfig(source="toy"), split="train")["prompt"][:64]
    width = statistics.fmean(len(tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                                           add_special_tokens=False).input_ids) for p in prompts)
    training = recipe.training
    width = round(width) + training.max_completion_length
    rm_width = width + 8  # the reward model's template wraps the conversation in a few more tokens
    rows = training.per_device_train_batch_size * training.gradient_accumulation_steps
    flops = training.diffusion_steps * dllm.forward_flops(rows, width)
    flops += rm.forward_flops(rows, rm_width)
    flops += 3 * training.num_iterations * dllm.forward_flops(rows, width)
    if getattr(training, "guided", False):  # RGRL with a guidance method
        flops += training.diffusion_steps * training.guidance_steps * (rm.forward_flops(rows, rm_width)
                                                                       + rm.input_backward_flops(rows, rm_width))
    return float(flops)


@dataclass(frozen=True)
class Sweep:
    """Where a sweep keeps things: the results of finished units (small JSON files, committed next to the report, so
    another session or machine resumes from them and `--report-only` rebuilds the report) and the heavy outputs
    (worlds, runs, logs) under `work`."""

    grid: Grid
    work: Path
    results: Path

    def result_path(self, unit: str) -> Path:
        return self.results / f"{unit}.json"

    def load(self, unit: str) -> dict | None:
        path = self.result_path(unit)
        return json.loads(path.read_text()) if path.exists() else None

    def world_available(self, unit: str) -> bool:
        """A finished world unit whose checkpoint is on this machine (the shipped ones always are)."""
        if not self.result_path(unit).exists():
            return False
        return (unit in SHIPPED_UNITS and not self.grid.quick) or (self.work / "worlds" / unit).is_dir()

    def pending(self) -> list[str]:
        """The units still to run, in plan order: every run without a result, and every world one of those runs
        reads that is not available here (a result from elsewhere, its checkpoint not copied: built again)."""
        units = plan(self.grid)
        runs = [unit for unit in units if unit.startswith(("steer", "train")) and not self.result_path(unit).exists()]
        worlds = {world for run in runs for world in dependencies(run) if not self.world_available(world)}
        return [unit for unit in units if unit in worlds or unit in runs]


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class RegimesOptions:
    """`python -m rgrl.bench regimes` options."""

    out: str = "docs/results"  # where regimes.md, regimes.json and the plots go
    work: str = "outputs/bench_regimes"  # worlds, runs and logs (large; not committed)
    results: str | None = None  # each finished unit's result (JSON; default: OUT/regimes_units, committed)
    quick: bool = False  # a smoke test: reduced worlds, tiny grid
    jobs: int = 1  # units run at once (separate processes)
    report_only: bool = False  # run nothing; report the finished units
    merge: str | None = None  # start from an earlier regimes.json: its cells stand where no finished unit replaces them
    unit: str | None = None  # run this one unit in this process (what `jobs` starts)

    def __post_init__(self):
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}.")


def main(argv: list[str] | None = None) -> None:
    options = cli.parse_options("python -m rgrl.bench regimes", __doc__, argv, RegimesOptions)
    grid = Grid.quick_grid() if options.quick else Grid.full()
    sweep = Sweep(grid, Path(options.work), Path(options.results or Path(options.out) / "regimes_units"))
    if options.unit:
        if options.unit not in plan(grid):
            sys.exit(f"error: unknown unit {options.unit!r}; the grid's units are listed in {options.out}/regimes.md.")
        run_unit(options.unit, sweep)
        return
    if not options.report_only:
        run_grid(sweep, options.jobs)
    report = collect(sweep)
    if options.merge:
        report = merge_reports(json.loads(Path(options.merge).read_text()), report)
    write_report(report, Path(options.out), cli.command_string("python -m rgrl.bench regimes", argv))


def run_grid(sweep: Sweep, jobs: int) -> None:
    """Every pending unit (`Sweep.pending`): with one job in this process, in plan order; with more, each as its own
    process, `jobs` at a time, a unit starting when its worlds are available (the first ready one in plan order
    first). A failed unit stops the sweep (its log is named)."""
    import logging

    pending = sweep.pending()
    if jobs == 1:
        for unit in pending:
            run_unit(unit, sweep)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("rgrl.bench.regimes")
    logs = sweep.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        for unit, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[unit]
            if process.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                raise SystemExit(f"error: unit {unit} failed (exit {process.returncode}); see {logs / f'{unit}.log'}")
            log.info(f"{unit}: {time.perf_counter() - started:.0f} s ({len(pending)} units left)")
        ready = [unit for unit in pending if all(sweep.world_available(d) for d in dependencies(unit))]
        while ready and len(running) < jobs:
            unit = ready.pop(0)
            pending.remove(unit)
            command = [sys.executable, "-m", "rgrl.bench", "regimes", "--unit", unit, "--work", str(sweep.work),
                       "--results", str(sweep.results), *(["--quick"] * sweep.grid.quick)]
            with open(logs / f"{unit}.log", "w") as log_file:
                running[unit] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT), time.perf_counter()
        if not running and pending:
            raise SystemExit(f"error: units {pending[:3]}… wait for worlds that are not in the plan")
        time.sleep(1 if sweep.grid.quick else 5)


# ------------------------------------------------------------------------------------------------ report
def mean_sem(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    if len(values) < 2:
        return values[0], float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def _eval_at(history: list[dict], key: str, step: int) -> float | None:
    values = {entry["step"]: entry[key] for entry in history if key in entry}
    return values.get(step)


def training_cell(runs: dict[str, list[dict]], max_steps: int) -> dict:
    """Per method: held-out ground truth and RM score (unguided) at the start, at equal steps (the last step) and at
    equal compute (RGRL's evaluation whose counted FLOPs come closest to, without exceeding, diffu-GRPO's at the last
    step), each mean ± SEM over the seeds run; and the ground-truth pass rate of the training rollouts over the first
    `ROLLOUT_STEPS` steps (what RGRL's guidance adds to the policy's own samples)."""
    budget = None
    if runs.get("diffu-GRPO"):
        budget = statistics.fmean(r["flops_per_step"] for r in runs["diffu-GRPO"]) * max_steps
    cell = {}
    for label, seeds in runs.items():
        if not seeds:
            continue
        row = {"seeds": len(seeds), "flops_per_step": statistics.fmean(r["flops_per_step"] for r in seeds)}
        equal_step = max_steps
        if budget is not None:
            eval_steps = sorted({e["step"] for e in seeds[0]["history"] if GROUND_TRUTH in e})
            affordable = [s for s in eval_steps if s * row["flops_per_step"] <= budget * (1 + 1e-9)]
            equal_step = affordable[-1] if affordable else 0
        row["equal_compute_step"] = equal_step
        for name, key in (("ground_truth", GROUND_TRUTH), ("reward", HELD_OUT_REWARD)):
            for when, step in (("start", 0), ("end", max_steps), ("equal_compute", equal_step)):
                values = [_eval_at(r["history"], key, step) for r in seeds]
                row[f"{name}@{when}"] = mean_sem([v for v in values if v is not None])
            best = [max(v for s, v in _evaluations(r["history"], key)) for r in seeds]
            row[f"{name}@best"] = mean_sem(best)
        train_rewards = [statistics.fmean([e["reward"] for e in r["history"] if "reward" in e
                                           and HELD_OUT_REWARD not in e][-10:]) for r in seeds]
        row["training_reward"] = mean_sem(train_rewards)
        rollouts = [[e[ROLLOUT_GROUND_TRUTH] for e in r["history"] if ROLLOUT_GROUND_TRUTH in e] for r in seeds]
        row["rollout_ground_truth@start"] = mean_sem([statistics.fmean(v[:ROLLOUT_STEPS]) for v in rollouts if v])
        cell[label] = row
    return cell


def collect(sweep: Sweep) -> dict:
    """Everything finished, by cell; the cells of the grid with nothing finished are listed under `missing`."""
    grid = sweep.grid
    builds = [unit for unit in plan(grid) if unit.startswith(("dllm", "rm"))]
    report: dict = {"grid": asdict(grid), "versions": versions(), "worlds": {}, "test_time": {}, "training": {},
                    "missing": [], "seconds": {}}
    for unit in builds:
        result = sweep.load(unit)
        if result is None:
            report["missing"].append(unit)
            continue
        entry = result["report"]["checkpoints"]["dream" if unit.startswith("dllm") else "rm"]
        shipped = result["report"].get("shipped", False)  # predates the knobs: the default world
        report["seconds"][unit] = entry["seconds"] if shipped else result["seconds"]
        summary = {k: entry[k] for k in ("heldout_pair_accuracy", "degenerate_pair_accuracy", "steps") if k in entry}
        if "base" in entry:
            summary.update(pass_rate=entry["base"]["pass_rate"], well_formed=entry["base"]["well_formed"],
                           on_topic=entry["base"]["on_topic"], uses_word=entry["base"]["uses_word"],
                           vocab_rows=entry["vocab_rows"])
        world_config = result["report"]["config"].get("world") or asdict(WorldConfig())
        report["worlds"][unit] = {**summary, "world": world_config, "shipped": shipped,
                                  "seconds": report["seconds"][unit]}
    for world_seed in grid.world_seeds:
        for entropy in grid.entropy_levels:
            result = sweep.load(steer_unit(world_seed, entropy))
            if result is None:
                report["missing"].append(steer_unit(world_seed, entropy))
                continue
            report["test_time"][f"s{world_seed}_{entropy}"] = result["rows"]
            report["seconds"][steer_unit(world_seed, entropy)] = result["seconds"]
        for difficulty in grid.difficulty_levels:
            for reward_model in grid.reward_models:
                per_method = {}
                for label in TRAINING_VARIANTS:
                    per_method[label] = []
                    for seed in grid.seeds:
                        unit = train_unit(world_seed, difficulty, reward_model, label, seed)
                        result = sweep.load(unit)
                        if result is None:
                            report["missing"].append(unit)
                        else:
                            per_method[label].append(result)
                            report["seconds"][unit] = result["seconds"]
                cell = training_cell(per_method, grid.max_steps)
                if cell:
                    report["training"][f"s{world_seed}_{difficulty}_{reward_model}"] = cell
    return report


def merge_reports(earlier: dict, report: dict) -> dict:
    """`report` on top of an `earlier` one (`--merge`): every world, test-time cell and training cell of `report`
    replaces the earlier one of that name; units neither report finished stay missing."""
    merged = dict(report)
    for section in ("worlds", "test_time", "training", "seconds"):
        merged[section] = {**earlier[section], **report[section]}
    merged["missing"] = [unit for unit in report["missing"] if unit not in earlier["seconds"]]
    merged["merged_from"] = [*earlier.get("merged_from", []),
                             {"command": earlier["command"], "versions": earlier["versions"]}]
    return merged


def stale_worlds(report: dict) -> dict[str, str]:
    """World builds whose recorded knob values are no longer what their level names (`rgrl.toy.build.DIFFICULTY`,
    `ENTROPY`) set: unit -> why. Cells built on them are not results of the current levels."""
    from rgrl.toy.build import DIFFICULTY, ENTROPY

    stale = {}
    for unit, entry in report.get("worlds", {}).items():
        kind, _, *rest = unit.split("_")
        difficulty, entropy = (rest[0], rest[1]) if kind == "dllm" else (None, rest[0])
        recorded = entry["world"]
        if recorded["synonyms"] != ENTROPY[entropy]:
            stale[unit] = f"built at synonyms {recorded['synonyms']}, `{entropy}` is now {ENTROPY[entropy]}"
        elif difficulty is not None and recorded["uses_word"] != DIFFICULTY[difficulty]:
            stale[unit] = (f"built at uses_word {recorded['uses_word']}, `{difficulty}` is now "
                           f"{DIFFICULTY[difficulty]}")
    return stale


def _stale_cell(stale: dict[str, str], kind: str, cell: str) -> str | None:
    """Why a test-time (`kind` "steer") or training ("train") cell is stale, or None."""
    if not stale:
        return None
    reasons = [f"{world} {stale[world]}" for world in dependencies(f"{kind}_{cell}") if world in stale]
    return "; ".join(reasons) or None


def compare(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
    """'holds' when a − b exceeds twice its standard error, 'fails' when it is below minus that, else 'tie'."""
    if a is None or b is None or math.isnan(a[1]) or math.isnan(b[1]):
        return "– (too few seeds)"
    diff, sem = a[0] - b[0], math.hypot(a[1], b[1])
    verdict = "holds" if diff > 2 * sem else "fails" if diff < -2 * sem else "tie"
    return f"{verdict} ({diff:+.3f} ± {sem:.3f})"


def claims(report: dict) -> list[dict]:
    """The paper's claims, cell by cell: [{claim, cell, measure, verdict}]."""
    out = []
    stale = stale_worlds(report)
    for cell, rows in report["test_time"].items():
        label = f"test time {cell}" + (" (STALE)" if _stale_cell(stale, "steer", cell) else "")
        by_method = {row["method"].split(" (")[0]: row for row in rows}
        entrgi = by_method.get("entrgi")
        if entrgi is None:
            continue
        bon = next((row for row in rows if row["method"].startswith("BoN equal compute")), None)
        for claim, other in (("EntRGi > expectation", by_method.get("expectation")),
                             ("EntRGi > APS", by_method.get("aps")), ("guidance (EntRGi) > BoN at equal compute", bon)):
            if other is None:
                continue
            for measure, key in (("RM Top@1", "top1"), ("ground truth of best", "ground_truth@best")):
                out.append({"claim": claim, "cell": label, "measure": measure,
                            "verdict": compare(_pair(entrgi.get(key)), _pair(other.get(key)))})
    for cell, methods in report["training"].items():
        cell = cell + (" (STALE)" if _stale_cell(stale, "train", cell) else "")
        diffu = methods.get("diffu-GRPO")
        for label in ("RGRL-EntRGi", "RGRL-APS"):
            if label not in methods or diffu is None:
                continue
            for when in ("end", "equal_compute"):
                out.append({"claim": f"{label} > diffu-GRPO", "cell": f"training {cell}",
                            "measure": f"held-out ground truth at {when.replace('_', ' ')}",
                            "verdict": compare(methods[label][f"ground_truth@{when}"], diffu["ground_truth@end"])})
        for label, row in methods.items():
            out.append({"claim": "no reward hacking", "cell": f"training {cell} {label}",
                        "measure": "held-out ground truth, end − best", "verdict": _hacking(row)})
    return out


def _pair(value) -> tuple[float, float] | None:
    return tuple(value) if value else None


def _hacking(row: dict) -> str:
    """Reward hacking is the proxy rising while the truth falls: the held-out ground truth ends more than 0.1 below
    its best evaluation while the reward model's held-out score ends above where it started. A ground truth that
    falls with the reward model's score is a policy getting worse at both ("degrades"), not hacking."""
    end, best = row["ground_truth@end"], row["ground_truth@best"]
    rm_start, rm_end = row["reward@start"], row["reward@end"]
    if end is None or best is None or rm_start is None or rm_end is None:
        return "–"
    drop = end[0] - best[0]
    if drop >= -0.1:
        return f"holds ({drop:+.3f})"
    if rm_end[0] > rm_start[0]:
        return f"hacked ({drop:+.3f}; RM {rm_start[0]:+.2f} → {rm_end[0]:+.2f})"
    return f"holds, degrades ({drop:+.3f}; RM {rm_start[0]:+.2f} → {rm_end[0]:+.2f} too)"


def write_report(report: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report["command"] = command
    report["claims"] = claims(report)
    report["stale"] = stale_worlds(report)
    (out / "regimes.json").write_text(json.dumps(report, indent=1, default=_plain))
    plot_test_time(report, out / "regimes_test_time.png")
    plot_training(report, out / "regimes_training.png")
    write_markdown(report, out / "regimes.md")
    return out / "regimes.md"


def write_markdown(report: dict, path: Path) -> None:
    grid = report["grid"]
    partial = bool(report["missing"])
    lines = ["# Regimes of the toy world: when do EntRGi and RGRL win?", ""]
    if partial:
        lines += [f"**PARTIAL: {len(report['missing'])} units of the grid have not run** (listed at the end); every "
                  "number below is from the units that finished.", ""]
    stale = stale_worlds(report)
    if stale:
        lines += [f"**STALE: {len(stale)} world builds were made at knob values their level no longer has** (marked "
                  "STALE below, with every cell built on them; those numbers are not results of the current "
                  "levels, which a sweep in a fresh --work builds): "
                  + "; ".join(f"{unit} {why}" for unit, why in stale.items()) + ".", ""]
    lines += [f"Generated by `{report['command']}` (from the repository root). Grid: {json.dumps(grid)}. Versions: "
              + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", ""]
    for earlier in report.get("merged_from", []):
        lines += [f"Merged with the earlier report of `{earlier['command']}` (versions "
                  + ", ".join(f"{k} {v}" for k, v in earlier["versions"].items())
                  + "): its cells stand where no unit of this run replaced them.", ""]
    lines += ["Unit wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()) + ".", "",
              "## The worlds", "",
              "Each dLLM's sampled pass rate (600 samples, τ = 0.7) and its reward model's pair accuracies.", ""]
    lines += _table([{"unit": unit + (" (shipped)" if entry["shipped"] else "")
                              + (" (STALE)" if unit in stale else ""),
                      **{k: v for k, v in entry.items() if k != "world"},
                      "corpus_uses_word": entry["world"]["uses_word"] if "pass_rate" in entry else None,
                      "synonyms": entry["world"]["synonyms"]} for unit, entry in report["worlds"].items()],
                    [("unit", "unit"), ("synonyms", "synonyms"), ("corpus uses word", "corpus_uses_word"),
                     ("sampled pass rate", "pass_rate"), ("uses word", "uses_word"), ("well-formed", "well_formed"),
                     ("vocab rows", "vocab_rows"),
                     ("RM pair acc.", "heldout_pair_accuracy"), ("RM acc. vs ill-formed", "degenerate_pair_accuracy"),
                     ("build s", "seconds")]) + [""]
    test_columns = [("method", "method"), ("N", "N"), ("RM Top@1", "top1"), ("RM Avg@N", "avg"),
                    ("pass rate of best", "ground_truth@best"), ("pass rate, all", "ground_truth@avg"),
                    ("mean w", "entropy_weight"), ("GFLOP / prompt", "gflops_per_prompt")]
    for cell, rows in report["test_time"].items():
        why = _stale_cell(stale, "steer", cell)
        lines += [f"## Test time: world {cell} (entropy knob)" + (" — STALE" if why else ""), ""]
        lines += ([f"STALE: {why}.", ""] if why else []) + _table(rows, test_columns) + [""]
    train_columns = [("method", "method"), ("seeds", "seeds"), ("training reward", "training_reward"),
                     (f"rollout GT, steps 1–{ROLLOUT_STEPS}", "rollout_ground_truth@start"),
                     ("GT start", "ground_truth@start"), ("GT end (equal steps)", "ground_truth@end"),
                     ("GT best", "ground_truth@best"), ("equal-compute step", "equal_compute_step"),
                     ("GT equal compute", "ground_truth@equal_compute"), ("RM start", "reward@start"),
                     ("RM end", "reward@end"), ("GFLOP / step", "gflops_per_step")]
    for cell, methods in report["training"].items():
        rows = [{"method": label, **row, "gflops_per_step": row["flops_per_step"] / 1e9}
                for label, row in methods.items()]
        why = _stale_cell(stale, "train", cell)
        lines += [f"## Training: world {cell} (difficulty × reward model)" + (" — STALE" if why else ""), ""]
        lines += [f"STALE: {why}.", ""] if why else []
        lines += ["GT = held-out ground-truth pass rate of unguided samples, RM = the reward model's score of them; "
                  "rollout GT = the pass rate of the training rollouts (RGRL's guided samples, diffu-GRPO's unguided "
                  "ones); mean ± SEM over training seeds.", ""] + _table(rows, train_columns) + [""]
    lines += ["## The paper's claims, cell by cell", "",
              "holds / fails: the difference is more than twice its standard error (√(SEM₁² + SEM₂²), seeds "
              "independent) above / below zero; tie: within that. Hacking: the held-out ground truth ends more than "
              "0.1 below its best evaluation while the reward model's held-out score ends above its start; the same "
              "fall with the score falling too is a policy getting worse at both (\"degrades\"), not hacking.", ""]
    lines += _table(report["claims"], [("claim", "claim"), ("cell", "cell"), ("measure", "measure"),
                                       ("verdict", "verdict")]) + [""]
    if report["test_time"]:
        lines += ["![test-time sweep](regimes_test_time.png)", ""]
    if report["training"]:
        lines += ["![training sweep](regimes_training.png)", ""]
    if partial:
        lines += ["## Not run", "", ", ".join(report["missing"]), ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def _bar_panels(ax, groups: list[str], series: dict[str, list], title: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        means = [v[0] if v else float("nan") for v in values]
        sems = [v[1] if v and not math.isnan(v[1]) else 0.0 for v in values]
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=sems, capsize=3, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8, rotation=35,
                  ha="right", rotation_mode="anchor")  # a full grid has 12 training cells
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot_test_time(report: dict, path: Path) -> None:
    def series(cells: list[str], key: str) -> dict[str, list]:
        methods = [row["method"].split(" (")[0] for row in report["test_time"][cells[0]]]
        return {m: [_pair(next((r.get(key) for r in report["test_time"][c] if r["method"].split(" (")[0] == m), None))
                    for c in cells] for m in methods}

    _plot_cells(report, "test_time", "steer", path, (13, 4), series, "test time across the entropy knob",
                [("top1", "RM Top@1"), ("ground_truth@best", "ground truth of the best")])


def plot_training(report: dict, path: Path) -> None:
    def series(cells: list[str], key: str) -> dict[str, list]:
        return {label: [_pair(report["training"][c].get(label, {}).get(key)) for c in cells]
                for label in TRAINING_VARIANTS}

    _plot_cells(report, "training", "train", path, (14, 4), series, "training across difficulty × RM",
                [("ground_truth@end", "held-out ground truth, equal steps"),
                 ("ground_truth@equal_compute", "held-out ground truth, equal compute")])


def _plot_cells(report: dict, section: str, kind: str, path: Path, figsize: tuple, series, title: str,
                panels: list[tuple[str, str]]) -> None:
    """One bar panel per (key, panel title): a bar group per cell of `report[section]` (stale ones labelled), a bar
    per series(cells, key) entry."""
    if not report[section]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(report[section])
    stale = stale_worlds(report)
    labels = [cell + (" (STALE)" if _stale_cell(stale, kind, cell) else "") for cell in cells]
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for ax, (key, panel) in zip(axes, panels):
        _bar_panels(ax, labels, series(cells, key), f"{title}: {panel}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
