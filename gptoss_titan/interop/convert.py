"""Streaming converters between our DCP checkpoints and Hugging Face safetensors folders.

HF -> DCP (import, here): reads each tensor (dequantizing MXFP4 experts) only when DCP writes it.
DCP -> HF (export): export.py. Both write to a temporary folder renamed at the end (files.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from ..checkpoint.files import MODEL_ARGS_FILE
from ..model import ModelArgs
from ..model.args import TRAINING_ONLY_FIELDS
from ..model.hf import name_pairs
from ..model.local import local
from .files import HF_CONFIG_FILE, MXFP4_TENSORS, ConvertError, output_folder
from .progress import Progress


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a gpt-oss config.json (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    if cfg.get("model_type") != "gpt_oss":
        raise ConvertError(f"{HF_CONFIG_FILE} has model_type {cfg.get('model_type')!r}, expected 'gpt_oss'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    try:
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim", 64),
            vocab_size=cfg["vocab_size"],
            num_experts=cfg.get("num_local_experts", cfg.get("num_experts")),
            top_k=cfg.get("num_experts_per_tok", cfg.get("experts_per_token")),
            moe_inter_dim=cfg["intermediate_size"],
            sliding_window=cfg.get("sliding_window", 128),
            max_seq_len=cfg.get("max_position_embeddings", 131072),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 150000.0))),
            rope_factor=float(rope.get("factor", 32.0)),
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            rope_original_seq_len=int(rope.get("original_max_position_embeddings", 4096)),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            swiglu_limit=cfg.get("swiglu_limit", 7.0),
            swiglu_alpha=cfg.get("swiglu_alpha", 1.702),
            init_std=cfg.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ConvertError(f"{HF_CONFIG_FILE} lacks {e.args[0]!r}; it is not a gpt-oss config") from None


class HFFolder:
    """Lazy access to the tensors of a Hugging Face folder (sharded or not; bf16/fp32 or MXFP4)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"Hugging Face folder {folder!r} does not exist")
        cfg_file = self.folder / HF_CONFIG_FILE
        if not cfg_file.is_file():
            raise ConvertError(f"{folder!r} has no {HF_CONFIG_FILE}; pass a Hugging Face gpt-oss folder")
        self.config = json.loads(cfg_file.read_text())
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            self.weight_map = {"": "model.safetensors"}
            with self._open("") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConvertError(f"{folder!r} has no model.safetensors.index.json and no model.safetensors")

    def _open(self, name: str):
        from safetensors import SafetensorError, safe_open

        path = self.folder / self.weight_map[name]
        try:
            return safe_open(str(path), "pt")
        except (SafetensorError, OSError) as e:
            raise ConvertError(
                f"safetensors file {path.name} in {str(self.folder)!r} is damaged or unreadable "
                f"({e}); download or export it again"
            ) from None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of the (dequantized) tensor `name`, or None if absent."""
        if name in self.weight_map:
            with self._open(name) as f:
                return tuple(f.get_slice(name).get_shape())
        if f"{name}_blocks" in self.weight_map and name.endswith(MXFP4_TENSORS):
            with self._open(f"{name}_blocks") as f:
                e, out, nb, _ = f.get_slice(f"{name}_blocks").get_shape()
            return (e, nb * 32, out)
        return None

    def load_raw(self, name: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> torch.Tensor:
        """Rows [r0, r1) and columns [c0, c1) (dims 0 and 1; None = all) of `name` as stored (no
        dequantizing: e.g. the uint8 MXFP4 blocks)."""
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        with self._open(name) as f:
            part = f.get_slice(name)
            return (part[r] if len(part.get_shape()) == 1 else part[r, c]).clone()

    def load(self, name: str) -> torch.Tensor:
        """The whole (dequantized) tensor `name`."""
        return self.load_part(name, None, None)

    def load_part(
        self, name: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None
    ) -> torch.Tensor:
        """Rows [r0, r1) and columns [c0, c1) (dims 0 and 1; None = all) of the (dequantized) tensor
        `name`, reading only those bytes (MXFP4: the 32-value blocks that cover the columns)."""
        from ..model.mxfp4 import dequantize_mxfp4

        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        if name in self.weight_map:
            with self._open(name) as f:
                part = f.get_slice(name)
                t = part[r] if len(part.get_shape()) == 1 else part[r, c]
                return t.clone()  # own memory: do not keep the file mapping alive
        # MXFP4: blocks [E, out, in/32, 16], scales [E, out, in/32]; native columns are `in`
        b = slice(cols[0] // 32, -(-cols[1] // 32)) if cols else slice(None)
        with self._open(f"{name}_blocks") as f:
            blocks = f.get_slice(f"{name}_blocks")[r, :, b]
        with self._open(f"{name}_scales") as f:
            scales = f.get_slice(f"{name}_scales")[r, :, b]
        value = dequantize_mxfp4(blocks, scales, torch.float32)  # [E', in', out]
        return value[:, cols[0] - b.start * 32 : cols[1] - b.start * 32] if cols else value


@torch.no_grad()
def load_hf_into(model: torch.nn.Module, folder: HFFolder, args: ModelArgs) -> None:
    """Copy a Hugging Face folder's weights into a (possibly sharded) model: each process reads only
    the rows and columns of each tensor it holds, and casts them to the parameter's dtype. A model
    with MXFP4-resident experts (`w_gate_up_blocks` ...) gets the folder's blocks and scales as
    stored, or a bf16/fp32 folder's experts quantized to MXFP4; a pipeline stage, its own layers."""
    from ..model.lora import is_adapter
    from ..runtime.compat import CHECKPOINT_WRAPPED_MODULE

    params = {n.replace(f"{CHECKPOINT_WRAPPED_MODULE}.", ""): p for n, p in model.named_parameters()}
    quantized, filled = 0, set()
    for native, hf, shape in name_pairs(args):
        got = folder.shape(hf)
        if got != shape:
            raise ConvertError(
                f"tensor {hf!r} has shape {list(got) if got else None}, expected {list(shape)}"
            )
        if f"{native}_blocks" in params:
            quantized += _load_mxfp4_into(params[f"{native}_blocks"], params[f"{native}_scales"], folder, hf)
            filled |= {f"{native}_blocks", f"{native}_scales"}
        elif native in params:  # (absent: a layer of another pipeline stage)
            _copy_held(params[native], lambda rows, cols, hf=hf: folder.load_part(hf, rows, cols))
            filled.add(native)
    unfilled = [n for n in params if n not in filled and not is_adapter(n)]
    if unfilled:  # a parameter no Hugging Face tensor maps to would keep uninitialized memory
        raise RuntimeError(f"load_hf_into: no Hugging Face tensor for the parameters {unfilled[:3]}")
    if quantized:
        from ..runtime.log import logger

        logger.info(
            f"quantized {quantized} expert tensors of {str(folder.folder)!r} to MXFP4 (the folder holds them in full precision)"
        )


def _copy_held(p: torch.Tensor, read) -> None:
    """Copy into `p` (plain or DTensor) the part of the global tensor it holds; read(rows, cols)
    returns rows [r0, r1) and columns [c0, c1) of dims 0 and 1 (None = all)."""
    from ..model.init import global_indices

    held = local(p)
    if held.numel() == 0:
        return
    idx = global_indices(p)  # dim -> global indices held here (contiguous chunks)
    span = {d: (int(i.min()), int(i.max()) + 1) for d, i in idx.items() if d < 2}  # what read() cuts
    value = read(span.get(0), span.get(1))
    for d, i in idx.items():
        if len(i) != value.shape[d]:  # not one contiguous chunk, or a dim read whole: pick the indices
            value = value.index_select(d, (i - span[d][0] if d in span else i).cpu())
    held.copy_(value.to(held.dtype))


def _load_mxfp4_into(blocks: torch.Tensor, scales: torch.Tensor, folder: HFFolder, hf: str) -> int:
    """The MXFP4 expert `hf` into its blocks and scales parameters ([E, out, in/32, 16] and
    [E, out, in/32], split on dims 0 and 1): read as stored, or quantized from a full-precision
    folder (returns 1 then)."""
    from ..model.mxfp4 import quantize_mxfp4

    if f"{hf}_blocks" in folder.weight_map:
        for p, name in ((blocks, f"{hf}_blocks"), (scales, f"{hf}_scales")):
            _copy_held(p, lambda rows, cols, name=name: folder.load_raw(name, rows, cols))
        return 0

    done: dict = {}  # blocks and scales come from one quantization of the rows held

    def quantized(rows, cols, part):
        if (rows, cols) not in done:
            w = folder.load_part(hf, rows, None)  # [E', in, out]
            done.clear()
            done[rows, cols] = quantize_mxfp4(w[:, :, cols[0] : cols[1]] if cols else w)
        return done[rows, cols][part]

    _copy_held(blocks, lambda rows, cols: quantized(rows, cols, 0))
    _copy_held(scales, lambda rows, cols: quantized(rows, cols, 1))
    return 1


class _LazySavePlanner(dcp.DefaultSavePlanner):
    """Plans from meta tensors; each tensor is read (and dequantized) only when DCP writes it."""

    def __init__(self, loaders: dict):
        super().__init__()
        self.loaders = loaders

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if fqn in self.loaders:
            return self.loaders[fqn]()
        return super().resolve_data(write_item)


def hf_to_dcp(hf_dir: str, output: str, overwrite: bool = False, progress: bool = True) -> Path:
    """Import a Hugging Face gpt-oss folder as a model-only DCP checkpoint (fp32) at `output`."""
    src = HFFolder(hf_dir)
    args = args_from_hf_config(src.config)
    state, loaders = {}, {}
    pairs = list(name_pairs(args))
    total = sum(4 * torch.Size(shape).numel() for _, _, shape in pairs)
    shown = Progress(f"import {Path(hf_dir).name}", len(pairs), total) if progress else None

    def load(hf: str) -> torch.Tensor:
        t = src.load(hf).to(torch.float32).contiguous()
        if shown:
            shown.update(t.numel() * 4)
        return t

    for native, hf, shape in pairs:
        got = src.shape(hf)
        if got is None:
            raise ConvertError(f"tensor {hf!r} is missing from {hf_dir!r} (expected shape {list(shape)})")
        if got != shape:
            raise ConvertError(f"tensor {hf!r} has shape {list(got)}, expected {list(shape)}")
        state[native] = torch.empty(shape, dtype=torch.float32, device="meta")
        loaders[f"model.{native}"] = lambda hf=hf: load(hf)
    out = Path(output)
    with output_folder(out, overwrite) as tmp:
        # One file per tensor: DCP's writer keeps every tensor of a file alive until the file is done.
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False)
        dcp.save({"model": state}, storage_writer=writer, planner=_LazySavePlanner(loaders), no_dist=True)
        (tmp / MODEL_ARGS_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        (tmp / "hf_config.json").write_text(json.dumps(src.config, indent=2) + "\n")
    return out


def check_hf_matches(hf_dir: str, model_args: ModelArgs) -> None:
    """The Hugging Face folder's config describes a model with these args (reads config.json only;
    a mismatch names the first differing field)."""
    hf_args = args_from_hf_config(HFFolder(hf_dir).config)
    ignored = (
        "max_seq_len",
        "init_std",
        "load_balance_bias",
        *TRAINING_ONLY_FIELDS,
    )  # not the weights' shape
    for k, theirs in hf_args.to_dict().items():
        if k not in ignored and getattr(model_args, k) != theirs:
            raise ConvertError(
                f"Hugging Face folder {hf_dir!r} has model {k} = {theirs!r} but the config gives "
                f"{getattr(model_args, k)!r}; use the matching model.flavor"
            )


def _source_record(hf_dir: str) -> dict:
    """What identifies a Hugging Face folder's weights: its path and its files' names, sizes, mtimes."""
    folder = Path(hf_dir).resolve()
    files = sorted(folder.glob("*.safetensors"))
    return {"path": str(folder), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def import_for_training(hf_dir: str, out: Path, model_args: ModelArgs) -> Path:
    """A Hugging Face folder as a model-only DCP checkpoint at `out` for a run with these model args,
    converted once: an existing complete import is reused only if it came from the same files."""
    check_hf_matches(hf_dir, model_args)
    source, record = _source_record(hf_dir), out / "hf_source.json"
    if not (out / ".metadata").is_file() or not record.is_file() or json.loads(record.read_text()) != source:
        hf_to_dcp(hf_dir, str(out), overwrite=True)
        (out / MODEL_ARGS_FILE).write_text(json.dumps(model_args.to_dict(), indent=2) + "\n")
        record.write_text(json.dumps(source, indent=1) + "\n")
    return out
