"""`python -m gptoss_titan.config --config F [overrides]`: check a config before launching (the launch
scripts run this first): one line and exit 2 for a bad value, nothing printed and exit 0 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..runtime.cli import run_cli
from .job_config import ConfigError
from .loading import help_text, parse_args


def check_main(argv: list[str] | None = None) -> int:
    """`python -m gptoss_titan.config --config F [overrides]`: validate, print one line, exit 0 or 2."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    return run_cli(lambda: check(argv))


def check(argv: list[str]) -> None:
    cfg = parse_args(argv)
    if cfg.comm.mode == "fake_backend":  # a dry run reads no data
        return
    for folder in [cfg.data.dataset_path] if cfg.data.dataset_path else [s.path for s in cfg.data.sources]:
        if not ((Path(folder) / "meta.json").is_file() or (Path(folder) / "train.bin").is_file()):
            raise ConfigError(
                f"data folder {folder!r} has no meta.json (nor train.bin); "
                "create it with scripts/prepare_data.py --output <folder>"
            )


if __name__ == "__main__":
    sys.exit(check_main())
