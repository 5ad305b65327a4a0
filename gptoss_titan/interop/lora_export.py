"""A LoRA run's checkpoint out (a PEFT adapter folder, or the adapters merged into the recorded
base, through export.py) and a PEFT adapter folder in (`lora.initial_adapter`, the sampler)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from ..checkpoint.files import CONFIG_FILE, read_model_args
from ..checkpoint.lora_base import read_base_record
from ..model import ModelArgs
from ..model.lora import is_adapter
from .files import ConvertError, output_folder
from .peft import adapter_config, from_peft, lora_from_config, to_peft

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _lora_section(step: Path) -> dict:
    if read_base_record(step) is None:
        raise ConvertError(
            f"--lora: checkpoint {str(step)!r} holds no LoRA adapters (not a LoRA run's checkpoint); leave --lora out"
        )
    return json.loads((step / CONFIG_FILE).read_text())["lora"]


def read_adapters(step: Path) -> tuple[dict[str, torch.Tensor], float]:
    """(the adapters of a LoRA checkpoint by model state name, their scale alpha / rank)."""
    lora = _lora_section(step)
    meta = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    holder = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.items()
        if k.startswith("model.") and is_adapter(k)
    }
    dcp.load(holder, storage_reader=FileSystemReader(str(step)), no_dist=True)
    return {k[len("model.") :]: v for k, v in holder.items()}, lora["alpha"] / lora["rank"]


def export_adapter(step: Path, output: Path, overwrite: bool) -> Path:
    """adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads
    onto transformers' gpt-oss of the base."""
    from safetensors.torch import save_file

    lora = _lora_section(step)
    adapters, _ = read_adapters(step)
    args = read_model_args(step)
    record = read_base_record(step)
    with output_folder(output, overwrite) as tmp:
        save_file(
            to_peft({k: v.float() for k, v in adapters.items()}), str(tmp / ADAPTER_WEIGHTS), {"format": "pt"}
        )
        config = adapter_config(
            adapters, lora["rank"], lora["alpha"], args.n_layers, record["path"] if record else None
        )
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return output


def read_peft_adapter(folder: str, args: ModelArgs) -> tuple[dict, dict[str, torch.Tensor]]:
    """(rank/alpha/dropout, our adapter tensors) of a PEFT adapter folder for this model's shape;
    a ConvertError (one line) for a folder that is not one or does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ConvertError(
            f"{folder!r} is not a PEFT adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    try:
        lora = lora_from_config(json.loads((path / ADAPTER_CONFIG).read_text()), args)
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, KeyError, ValueError) as e:
        raise ConvertError(f"{folder!r}: unreadable adapter ({type(e).__name__}: {e})") from None
    ours = from_peft(tensors, args)
    check_shapes(ours, args, lora["rank"], folder)
    return lora, ours


def check_shapes(adapters: dict[str, torch.Tensor], args: ModelArgs, rank: int, folder: str) -> None:
    """Each adapter has the shape this model's adapter at its place has (ConvertError if not)."""
    from ..model import Transformer
    from ..model.lora import LoRASpec, add_lora, sites_of

    with torch.device("meta"):
        model = Transformer(args)
    try:
        add_lora(model, LoRASpec(rank, 1.0, 0.0, (), sites=sites_of(adapters)))
    except AttributeError as e:
        raise ConvertError(f"{folder!r}: an adapter sits where this model has nothing ({e})") from None
    want = {n: tuple(p.shape) for n, p in model.named_parameters() if is_adapter(n)}
    for name, t in adapters.items():
        if want.get(name) != tuple(t.shape):
            raise ConvertError(
                f"{folder!r}: adapter {name} has shape {list(t.shape)}, but this model's (rank {rank}) is "
                f"{list(want.get(name, ()))}; the adapter was made for another model or rank"
            )
