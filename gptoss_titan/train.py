"""The trainer: read top to bottom, one step at a time. Entry point: `python -m gptoss_titan.train`.

Flow: config -> devices -> data -> model on meta -> to_empty + init_weights -> optimizer and LR
schedule -> loop (micro-batches, backward, clip, step, metrics, validation, samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError, JobConfig, help_text, parse_args
from .data import DataError, TokenLoader, get_tokenizer, open_split, resolve_dataset
from .data.tokenizer import STOP_TOKENS
from .generate import generate
from .metrics import MetricsLogger, Timer, init_logging, logger, memory_stats
from .model import FLAVORS, ModelArgs, Transformer
from .optim import build_lr_scheduler, build_optimizer


def device_type() -> str:
    """The one place the device type is chosen: CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_args_for(cfg: JobConfig) -> ModelArgs:
    return dataclasses.replace(FLAVORS[cfg.model.flavor], load_balance_bias=cfg.model.load_balance_bias)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        t = cfg.training
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world_size != 1:
            raise ConfigError(
                f"WORLD_SIZE = {self.world_size}: multi-process training is not available in this version; use NGPU=1"
            )
        self.rank, self.dp_rank, self.dp_degree = 0, 0, 1
        self.device = torch.device(device_type())
        init_logging(self.rank)
        torch.manual_seed(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)

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
        self.model_args = model_args_for(cfg)
        d = cfg.data
        folder = resolve_dataset(d.dataset, d.dataset_path, d.tokenizer, d.cache_dir)
        train_tokens = open_split(folder, "train", self.model_args.vocab_size, t.seq_len)
        self.train_loader = TokenLoader(train_tokens, t.seq_len, t.local_batch_size, self.dp_rank,
                                        self.dp_degree, seed=t.seed)
        self.val_tokens = open_split(folder, "val", self.model_args.vocab_size, t.seq_len) \
            if cfg.validation.enable else None

        # Model: meta -> (parallel passes) -> to_empty -> init_weights.
        with torch.device("meta"):
            model = Transformer(self.model_args)
        model.to_empty(device=self.device)
        torch.manual_seed(t.seed)
        model.init_weights()
        self.model = model
        self.optimizer = build_optimizer(model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.steps, cfg.lr_scheduler)
        self.step = 0
        self.tokens_seen = 0
        self.compute_dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32

        # The run folder.
        self.dump = Path(cfg.job.dump_folder)
        self.dump.mkdir(parents=True, exist_ok=True)
        cfg.write(self.dump / "config.json")
        (self.dump / "model_args.json").write_text(json.dumps(self.model_args.to_dict(), indent=2) + "\n")
        self.metrics = MetricsLogger(self.dump, cfg.metrics.save_tb_folder, cfg.metrics.enable_tensorboard,
                                     self.rank, write_files=self.rank == 0 or not cfg.metrics.rank_0_only)
        n, a = self.model_args.num_params(), self.model_args.num_active_params()
        logger.info(f"model {cfg.model.flavor}: {n:,} parameters, {a:,} active; device {self.device}; "
                    f"global batch {global_bs} x {t.seq_len} ({self.accum_steps} accumulation steps)")

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        data_timer = Timer()
        batches = [self.train_loader.next_batch() for _ in range(self.accum_steps)]
        data_time = data_timer.lap()
        n_targets = sum(int((y != -100).sum()) for _, y in batches)  # global count (one rank for now)
        ce_total = torch.zeros((), device=self.device)
        aux_total = 0.0
        counts_total = None
        coef = cfg.model.aux_loss_coef
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                ce_sum, aux, counts = self.model(x, y, aux_loss=coef > 0)
            loss = ce_sum / n_targets
            if aux is not None:
                loss = loss + coef * aux / self.accum_steps
                aux_total += float(aux.detach()) / self.accum_steps
            loss.backward()
            ce_total += ce_sum.detach()
            counts_total = counts if counts_total is None else counts_total + counts
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.training.max_norm if cfg.training.max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model_args.load_balance_bias:
            self._update_expert_bias(counts_total)
        out = {"loss": float(ce_total) / n_targets, "lr": lr, "grad_norm": float(grad_norm), "data_time_s": data_time}
        if coef > 0:
            out["aux_loss"] = aux_total
        loads = counts_total.float()  # [L, E]
        out["expert_load_cv"] = float((loads.std(-1) / loads.mean(-1).clamp(min=1e-9)).mean())
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
        return total / count

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
        timer = Timer()
        tokens_since = 0
        flops_per_token = self.model_args.flops_per_token(t.seq_len)
        while self.step < t.steps:
            self.step += 1
            stats = self.train_step()
            step_tokens = self.global_bs * t.seq_len
            self.tokens_seen += step_tokens
            tokens_since += step_tokens
            last = self.step == t.steps
            if self.step == 1 or self.step % cfg.metrics.log_freq == 0 or last:
                dt = timer.lap()
                tps = tokens_since / dt
                tokens_since = 0
                stats.update(tokens_per_s=tps, tokens_per_s_per_device=tps / self.world_size,
                             tflops_per_device=flops_per_token * tps / self.world_size / 1e12,
                             tokens_seen=self.tokens_seen, **memory_stats(self.device))
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}")
                self.metrics.log(self.step, stats)
            if self.val_tokens is not None and (self.step % cfg.validation.freq == 0 or last):
                self.metrics.log(self.step, {"val_loss": self.validate()})
                timer.lap()
            if cfg.metrics.sample_freq and (self.step % cfg.metrics.sample_freq == 0 or last):
                logger.info(f"sample at step {self.step}: {self.sample_text()!r}")
                timer.lap()
        self.metrics.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train()
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
