"""Checkpoints as storage: the on-disk layout and its errors (files.py), integrity records
(integrity.py), the manager that saves and loads the state dicts it is handed (manager.py). What a
checkpoint holds is train/state.py's; what a run resumes from, train/resume.py's.

Only the small, dependency-free part is re-exported here, so that converters can use it without
importing the manager (and the manager never imports the converters).
"""

from .files import CheckpointError, complete_steps, read_model_args, resolve_step_dir

__all__ = ["CheckpointError", "complete_steps", "read_model_args", "resolve_step_dir"]
