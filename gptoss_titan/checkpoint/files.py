"""The checkpoint layout on disk and its one-line errors.

`<dump_folder>/<checkpoint.folder>/step-<N>/` holds the DCP files (`.metadata` + shards) and
`config.json` / `model_args.json`. A step counts as complete once it was renamed from
`step-<N>.tmp` and holds `.metadata` (the manager renames only after every rank wrote).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from ..model import ModelArgs
from ..model.args import TRAINING_ONLY_FIELDS
from ..runtime.errors import UserError

STEP_DIR = re.compile(r"step-(\d+)$")
MODEL_ARGS_FILE = "model_args.json"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"  # the run's layout at the save: world size, global batch, accumulation steps


def read_run_file(path: Path) -> dict:
    """A step folder's run.json ({} for checkpoints saved before it existed)."""
    f = path / RUN_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


class CheckpointError(UserError):
    """A user-caused checkpoint problem; entry points print it as one line and exit 2."""


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


def step_folders(folder: Path) -> list[int]:
    """Steps with a step-<N> folder (renamed: its save finished, intact or not), ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def complete_steps(folder: Path) -> list[int]:
    """Steps with a finished checkpoint in folder (renamed from .tmp, DCP metadata present), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_step_dir(path: str) -> Path:
    """A step-<N> folder, a checkpoint folder of them, or a run folder (takes the latest complete step)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass a step-<N> folder or a run folder")
    if (p / ".metadata").is_file():
        return p
    if STEP_DIR.match(p.name):  # a finished save's folder without its metadata
        raise CheckpointError(f"checkpoint {path!r} is damaged (its .metadata is missing); pass another step")
    for folder in (p, p / "checkpoint"):
        steps = complete_steps(folder)
        if steps:
            return step_dir(folder, steps[-1])
    raise CheckpointError(
        f"no complete checkpoint under {path!r} (no step-<N>/.metadata); pass a step folder"
    )


def read_model_args(path: Path) -> ModelArgs:
    f = path / MODEL_ARGS_FILE
    if not f.is_file():
        raise CheckpointError(f"{str(path)!r} has no {MODEL_ARGS_FILE}; it is not a gptoss-titan checkpoint")
    try:
        return ModelArgs.from_dict(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r} has an unreadable {MODEL_ARGS_FILE} ({e})") from None


def check_model_args(path: Path, args: ModelArgs) -> None:
    """The checkpoint at path holds a model with these args (else a one-line error naming the field)."""
    saved_file = path / MODEL_ARGS_FILE
    if not saved_file.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no {MODEL_ARGS_FILE}; it is not a gptoss-titan checkpoint"
        )
    try:
        saved = json.loads(saved_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable {MODEL_ARGS_FILE} ({e})") from None
    for k, v in args.to_dict().items():
        if k in saved and saved[k] != v and k not in TRAINING_ONLY_FIELDS:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has model {k} = {saved[k]!r} but the config gives {v!r}; "
                "use the checkpoint's model.flavor or another checkpoint"
            )


def checkpoint_fqns(path: Path) -> set[str]:
    """Every saved state name in a DCP checkpoint ("model.layers.0.attention.wq.weight", ...)."""
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def checkpoint_keys(path: Path) -> set[str]:
    """Top-level state keys in a DCP checkpoint (raises CheckpointError if it cannot be read)."""
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # truncated / corrupt metadata
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}); "
            "delete it or choose another with --checkpoint.load_step"
        ) from None
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}
