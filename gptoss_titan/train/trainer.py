"""The trainer: read top to bottom, one step at a time. Entry point: `python -m gptoss_titan.train`.

Flow (docs/package_map.md): config -> process settings (main) -> devices and meshes -> data ->
what to resume from -> model on meta, expert kernel, parallel passes -> to_empty + init (skipped
when a checkpoint loads every weight) -> optimizer, LR schedule, TrainState -> run folder, load ->
loop (micro-batches, backward, clip, step; metrics, validation, samples, checkpoints).
"""

from __future__ import annotations

import functools
import json
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.files import CONFIG_FILE, MODEL_ARGS_FILE, RUN_FILE, read_run_file
from ..checkpoint.integrity import IntegrityWriter
from ..checkpoint.lora_base import BASE_FILE, base_record, check_base
from ..checkpoint.manager import CheckpointManager, CheckpointSaveError
from ..config import JobConfig, model_name
from ..data import open_data
from ..parallel.build import build_model, plan_run
from ..runtime.compat import set_pg_timeout
from ..runtime.distributed import (
    init_distributed,
    local_device,
    world_size,
)
from ..runtime.dtypes import dtype_of
from ..runtime.errors import StoppedBySignal, TrainingStopped
from ..runtime.log import Timer, init_logging, logger
from ..runtime.runlock import claim_run_folder
from .contract import resume_lines
from .evaluate import greedy_sample, validation_loss
from .lora_run import choose_lora_resumes, lora_layout
from .metrics import (
    MetricsLogger,
    StepResult,
    memory_stats,
    peak_tflops,
    reset_peak_memory,
    throughput_stats,
    warn_slow_cpu_bf16,
)
from .profiling import Profiler
from .resume import Resume, choose_resume, import_hf
from .signals import METRICS_FAILED, StopRequest
from .state import TrainState
from .step import SkipLimitReached, TrainStep


class Trainer:
    step_class = TrainStep  # tests inject a fault-injecting subclass here

    def __init__(self, cfg: JobConfig, checkpoint_writer=None, checkpoint_stager=None):
        """checkpoint_writer / checkpoint_stager: see CheckpointManager (tests inject their own)."""
        self.cfg = cfg
        # The model's shape, the degrees against the world size and the batch layout (global batch
        # = local x dp x accumulation steps): checked before any process group exists.
        self.plan = plan_run(cfg, world_size())
        self.model_args, self.dims = self.plan.args, self.plan.dims
        self.global_bs, self.accum_steps = self.plan.global_batch, self.plan.accum_steps
        one = cfg.parallelism.fsdp_one_process  # FSDP2, DTensor and DCP with a group on one process
        self.rank, self.world_size = init_distributed(cfg.comm.init_timeout_seconds, one)
        self.device = local_device()
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 or one else None
        self.dp_rank, self.dp_degree = self.dims.dp_rank(self.rank), self.dims.dp_degree
        init_logging(self.rank)
        if cfg.job.description:
            logger.info(f"job: {cfg.job.description}")
        # Data (all checks happen before anything is written to the run folder).
        self.train_loader, self.val_tokens = self.open_data()

        # What to resume from (reads metadata only; errors here still leave nothing written).
        self.dump = Path(cfg.job.dump_folder)
        ckpt_folder = self.dump / cfg.checkpoint.folder
        self.base, self.base_record, lora = None, None, None  # a LoRA run's frozen base (train/lora_run.py)
        self.initial_adapter: dict = {}  # lora.initial_adapter's tensors, for a run without a checkpoint
        if cfg.lora.rank:
            self.base, resume = choose_lora_resumes(cfg.checkpoint, ckpt_folder, self.model_args)
            self.base_record = base_record(self.base.path, self.base.format)
            if resume is not None:
                check_base(resume.path, self.base_record)
            lora, self.initial_adapter = lora_layout(cfg, self.model_args, resume)
        else:
            resume = choose_resume(cfg.checkpoint, ckpt_folder, self.model_args)
        if resume is not None and resume.format == "dcp" and not resume.model_only:  # the resume contract
            saved_batch = read_run_file(resume.path).get("global_batch")
            for line in resume_lines(resume.path, cfg, self.global_bs, saved_batch):
                logger.info(line)

        # Model (parallel/build.py), then the step that trains it: optimizer, schedule, guard.
        # Initialization (the same values at any layout) is skipped when a checkpoint will
        # overwrite every parameter.
        init = self.base is None and (resume is None or "model" in cfg.checkpoint.exclude_from_loading)
        built = build_model(cfg, self.plan, self.meshes, self.device, init, lora=lora)
        self.train_module = self.step_class(cfg, self.plan, built, self.meshes, self.device)
        m = self.train_module
        self.state = TrainState.build(
            m.model,
            m.optimizer,
            m.lr_scheduler,
            self.train_loader,
            m.guard,
            adapters_only=self.base is not None,
        )

        # From here a stop signal waits for a step boundary (train/signals.py), also during loading.
        self.stop_request = StopRequest(
            cfg.job.stop_signal, self.world_size > 1, cfg.comm.init_timeout_seconds
        )
        # The run folder: one run at a time (rank 0 holds its lock until the run ends).
        try:
            self.run_lock = claim_run_folder(self.dump, self.rank, self.world_size)
        except BaseException:
            self.stop_request.close()
            raise
        try:
            self._finish_init(resume, ckpt_folder, checkpoint_writer, checkpoint_stager)
        except BaseException:
            self.stop_request.close()
            self.run_lock.release()
            raise

    def _finish_init(
        self, resume: Resume | None, ckpt_folder: Path, checkpoint_writer, checkpoint_stager
    ) -> None:
        cfg, t = self.cfg, self.cfg.training
        if self.rank == 0:
            cfg.write(self.dump / CONFIG_FILE)
            (self.dump / MODEL_ARGS_FILE).write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        self.barrier()
        run = {"world_size": self.world_size, "global_batch": self.global_bs, "accum_steps": self.accum_steps}
        meta = {CONFIG_FILE: cfg.to_dict(), MODEL_ARGS_FILE: self.model_args.to_dict(), RUN_FILE: run}
        if self.base_record is not None:
            meta[BASE_FILE] = self.base_record
        writer = checkpoint_writer or IntegrityWriter
        self.checkpoint = CheckpointManager(ckpt_folder, cfg.checkpoint, meta, writer, checkpoint_stager)
        for warning in resume.warnings if resume is not None else ():
            logger.info(f"warning: {warning}")
        if resume is not None and resume.format == "hf":
            resume = import_hf(resume, ckpt_folder / "hf-import", self.model_args, self.rank, self.world_size)
        if self.base is not None:
            if self.base.format == "hf":  # read straight into the sharded model: no converted copy
                self.state.load_base_hf(self.checkpoint, self.base.path, self.model_args)
            else:
                self.state.load_base(self.checkpoint, self.base.path)
            if self.initial_adapter:
                self.state.load_adapters(self.initial_adapter)
                logger.info(f"adapters from {cfg.lora.initial_adapter}")
        loaded = set()
        if resume is not None:
            loaded = self.state.load(
                self.checkpoint, resume.path, cfg.checkpoint.exclude_from_loading, resume.model_only
            )
        # the step count continues (rows past it are redone) or starts over (earlier rows kept aside)
        resumed_at = self.step if "train_state" in loaded else None
        self.metrics = MetricsLogger(self.dump, cfg.metrics, self.rank, resume_step=resumed_at)
        n, a = self.model_args.num_params(), self.model_args.num_active_params()
        logger.info(
            f"model {model_name(cfg)}: {n:,} parameters, {a:,} active; {self.world_size} x {self.device}; "
            f"global batch {self.global_bs} x {t.seq_len} ({self.accum_steps} accumulation steps)"
        )

    def open_data(self):
        """(this rank's training loader, validation data or None); RL runs hand out prompts instead."""
        return open_data(self.cfg, self.model_args.vocab_size, self.dp_rank, self.dp_degree)

    def step_tokens(self, result: StepResult) -> int:
        """Tokens one step trained on, for tokens/s and MFU (a pretraining step: every position)."""
        return self.global_bs * self.cfg.training.seq_len

    # What the step owns, by the names tools and tests use.
    @property
    def model(self):
        return self.train_module.model

    @property
    def pipeline(self):
        return self.train_module.pipeline

    @property
    def optimizer(self):
        return self.train_module.optimizer

    @property
    def step(self) -> int:
        return self.state.progress.step

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def train_step(self) -> StepResult:
        """One optimizer step over accum_steps micro-batches (train/step.py)."""
        data_timer = Timer()
        batches = [self.train_loader.next_batch() for _ in range(self.accum_steps)]
        data_time = data_timer.lap()
        result = self.train_module(batches, self.step)
        result.data_time = data_time
        return result

    def settle(self) -> None:
        self.train_module.settle()

    def validate(self) -> float:
        return validation_loss(self.train_module, self.val_tokens, self.cfg)

    def sample_text(self) -> str:
        m = self.cfg.metrics
        return greedy_sample(self.train_module, m.sample_prompt, m.sample_tokens, self.cfg.data.tokenizer)

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
        except SkipLimitReached as e:
            raise TrainingStopped(
                f"{e}; the last intact checkpoint is {self.checkpoint.last_intact()}: resume from it with a "
                "lower optimizer.lr, or check the data"
            ) from None
        finally:
            self.stop_request.close()
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
            step_tokens = self.step_tokens(result)
            progress.tokens_seen += step_tokens
            tokens_since += step_tokens
            steps_since += 1
            data_time += result.data_time
            last = self.step == t.steps
            if self.step == 1 or self.step % cfg.metrics.log_freq == 0 or last:
                self.settle()  # the step's results are read from the device here anyway
                stats = result.stats()
                stats["skipped_steps"] = self.train_module.guard.skipped_total
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
            if self.save_due(last):
                self.settle()  # the checkpoint holds the schedule and counters after this step
                self._save_guarded(self.checkpoint.wait)  # the previous save's failure, reported once
                self._save_guarded(functools.partial(self.save, last))
            if self.metrics.write_error and cfg.metrics.on_write_error == "stop":
                self.stop_request.request(METRICS_FAILED)
            signum = self.stop_request.agreed()  # every rank stops at this step, or none
            if signum and not last:
                self._stop_for(signum)

    def _stop_for(self, signum: int) -> None:
        """Save this step (unless saved already) and stop with one line: exit 128 + signum, or 3
        when metrics.jsonl could not be written (METRICS_FAILED)."""
        self.settle()
        self._save_guarded(self.checkpoint.wait)
        name = "an unwritable metrics.jsonl" if signum == METRICS_FAILED else signal.Signals(signum).name
        if not self.cfg.checkpoint.enable:
            saved = "checkpoint.enable is false: nothing saved"
        else:
            if self.checkpoint.last_saved != self.step:
                t0 = time.perf_counter()
                state = self.state.state_dicts(self.rank)
                self._save_guarded(lambda: self.checkpoint.save(self.step, state, blocking=True))
                logger.info(f"saved step {self.step} for the stop in {time.perf_counter() - t0:.1f} s")
            self.barrier()  # rank 0 renames the step into place after the others finished writing
            saved = f"saved {self.checkpoint.last_intact()}; rerun the same command to resume"
        message = f"stopped by {name} at step {self.step}; {saved}"
        if signum == METRICS_FAILED:
            why = self.metrics.write_error or "metrics.jsonl could not be written on rank 0"
            raise TrainingStopped(f"{why}: {message}; or set metrics.on_write_error = continue")
        raise StoppedBySignal(message, signum)

    def save_due(self, last: bool) -> bool:
        """Every checkpoint.interval steps and after the last one (once per step)."""
        c = self.cfg.checkpoint
        return c.enable and (self.step % c.interval == 0 or last) and self.step != self.checkpoint.last_saved

    def save(self, last: bool) -> None:
        """This step's checkpoint: in the background, but the last one blocks; with
        checkpoint.last_save_model_only the last holds the model alone, in export_dtype."""
        c = self.cfg.checkpoint
        model_only = last and c.last_save_model_only
        dtype = dtype_of(c.export_dtype) if model_only else None
        state = self.state.state_dicts(self.rank, model_only, dtype)
        self.checkpoint.save(self.step, state, blocking=last)

    def _set_train_timeout(self) -> None:
        """From the second step on, a collective that waits longer than comm.train_timeout_seconds
        fails the run (start-up, compilation and checkpoint loading had comm.init_timeout_seconds)."""
        if self.world_size > 1:
            groups = self.meshes.groups() + [self.stop_request.group]
            set_pg_timeout(timedelta(seconds=self.cfg.comm.train_timeout_seconds), groups)
            logger.info(f"collective timeout now {self.cfg.comm.train_timeout_seconds} s")

    def save_seed_checkpoint(self) -> None:
        """Step 0 model only, so later runs at any world size start from the same weights."""
        try:
            state = self.state.state_dicts(self.rank, model_only=True)
            self._save_guarded(lambda: self.checkpoint.save(0, state, blocking=True))
        finally:
            self.stop_request.close()
            self.checkpoint.close()
            self.run_lock.release()
        logger.info(f"seed checkpoint written to {self.checkpoint.folder / 'step-0'}")
