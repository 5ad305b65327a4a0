#!/usr/bin/env python3
"""Import a Hugging Face gpt-oss folder (bf16/fp32, or the released MXFP4 experts) as a DCP checkpoint.

  python scripts/convert_hf_to_dcp.py --hf path/to/gpt-oss-20b --output ckpt/gpt-oss-20b
  ./scripts/run_train.sh --checkpoint.enable=true --checkpoint.initial_load_path=ckpt/gpt-oss-20b

The output is a model-only step folder (fp32 master weights) for checkpoint.initial_load_path.
Tensors are read, dequantized and written one at a time; the output appears only when complete.
"""

from __future__ import annotations

import argparse

from gptoss_titan.interop.convert import hf_to_dcp
from gptoss_titan.runtime.cli import exit_now, run_cli
from gptoss_titan.runtime.distributed import quiet_single_process_warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face folder: config.json + safetensors")
    p.add_argument("--output", required=True, help="output DCP folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    quiet_single_process_warnings()

    def convert() -> None:
        out = hf_to_dcp(a.hf, a.output, a.overwrite, progress=not a.quiet)
        print(f"wrote {out}")

    return run_cli(convert)


if __name__ == "__main__":
    exit_now(main())
