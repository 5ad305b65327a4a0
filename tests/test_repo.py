"""Repository hygiene: lint, the README's commands, CI running exactly them."""

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
        assert len(p.read_text().splitlines()) < 450, f"{p} is too long to read in one sitting"
