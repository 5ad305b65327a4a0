"""The generation command line (python -m gptoss_titan.sample) as a subprocess."""

import subprocess

from ..conftest import ROOT, python_cmd


def sample(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """`gptoss_titan.sample ARGS` on nproc processes (torchrun when more than one), output captured."""
    return subprocess.run(
        python_cmd(nproc, "-m", "gptoss_titan.sample", *args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
