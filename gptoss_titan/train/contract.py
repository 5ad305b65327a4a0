"""The resume contract: what a resumed run may change from the checkpoint's config.

Every config field falls in one class (docs/checkpoints.md has the table):
- must match: the model's shape (checked from model_args.json), training.seq_len and
  data.tokenizer (the data position counts sequences of those tokens), optimizer.implementation
  (the saved optimizer state follows it), lora.rank, targets and layers (the saved adapters;
  checkpoints from before [lora] existed count as rank 0), rl.enable (a supervised run's
  checkpoint starts RL through checkpoint.initial_load_path) - refused in one line, exit 2, before the run writes
  anything;
- may change with a warning: the global batch (through NGPU, local_batch_size or
  global_batch_size), the data (dataset, dataset_path, sources, stream; rl.prompts and
  rl.prompts_per_step) and training.seed - the
  data position (a count of samples) is kept and mapped onto the new batch or data, and the sample
  order keeps the checkpoint's seed;
- may change and takes effect, logged one line each ("resume: optimizer.lr 0.001 -> 0.03 from
  step 5"): everything else - the optimizer's settings and the LR schedule are rebuilt from the
  new config at the resumed step (train/state.py), training.steps extends or ends the run.
Fields that only say where things go or how to resume (job.*, checkpoint.*, comm.*, profiling.*)
are not compared.
A training.steps at or below the checkpoint's step says so: nothing to do (equal) or an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.files import CONFIG_FILE, STEP_DIR, CheckpointError
from ..config import JobConfig

MUST_MATCH = {
    "training.seq_len": "the data position counts sequences of this length",
    "data.tokenizer": "the data position counts tokens of this tokenizer",
    "optimizer.implementation": "the optimizer's saved state and flags follow it (fused vs foreach)",
    "lora.rank": "the saved adapters have this rank (0: a full fine-tuning run)",
    "lora.targets": "the saved adapters sit on these targets",
    "lora.layers": "the saved adapters sit on these layers",
    "rl.enable": "a supervised run's data position and steps are not an RL run's; start RL from its checkpoint "
    "with checkpoint.initial_load_path in a new run folder",
}
WARN = {
    "training.local_batch_size": "the data position (samples consumed) is kept: the new batches follow it",
    "training.global_batch_size": "the data position (samples consumed) is kept: the new batches follow it",
    "data.dataset": "the data position is kept and mapped onto the new data (same sample count and order)",
    "data.dataset_path": "the data position is kept and mapped onto the new data (same sample count and order)",
    "data.sources": "the data position is kept and mapped onto the new mixture",
    "data.stream": "the stream restarts unless the layout matches",
    "training.seed": "the sample order keeps the checkpoint's seed (packing chat data takes the new one)",
    "rl.prompts": "the prompt position (prompts consumed) is kept and mapped onto the new prompts",
    "rl.prompts_per_step": "the prompt position (prompts consumed) is kept: the next steps take the new count",
}
NOT_COMPARED = ("job.", "comm.", "checkpoint.", "profiling.", "model.args")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_lines(path: Path, cfg: JobConfig, global_batch: int, saved_global_batch: int | None) -> list[str]:
    """The lines to log for resuming from the step folder `path` with `cfg` (warnings first);
    CheckpointError for a field that must match or a training.steps below the checkpoint's."""
    m = STEP_DIR.match(path.name)
    step = int(m.group(1)) if m else None
    saved_file = path / CONFIG_FILE
    if not saved_file.is_file():  # checkpoints from converters carry no run config
        _check_steps(path, step, cfg)
        return []
    saved = _flat(json.loads(saved_file.read_text()))
    now = _flat(cfg.to_dict())
    lines, warnings = [], []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b or key.startswith(NOT_COMPARED):
            continue
        if a is None and key.startswith("rl.") and not now["rl.enable"]:
            continue  # a checkpoint from before [rl] existed: a supervised run, as this one
        absent = a is None and key.startswith("lora.") and not now["lora.rank"]  # from before [lora]: rank 0
        if key in MUST_MATCH and not absent:
            raise CheckpointError(
                f"{key} = {b!r} but the checkpoint {str(path)!r} was trained with {a!r} ({MUST_MATCH[key]}); "
                f"use {key}={a!r} to resume, or start a new run folder"
            )
        if key in WARN:
            warnings.append(f"warning: resume: {key} {a!r} -> {b!r}: {WARN[key]}")
        else:
            lines.append(f"resume: {key} {a!r} -> {b!r} from step {step}")
    _check_steps(path, step, cfg)  # after the must-match fields: they say more about a wrong folder
    if saved_global_batch is not None and saved_global_batch != global_batch:
        warnings.append(
            f"warning: resume: the global batch {saved_global_batch} -> {global_batch} sequences: "
            "the data position (samples consumed) is kept"
        )
    if step is not None and cfg.training.steps == step:
        lines.append(
            f"resume: the run is complete at step {step} (training.steps = {step}); raise it to train on"
        )
    return warnings + lines


def _check_steps(path: Path, step: int | None, cfg: JobConfig) -> None:
    if step is not None and cfg.training.steps < step:
        raise CheckpointError(
            f"training.steps = {cfg.training.steps} is below the checkpoint's step {step} ({str(path)!r}); "
            f"set training.steps above {step} to train on, or resume from an earlier step"
        )
