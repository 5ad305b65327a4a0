"""The trainer: read top to bottom, one step at a time. Entry point: `python -m gptoss_titan.train`.

Flow (docs/package_map.md): config -> process settings (main) -> devices and meshes -> data ->
what to resume from -> model on meta, expert kernel, parallel passes -> to_empty + init (skipped
when a checkpoint loads every weight) -> optimizer, LR schedule, TrainState -> run folder, load ->
loop (micro-batches, backward, clip, step; metrics, validation, samples, checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from .checkpoint.files import CheckpointError
from .checkpoint.manager import CheckpointManager
from .checkpoint.resume import Resume, choose_resume
from .compat import set_pg_timeout
from .config import ConfigError, JobConfig, batch_layout, help_text, model_args, parse_args
from .convert import ConvertError, import_for_training
from .data import TokenLoader, get_tokenizer, open_split, resolve_dataset
from .distributed import apply_process_settings, init_distributed, local_device, shutdown, world_size
from .errors import UserError
from .generate import generate
from .metrics import (
    MetricsLogger,
    StepResult,
    Timer,
    init_logging,
    logger,
    memory_stats,
    peak_tflops,
    reset_peak_memory,
    warn_slow_cpu_bf16,
)
from .model import Transformer
from .model.loss import IGNORE_INDEX
from .model.moe import load_balancing_loss, resolve_expert_kernel, update_expert_bias
from .optim import build_lr_scheduler, build_optimizer
from .parallel import ParallelDims, parallelize
from .parallel.dry_run import dry_run, is_dry_run
from .parallel.grad import clip_grad_norm_
from .profiling import Profiler
from .tokens import STOP_IDS
from .train_state import TrainState


class Trainer:
    def __init__(self, cfg: JobConfig, checkpoint_writer=FileSystemWriter, checkpoint_stager=None):
        """checkpoint_writer / checkpoint_stager: see CheckpointManager (tests inject their own)."""
        self.cfg = cfg
        t = cfg.training
        self.model_args = model_args(cfg)
        # Checks that need the world size, before any process group exists.
        self.dims = ParallelDims.from_config(cfg.parallelism, world_size(), self.model_args.num_experts)
        self.rank, self.world_size = init_distributed(cfg.comm.init_timeout_seconds)
        self.device = local_device()
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 else None
        self.dp_rank = self.meshes.dp.get_local_rank() if self.meshes else 0
        self.dp_degree = self.dims.dp_degree
        init_logging(self.rank)
        if cfg.job.description:
            logger.info(f"job: {cfg.job.description}")
        self.global_bs, self.accum_steps = batch_layout(
            t, self.dp_degree
        )  # global = local x dp x accumulation

        # Data (all checks happen before anything is written to the run folder).
        d = cfg.data
        folder = resolve_dataset(d.dataset, d.dataset_path, d.tokenizer, d.cache_dir)
        train_tokens = open_split(folder, "train", self.model_args.vocab_size, t.seq_len)
        self.train_loader = TokenLoader(
            train_tokens, t.seq_len, t.local_batch_size, self.dp_rank, self.dp_degree, seed=t.seed
        )
        self.val_tokens = (
            open_split(folder, "val", self.model_args.vocab_size, t.seq_len)
            if cfg.validation.enable
            else None
        )

        # What to resume from (reads metadata only; errors here still leave nothing written).
        self.dump = Path(cfg.job.dump_folder)
        ckpt_folder = self.dump / cfg.checkpoint.folder
        resume = choose_resume(cfg.checkpoint, ckpt_folder, self.model_args)

        # Model: meta -> expert kernel -> parallel passes -> to_empty -> init (same values at any
        # sharding; skipped when a checkpoint will overwrite every parameter).
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self._choose_expert_kernel(model)
        parallelize(model, self.dims, self.meshes, cfg)
        model.to_empty(device=self.device)
        if resume is not None and "model" not in cfg.checkpoint.exclude_from_loading:
            model.init_buffers()
        else:
            init_timer = Timer()
            model.init_weights(seed=t.seed)
            logger.info(f"initialized the weights in {init_timer.lap():.2f} s")
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.steps, cfg.lr_scheduler)
        self.state = TrainState.build(model, self.optimizer, self.lr_scheduler, self.train_loader)
        # Without FSDP, bf16 compute is autocast; with FSDP it is the MixedPrecisionPolicy.
        self.autocast_dtype = (
            torch.bfloat16 if t.mixed_precision_param == "bfloat16" and self.meshes is None else None
        )

        # The run folder.
        if self.rank == 0:
            self.dump.mkdir(parents=True, exist_ok=True)
            cfg.write(self.dump / "config.json")
            (self.dump / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        self.barrier()
        self.checkpoint = CheckpointManager(
            ckpt_folder,
            cfg.checkpoint,
            self.state,
            metadata={"config.json": cfg.to_dict(), "model_args.json": self.model_args.to_dict()},
            writer=checkpoint_writer,
            stager=checkpoint_stager,
        )
        self.metrics = MetricsLogger(self.dump, cfg.metrics, self.rank)
        if resume is not None and resume.format == "hf":
            resume = self._import_hf(resume, ckpt_folder / "hf-import")
        if resume is not None:
            self.checkpoint.load(resume.path, resume.model_only)
        n, a = self.model_args.num_params(), self.model_args.num_active_params()
        logger.info(
            f"model {cfg.model.flavor}: {n:,} parameters, {a:,} active; {self.world_size} x {self.device}; "
            f"global batch {self.global_bs} x {t.seq_len} ({self.accum_steps} accumulation steps)"
        )

    @property
    def step(self) -> int:
        return self.state.progress.step

    def _choose_expert_kernel(self, model: Transformer) -> None:
        """Resolve model.expert_kernel once for this device, compute dtype and routed rows; log it."""
        t = self.cfg.training
        dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32
        local = self.model_args.num_experts // self.dims.ep
        rows = t.local_batch_size * t.seq_len * self.model_args.top_k  # routed rows per micro-batch per rank
        try:
            kernel, why = resolve_expert_kernel(
                self.cfg.model.expert_kernel, self.device.type, dtype, local, rows
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model.set_expert_kernel(kernel)
        logger.info(f"experts: {kernel} kernel ({why})")

    def _import_hf(self, resume: Resume, out: Path) -> Resume:
        """Rank 0 converts the Hugging Face folder once into out; every rank then loads it like DCP."""
        if self.rank == 0:
            try:
                import_for_training(str(resume.path), out, self.model_args)
            except ConvertError as e:
                raise CheckpointError(f"checkpoint.initial_load_path: {e}") from None
        if self.world_size > 1:
            dist.barrier()
        return Resume(out, model_only=True)

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
        """One optimizer step over accum_steps micro-batches. Nothing here waits for the device:
        the results stay tensors until a log step reads them (EP's split exchange is the only sync)."""
        cfg = self.cfg
        data_timer = Timer()
        batches = [self.train_loader.next_batch() for _ in range(self.accum_steps)]
        data_time = data_timer.lap()
        local_targets = sum(int(np.count_nonzero(y.numpy() != IGNORE_INDEX)) for _, y in batches)  # host data
        n_targets = self.all_reduce(torch.tensor(local_targets, device=self.device))  # the global count
        ce_total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        counts_total = None
        coef = cfg.model.aux_loss_coef
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                ce_sum, prob_sums, counts = self.model(x, y, router_probs=coef > 0)
            loss = ce_sum / n_targets
            if prob_sums is not None:
                # The aux loss of this micro-batch over all ranks: pooled counts, local probabilities.
                global_counts = self.all_reduce(counts.detach().clone())
                rows = self.all_reduce(torch.tensor(x.numel(), device=self.device))
                aux = load_balancing_loss(global_counts, prob_sums, rows)
                loss = loss + coef * aux / self.accum_steps
                aux_total += aux.detach() / self.accum_steps
            loss.backward()
            ce_total += ce_sum.detach()
            counts_total = counts if counts_total is None else counts_total + counts
        grad_norm = clip_grad_norm_(self.model.parameters(), cfg.training.max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.all_reduce(ce_total)
        self.all_reduce(counts_total)  # expert loads over the whole batch
        if self.model_args.load_balance_bias:
            update_expert_bias(
                [layer.moe.router for layer in self.model.layers],
                counts_total,
                cfg.model.load_balance_bias_rate,
            )
        if coef > 0:
            self.all_reduce(aux_total)
        loss = ce_total.double() / n_targets
        return StepResult(loss, lr, grad_norm, counts_total, aux_total if coef > 0 else None, data_time)

    @torch.no_grad()
    def validate(self) -> float:
        v = self.cfg.validation
        loader = TokenLoader(
            self.val_tokens,
            self.cfg.training.seq_len,
            self.cfg.training.local_batch_size,
            self.dp_rank,
            self.dp_degree,
            shuffle=False,
        )
        steps = min(v.steps, max(loader.num_samples // (loader.b * loader.dp_degree), 1))
        self.model.eval()
        total, count = 0.0, 0
        for _ in range(steps):
            x, y = loader.next_batch()
            with self.autocast():
                ce_sum, _, _ = self.model(x.to(self.device), y.to(self.device))
            total += float(ce_sum)
            count += int((y != IGNORE_INDEX).sum())
        self.model.train()
        sums = self.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=self.device))
        return float(sums[0] / sums[1])

    @torch.no_grad()
    def sample_text(self) -> str:
        m = self.cfg.metrics
        enc = get_tokenizer(self.cfg.data.tokenizer)
        prompt = torch.tensor([enc.encode_ordinary(m.sample_prompt)], device=self.device)
        self.model.eval()
        with self.autocast():
            out = generate(self.model, prompt, m.sample_tokens, temperature=0.0, stop_ids=STOP_IDS)
        self.model.train()
        return enc.decode(out[0, prompt.shape[1] :].tolist())

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
        progress = self.state.progress
        profiler = Profiler(cfg.profiling, self.dump, self.rank, self.step, self.device)
        timer = Timer()
        tokens_since, steps_since, data_time = 0, 0, 0.0
        first_step = self.step + 1
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
                stats = result.stats()  # reads the step's results from the device
                dt = timer.lap()
                tps = tokens_since / dt
                tflops = flops_per_token * tps / self.world_size / 1e12
                stats.update(
                    tokens_per_s=tps,
                    tokens_per_s_per_device=tps / self.world_size,
                    tflops_per_device=tflops,
                    mfu_pct=100 * tflops / peak,
                    data_time_s=data_time / steps_since,
                    data_time_pct=100 * data_time / dt,
                    tokens_seen=progress.tokens_seen,
                    **memory_stats(self.device),
                )
                tokens_since, steps_since, data_time = 0, 0, 0.0
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}")
                self.metrics.log(self.step, stats)
                reset_peak_memory(self.device)  # each log line reports the peak of its own window
            if self.val_tokens is not None and (self.step % cfg.validation.freq == 0 or last):
                self.metrics.log(self.step, {"val_loss": self.validate()})
                timer.lap()
            if cfg.metrics.sample_freq and (self.step % cfg.metrics.sample_freq == 0 or last):
                logger.info(f"sample at step {self.step}: {self.sample_text()!r}")
                timer.lap()
            self.checkpoint.maybe_save(self.step, last)
        profiler.close()
        self.checkpoint.close()  # waits for the save in flight
        self.metrics.close()

    def _set_train_timeout(self) -> None:
        """From the second step on, a collective that waits longer than comm.train_timeout_seconds
        fails the run (start-up, compilation and checkpoint loading had comm.init_timeout_seconds)."""
        if self.world_size > 1:
            set_pg_timeout(timedelta(seconds=self.cfg.comm.train_timeout_seconds), self.meshes.groups())
            logger.info(f"collective timeout now {self.cfg.comm.train_timeout_seconds} s")

    def save_seed_checkpoint(self) -> None:
        """Step 0 model only, so later runs at any world size start from the same weights."""
        self.checkpoint.save(0, model_only=True, blocking=True)
        self.checkpoint.close()
        logger.info(f"seed checkpoint written to {self.checkpoint.folder / 'step-0'}")


def seed_checkpoint_config(cfg: JobConfig) -> JobConfig:
    """One process, no parallel passes, checkpointing on; the values do not depend on sharding."""
    p = dataclasses.replace(
        cfg.parallelism,
        data_parallel_replicate_degree=1,
        data_parallel_shard_degree=-1,
        expert_parallel_degree=1,
    )
    c = dataclasses.replace(cfg.checkpoint, enable=True, async_mode="disabled", initial_load_path="")
    return dataclasses.replace(cfg, parallelism=p, checkpoint=c)


def main(argv: list[str] | None = None) -> int:
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
        trainer = Trainer(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in settings:
        logger.info(f"process: {line}")
    if seed_only:
        trainer.save_seed_checkpoint()
    else:
        trainer.train()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
