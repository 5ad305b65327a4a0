"""Repository hygiene: lint, the README's commands, CI running exactly them, the package's layers."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("gptoss_titan", "tests", "scripts", "benchmarks")


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the test extra: pip install -e '.[test]'")
    r = subprocess.run(
        [ruff, "check", "gptoss_titan", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    train_cmd = next(b for b in blocks if "run_train.sh" in b and "venv" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci
    assert "pip install torch==2.13.0" in train_cmd


def test_python_files_are_readable_size():
    for p in list((ROOT / "gptoss_titan").rglob("*.py")) + list((ROOT / "scripts").glob("*.py")):
        assert len(p.read_text().splitlines()) <= 400, f"{p} is too long to read in one sitting"


# The package's layers, bottom to top (docs/package_map.md): a module imports only from its own
# layer and the ones below. gptoss_titan/sample.py is the `python -m gptoss_titan.sample` shim.
LAYERS = (
    "runtime",
    "model",
    "config",
    "data",
    "checkpoint",
    "parallel",
    "interop",
    "infer",
    "rl",
    "train",
    "sample",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (type-only imports included; `from X import Y`
    counts Y when Y is a module, else X)."""
    files = {_module_name(p): p for p in (ROOT / "gptoss_titan").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the package's __init__: on top


def test_imports_point_down_the_layers():
    graph = _package_imports()
    assert all(len(m.split(".")) == 1 or m.split(".")[1] in LAYERS for m in graph), sorted(graph)
    up = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)]
    assert not up, "imports up a layer: " + "; ".join(sorted(up))


def test_no_import_cycles():
    """No module reaches itself through the package's imports (type-only ones included; a package's
    __init__ counts as a module)."""
    graph = _package_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d) :] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


# Environment variables are read only where a process starts: torchrun's contract in
# runtime/distributed.py (WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RUN_ID) and the one variable it sets
# for cuBLAS there; and, read but never set, tiktoken's and openai-harmony's own cache variables in
# data/tokenizer.py, to put the bundled vocabulary file where those libraries will look for it;
# run_train.sh's launcher (runtime/launch.py, before the workers start) sets OMP_NUM_THREADS for
# them unless it is set, as the shell script did. Everything else is a config field
# (docs/configuration.md lists them all).
ENV_FILES = {
    "gptoss_titan/runtime/distributed.py",
    "gptoss_titan/data/tokenizer.py",
    "gptoss_titan/runtime/launch.py",
}


def test_environment_is_read_only_at_process_start():
    found = set()
    for p in (ROOT / "gptoss_titan").rglob("*.py"):
        text = p.read_text()
        if re.search(r"os\.environ|os\.getenv|getenv\(", text):
            found.add(str(p.relative_to(ROOT)))
    assert found <= ENV_FILES, f"environment read outside process start-up: {sorted(found - ENV_FILES)}"
