"""What a run starts from: its own latest (or chosen) step, another run's checkpoint, a Hugging
Face folder, or nothing. A free function of the config and the folder; it reads metadata only
and raises CheckpointError (one line) for a bad request, before the run writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Checkpoint as CkptConfig
from ..convert import ConvertError, check_hf_matches
from ..model import ModelArgs
from .files import CheckpointError, check_model_args, checkpoint_keys, complete_steps, step_dir


@dataclass(frozen=True)
class Resume:
    """Load `path`: a DCP step folder (format "dcp") or a Hugging Face folder to import ("hf")."""

    path: Path
    model_only: bool
    format: str = "dcp"


def choose_resume(cfg: CkptConfig, folder: Path, model_args: ModelArgs) -> Resume | None:
    """The run's own checkpoints win (latest complete, or checkpoint.load_step); else
    checkpoint.initial_load_path (a step folder, a run folder, or an HF folder); else None."""
    if not cfg.enable and not cfg.initial_load_path:
        return None
    steps = complete_steps(folder) if cfg.enable else []
    if cfg.enable and cfg.load_step >= 0:
        if cfg.load_step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(
                f"checkpoint.load_step = {cfg.load_step} not found in {str(folder)!r} "
                f"(complete steps: {have}); use one of them or -1 for the latest"
            )
        return _own(step_dir(folder, cfg.load_step), model_args)
    if steps:
        return _own(step_dir(folder, steps[-1]), model_args)
    if not cfg.initial_load_path:
        return None
    if cfg.initial_load_format == "hf":
        try:
            check_hf_matches(cfg.initial_load_path, model_args)
        except ConvertError as e:
            raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
        return Resume(Path(cfg.initial_load_path), model_only=True, format="hf")
    path = Path(cfg.initial_load_path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.initial_load_path {cfg.initial_load_path!r} does not exist; "
            "pass a step-<N> folder of a checkpoint"
        )
    if not (path / ".metadata").is_file():
        found = complete_steps(path)
        if not found:
            raise CheckpointError(
                f"checkpoint.initial_load_path {cfg.initial_load_path!r} holds no DCP "
                "checkpoint (.metadata missing); pass a step-<N> folder"
            )
        path = step_dir(path, found[-1])
    check_model_args(path, model_args)
    checkpoint_keys(path)
    return Resume(path, model_only=cfg.initial_load_model_only)


def _own(path: Path, model_args: ModelArgs) -> Resume:
    check_model_args(path, model_args)
    keys = checkpoint_keys(path)
    return Resume(
        path, model_only="optimizer" not in keys
    )  # a seed or model-only checkpoint: the model alone
