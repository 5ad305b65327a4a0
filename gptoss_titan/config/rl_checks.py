"""The [rl] section's checks (reinforcement learning, docs/rl.md): ranges, choices and what an RL
run composes with. The reward formula is imported when the run starts (rl/rewards.py), and the
data-parallel split of rl.prompts_per_step is checked against the world size then."""

from __future__ import annotations

import math

from .job_config import ConfigError, JobConfig
from .validation import _choice

LOSSES = ("grpo", "gspo")
ADVANTAGE_SCALES = ("group", "none")


def validate_rl(cfg: JobConfig) -> None:
    rl = cfg.rl
    if not rl.enable:
        return
    _choice("rl.loss", rl.loss, LOSSES)
    _choice("rl.advantage_scale", rl.advantage_scale, ADVANTAGE_SCALES)
    if rl.group_size < 2:
        raise ConfigError(
            f"rl.group_size = {rl.group_size}: advantages compare completions of a prompt; use >= 2"
        )
    if min(rl.prompts_per_step, rl.updates_per_batch, rl.generation_batch) < 1:
        raise ConfigError(
            f"rl.prompts_per_step = {rl.prompts_per_step}, rl.updates_per_batch = {rl.updates_per_batch} and "
            f"rl.generation_batch = {rl.generation_batch} must be >= 1"
        )
    if not rl.temperature > 0 or not 0 < rl.top_p <= 1:
        raise ConfigError(
            f"rl.temperature = {rl.temperature} must be > 0 (log-probs need a distribution) and "
            f"rl.top_p = {rl.top_p} in (0, 1]"
        )
    if not 0 <= rl.clip_low < 1 or rl.clip_high < 0 or rl.kl_coef < 0:
        raise ConfigError(
            f"rl.clip_low = {rl.clip_low} must be in [0, 1), rl.clip_high = {rl.clip_high} and "
            f"rl.kl_coef = {rl.kl_coef} >= 0"
        )
    seq = cfg.training.seq_len  # in RL the longest prompt + completion (the KV cache and the updates)
    if not 1 <= rl.max_new_tokens < seq:
        raise ConfigError(
            f"rl.max_new_tokens = {rl.max_new_tokens} must be in [1, {seq - 1}]: a prompt and its completion "
            f"fit in training.seq_len = {seq}; raise training.seq_len or lower rl.max_new_tokens"
        )
    p = cfg.parallelism
    others = {
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "context_parallel_degree": p.context_parallel_degree,
    }
    for name, degree in others.items():
        if degree != 1:
            raise ConfigError(
                f"parallelism.{name} = {degree} with rl.enable: RL runs on data, tensor and expert "
                "parallelism (FSDP, HSDP, TP, EP) for now; set it to 1"
            )
    if not rl.generation_batch >= rl.group_size:
        raise ConfigError(
            f"rl.generation_batch = {rl.generation_batch} is below rl.group_size = {rl.group_size}: a prompt's "
            "completions decode together; raise it"
        )
    if not math.isfinite(rl.reward_default):
        raise ConfigError(f"rl.reward_default = {rl.reward_default} must be a finite number")
    if cfg.training.loss_spike_sigma > 0:
        raise ConfigError(
            f"training.loss_spike_sigma = {cfg.training.loss_spike_sigma} with rl.enable: the policy loss has no "
            "spikes to detect (its sign swings with the advantages); set it to 0"
        )
    if cfg.lora.rank and cfg.lora.dropout > 0:
        raise ConfigError(
            f"lora.dropout = {cfg.lora.dropout} with rl.enable: dropout would make the recorded and the trained "
            "log-probs differ; set lora.dropout = 0"
        )
    if cfg.training.mxfp4_qat:
        raise ConfigError("training.mxfp4_qat with rl.enable is not supported; turn one off")
