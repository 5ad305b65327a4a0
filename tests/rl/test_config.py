"""The [rl] section's checks (config/rl_checks.py): each bad value is one line naming it and the fix."""

import pytest

from gptoss_titan.config import ConfigError, parse_args

RL = ["--config", "train_configs/grpo_debug.toml"]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--rl.loss=ppo"], "rl.loss = 'ppo' is not one of grpo, gspo"),
        (["--rl.group_size=1"], "rl.group_size = 1"),
        (["--rl.temperature=0"], "rl.temperature = 0.0 must be > 0"),
        (["--rl.clip_low=1.5"], "rl.clip_low = 1.5 must be in [0, 1)"),
        (
            ["--rl.max_new_tokens=5000"],
            "rl.max_new_tokens = 5000 must be in [1, 127]: a prompt and its completion fit in training.seq_len = 128",
        ),
        (["--rl.generation_batch=4"], "rl.generation_batch = 4 is below rl.group_size = 8"),
        (["--rl.reward_default=nan"], "rl.reward_default = nan must be a finite number"),
        (["--training.loss_spike_sigma=3"], "training.loss_spike_sigma = 3.0 with rl.enable"),
        (["--lora.rank=4", "--lora.dropout=0.1"], "lora.dropout = 0.1 with rl.enable"),
        (
            ["--parallelism.pipeline_parallel_degree=2", "--training.document_mask=false"],
            "parallelism.pipeline_parallel_degree = 2 with rl.enable",
        ),
        (["--rl.advantage_scale=batch"], "rl.advantage_scale = 'batch' is not one of group, none"),
    ],
)
def test_bad_rl_section(argv, match):
    with pytest.raises(
        ConfigError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ) as e:
        parse_args(RL + argv)
    assert "\n" not in str(e.value)


def test_the_debug_config_and_rl_off_are_accepted():
    assert parse_args(RL).rl.enable
    assert not parse_args(RL + ["--rl.enable=false", "--rl.group_size=1"]).rl.enable  # unchecked when off
