"""`python -m gptoss_titan.config --config F [overrides]`: check a config before launching
(the SLURM script runs this first; run_train.sh runs the same check inside its launcher): one line
and exit 2 for a bad value, nothing printed and exit 0 otherwise.
"""

from __future__ import annotations

import sys

from ..runtime.cli import exit_now, run_cli
from .loading import check_before_launch, help_text


def check_main(argv: list[str] | None = None) -> int:
    """`python -m gptoss_titan.config --config F [overrides]`: validate, print one line, exit 0 or 2."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    return run_cli(lambda: check_before_launch(argv))


if __name__ == "__main__":
    exit_now(check_main())
