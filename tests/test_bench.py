"""`python -m rgrl.bench toy`: the smoke-test scale runs end to end and writes the report and plots."""

import json

import pytest

from rgrl import bench


@pytest.mark.slow
def test_toy_bench_quick_writes_report_and_plots(tmp_path):
    bench.main(["toy", "--quick", "--families", "dream", "--out", str(tmp_path), "--work", str(tmp_path / "runs")])
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
