"""The command-line front `rgrl.train`, `rgrl.steer` and `rgrl.bench` share (`rgrl.cli`): the benchmarks' options
through it (--help, --dry_run, an options file, overrides, bad values), and how overrides are read."""

import dataclasses
import importlib
import re

import pytest
import yaml

from rgrl.bench import BENCHMARKS, main
from rgrl.recipe import BARE, RecipeError, load_recipe, parse_overrides
from rgrl.train import RGRLRecipe

OPTIONS = {"toy": "ToyOptions", "speed": "SpeedOptions", "cache": "CacheOptions", "regimes": "RegimesOptions"}


def options_class(name: str) -> type:
    return getattr(importlib.import_module(BENCHMARKS[name]), OPTIONS[name])


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out, (err + (code if isinstance(code, str) else ""))


def test_every_benchmark_has_options():
    assert sorted(OPTIONS) == sorted(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_bench_help_lists_every_option_with_help_and_default(name, capsys):
    code, out, _ = run_main([name, "--help"], capsys)
    assert code == 0
    lines = out.splitlines()
    for f in dataclasses.fields(options_class(name)):
        entry = next((i for i, line in enumerate(lines) if line.startswith(f"  {f.name}  (")), None)
        assert entry is not None, f"{f.name} is not listed"
        assert "default: " in lines[entry] and lines[entry + 1].startswith("      "), f"{f.name} has no help text"
    assert f"usage: python -m rgrl.bench {name} [OPTIONS.yaml]" in out


def test_bench_dry_run_resolves_file_then_overrides(tmp_path, capsys):
    options_file = tmp_path / "speed.yaml"
    options_file.write_text("repeats: 2\nshapes: [full]\nlayers: 3\n")
    code, out, _ = run_main(["speed", str(options_file), "--shapes", "tiny", "toy", "--oracle", "layers=4",
                             "--prompt-length", "7", "--dry_run"], capsys)
    assert code == 0 and "OK (dry run" in out
    resolved = yaml.safe_load(out)
    assert resolved["shapes"] == ["tiny", "toy"] and resolved["repeats"] == 2
    assert (resolved["oracle"], resolved["layers"], resolved["prompt_length"]) == (True, 4, 7)
    assert resolved["compile"] is False and resolved["out"] == "docs/results"


def test_bench_one_value_for_a_list_option_is_a_list(capsys):
    code, out, _ = run_main(["toy", "--skip", "training", "--families", "dream", "--dry_run"], capsys)
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["skip"] == ["training"] and resolved["families"] == ["dream"]


BAD_BENCH_ARGS = {
    "unknown key": (["speed", "--shaeps", "tiny"], "Did you mean 'shapes'"),
    "bad choice": (["speed", "--shapes", "huge"], "must be one of ['tiny', 'toy', 'full']"),
    "bare non-boolean": (["regimes", "--jobs"], "override --jobs has no value"),
    "wrong type": (["toy", "--jobs", "many"], "'jobs' must be an integer"),
    "out of range": (["toy", "--jobs", "0"], "jobs must be >= 1"),
    "unknown part": (["speed", "--parts", "guidence"], "parts: unknown ['guidence']"),
    "part without its flag": (["speed", "--parts", "naive_guidance"], "naive_guidance needs oracle: true"),
    "unknown setting": (["speed", "--setting", "fast"], "setting must be one of ['rgrl', 'test_time']"),
    "missing options file": (["cache", "nowhere.yaml"], "Recipe file not found: nowhere.yaml"),
    "unknown unit": (["regimes", "--unit", "dllm_s9_easy_low"], "unknown unit 'dllm_s9_easy_low'"),
}


@pytest.mark.parametrize("case", sorted(BAD_BENCH_ARGS))
def test_bench_bad_options_exit_with_the_reason(case, capsys):
    argv, message = BAD_BENCH_ARGS[case]
    code, _, err = run_main(argv, capsys)
    assert code != 0 and message in err, err


def test_overrides_parse_as_yaml_with_lists_and_bare_flags():
    pairs = parse_overrides(["--a.b", "3", "--flag=true", "c=x", "--names", "x", "y", "--quick", "--z=k=v",
                             "w=1", "--run-name", "[1, 2]", "--v", "--x", "y=2"])
    assert pairs == [("a.b", 3), ("flag", True), ("c", "x"), ("names", ["x", "y"]), ("quick", BARE),
                     ("z", "k=v"), ("w", 1), ("run_name", [1, 2]), ("v", BARE), ("x", BARE), ("y", 2)]


def test_training_recipe_takes_a_bare_boolean_and_rejects_a_bare_number():
    recipe = load_recipe("recipes/tiny_dream.yaml", RGRLRecipe, ["--training.guidance_compile"])
    assert recipe.training.guidance_compile is True
    with pytest.raises(RecipeError, match=re.escape("override --training.guidance_lr has no value")):
        load_recipe("recipes/tiny_dream.yaml", RGRLRecipe, ["--training.guidance_lr", "--training.seed", "3"])
