"""DCP checkpoint -> Hugging Face gpt-oss folder, streaming, in bf16/fp32 or the release's MXFP4.

Reads the checkpoint's metadata, plans the shards from the tensor sizes, then loads one tensor at
a time (a partial DCP load reads only that tensor's bytes) and writes each shard as soon as it is
full: peak memory is about one shard plus one tensor, whatever the model size. Everything goes to
a temporary folder renamed at the end; files are readable by others (0644).

quantize="mxfp4" writes the expert matrices as the released checkpoints do: `*_blocks` (uint8
[E, out, in/32, 16]) and `*_scales` (uint8 [E, out, in/32]) encoded as model/mxfp4.py states, with
the release's `quantization_config`; everything else (expert biases included) in `dtype`.
Models with the o200k_harmony vocabulary also get the tokenizer files (hf_tokenizer.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..checkpoint.files import CheckpointError, read_model_args, resolve_step_dir
from ..checkpoint.integrity import verify as verify_integrity
from ..checkpoint.lora_base import read_base_record, recorded_base
from ..model.hf import generation_config, hf_config, name_pairs
from ..model.lora import weight_delta
from ..model.mxfp4 import quantize_mxfp4
from ..model.tokens import VOCAB_SIZE
from ..runtime.dtypes import DTYPES, dtype_of
from .convert import HFFolder
from .files import (
    HF_CONFIG_FILE,
    MXFP4_TENSORS,
    ConvertError,
    output_folder,
    parse_size,
)
from .hf_tokenizer import write_tokenizer
from .lora_export import export_adapter, read_adapters
from .progress import Progress

# The released gpt-oss config.json's quantization_config (openai/gpt-oss-20b and -120b).
RELEASE_QUANTIZATION = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
QUANTIZE = ("none", "mxfp4")


def _outputs(hf: str, shape: tuple[int, ...], quantized: bool, itemsize: int) -> list[tuple[str, int]]:
    """(file tensor name, bytes) written for one checkpoint tensor."""
    n = 1
    for s in shape:
        n *= s
    if quantized:
        return [(f"{hf}_blocks", n // 2), (f"{hf}_scales", n // 32)]
    return [(hf, n * itemsize)]


def dcp_to_hf(
    checkpoint: str,
    output: str,
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    quantize: str = "none",
    progress: bool = True,
    lora: str = "none",
) -> Path:
    """Export a checkpoint's model as a Hugging Face gpt-oss folder; returns the output folder.
    A LoRA run's checkpoint (adapters only) needs lora: "adapter" writes a PEFT adapter folder
    (interop/peft.py), "merge" the recorded base with the adapters merged in."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not supported; use bfloat16 or float32")
    if quantize not in QUANTIZE:
        raise ConvertError(f"--quantize {quantize!r} is not supported; use {' or '.join(QUANTIZE)}")
    limit = parse_size(max_shard_size)
    step_dir = resolve_step_dir(checkpoint)
    args = read_model_args(step_dir)
    damage = verify_integrity(step_dir)
    if damage:
        raise CheckpointError(f"checkpoint {str(step_dir)!r} is damaged ({damage}); export another step")
    adapters, scale, weights = {}, 0.0, (step_dir, "dcp")
    if lora == "adapter":
        return export_adapter(step_dir, Path(output), overwrite)
    if lora == "merge":  # the base's weights with the adapters merged in, written like any export
        adapters, scale = read_adapters(step_dir)
        weights = recorded_base(step_dir, f"--lora merge of {str(step_dir)!r}")  # DCP or Hugging Face
    elif lora != "none":
        raise ConvertError(f"--lora {lora!r} is not supported; use adapter or merge")
    elif read_base_record(step_dir) is not None:
        raise ConvertError(
            f"checkpoint {str(step_dir)!r} holds LoRA adapters only; pass --lora adapter (a PEFT folder) or "
            "--lora merge (the base with the adapters merged in)"
        )
    if quantize == "mxfp4" and (args.dim % 32 or args.moe_inter_dim % 32):
        raise ConvertError(
            f"MXFP4 needs hidden size and expert size multiples of 32 (got {args.dim} and {args.moe_inter_dim}); "
            "export with --quantize none"
        )
    shape_of, load = _reader(*weights)
    out_dtype = dtype_of(dtype)
    plan: list[list[tuple[str, str, tuple[int, ...], bool]]] = [[]]
    size, total_bytes = 0, 0
    for native, hf, shape in name_pairs(args):
        got = shape_of(native, hf)
        if got is None:
            raise ConvertError(f"checkpoint {str(weights[0])!r} has no tensor model.{native}")
        if got != shape:
            raise ConvertError(
                f"checkpoint tensor model.{native} has shape {list(got)}, expected {list(shape)}"
            )
        quantized = quantize == "mxfp4" and hf.endswith(MXFP4_TENSORS)
        nbytes = sum(b for _, b in _outputs(hf, shape, quantized, out_dtype.itemsize))
        if plan[-1] and size + nbytes > limit:
            plan.append([])
            size = 0
        plan[-1].append((native, hf, shape, quantized))
        size += nbytes
        total_bytes += nbytes

    out = Path(output)
    shown = Progress(f"export {out.name}", sum(len(s) for s in plan), total_bytes) if progress else None
    with output_folder(out, overwrite) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(plan, 1):
            fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for native, hf, shape, quantized in shard:
                value = load(native, hf, shape)
                delta = weight_delta(native, adapters, scale)
                if delta is not None:
                    value = value.to(delta.dtype) + delta
                if quantized:  # expert by expert: the encoder's temporaries stay small
                    parts = [quantize_mxfp4(value[e : e + 1]) for e in range(value.shape[0])]
                    written = {
                        f"{hf}_blocks": torch.cat([b for b, _ in parts]),
                        f"{hf}_scales": torch.cat([s for _, s in parts]),
                    }
                    del parts
                else:
                    written = {hf: value.to(out_dtype).contiguous()}
                del value
                nbytes = sum(t.numel() * t.element_size() for t in written.values())
                for name, t in written.items():
                    tensors[name] = t
                    weight_map[name] = fname
                total += nbytes
                if shown:
                    shown.update(nbytes)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        cfg = hf_config(args, dtype)
        if quantize == "mxfp4":
            cfg["quantization_config"] = dict(RELEASE_QUANTIZATION)
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(args), indent=2) + "\n")
        if args.vocab_size == VOCAB_SIZE:  # servable as is: AutoTokenizer, vLLM, llama.cpp
            write_tokenizer(tmp, args.max_seq_len)
        readable(tmp)
    return out


def _reader(path: Path, fmt: str):
    """(shape_of(native, hf) -> shape or None, load(native, hf, shape) -> tensor) over the weights
    of a DCP step folder (a partial load reads one tensor's bytes) or of a Hugging Face folder (a
    LoRA run's recorded base: read in place, MXFP4 experts dequantized)."""
    if fmt == "hf":
        folder = HFFolder(str(path))
        return (lambda native, hf: folder.shape(hf)), (lambda native, hf, shape: folder.load(hf))
    try:
        meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__})") from None

    def shape_of(native: str, hf: str) -> tuple[int, ...] | None:
        m = meta.get(f"model.{native}")
        return tuple(m.size) if isinstance(m, TensorStorageMetadata) else None

    def load(native: str, hf: str, shape: tuple[int, ...]) -> torch.Tensor:
        holder = {f"model.{native}": torch.empty(shape, dtype=meta[f"model.{native}"].properties.dtype)}
        dcp.load(holder, storage_reader=FileSystemReader(str(path)), no_dist=True)
        return holder.pop(f"model.{native}")

    return shape_of, load


def readable(folder: Path) -> None:
    """Files 0644 and the folder 0755 (minus the umask): exports are shared with servers and users."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o644 & ~umask)
