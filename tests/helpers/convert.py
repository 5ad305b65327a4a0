"""The converters run as users run them, and what the export and import tests share."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from gptoss_titan.model import Transformer

from ..conftest import ROOT
from .checkpoint import weights


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_dcp_to_safetensors.py"), *args],
        capture_output=True,
        text=True,
    )


def ours_from(step_dir: Path) -> Transformer:
    from gptoss_titan.checkpoint import read_model_args

    args = read_model_args(step_dir)
    m = Transformer(args)
    m.init_weights()
    m.load_state_dict(weights(step_dir))
    return m.eval()


def import_(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/convert_hf_to_dcp.py"), *args], capture_output=True, text=True
    )


def quantize_folder(src: Path, dst: Path) -> dict:
    """A copy of an HF folder whose expert matrices are replaced by random MXFP4 blocks and scales."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (dst / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors, packed = {}, {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, n_in, n_out = tensors.pop(name).shape
        blocks = torch.randint(0, 256, (e, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(118, 130, (e, n_out, n_in // 32), generator=g, dtype=torch.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        packed[name] = (blocks, scales)
    save_file(tensors, str(dst / "model.safetensors"))
    return packed
