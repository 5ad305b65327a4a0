"""Checkpoints: the on-disk layout and its errors (files.py), the manager that saves and loads
(manager.py), and the choice of what a run resumes from (resume.py).

Only the small, dependency-free part is re-exported here, so that converters can use it without
importing the manager (and the manager never imports the converters).
"""

from .files import CheckpointError, complete_steps, read_model_args, resolve_step_dir

__all__ = ["CheckpointError", "complete_steps", "read_model_args", "resolve_step_dir"]
