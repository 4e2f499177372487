"""The TRL-style scripts in examples/ run as shipped (two steps each in the toy world): a model by name, a reward
model by name mixed with a Python reward function, a peft config; they log both rewards and save the adapter."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script,guided", [("rgrl_toy.py", True), ("diffu_grpo_toy.py", False)])
def test_example_script_trains(script, guided, tmp_path):
    command = [sys.executable, f"examples/{script}", "--max_steps", "2", "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "rewards/rm/mean" in log and "rewards/uses_the_word/mean" in log
    assert ("guidance/entropy_weight" in log) == guided
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    """The README's Python API example, with one step into a temporary folder."""
    import re

    text = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("### Python API"):], re.S).group(1)
    assert "max_steps=20" in code and 'output_dir="outputs/api"' in code
    code = code.replace("max_steps=20", "max_steps=1").replace(
        'output_dir="outputs/api"', f'output_dir="{tmp_path}", report_to="none"')
    monkeypatch.chdir(REPO)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1 and trainer.guidance is not None
    assert "rewards/short/mean" in trainer.state.log_history[0]
