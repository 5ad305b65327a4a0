"""One training step's forwards and backwards: the micro-batches one after another, or all of
them through the pipeline schedule (parallel/pipeline.py). Each returns (summed cross-entropy, aux
loss, expert counts [L, E]) for the trainer (train.py), which owns everything else of the step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..model.moe import load_balancing_loss

if TYPE_CHECKING:
    from .trainer import Trainer


def forward_backward(trainer: Trainer, batches: list, n_targets: torch.Tensor) -> tuple:
    """Forward and backward of each micro-batch; (summed cross-entropy, aux loss, counts [L, E])."""
    ce_total = torch.zeros((), device=trainer.device)
    aux_total = torch.zeros((), device=trainer.device)
    counts_total = None
    coef = trainer.cfg.model.aux_loss_coef
    for x, y, docs in batches:
        with trainer.autocast():
            ce_sum, prob_sums, counts = trainer.model(x, y, router_probs=coef > 0, documents=docs)
        loss = ce_sum / n_targets
        if prob_sums is not None:
            # The aux loss of this micro-batch over all ranks: pooled counts, local probabilities.
            global_counts = trainer.all_reduce(counts.detach().clone())
            rows = trainer.all_reduce(torch.full((), x.numel(), device=trainer.device))
            aux = load_balancing_loss(
                global_counts, prob_sums, rows, trainer.cfg.model.aux_loss_type == "per_layer"
            )
            # with the experts split by columns every tp rank computes this loss in full: each
            # counts 1/tp (tensor_parallel.py); otherwise each its own tokens' share
            share = trainer.dims.tp if trainer.dims.moe_split else 1
            loss = loss + coef * aux / (trainer.accum_steps * share)
            aux_total += aux.detach() / trainer.accum_steps
        loss.backward()
        ce_total += ce_sum.detach()
        counts_total = counts if counts_total is None else counts_total + counts
    if (
        coef > 0 and trainer.dims.tp > 1 and not trainer.dims.moe_split
    ):  # each tp rank logged its tokens' share
        dist.all_reduce(aux_total, group=trainer.meshes.tp.get_group())
    return ce_total, aux_total, counts_total


def pipeline_forward_backward(trainer: Trainer, batches: list, n_targets: torch.Tensor) -> tuple:
    """The micro-batches through the pipeline schedule; the loss and the counts of every
    layer summed over the stages, so every rank holds them."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ce_total, counts = trainer.pipeline.step(x, y, n_targets, batches[0][2])
    a = trainer.model_args
    counts_total = torch.zeros(a.n_layers, a.num_experts, dtype=torch.int64, device=trainer.device)
    for layer, c in counts.items():
        counts_total[layer] = c
    dist.all_reduce(counts_total, group=trainer.meshes.pp.get_group())
    return ce_total, torch.zeros((), device=trainer.device), counts_total
