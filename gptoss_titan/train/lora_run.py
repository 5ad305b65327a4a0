"""A LoRA run's two sources: the frozen base and the run's own adapter checkpoints.

The base is `checkpoint.initial_load_path` (a DCP step folder, or a Hugging Face folder with
`initial_load_format = "hf"`), loaded at every start, model only. The run's checkpoints hold the
trainable state alone (adapters, their AdamW, schedule, data position, RNG) plus the base's
record (checkpoint/lora_base.py); a resume onto another base is refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint.files import CheckpointError, checkpoint_fqns
from ..checkpoint.lora_base import read_base_record
from ..config import Checkpoint as CkptConfig
from ..config import JobConfig, lora_spec
from ..config import LoRA as LoRAConfig
from ..model import ModelArgs
from ..model.lora import LoRASpec, is_adapter, sites_of, spec_sites
from ..runtime.log import logger
from .resume import Resume, choose_resume


def choose_lora_resumes(cfg: CkptConfig, folder: Path, model_args: ModelArgs) -> tuple[Resume, Resume | None]:
    """(the base, the run's own newest intact checkpoint or None)."""
    if not cfg.initial_load_path:
        raise CheckpointError(
            "lora.rank > 0 trains adapters on a frozen base: set checkpoint.initial_load_path to the base "
            "(a DCP step folder, or a Hugging Face folder with checkpoint.initial_load_format = 'hf')"
        )
    base = choose_resume(dataclasses.replace(cfg, enable=False), folder, model_args)
    assert base is not None
    if base.format == "dcp" and read_base_record(base.path) is not None:
        raise CheckpointError(
            f"checkpoint.initial_load_path {str(base.path)!r} is a LoRA run's checkpoint (adapters only), not a "
            "base; point it at that run's base, or export the merged model (--lora merge) and start from it"
        )
    own = choose_resume(dataclasses.replace(cfg, initial_load_path=""), folder, model_args)
    return base, own


def lora_layout(
    cfg: JobConfig, args: ModelArgs, own: Resume | None
) -> tuple[LoRASpec, dict[str, torch.Tensor]]:
    """(where the adapters sit, lora.initial_adapter's tensors or {}): a resumed run's sites are its
    checkpoint's, an imported adapter's are its own (lora.targets and lora.layers cannot say "q and
    v on every layer, experts on layers 7, 15, 23" as the cookbook's do), else the config's."""
    spec, adapters = lora_spec(cfg, args), {}
    if own is not None:
        names = [k[len("model.") :] for k in checkpoint_fqns(own.path) if k.startswith("model.")]
        sites = sites_of(n for n in names if is_adapter(n))
    elif cfg.lora.initial_adapter:
        adapters = initial_adapter(cfg.lora, args)
        sites = sites_of(adapters)
    else:
        return spec, adapters
    if sites != tuple(sorted(spec_sites(spec, args.n_layers))):
        logger.info(
            f"adapters at {len(sites)} places, as {'the checkpoint' if own else 'lora.initial_adapter'} has them"
        )
    return dataclasses.replace(spec, sites=sites), adapters


def initial_adapter(cfg: LoRAConfig, model_args: ModelArgs) -> dict[str, torch.Tensor]:
    """The adapters of lora.initial_adapter (a PEFT folder), of the run's rank (one line if not)."""
    from ..interop.files import ConvertError
    from ..interop.lora_export import read_peft_adapter

    try:
        settings, adapters = read_peft_adapter(cfg.initial_adapter, model_args)
    except ConvertError as e:
        raise CheckpointError(f"lora.initial_adapter: {e}") from None
    if settings["rank"] != cfg.rank:
        raise CheckpointError(
            f"lora.initial_adapter {cfg.initial_adapter!r} has rank {settings['rank']} but lora.rank = {cfg.rank}; "
            f"set lora.rank = {settings['rank']}"
        )
    if abs(settings["alpha"] - cfg.alpha) > 1e-9 * cfg.alpha:
        logger.info(
            f"warning: lora.initial_adapter was trained with alpha {settings['alpha']}; lora.alpha = {cfg.alpha}"
        )
    return adapters
