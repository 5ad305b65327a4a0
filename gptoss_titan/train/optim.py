"""AdamW with parameter groups, and the warmup + cosine/linear decay LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LRScheduler as LRConfig
from ..config import Optimizer as OptConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, sinks and embeddings get no weight decay (1-D tensors or the embedding)."""
    return (
        param.ndim < 2
        or name.endswith(".bias")
        or "b_gate_up" in name
        or "b_down" in name
        or "tok_embeddings" in name
        or name.endswith("sinks")
    )


def build_optimizer(model: nn.Module, cfg: OptConfig) -> torch.optim.AdamW:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[
        cfg.implementation
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **impl)


def lr_factor(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Multiplier of the peak lr at 1-based `step`: linear warmup, then decay to min_lr_factor."""
    warm = cfg.warmup_steps
    if step <= warm:
        return step / (warm + 1)
    decay = cfg.decay_steps if cfg.decay_steps >= 0 else max(total_steps - warm, 1)
    progress = min((step - warm) / max(decay, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay_type == "cosine" else 1 - progress
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * shape


def build_lr_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: LRConfig):
    """LambdaLR over optimizer steps; its state (last_epoch) is saved in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, total_steps, cfg))
