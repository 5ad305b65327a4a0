"""scripts/gpu_smoke.sh: its CPU version runs every step that can run without a GPU (CI)."""

import os
import subprocess

import pytest

from .conftest import ROOT


@pytest.mark.slow
def test_gpu_smoke_cpu_version_passes(tmp_path):
    r = subprocess.run(
        [str(ROOT / "scripts" / "gpu_smoke.sh"), "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "SMOKE_DIR": str(tmp_path / "smoke")},
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.index("step         status") :].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1] for line in table}
    steps = ("cuda_tests", "train", "sample", "export", "throughput", "long_packed", "tp_pp")
    assert rows == {s: "PASS" for s in steps}, table
    assert (
        "resumed 4-6" in r.stdout
        and "transformers generated" in r.stdout
        and "tokens/s per device" in r.stdout
        and "cp 2, seq 512" in r.stdout
        and "tp 2, pp 1" in r.stdout
    )
    # the resumed half loaded the first half's last checkpoint (not a fresh start)
    assert "loaded" in (tmp_path / "smoke" / "resume.log").read_text()
