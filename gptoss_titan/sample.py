"""`python -m gptoss_titan.sample`: the sampling command line (gptoss_titan/infer/sample.py)."""

from .infer.sample import main
from .runtime.cli import exit_now

if __name__ == "__main__":
    exit_now(main())
