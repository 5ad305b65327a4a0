"""The trainer: read top to bottom, one step at a time. Entry point: `python -m gptoss_titan.train`.

Flow: config -> devices -> data -> model on meta -> to_empty + init_weights -> optimizer and LR
schedule -> loop (micro-batches, backward, clip, step, metrics, validation, samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, CheckpointManager
from .config import ConfigError, JobConfig, help_text, parse_args
from .data import DataError, TokenLoader, get_tokenizer, open_split, resolve_dataset
from .data.tokenizer import STOP_TOKENS
from .distributed import device_type, init_distributed, keep_freed_cpu_memory, shutdown
from .generate import generate
from .metrics import (
    MetricsLogger,
    Timer,
    expert_load_stats,
    init_logging,
    logger,
    measure_matmul_tflops,
    memory_stats,
    peak_tflops,
)
from .model import FLAVORS, ModelArgs, Transformer
from .model.moe import load_balancing_loss
from .optim import build_lr_scheduler, build_optimizer
from .parallel import ParallelDims, parallelize
from .parallel.dry_run import dry_run, is_dry_run
from .parallel.grad import clip_grad_norm_
from .profiling import Profiler


def model_args_for(cfg: JobConfig) -> ModelArgs:
    return dataclasses.replace(FLAVORS[cfg.model.flavor], load_balance_bias=cfg.model.load_balance_bias)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        t = cfg.training
        self.model_args = model_args_for(cfg)
        # Checks that need the world size, before any process group exists.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dims = ParallelDims.from_config(cfg.parallelism, world, self.model_args.num_experts)
        self.rank, self.world_size = init_distributed(cfg.comm.init_timeout_seconds)
        self.device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" \
            else torch.device("cpu")
        self.meshes = self.dims.build_meshes(self.device.type) if self.world_size > 1 else None
        self.dp_rank = self.meshes.dp.get_local_rank() if self.meshes else 0
        self.dp_degree = self.dims.dp_degree
        init_logging(self.rank)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cpu" and t.cpu_keep_freed_memory and not keep_freed_cpu_memory():
            logger.info("training.cpu_keep_freed_memory: not glibc, left the allocator as it is")

        # Batch layout: global = local x dp x accumulation steps.
        global_bs = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dp_degree
        per_micro = t.local_batch_size * self.dp_degree
        if global_bs % per_micro:
            raise ConfigError(
                f"training.global_batch_size = {global_bs} is not a multiple of local_batch_size x data-parallel "
                f"degree = {t.local_batch_size} x {self.dp_degree}; change one of them"
            )
        self.accum_steps = global_bs // per_micro
        self.global_bs = global_bs

        # Data (all checks happen before anything is written to the run folder).
        d = cfg.data
        folder = resolve_dataset(d.dataset, d.dataset_path, d.tokenizer, d.cache_dir)
        train_tokens = open_split(folder, "train", self.model_args.vocab_size, t.seq_len)
        self.train_loader = TokenLoader(train_tokens, t.seq_len, t.local_batch_size, self.dp_rank,
                                        self.dp_degree, seed=t.seed)
        self.val_tokens = open_split(folder, "val", self.model_args.vocab_size, t.seq_len) \
            if cfg.validation.enable else None

        # Model: meta -> parallel passes -> to_empty -> init_weights (same values at any sharding).
        with torch.device("meta"):
            model = Transformer(self.model_args)
        parallelize(model, self.dims, self.meshes, cfg)
        model.to_empty(device=self.device)
        model.init_weights(seed=t.seed)
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.steps, cfg.lr_scheduler)
        self.step = 0
        self.tokens_seen = 0
        # Without FSDP, bf16 compute is autocast; with FSDP it is the MixedPrecisionPolicy.
        self.autocast_dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" and self.meshes is None \
            else None

        # Checkpoints: find what to resume from (errors here still leave nothing written).
        self.dump = Path(cfg.job.dump_folder)
        self.checkpoint = CheckpointManager(
            cfg.checkpoint, self.dump, model, self.optimizer, self.lr_scheduler, self.train_loader,
            train_state=lambda: {"step": self.step, "tokens_seen": self.tokens_seen},
            load_train_state=self._load_train_state, model_args=self.model_args, run_config=cfg.to_dict(),
            rank=self.rank, world_size=self.world_size,
        )
        resume = self.checkpoint.resume_source()

        # The run folder.
        if self.rank == 0:
            self.dump.mkdir(parents=True, exist_ok=True)
            cfg.write(self.dump / "config.json")
            (self.dump / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        self.barrier()
        self.metrics = MetricsLogger(self.dump, cfg.metrics.save_tb_folder, cfg.metrics.enable_tensorboard,
                                     self.rank, write_files=self.rank == 0 or not cfg.metrics.rank_0_only)
        if resume is not None:
            self.checkpoint.load(resume)
        n, a = self.model_args.num_params(), self.model_args.num_active_params()
        logger.info(f"model {cfg.model.flavor}: {n:,} parameters, {a:,} active; {self.world_size} x {self.device}; "
                    f"global batch {global_bs} x {t.seq_len} ({self.accum_steps} accumulation steps)")

    def _load_train_state(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])

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

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        data_timer = Timer()
        batches = [self.train_loader.next_batch() for _ in range(self.accum_steps)]
        data_time = data_timer.lap()
        local_targets = sum(int((y != -100).sum()) for _, y in batches)
        n_targets = int(self.all_reduce(torch.tensor(local_targets, device=self.device)))  # global count
        ce_total = torch.zeros((), device=self.device)
        aux_total = 0.0
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
                rows = int(self.all_reduce(torch.tensor(x.numel(), device=self.device)))
                aux = load_balancing_loss(global_counts, prob_sums, rows)
                loss = loss + coef * aux / self.accum_steps
                aux_total += float(aux.detach()) / self.accum_steps
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
            self._update_expert_bias(counts_total)
        if coef > 0:
            aux_total = float(self.all_reduce(torch.tensor(aux_total, device=self.device)))
        out = {"loss": float(ce_total) / n_targets, "lr": lr, "grad_norm": float(grad_norm), "data_time_s": data_time}
        if coef > 0:
            out["aux_loss"] = aux_total
        out.update(expert_load_stats(counts_total))  # [L, E] tokens per expert, whole global batch
        return out

    @torch.no_grad()
    def _update_expert_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        rate = self.cfg.model.load_balance_bias_rate
        for layer, c in zip(self.model.layers, counts.float()):
            router = layer.moe.router
            router.expert_bias += rate * torch.sign(c.mean() - c)

    @torch.no_grad()
    def validate(self) -> float:
        v = self.cfg.validation
        loader = TokenLoader(self.val_tokens, self.cfg.training.seq_len, self.cfg.training.local_batch_size,
                             self.dp_rank, self.dp_degree, shuffle=False)
        steps = min(v.steps, max(loader.num_samples // (loader.b * loader.dp_degree), 1))
        self.model.eval()
        total, count = 0.0, 0
        for _ in range(steps):
            x, y = loader.next_batch()
            with self.autocast():
                ce_sum, _, _ = self.model(x.to(self.device), y.to(self.device))
            total += float(ce_sum)
            count += int((y != -100).sum())
        self.model.train()
        sums = self.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=self.device))
        return float(sums[0] / sums[1])

    @torch.no_grad()
    def sample_text(self) -> str:
        m = self.cfg.metrics
        enc = get_tokenizer(self.cfg.data.tokenizer)
        prompt = torch.tensor([enc.encode_ordinary(m.sample_prompt)], device=self.device)
        stops = tuple(enc.encode_single_token(s) for s in STOP_TOKENS)
        self.model.eval()
        with self.autocast():
            out = generate(self.model, prompt, m.sample_tokens, temperature=0.0, stop_ids=stops)
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
        logger.info(f"MFU against {peak:.3f} TFLOP/s per device ({source}); {flops_per_token / 1e9:.3f} GFLOP/token")
        if self.device.type == "cpu" and t.mixed_precision_param == "bfloat16":
            warn_slow_cpu_bf16(self.device)
        profiler = Profiler(cfg.profiling, self.dump, self.rank, self.step, self.device)
        timer = Timer()
        tokens_since, steps_since, data_time = 0, 0, 0.0
        while self.step < t.steps:
            self.step += 1
            stats = self.train_step()
            profiler.step()
            step_tokens = self.global_bs * t.seq_len
            self.tokens_seen += step_tokens
            tokens_since += step_tokens
            steps_since += 1
            data_time += stats.pop("data_time_s")
            last = self.step == t.steps
            if self.step == 1 or self.step % cfg.metrics.log_freq == 0 or last:
                dt = timer.lap()
                tps = tokens_since / dt
                tflops = flops_per_token * tps / self.world_size / 1e12
                stats.update(tokens_per_s=tps, tokens_per_s_per_device=tps / self.world_size,
                             tflops_per_device=tflops, mfu_pct=100 * tflops / peak,
                             data_time_s=data_time / steps_since, data_time_pct=100 * data_time / dt,
                             tokens_seen=self.tokens_seen, **memory_stats(self.device))
                tokens_since, steps_since, data_time = 0, 0, 0.0
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}")
                self.metrics.log(self.step, stats)
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

    def save_seed_checkpoint(self) -> None:
        """Step 0 model only, so later runs at any world size start from the same weights."""
        self.checkpoint.save(0, model_only=True, blocking=True)
        self.checkpoint.close()
        logger.info(f"seed checkpoint written to {self.checkpoint.folder / 'step-0'}")


def warn_slow_cpu_bf16(device: torch.device) -> bool:
    """Warn (and return True) when bf16 matmuls are much slower than fp32 here: CPUs without native
    bf16 (AVX2 only) fall back to ~1 GFLOP/s. Small matrices keep the check cheap even then."""
    fp32 = measure_matmul_tflops(device, torch.float32, n=256, reps=2)
    bf16 = measure_matmul_tflops(device, torch.bfloat16, n=256, reps=2)
    if fp32 <= 2 * bf16:
        return False
    logger.info(f"warning: bf16 matmuls run at {bf16 * 1e3:.1f} GFLOP/s on this CPU, fp32 at {fp32 * 1e3:.1f} "
                "(no native bf16): --training.mixed_precision_param=float32 is faster")
    return True


def seed_checkpoint_config(cfg: JobConfig) -> JobConfig:
    """One process, no parallel passes, checkpointing on; the values do not depend on sharding."""
    p = dataclasses.replace(cfg.parallelism, data_parallel_replicate_degree=1, data_parallel_shard_degree=-1,
                            expert_parallel_degree=1)
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
            dry_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
            return 0
        seed_only = cfg.checkpoint.create_seed_checkpoint
        if seed_only:
            if int(os.environ.get("WORLD_SIZE", "1")) != 1:
                raise ConfigError("checkpoint.create_seed_checkpoint runs on one process; use NGPU=1")
            cfg = seed_checkpoint_config(cfg)
        trainer = Trainer(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if seed_only:
        trainer.save_seed_checkpoint()
    else:
        trainer.train()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
