"""The trainer: read top to bottom, one step at a time. Entry point: `python -m gptoss_titan.train`.

Flow (docs/package_map.md): config -> process settings (main) -> devices and meshes -> data ->
what to resume from -> model on meta, expert kernel, parallel passes -> to_empty + init (skipped
when a checkpoint loads every weight) -> optimizer, LR schedule, TrainState -> run folder, load ->
loop (micro-batches, backward, clip, step; metrics, validation, samples, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.integrity import IntegrityWriter
from ..checkpoint.manager import CheckpointManager, CheckpointSaveError
from ..config import (
    ConfigError,
    JobConfig,
    batch_layout,
    check_micro_batches,
    help_text,
    model_args,
    model_name,
    parse_args,
)
from ..data import open_data
from ..model.loss import IGNORE_INDEX
from ..model.moe import update_expert_bias
from ..parallel import ParallelDims, sync_replicated_grads
from ..parallel.build import build_model
from ..parallel.context_parallel import CPLayout
from ..parallel.dry_run import dry_run, is_dry_run
from ..parallel.grad import clip_grad_norm_
from ..runtime.compat import set_pg_timeout
from ..runtime.distributed import apply_process_settings, init_distributed, local_device, shutdown, world_size
from ..runtime.errors import TrainingStopped, UserError
from ..runtime.runlock import claim_run_folder
from .batching import ModelInputs
from .evaluate import greedy_sample, validation_loss
from .guard import StepGuard
from .metrics import (
    MetricsLogger,
    StepResult,
    Timer,
    init_logging,
    logger,
    memory_stats,
    peak_tflops,
    reset_peak_memory,
    throughput_stats,
    warn_slow_cpu_bf16,
)
from .optim import build_lr_scheduler, build_optimizer
from .profiling import Profiler
from .resume import Resume, choose_resume, import_hf
from .state import TrainState
from .step import forward_backward, pipeline_forward_backward


class Trainer:
    def __init__(self, cfg: JobConfig, checkpoint_writer=None, checkpoint_stager=None):
        """checkpoint_writer / checkpoint_stager: see CheckpointManager (tests inject their own)."""
        self.cfg = cfg
        t = cfg.training
        self.model_args = model_args(cfg)
        # Checks that need the world size, before any process group exists.
        self.dims = ParallelDims.from_config(cfg.parallelism, world_size(), self.model_args.num_experts)
        self.rank, self.world_size = init_distributed(cfg.comm.init_timeout_seconds)
        self.device = local_device()
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 else None
        self.dp_rank, self.dp_degree = self.dims.dp_rank(self.rank), self.dims.dp_degree
        cp = self.dims.cp
        self.inputs = ModelInputs(
            t.document_mask,
            self.device,
            CPLayout.balanced(t.seq_len, cp, (self.model_args.sliding_window,)) if cp > 1 else None,
            self.meshes.cp.get_local_rank() if cp > 1 else 0,
            self.meshes.cp.get_group().group_name if cp > 1 else None,
        )
        init_logging(self.rank)
        if cfg.job.description:
            logger.info(f"job: {cfg.job.description}")
        # global batch = local x dp x accumulation steps
        self.global_bs, self.accum_steps = batch_layout(t, self.dp_degree)
        check_micro_batches(cfg.parallelism, self.accum_steps, t.local_batch_size * self.dp_degree)
        # Data (all checks happen before anything is written to the run folder).
        self.train_loader, self.val_tokens = open_data(
            cfg, self.model_args.vocab_size, self.dp_rank, self.dp_degree
        )

        # What to resume from (reads metadata only; errors here still leave nothing written).
        self.dump = Path(cfg.job.dump_folder)
        ckpt_folder = self.dump / cfg.checkpoint.folder
        resume = choose_resume(cfg.checkpoint, ckpt_folder, self.model_args)

        # Model: meta -> pipeline stages -> expert kernel -> parallel passes -> to_empty -> init
        # (same values at any layout; skipped when a checkpoint will overwrite every parameter).
        init = resume is None or "model" in cfg.checkpoint.exclude_from_loading
        model, self.pipeline = build_model(
            cfg, self.model_args, self.dims, self.meshes, self.device, init, self.accum_steps
        )
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.steps, cfg.lr_scheduler)
        self.guard = StepGuard(t, self.device)
        self.state = TrainState.build(model, self.optimizer, self.lr_scheduler, self.train_loader, self.guard)
        # Without FSDP, bf16 compute is autocast; with FSDP it is the MixedPrecisionPolicy.
        self.autocast_dtype = (
            torch.bfloat16 if t.mixed_precision_param == "bfloat16" and self.meshes is None else None
        )

        # The run folder: one run at a time (rank 0 holds its lock until the run ends).
        self.run_lock = claim_run_folder(self.dump, self.rank, self.world_size)
        try:
            self._finish_init(resume, ckpt_folder, checkpoint_writer, checkpoint_stager)
        except BaseException:
            self.run_lock.release()
            raise

    def _finish_init(
        self, resume: Resume | None, ckpt_folder: Path, checkpoint_writer, checkpoint_stager
    ) -> None:
        cfg, t = self.cfg, self.cfg.training
        if self.rank == 0:
            cfg.write(self.dump / "config.json")
            (self.dump / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        self.barrier()
        meta = {"config.json": cfg.to_dict(), "model_args.json": self.model_args.to_dict()}
        writer = checkpoint_writer or IntegrityWriter
        self.checkpoint = CheckpointManager(
            ckpt_folder, cfg.checkpoint, self.state, meta, writer, checkpoint_stager
        )
        self.metrics = MetricsLogger(self.dump, cfg.metrics, self.rank)
        for warning in resume.warnings if resume is not None else ():
            logger.info(f"warning: {warning}")
        if resume is not None and resume.format == "hf":
            resume = import_hf(resume, ckpt_folder / "hf-import", self.model_args, self.rank, self.world_size)
        if resume is not None:
            self.checkpoint.load(resume.path, resume.model_only)
        n, a = self.model_args.num_params(), self.model_args.num_active_params()
        logger.info(
            f"model {model_name(cfg)}: {n:,} parameters, {a:,} active; {self.world_size} x {self.device}; "
            f"global batch {self.global_bs} x {t.seq_len} ({self.accum_steps} accumulation steps)"
        )

    @property
    def step(self) -> int:
        return self.state.progress.step

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the loss mesh (every data-parallel rank)."""
        if self.meshes is not None:
            dist.all_reduce(t, group=self.meshes.loss.get_group())
        return t

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> StepResult:
        """One optimizer step over accum_steps micro-batches. The host does not wait for the device's
        queue here: batches go over asynchronously, results stay tensors until a log step reads them;
        the only waits are EP's split-size exchange and settle()'s wait for the previous step's skip
        flag, recorded a step earlier (see guard.py)."""
        cfg = self.cfg
        data_timer = Timer()
        batches = [self.train_loader.next_batch() for _ in range(self.accum_steps)]
        data_time = data_timer.lap()
        batches = [self.inputs(x, y) for x, y in batches]
        n_targets = self.all_reduce(sum((y != IGNORE_INDEX).sum() for _, y, _ in batches))  # the global count
        run = pipeline_forward_backward if self.pipeline is not None else forward_backward
        ce_total, aux_total, counts_total = run(self, batches, n_targets)
        coef = cfg.model.aux_loss_coef
        for part in self.parts():  # tensor parallelism: whole parameters' shares summed
            sync_replicated_grads(part)
        grad_norm = self.clip_gradients()
        loss = self.all_reduce(ce_total).double() / n_targets  # global: every rank decides alike
        self.settle()  # the previous step's skip decision (its copy arrived meanwhile): the LR schedule
        skip = self.guard.check(loss, grad_norm, self.step)  # 1.0: skip this update (see guard.py)
        lr = self.optimizer.param_groups[0]["lr"]
        if cfg.optimizer.implementation == "fused":
            self.optimizer.found_inf = skip  # the fused kernel leaves everything as it is when set
            self.optimizer.step()
        elif not bool(skip):  # the other implementations decide on the host (one sync)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.all_reduce(counts_total)  # expert loads over the whole batch
        if self.model_args.load_balance_bias:
            blocks = self.model.blocks()  # a pipeline stage holds some of them
            rows = counts_total[[b.layer_id for b in blocks]]
            update_expert_bias(
                [b.moe.router for b in blocks], rows, cfg.model.load_balance_bias_rate * (1 - skip)
            )
        if coef > 0:
            self.all_reduce(aux_total)
        aux = aux_total if coef > 0 else None
        return StepResult(loss, lr, grad_norm, counts_total, aux, data_time, skip, n_targets)

    def parts(self) -> list:
        """The modules this rank runs: the model, or its pipeline stages."""
        return self.pipeline.parts if self.pipeline is not None else [self.model]

    def clip_gradients(self) -> torch.Tensor:
        """The global gradient norm, clipped to training.max_norm (tests inject bad gradients here)."""
        pp = self.meshes.pp.get_group() if self.pipeline is not None else None
        return clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, pp, self.device)

    def settle(self) -> None:
        """Account for the last step's skip decision on the host: advance the LR schedule if it was
        applied; stop the run (exit 3) after training.max_skipped_steps skips in a row."""
        skipped = self.guard.settle()
        if skipped is None:
            return
        if not skipped:
            self.lr_scheduler.step()
        else:
            logger.info(
                f"step {self.guard.last_step} skipped: loss or gradient norm not finite"
                f"{', or a loss spike' if self.guard.sigma else ''} ({self.guard.skipped_in_a_row} in a row, "
                f"{self.guard.skipped_total} in all)"
            )
        if self.guard.must_stop:
            raise TrainingStopped(
                f"{self.guard.skipped_in_a_row} steps in a row were skipped (loss or gradient norm not finite"
                f"{', or a loss spike' if self.guard.sigma else ''}), the last at step {self.guard.last_step}; the last intact "
                f"checkpoint is {self.checkpoint.last_intact()}: resume from it with a lower optimizer.lr, or check the data"
            )

    def validate(self) -> float:
        return validation_loss(
            self.model,
            self.val_tokens,
            self.cfg,
            self.dp_rank,
            self.dp_degree,
            self.inputs,
            self.autocast,
            self.all_reduce,
            self.pipeline,
        )

    def sample_text(self) -> str:
        m = self.cfg.metrics
        return greedy_sample(
            self.model, m.sample_prompt, m.sample_tokens, self.cfg.data.tokenizer, self.device, self.autocast
        )

    def train(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.model.train()
        flops_per_token = self.model_args.flops_per_token(t.seq_len)
        peak, source = peak_tflops(self.device, t.mixed_precision_param, cfg.metrics.peak_tflops)
        if self.world_size > 1:  # one peak for all ranks (a measured one varies with the neighbours' load)
            peak_t = torch.tensor(peak, dtype=torch.float64, device=self.device)
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
            peak = float(peak_t)
        logger.info(
            f"MFU against {peak:.3f} TFLOP/s per device ({source}); {flops_per_token / 1e9:.3f} GFLOP/token"
        )
        if self.device.type == "cpu" and t.mixed_precision_param == "bfloat16":
            warn_slow_cpu_bf16(self.device)
        profiler = Profiler(cfg.profiling, self.dump, self.rank, self.step, self.device)
        try:
            self._loop(flops_per_token, peak, profiler)
            self.settle()
            self._save_guarded(self.checkpoint.wait)  # the save in flight
        finally:
            profiler.close()
            self.checkpoint.close()
            self.metrics.close()
            self.run_lock.release()

    def _save_guarded(self, save) -> None:
        """Run a checkpoint save (or the wait for one); a failed save stops the run (exit 3) or, with
        checkpoint.on_save_error = continue, is logged and training goes on."""
        try:
            save()
        except CheckpointSaveError as e:
            if self.cfg.checkpoint.on_save_error == "stop":
                raise TrainingStopped(
                    f"{e}; the last intact checkpoint is {self.checkpoint.last_intact()}"
                ) from None
            logger.info(f"warning: {e}; training goes on (checkpoint.on_save_error = continue)")

    def _loop(self, flops_per_token: float, peak: float, profiler: Profiler) -> None:
        cfg, t = self.cfg, self.cfg.training
        progress = self.state.progress
        timer = Timer()
        tokens_since, steps_since, data_time = 0, 0, 0.0
        first_step = self.step + 1
        sampling = cfg.metrics.sample_freq > 0 and self.pipeline is None
        if cfg.metrics.sample_freq and not sampling:
            logger.info("metrics.sample_freq: no in-run samples under pipeline parallelism yet")
        while self.step < t.steps:
            progress.step += 1
            result = self.train_step()
            profiler.step()
            if self.step == first_step:
                self._set_train_timeout()  # start-up (compile, loading) is over
            step_tokens = self.global_bs * t.seq_len
            progress.tokens_seen += step_tokens
            tokens_since += step_tokens
            steps_since += 1
            data_time += result.data_time
            last = self.step == t.steps
            if self.step == 1 or self.step % cfg.metrics.log_freq == 0 or last:
                self.settle()  # the step's results are read from the device here anyway
                stats = result.stats()
                stats["skipped_steps"] = self.guard.skipped_total
                stats.update(
                    throughput_stats(
                        tokens_since,
                        timer.lap(),
                        flops_per_token,
                        self.world_size,
                        peak,
                        data_time,
                        steps_since,
                    )
                )
                stats.update(tokens_seen=progress.tokens_seen, **memory_stats(self.device))
                if self.step == first_step:  # the model's size, once per run (custom shapes too)
                    a = self.model_args
                    stats.update(params=a.num_params(), active_params=a.num_active_params())
                    stats.update(flops_per_token=flops_per_token)
                tokens_since, steps_since, data_time = 0, 0, 0.0
                self.metrics.log(self.step, stats)
                reset_peak_memory(self.device)  # each log line reports the peak of its own window
            if self.val_tokens is not None and (self.step % cfg.validation.freq == 0 or last):
                self.metrics.log(self.step, {"val_loss": self.validate()})
                timer.lap()
            if sampling and (self.step % cfg.metrics.sample_freq == 0 or last):
                logger.info(f"sample at step {self.step}: {self.sample_text()!r}")
                timer.lap()
            if self.checkpoint.due(self.step, last):
                self.settle()  # the checkpoint holds the schedule and counters after this step
                self._save_guarded(self.checkpoint.wait)  # the previous save's failure, reported once
                self._save_guarded(functools.partial(self.checkpoint.maybe_save, self.step, last))

    def _set_train_timeout(self) -> None:
        """From the second step on, a collective that waits longer than comm.train_timeout_seconds
        fails the run (start-up, compilation and checkpoint loading had comm.init_timeout_seconds)."""
        if self.world_size > 1:
            set_pg_timeout(timedelta(seconds=self.cfg.comm.train_timeout_seconds), self.meshes.groups())
            logger.info(f"collective timeout now {self.cfg.comm.train_timeout_seconds} s")

    def save_seed_checkpoint(self) -> None:
        """Step 0 model only, so later runs at any world size start from the same weights."""
        try:
            self._save_guarded(lambda: self.checkpoint.save(0, model_only=True, blocking=True))
        finally:
            self.checkpoint.close()
            self.run_lock.release()
        logger.info(f"seed checkpoint written to {self.checkpoint.folder / 'step-0'}")


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
    try:
        cfg = parse_args(argv)
        if is_dry_run():
            dry_run(cfg, world_size())
            return 0
        seed_only = cfg.checkpoint.create_seed_checkpoint
        if seed_only:
            if world_size() != 1:
                raise ConfigError("checkpoint.create_seed_checkpoint runs on one process; use NGPU=1")
            cfg = seed_checkpoint_config(cfg)
        settings = apply_process_settings(cfg)
        trainer = trainer_cls(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown(barrier=False)  # every rank reaches this (the checks agree across ranks)
        return 2
    for line in settings:
        logger.info(f"process: {line}")
    try:
        if seed_only:
            trainer.save_seed_checkpoint()
        else:
            trainer.train()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown(barrier=False)
        return e.exit_code
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
