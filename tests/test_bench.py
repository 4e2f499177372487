"""`python -m rgrl.bench toy`: the smoke-test scale runs end to end and writes the report and plots."""

import json

import pytest

from rgrl.bench import main, toy as bench


@pytest.mark.slow
def test_toy_bench_quick_writes_report_and_plots(tmp_path):
    main(["toy", "--quick", "--families", "dream", "--out", str(tmp_path), "--work", str(tmp_path / "runs")])
    report = json.loads((tmp_path / "toy.json").read_text())
    methods = [row["method"] for row in report["test_time"]["dream"]]
    assert methods[0].startswith("unguided") and methods[-1].startswith("BoN equal compute")
    assert {"expectation", "aps", "entrgi"} <= set(methods)
    assert [(row["M"], row["lr"]) for row in report["ablation"]["dream"]] == [
        (m, lr) for m in bench.ABLATION_STEPS for lr in bench.ABLATION_LRS]
    assert set(report["training"]["dream"]) == {label for label, _, _ in bench.TRAINING_VARIANTS}
    text = (tmp_path / "toy.md").read_text()
    assert "python -m rgrl.bench toy --quick" in text and "| RGRL-APS |" in text
    assert (tmp_path / "toy_test_time.png").stat().st_size > 0
    assert (tmp_path / "toy_training_dream.png").stat().st_size > 0

    # The same parts as parallel processes (--jobs) give the same tables; only measured seconds differ.
    parallel_dir = tmp_path / "parallel"
    main(["toy", "--quick", "--families", "dream", "--skip", "training", "--jobs", "2",
                "--out", str(parallel_dir), "--work", str(parallel_dir / "runs")])
    parallel = json.loads((parallel_dir / "toy.json").read_text())

    def without_seconds(rows):
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]

    for section in ("test_time", "ablation"):
        assert without_seconds(parallel[section]["dream"]) == without_seconds(report[section]["dream"]), section
    assert parallel["training"] == {} and set(parallel["seconds"]) == {"test_time_dream", "ablation_dream", "total"}

    # --merge rebuilds the same report from the parts' own reports, and refuses a part given twice.
    parts = [str(parallel_dir / "runs" / "parts" / f"dream_{section}") for section in ("test_time", "ablation")]
    main(["toy", "--merge", *parts, "--out", str(tmp_path / "merged")])
    merged = json.loads((tmp_path / "merged" / "toy.json").read_text())
    for section in ("test_time", "ablation", "training"):
        assert merged[section] == parallel[section], section
    assert "--merge" in merged["command"] and "--skip" in merged["command"]
    with pytest.raises(SystemExit, match="two parts"):
        main(["toy", "--merge", parts[0], parts[0], "--out", str(tmp_path / "twice")])


def test_training_table_reports_first_last_and_the_best_evaluation_between():
    key = "eval_rewards/ground_truth/mean"
    history = [{"step": 0, key: 0.4}, {"step": 1, "reward": 1.0}, {"step": 10, key: 0.8}, {"step": 20, key: 0.0}]
    assert bench._eval_metric(history, "ground_truth") == "0.400 → 0.000 (best 0.800 at step 10)"
    rising = [{"step": 0, key: 0.4}, {"step": 10, key: 0.6}, {"step": 20, key: 0.9}]
    assert bench._eval_metric(rising, "ground_truth") == "0.400 → 0.900"
    assert bench._eval_metric(history, "rm") == "–"


# --- python -m rgrl.bench regimes ----------------------------------------------------------------------------


def test_regimes_quick_runs_the_tiny_grid_and_resumes(tmp_path):
    from rgrl.bench import regimes

    out, work = tmp_path / "out", tmp_path / "work"
    main(["regimes", "--quick", "--out", str(out), "--work", str(work)])
    report = json.loads((out / "regimes.json").read_text())
    grid = regimes.Grid.quick_grid()
    assert report["missing"] == [] and set(report["worlds"]) == {"dllm_s0_easy_low", "rm_s0_low_standard"}
    methods = [row["method"] for row in report["test_time"]["s0_low"]]
    assert methods[0].startswith("unguided") and methods[-1].startswith("BoN equal compute")
    (cell,) = report["training"].values()
    assert set(cell) == set(regimes.TRAINING_VARIANTS) and all(row["seeds"] == len(grid.seeds) for row in cell.values())
    # RGRL's rollouts add guidance's reward-model passes: more FLOPs per step, so an earlier equal-compute step
    assert cell["RGRL-EntRGi"]["flops_per_step"] > cell["diffu-GRPO"]["flops_per_step"]
    assert cell["diffu-GRPO"]["equal_compute_step"] == grid.max_steps
    claims = {claim["claim"] for claim in report["claims"]}
    assert claims == {"EntRGi > expectation", "EntRGi > APS", "guidance (EntRGi) > BoN at equal compute",
                      "RGRL-EntRGi > diffu-GRPO", "RGRL-APS > diffu-GRPO", "no reward hacking"}
    text = (out / "regimes.md").read_text()
    assert "PARTIAL" not in text and "python -m rgrl.bench regimes --quick" in text
    assert (out / "regimes_test_time.png").stat().st_size > 0 and (out / "regimes_training.png").stat().st_size > 0

    # finished units are not rerun; a lost result is rerun; --report-only runs nothing and marks the gap
    assert not (work / "results").exists(), "results are kept next to the report (committed), not under work"
    results = sorted((out / "regimes_units").glob("*.json"))
    stamps = {path: path.stat().st_mtime_ns for path in results}
    lost = out / "regimes_units" / "train_s0_easy_standard_diffu-GRPO_seed2.json"
    lost.unlink()
    main(["regimes", "--quick", "--report-only", "--out", str(out), "--work", str(work)])
    partial = json.loads((out / "regimes.json").read_text())
    assert partial["missing"] == ["train_s0_easy_standard_diffu-GRPO_seed2"]
    assert partial["training"]["s0_easy_standard"]["diffu-GRPO"]["seeds"] == 1
    assert (out / "regimes.md").read_text().startswith("# Regimes") and "PARTIAL: 1 units" in (out / "regimes.md").read_text()
    main(["regimes", "--quick", "--out", str(out), "--work", str(work)])
    assert lost.exists() and all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path != lost)
    assert json.loads((out / "regimes.json").read_text())["training"] == report["training"]  # deterministic rerun


def test_regimes_resumes_from_results_made_elsewhere(tmp_path):
    """Results from another session (committed) are not rerun; a world whose checkpoint is not here is built again
    only when a run still needs it."""
    from rgrl.bench.regimes import Grid, Sweep, plan

    sweep = Sweep(Grid.quick_grid(), tmp_path / "work", tmp_path / "results")
    units = plan(sweep.grid)
    assert sweep.pending() == units
    sweep.results.mkdir()
    for unit in units:
        sweep.result_path(unit).write_text("{}")
    assert sweep.pending() == [], "every result is there: nothing runs, the missing worlds are not rebuilt"
    run = "train_s0_easy_standard_RGRL-APS_seed2"
    sweep.result_path(run).unlink()
    assert sweep.pending() == ["dllm_s0_easy_low", "rm_s0_low_standard", run]
    (sweep.work / "worlds" / "dllm_s0_easy_low").mkdir(parents=True)
    assert sweep.pending() == ["rm_s0_low_standard", run]
    assert not sweep.world_available("rm_s0_low_standard") and sweep.world_available("dllm_s0_easy_low")


def test_regimes_plan_starts_every_world_before_its_runs():
    from rgrl.bench import regimes

    grid = regimes.Grid.full()
    units = regimes.plan(grid)
    assert len(units) == len(set(units))
    position = {unit: i for i, unit in enumerate(units)}
    runs = [u for u in units if u.startswith(("steer", "train"))]
    cells = len(grid.difficulty_levels) * len(grid.reward_models)
    assert len(runs) == len(grid.world_seeds) * (len(grid.entropy_levels)
                                                 + cells * len(grid.seeds) * len(regimes.TRAINING_VARIANTS))
    for run in runs:
        assert all(position[world] < position[run] for world in regimes.dependencies(run)), run
    worlds = {u for u in units if not u.startswith(("steer", "train"))}
    assert worlds == {world for run in runs for world in regimes.dependencies(run)}
    # dLLMs: easy at 3 entropies, medium and hard at low; RMs: standard at 3 entropies, robust at low
    assert len(worlds) == len(grid.world_seeds) * (5 + 4)


def _history(values: dict[int, tuple[float, float]], train_rewards: list[float]) -> list[dict]:
    history = [{"step": step + 1, "reward": r} for step, r in enumerate(train_rewards)]
    history += [{"step": step, "eval_reward": rm, "eval_rewards/ground_truth/mean": gt}
                for step, (gt, rm) in values.items()]
    return history


def test_regimes_training_cell_is_mean_and_sem_over_seeds_at_equal_steps_and_compute():
    from rgrl.bench import regimes

    diffu = [{"history": _history({0: (0.4, 0.0), 10: (0.5, 0.1), 20: (0.6, 0.2)}, [0.0] * 20), "flops_per_step": 1.0},
             {"history": _history({0: (0.4, 0.0), 10: (0.7, 0.1), 20: (0.8, 0.3)}, [1.0] * 20), "flops_per_step": 1.0}]
    # RGRL costs 1.5× per step: diffu-GRPO's 20 steps buy 13.3 of its steps, so its step-10 evaluation
    rgrl = [{"history": _history({0: (0.4, 0.0), 10: (0.9, 0.5), 20: (0.2, 0.9)}, [2.0] * 20), "flops_per_step": 1.5},
            {"history": _history({0: (0.4, 0.0), 10: (0.7, 0.4), 20: (0.4, 0.7)}, [3.0] * 20), "flops_per_step": 1.5}]
    cell = regimes.training_cell({"RGRL-EntRGi": rgrl, "diffu-GRPO": diffu}, max_steps=20)
    sem = lambda a, b: abs(a - b) / 2  # SEM of two values: stdev / √2 = |a − b| / 2
    assert cell["RGRL-EntRGi"]["equal_compute_step"] == 10 and cell["diffu-GRPO"]["equal_compute_step"] == 20
    assert cell["RGRL-EntRGi"]["ground_truth@equal_compute"] == pytest.approx((0.8, sem(0.9, 0.7)))
    assert cell["RGRL-EntRGi"]["ground_truth@end"] == pytest.approx((0.3, sem(0.2, 0.4)))
    assert cell["RGRL-EntRGi"]["ground_truth@best"] == pytest.approx((0.8, sem(0.9, 0.7)))
    assert cell["diffu-GRPO"]["reward@end"] == pytest.approx((0.25, sem(0.2, 0.3)))
    assert cell["diffu-GRPO"]["training_reward"] == pytest.approx((0.5, 0.5))  # last 10 training rewards per seed
    assert cell["diffu-GRPO"]["rollout_ground_truth@start"] is None  # these histories log no rollout ground truth
    for run, passes in zip(rgrl, ([0.1] * 5 + [0.9] * 15, [0.3] * 20)):  # only the first ROLLOUT_STEPS (5) count
        run["history"] = [{**e, "rewards/ground_truth/mean": passes[e["step"] - 1]} if "reward" in e else e
                          for e in run["history"]]
    with_rollouts = regimes.training_cell({"RGRL-EntRGi": rgrl, "diffu-GRPO": diffu}, max_steps=20)
    assert with_rollouts["RGRL-EntRGi"]["rollout_ground_truth@start"] == pytest.approx((0.2, sem(0.1, 0.3)))
    verdicts = {c["claim"] + " / " + c["measure"]: c["verdict"]
                for c in regimes.claims({"test_time": {}, "training": {"cell": cell}})}
    assert verdicts["RGRL-EntRGi > diffu-GRPO / held-out ground truth at end"].startswith("fails (-0.400")
    assert verdicts["RGRL-EntRGi > diffu-GRPO / held-out ground truth at equal compute"].startswith("tie (+0.100")
    assert verdicts["no reward hacking / held-out ground truth, end − best"] == "holds (+0.000)"  # diffu-GRPO's
    def hacking(cell):
        return [c["verdict"] for c in regimes.claims({"test_time": {}, "training": {"cell": cell}})
                if c["cell"].endswith("RGRL-EntRGi") and c["claim"] == "no reward hacking"]

    assert hacking(cell) == ["hacked (-0.500; RM +0.00 → +0.80)"]  # ground truth 0.8 → 0.3 while the RM rose
    for run in rgrl:  # the same fall with the reward model's score falling too is not hacking
        run["history"] = [{**e, "eval_reward": -e["step"] / 10} if "eval_reward" in e else e for e in run["history"]]
    falling = regimes.training_cell({"RGRL-EntRGi": rgrl, "diffu-GRPO": diffu}, max_steps=20)
    assert hacking(falling) == ["holds, degrades (-0.500; RM +0.00 → -2.00 too)"]


def test_regimes_merge_keeps_earlier_cells_and_marks_stale_worlds(tmp_path):
    from rgrl.bench import regimes
    from rgrl.toy.build import DIFFICULTY

    def world(uses_word, **measured):
        return {**measured, "world": {"uses_word": uses_word, "synonyms": 1}, "shipped": False, "seconds": 1.0}

    runs = [{"history": _history({0: (0.1, 0.0), 10: (0.2, 0.1)}, [0.0] * 10), "flops_per_step": 1.0},
            {"history": _history({0: (0.1, 0.0), 10: (0.3, 0.2)}, [0.0] * 10), "flops_per_step": 1.0}]
    cell = regimes.training_cell({"RGRL-EntRGi": runs, "diffu-GRPO": runs}, max_steps=10)
    rows = [{"method": "expectation", "top1": [1.0, 0.1], "ground_truth@best": [0.9, 0.05]},
            {"method": "entrgi (M = 3)", "top1": [1.5, 0.1], "ground_truth@best": [1.0, 0.0]}]
    earlier = {"grid": {}, "versions": {"commit": "old"}, "command": "python -m rgrl.bench regimes --jobs 2",
               "worlds": {"dllm_s0_hard_low": world(DIFFICULTY["hard"] + 0.01, pass_rate=0.0),  # an older level
                          "dllm_s0_easy_low": world(DIFFICULTY["easy"], pass_rate=0.44),
                          "rm_s0_low_standard": world(DIFFICULTY["easy"], heldout_pair_accuracy=0.9)},
               "test_time": {"s0_low": rows}, "training": {"s0_hard_standard": cell},
               "missing": ["rm_s0_low_robust", "dllm_s0_medium_low"],
               "seconds": {"dllm_s0_hard_low": 1.0, "dllm_s0_easy_low": 1.0, "rm_s0_low_standard": 1.0,
                           "steer_s0_low": 1.0, "train_s0_hard_standard_RGRL-EntRGi_seed1": 1.0}}
    new = {"grid": {}, "versions": {"commit": "new"},
           "worlds": {"rm_s0_low_robust": world(0.4, heldout_pair_accuracy=0.95)},
           "test_time": {}, "training": {}, "seconds": {"rm_s0_low_robust": 2.0},
           "missing": ["dllm_s0_hard_low", "dllm_s0_easy_low", "dllm_s0_medium_low", "rm_s0_low_standard"]}
    merged = regimes.merge_reports(earlier, new)
    assert set(merged["worlds"]) == {"dllm_s0_hard_low", "dllm_s0_easy_low", "rm_s0_low_standard", "rm_s0_low_robust"}
    assert merged["missing"] == ["dllm_s0_medium_low"]  # finished in neither report
    assert merged["training"] == {"s0_hard_standard": cell} and merged["test_time"] == {"s0_low": rows}
    assert merged["merged_from"] == [{"command": earlier["command"], "versions": {"commit": "old"}}]

    assert regimes.stale_worlds(merged) == {
        "dllm_s0_hard_low": f"built at uses_word {DIFFICULTY['hard'] + 0.01}, `hard` is now {DIFFICULTY['hard']}"}
    regimes.write_report(merged, tmp_path, "python -m rgrl.bench regimes --report-only --merge regimes.json")
    text = (tmp_path / "regimes.md").read_text()
    assert "STALE: 1 world builds" in text and "| dllm_s0_hard_low (STALE) |" in text
    assert "## Training: world s0_hard_standard (difficulty × reward model) — STALE" in text
    assert "## Test time: world s0_low (entropy knob)\n" in text  # its worlds are current
    assert "Merged with the earlier report of `python -m rgrl.bench regimes --jobs 2`" in text
    written = json.loads((tmp_path / "regimes.json").read_text())
    assert set(written["stale"]) == {"dllm_s0_hard_low"}
    cells = {claim["cell"] for claim in written["claims"]}
    assert "test time s0_low" in cells and "training s0_hard_standard (STALE)" in cells
    assert all("s0_low (STALE)" not in c for c in cells)


def test_regimes_compare_needs_a_margin_of_two_standard_errors():
    from rgrl.bench import regimes

    assert regimes.compare((1.0, 0.1), (0.5, 0.1)).startswith("holds (+0.500 ± 0.141)")
    assert regimes.compare((0.5, 0.1), (1.0, 0.1)).startswith("fails (-0.500")
    assert regimes.compare((0.6, 0.1), (0.5, 0.1)).startswith("tie (+0.100")
    assert regimes.compare((0.6, float("nan")), (0.5, 0.1)) == "– (too few seeds)"
