"""`python -m gptoss_titan.train`: parse the config, then a dry run, a seed checkpoint or training,
ending through runtime/cli.run_cli (exit 0, 2 bad input, 3 stopped itself, 128 + N a signal)."""

from __future__ import annotations

import dataclasses
import sys

from ..checkpoint.manager import finish_discards
from ..config import ConfigError, JobConfig, help_text, parse_args
from ..parallel.dry_run import dry_run
from ..runtime.cli import exit_now, run_cli
from ..runtime.distributed import apply_process_settings, lost_peer, shutdown, world_size
from ..runtime.log import logger
from .rl_trainer import RLTrainer
from .trainer import Trainer


def seed_checkpoint_config(cfg: JobConfig) -> JobConfig:
    """One process, no parallel passes, checkpointing on; the values do not depend on sharding."""
    p = dataclasses.replace(
        cfg.parallelism,
        data_parallel_replicate_degree=1,
        data_parallel_shard_degree=-1,
        expert_parallel_degree=1,
        context_parallel_degree=1,
        tensor_parallel_degree=1,
        expert_tensor_parallel_degree=-1,
        pipeline_parallel_degree=1,
        pipeline_parallel_stages_per_rank=1,
        pipeline_parallel_schedule="1F1B",
        pipeline_parallel_layers=[],
    )
    c = dataclasses.replace(cfg.checkpoint, enable=True, async_mode="disabled", initial_load_path="")
    return dataclasses.replace(cfg, parallelism=p, checkpoint=c)


def main(argv: list[str] | None = None, trainer_cls: type[Trainer] = Trainer) -> int:
    """The command line; exit 0, 2 (a user error, one line) or 3 (the run stopped itself, one line).
    trainer_cls: tests run their fault-injecting subclasses through the same entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    # every rank reaches the error path alike (the checks agree across ranks): leave at once
    code = run_cli(lambda: _run(argv, trainer_cls), on_error=lambda: shutdown(barrier=False))
    if code == 0:
        shutdown()
    finish_discards()  # old checkpoints deleted in the background (checkpoint/manager.py)
    return code


def _run(argv: list[str], trainer_cls: type[Trainer]) -> None:
    cfg = parse_args(argv)
    if cfg.comm.mode == "fake_backend":
        dry_run(cfg, world_size())
        return
    seed_only = cfg.checkpoint.create_seed_checkpoint
    if seed_only:
        if world_size() != 1:
            raise ConfigError("checkpoint.create_seed_checkpoint runs on one process; use NGPU=1")
        cfg = seed_checkpoint_config(cfg)
    settings = apply_process_settings(cfg)
    if cfg.rl.enable and trainer_cls is Trainer:  # reinforcement learning: the same loop, another step
        trainer_cls = RLTrainer
    trainer = trainer_cls(cfg)
    for line in settings:
        logger.info(f"process: {line}")
    try:
        if seed_only:
            trainer.save_seed_checkpoint()
        else:
            trainer.train()
    except RuntimeError as e:  # another rank died: one line here, the launcher names that rank
        lost = lost_peer(e)
        if lost is None:
            raise
        raise lost from None


if __name__ == "__main__":
    exit_now(main())
