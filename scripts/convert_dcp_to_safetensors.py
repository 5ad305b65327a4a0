#!/usr/bin/env python3
"""Export a gptoss-titan DCP checkpoint as a Hugging Face gpt-oss folder (transformers loads it).

  python scripts/convert_dcp_to_safetensors.py --checkpoint outputs/debug --output hf/debug --dtype float32

--checkpoint takes a step-<N> folder, or a run / checkpoint folder (its latest complete step).
Writes config.json, generation_config.json, model-0000i-of-0000n.safetensors and
model.safetensors.index.json, streaming one tensor at a time, into a temporary folder renamed at
the end. Needs no GPU, no config and no process group, whatever world size saved the checkpoint.
--quantize mxfp4 writes the experts in the released checkpoints' MXFP4 layout (`*_blocks`,
`*_scales`, the release's quantization_config); progress goes to stderr (--quiet: none).
A LoRA run's checkpoint holds the adapters alone: --lora adapter writes a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors, loaded by peft.PeftModel.from_pretrained onto
the base), --lora merge the recorded base with the adapters merged in (any --dtype, --quantize).
"""

from __future__ import annotations

import argparse

from gptoss_titan.interop.export import QUANTIZE, dcp_to_hf
from gptoss_titan.runtime.cli import exit_now, run_cli
from gptoss_titan.runtime.distributed import quiet_single_process_warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="step-<N> folder, or a run/checkpoint folder")
    p.add_argument("--output", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default, as released) or float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="mxfp4: experts as the release's MXFP4 blocks and scales (20b fits 16 GB); others in --dtype",
    )
    p.add_argument(
        "--lora",
        default="none",
        choices=("none", "adapter", "merge"),
        help="a LoRA run's checkpoint: adapter (a PEFT folder for the base) or merge (the base with the adapters merged in)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    quiet_single_process_warnings()

    def convert() -> None:
        out = dcp_to_hf(
            a.checkpoint,
            a.output,
            a.dtype,
            a.max_shard_size,
            a.overwrite,
            a.quantize,
            progress=not a.quiet,
            lora=a.lora,
        )
        print(f"wrote {out}")

    return run_cli(convert)


if __name__ == "__main__":
    exit_now(main())
