"""scripts/gpu_smoke.sh: its CPU version runs every step that can run without a GPU (CI); steps that
cannot run say SKIP and why, never PASS."""

import os
import subprocess

import pytest

from .conftest import ROOT

STEPS = (
    "cuda_tests",
    "train",
    "sync_debug",
    "throughput",
    "lora_mxfp4",
    "sample",
    "export",
    "grpo",
    "long_packed",
    "cp",
    "tp_pp",
)


def smoke(tmp_path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run(
        [str(ROOT / "scripts" / "gpu_smoke.sh"), "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=2400,
        env={**os.environ, "SMOKE_DIR": str(tmp_path / "smoke"), **env},
    )
    table = r.stdout[r.stdout.index("step         status") :].splitlines()[1:]
    return r, {line.split()[0]: line.split()[1] for line in table}


@pytest.mark.slow
def test_gpu_smoke_cpu_version_passes(tmp_path):
    r, rows = smoke(tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert rows == {s: "SKIP" if s in ("cuda_tests", "sync_debug") else "PASS" for s in STEPS}, rows
    assert (
        "resumed 4-6" in r.stdout
        and "transformers generated" in r.stdout
        and "tokens/s per device" in r.stdout
        and "rank 8, MXFP4 base" in r.stdout
        and "cp 2, seq 512" in r.stdout
        and "tp 2, pp 1 (pp needs 4)" in r.stdout
        and "old_logprob_diff_max 0," in r.stdout
    )
    # the resumed half loaded the first half's last checkpoint (not a fresh start)
    assert "loaded" in (tmp_path / "smoke" / "resume.log").read_text()
    # every step's line was written as it ended (a run cut off by its slot keeps them)
    summary = (tmp_path / "smoke" / "summary.txt").read_text().splitlines()
    assert [line.split()[1].rstrip(":") for line in summary] == list(STEPS)
    import json

    table = json.loads((tmp_path / "smoke" / "summary.json").read_text())  # the final table as JSON
    assert [r["step"] for r in table] == list(STEPS) and all(isinstance(r["seconds"], int) for r in table)


def test_gpu_smoke_out_of_budget_skips_and_says_so(tmp_path):
    """With no time left every step is SKIP (budget), the exit code 0: nothing failed, nothing
    passed; one process: the steps that need two say so first."""
    r, rows = smoke(tmp_path, SMOKE_BUDGET="0", NGPU="1")
    assert r.returncode == 0, r.stdout[-3000:]
    assert rows == dict.fromkeys(STEPS, "SKIP"), rows
    assert "(needs 2 processes)" in r.stdout and "(budget: " in r.stdout
