"""`python -m gptoss_titan.sample`: the sampling command line (gptoss_titan/infer/sample.py)."""

import sys

from .infer.sample import main

if __name__ == "__main__":
    sys.exit(main())
