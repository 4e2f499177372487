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
