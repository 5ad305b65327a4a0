"""What a run starts from: its own latest (or chosen) step, another run's checkpoint, a Hugging
Face folder, or nothing. A free function of the config and the folder; it reads metadata only
and raises CheckpointError (one line) for a bad request, before the run writes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..checkpoint.files import (
    CheckpointError,
    check_model_args,
    checkpoint_keys,
    complete_steps,
    step_dir,
    step_folders,
)
from ..checkpoint.integrity import verify as verify_integrity
from ..config import Checkpoint as CkptConfig
from ..interop.convert import ConvertError, check_hf_matches, import_for_training
from ..model import ModelArgs


@dataclass(frozen=True)
class Resume:
    """Load `path`: a DCP step folder (format "dcp") or a Hugging Face folder to import ("hf").
    warnings: damaged newer checkpoints that were passed over, one line each."""

    path: Path
    model_only: bool
    format: str = "dcp"
    warnings: tuple[str, ...] = ()


def choose_resume(
    cfg: CkptConfig,
    folder: Path,
    model_args: ModelArgs,
    verify: Callable[[Path], str | None] = verify_integrity,
) -> Resume | None:
    """The run's own checkpoints win (the newest intact one, or checkpoint.load_step); else
    checkpoint.initial_load_path (a step folder, a run folder, or an HF folder); else None.

    verify(path) -> the damage of a step folder or None (checksums, split over the ranks). A
    damaged newest step is passed over with a warning; a damaged step asked for by load_step or
    initial_load_path is a CheckpointError, as is a run whose every checkpoint is damaged."""
    if not cfg.enable and not cfg.initial_load_path:
        return None
    steps = step_folders(folder) if cfg.enable else []
    if cfg.enable and cfg.load_step >= 0:
        if cfg.load_step not in steps:
            have = ", ".join(map(str, complete_steps(folder))) or "none"
            raise CheckpointError(
                f"checkpoint.load_step = {cfg.load_step} not found in {str(folder)!r} "
                f"(complete steps: {have}); use one of them or -1 for the latest"
            )
        path = step_dir(folder, cfg.load_step)
        damage = verify(path)
        if damage:
            raise CheckpointError(
                f"checkpoint.load_step = {cfg.load_step}: {str(path)!r} is damaged ({damage}); "
                "choose another step, or -1 for the newest intact one"
            )
        return _own(path, model_args)
    passed_over = []
    for step in reversed(steps):
        path = step_dir(folder, step)
        damage = verify(path)
        if damage is None:
            own = _own(path, model_args)
            return Resume(own.path, own.model_only, warnings=tuple(passed_over))
        passed_over.append(f"checkpoint {str(path)!r} is damaged ({damage}); passing over it")
    if passed_over:
        raise CheckpointError(
            f"every checkpoint in {str(folder)!r} is damaged (newest: {passed_over[0]}); "
            "delete them to start over, or set checkpoint.initial_load_path"
        )
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
    damage = verify(path)
    if damage:
        raise CheckpointError(
            f"checkpoint.initial_load_path {str(path)!r} is damaged ({damage}); pass another"
        )
    checkpoint_keys(path)
    return Resume(path, model_only=cfg.initial_load_model_only)


def _own(path: Path, model_args: ModelArgs) -> Resume:
    check_model_args(path, model_args)
    keys = checkpoint_keys(path)
    return Resume(
        path, model_only="optimizer" not in keys
    )  # a seed or model-only checkpoint: the model alone


def import_hf(resume: Resume, out: Path, model_args: ModelArgs, rank: int, world_size: int) -> Resume:
    """Rank 0 converts the Hugging Face folder of `resume` once into `out`; every rank then loads it
    like a DCP checkpoint. The others wait on a gloo group with no practical timeout (120b converts
    for many minutes) and learn rank 0's outcome, so an error is one line on every rank."""
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            import_for_training(str(resume.path), out, model_args)
        except ConvertError as e:
            error = f"checkpoint.initial_load_path: {e}"
        except OSError as e:
            error = f"checkpoint.initial_load_path: importing into {str(out)!r} failed ({e})"
    if world_size > 1:
        group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=group)
        error = outcome[0]
        dist.destroy_process_group(group)
    if error is not None:
        raise CheckpointError(error)
    return Resume(out, model_only=True)
