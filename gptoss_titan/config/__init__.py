"""The run's configuration: JobConfig (job_config.py), loading and --help (loading.py), every check
(validation.py); `python -m gptoss_titan.config` checks a config file (__main__.py)."""

from .job_config import (
    ActivationCheckpoint,
    Checkpoint,
    Comm,
    Compile,
    ConfigError,
    Data,
    Job,
    JobConfig,
    LRScheduler,
    Metrics,
    Model,
    Optimizer,
    Parallelism,
    Profiling,
    Training,
    Validation,
)
from .loading import help_text, load_toml, parse_args
from .validation import batch_layout, check_degrees, model_args, model_name, pipeline_layout, validate

__all__ = [
    "ActivationCheckpoint",
    "Checkpoint",
    "Comm",
    "Compile",
    "ConfigError",
    "Data",
    "Job",
    "JobConfig",
    "LRScheduler",
    "Metrics",
    "Model",
    "Optimizer",
    "Parallelism",
    "Profiling",
    "Training",
    "Validation",
    "batch_layout",
    "check_degrees",
    "pipeline_layout",
    "help_text",
    "load_toml",
    "model_args",
    "model_name",
    "parse_args",
    "validate",
]
