"""The house's layering: every import inside rgrl points down (models <- rewards <- guidance <- sampling <- trainers
<- the applications), no modules import each other in a cycle, and rgrl's own checkpoint names reach the loader
through its scheme registry, not through imports from the model layer."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from rgrl.models import loading
from rgrl.models.loading import register_checkpoint_scheme, resolve_checkpoint

PACKAGE = Path(loading.__file__).parents[1]

# rank of each top-level part of rgrl: a module may import its own part and parts of lower rank only
LAYERS = {
    "distributions": 0, "recipe": 0, "data": 0,  # utilities that import nothing of rgrl
    "models": 1,
    "rewards": 2,
    "guidance": 3,
    "sampling": 4,
    "trainers": 5,
    "train": 6, "steer": 6, "cli": 6, "merge": 6, "toy": 6, "bench": 6, "rgrl": 6,  # applications (and the package root)
}


def _part(module: str) -> str:
    """'rgrl.models.loading' -> 'models'; 'rgrl' -> 'rgrl'."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "rgrl"


def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package ('rgrl.toy' is rgrl/toy/__init__.py)."""
    return {".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted(package.rglob("*.py"))}


def _rgrl_imports(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) of every use of an rgrl module in a file: imports (function-level ones included), and modules
    named in `importlib.import_module("rgrl…")` or `resources.files("rgrl…")`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "rgrl"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "rgrl":
            for alias in node.names:  # `from rgrl.toy import tiny` imports the module rgrl.toy.tiny
                submodule = f"{node.module}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; rgrl uses absolute imports")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("import_module", "files") and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("rgrl")):
            found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(package: Path) -> list[str]:
    """'file:line (part) imports module (part)' for every import from a part of lower rank into one of higher or
    equal rank (another part), below the applications."""
    problems, modules = [], _modules(package)
    for module, path in modules.items():
        if module == "rgrl":
            continue  # the package root wires everything together
        part = _part(module)
        assert part in LAYERS, f"{path}: new top-level part {part!r}; give it a rank in LAYERS"
        for line, imported in _rgrl_imports(path, modules):
            target = _part(imported)
            assert target in LAYERS, f"{path}:{line}: imports unknown part {imported!r}"
            if target != part and LAYERS[target] >= LAYERS[part] and LAYERS[part] < LAYERS["train"]:
                problems.append(f"{path.relative_to(package.parent)}:{line} ({part}) imports {imported} ({target})")
    return problems


def import_cycles(package: Path) -> list[list[str]]:
    """The modules that import each other in a cycle (strongly connected components of the import graph)."""
    modules = _modules(package)
    edges = {module: {imported for _, imported in _rgrl_imports(path, modules) if imported in modules} - {module}
             for module, path in modules.items()}
    index, low, stack, cycles = {}, {}, [], []

    def visit(module):  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in edges[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return cycles


def test_no_import_points_up_or_sideways_below_the_applications():
    assert upward_imports(PACKAGE) == []


def test_no_modules_import_each_other():
    assert import_cycles(PACKAGE) == []


def test_the_checks_see_an_upward_import_a_resource_reach_and_a_cycle(tmp_path):
    """The checks above can fail, on what the model layer once held: loading.py importing tiny.py, which imported
    loading.py back, and loading.py reading the toy world's files by package name."""
    models = tmp_path / "rgrl" / "models"
    (tmp_path / "rgrl" / "toy").mkdir(parents=True)
    models.mkdir()
    for init in (tmp_path / "rgrl", models, tmp_path / "rgrl" / "toy"):
        (init / "__init__.py").write_text("")
    (models / "loading.py").write_text(
        "from importlib import resources\n"
        "def resolve(name):\n    from rgrl.models.tiny import tiny_checkpoint\n    return tiny_checkpoint(name)\n"
        "def toy(name):\n    return resources.files('rgrl.toy').joinpath(name)\n")
    (models / "tiny.py").write_text("from rgrl.models.loading import resolve\n")
    assert upward_imports(tmp_path / "rgrl") == ["rgrl/models/loading.py:6 (models) imports rgrl.toy (toy)"]
    assert import_cycles(tmp_path / "rgrl") == [["rgrl.models.loading", "rgrl.models.tiny"]]


def test_the_model_layer_imports_alone():
    """In a fresh interpreter, the model layer's modules import without pulling in the toy world or anything above;
    the root package is bypassed (its __init__ imports everything on purpose)."""
    code = (
        "import importlib.util, sys, types\n"
        f"root = types.ModuleType('rgrl'); root.__path__ = [{str(PACKAGE)!r}]; sys.modules['rgrl'] = root\n"
        "import rgrl.models.loading, rgrl.models.family, rgrl.models.flops\n"
        "above = sorted(m for m in sys.modules if m.startswith('rgrl.') and not m.startswith('rgrl.models'))\n"
        "assert not above, above\n"
        "assert rgrl.models.loading.CHECKPOINT_SCHEMES == {}, rgrl.models.loading.CHECKPOINT_SCHEMES\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_import_rgrl_registers_the_toy_and_tiny_schemes():
    assert {"toy", "tiny"} <= set(loading.CHECKPOINT_SCHEMES)
    assert Path(resolve_checkpoint("toy:dream")).name == "dream"


def _scratch_resolver(name):
    return f"/scratch/{name}"


def _other_resolver(name):
    return f"/elsewhere/{name}"


def test_a_registered_scheme_resolves_and_a_taken_one_cannot_be_stolen(monkeypatch):
    monkeypatch.setattr(loading, "CHECKPOINT_SCHEMES", dict(loading.CHECKPOINT_SCHEMES))
    register_checkpoint_scheme("scratch", _scratch_resolver)
    register_checkpoint_scheme("scratch", _scratch_resolver)  # a module imported twice: no-op
    assert resolve_checkpoint("scratch:model_a") == "/scratch/model_a"
    with pytest.raises(ValueError, match="'scratch': is already registered to .*_scratch_resolver"):
        register_checkpoint_scheme("scratch", _other_resolver)
    with pytest.raises(ValueError, match="lower-case"):
        register_checkpoint_scheme("Bad-Scheme", _other_resolver)


def test_an_unknown_scheme_names_the_registered_ones():
    with pytest.raises(FileNotFoundError, match=r"nor a name of a registered checkpoint scheme \(tiny:<name>, "
                                                r"toy:<name>\)"):
        resolve_checkpoint("nosuchscheme:model")


def test_a_missing_toy_checkpoint_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"toy:nope.*shipped: \['dream', 'llada', 'rm', 'rm_llada'\]"):
        resolve_checkpoint("toy:nope")
