"""TrainStep: one optimizer step of a rank, everything but the loop.

It owns the model parts this rank runs (the model, or its pipeline stages), the optimizer and LR
schedule, the step guard, the meshes, autocast, the forward/backward of the micro-batches (one
after another, or all through the pipeline schedule), the tensor-parallel gradient sync and
clipping. The Trainer (trainer.py) keeps the loop, metrics, and when to evaluate and save;
validation (evaluate.py) runs through a TrainStep too.

The host does not wait for the device here: batches go over asynchronously, results stay tensors
until a log step reads them; the only waits are EP's split-size exchange and settle()'s wait for
the previous step's skip flag, recorded a step earlier (see guard.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..config import JobConfig
from ..model.balance import load_balancing_loss, update_expert_bias
from ..model.loss import IGNORE_INDEX
from ..parallel import Meshes, sync_replicated_grads
from ..parallel.build import RankModel, RunPlan
from ..parallel.context_parallel import CPLayout
from ..parallel.grad import clip_grad_norm_
from ..runtime.dtypes import dtype_of
from ..runtime.errors import TrainingStopped
from ..runtime.log import logger
from .batching import ModelInputs
from .guard import StepGuard
from .metrics import StepResult
from .optim import build_lr_scheduler, build_optimizer


class SkipLimitReached(TrainingStopped):
    """training.max_skipped_steps skips in a row; the trainer adds the last intact checkpoint."""


class TrainStep:
    def __init__(self, cfg: JobConfig, plan: RunPlan, built: RankModel, meshes: Meshes | None, device):
        t = cfg.training
        self.cfg, self.plan, self.dims, self.meshes, self.device = cfg, plan, plan.dims, meshes, device
        self.model, self.pipeline = built.model, built.pipeline
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_rank, self.dp_degree = self.dims.dp_rank(self.rank), self.dims.dp_degree
        cp = self.dims.cp
        self.inputs = ModelInputs(
            t.document_mask,
            device,
            CPLayout.balanced(t.seq_len, cp, (plan.args.sliding_window,)) if cp > 1 else None,
            meshes.cp.get_local_rank() if cp > 1 else 0,
            meshes.cp.get_group().group_name if cp > 1 else None,
        )
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, t.steps, cfg.lr_scheduler)
        self.guard = StepGuard(t, device)
        self._held_layers: torch.Tensor | None = None  # indices of this rank's layers (expert balancing)
        self._balanced_ended = False  # model.balanced_routing_steps passed
        # Without FSDP, bf16 compute is autocast; with FSDP it is the MixedPrecisionPolicy.
        self.autocast_dtype = (
            dtype_of(t.mixed_precision_param)
            if t.mixed_precision_param != "float32" and meshes is None
            else None
        )

    # ----- helpers the step and validation share ------------------------------------------------
    def parts(self) -> list:
        """The modules this rank runs: the model, or its pipeline stages."""
        return self.pipeline.parts if self.pipeline is not None else [self.model]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the loss mesh (every data-parallel rank)."""
        if self.meshes is not None:
            dist.all_reduce(t, group=self.meshes.loss.get_group())
        return t

    # ----- the step ------------------------------------------------------------------------------
    def __call__(self, host_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> StepResult:
        """One optimizer step (number `step`) over the accumulation steps' host batches [B, T]."""
        cfg = self.cfg
        self.end_balanced_routing(step)
        batches = [self.inputs(x, y) for x, y in host_batches]
        n_targets = self.all_reduce(
            sum((b.targets != IGNORE_INDEX).sum() for b in batches)
        )  # the global count
        run = self.pipeline_forward_backward if self.pipeline is not None else self.forward_backward
        ce_total, aux_total, counts_total = run(batches, n_targets)
        coef = cfg.model.aux_loss_coef
        for part in self.parts():  # tensor parallelism: whole parameters' shares summed
            sync_replicated_grads(part)
        grad_norm = self.clip_gradients(step)
        loss = self.all_reduce(ce_total).double() / n_targets  # global: every rank decides alike
        self.settle()  # the previous step's skip decision (its copy arrived meanwhile): the LR schedule
        skip = self.guard.check(loss, grad_norm, step)  # 1.0: skip this update (see guard.py)
        lr = self.optimizer.param_groups[0]["lr"]
        if cfg.optimizer.implementation == "fused":
            self.optimizer.found_inf = skip  # the fused kernel leaves everything as it is when set
            self.optimizer.step()
        elif not bool(skip):  # the other implementations decide on the host (one sync)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.all_reduce(counts_total)  # expert loads over the whole batch
        balanced = None
        if self.plan.args.load_balance_bias and not cfg.lora.rank:  # LoRA: the routing stays the base's
            blocks = self.model.blocks()  # a pipeline stage holds some of them
            routers = [b.moe.router for b in blocks]
            if self.plan.args.balanced_routing and not self._balanced_ended:  # the plain top-k's loads
                rows, balanced = self.plain_choice_counts(routers)
            else:
                if self._held_layers is None:  # made once: an index list would be a blocking copy per step
                    self._held_layers = torch.tensor([b.layer_id for b in blocks], device=counts_total.device)
                rows = counts_total.index_select(0, self._held_layers)
            update_expert_bias(
                routers,
                rows,
                cfg.model.load_balance_bias_rate * (1 - skip),
                cfg.model.load_balance_bias_update,
            )
        if coef > 0:
            self.all_reduce(aux_total)
        aux = aux_total if coef > 0 else None
        return StepResult(loss, lr, grad_norm, counts_total, aux, 0.0, skip, n_targets, balanced)

    def plain_choice_counts(self, routers: list) -> tuple[torch.Tensor, torch.Tensor]:
        """model.balanced_routing: the plain top-k's loads [held layers, E] over the whole batch (the
        bias evens these out) and how many layers routed a batch by the fallback this step (all
        stages); the routers' tallies start over."""
        rows = self.all_reduce(torch.stack([r.choice_counts for r in routers]))  # [L, E + 1]
        for r in routers:
            r.choice_counts.zero_()
        fallbacks = (rows[:, -1] > 0).sum()
        if self.pipeline is not None:
            dist.all_reduce(fallbacks, group=self.meshes.pp.get_group())
        return rows[:, :-1], fallbacks

    def end_balanced_routing(self, step: int) -> None:
        """Past model.balanced_routing_steps the routers take the plain top-k, at no cost (also when
        a run resumes past the window)."""
        window = self.cfg.model.balanced_routing_steps
        if self.plan.args.balanced_routing and window and step > window and not self._balanced_ended:
            for block in self.model.blocks():  # every stage this rank holds
                block.moe.router.balanced_routing = 0.0
            self._balanced_ended = True

    def forward_backward(self, batches: list, n_targets: torch.Tensor) -> tuple:
        """Forward and backward of each micro-batch; (summed cross-entropy, aux loss, counts [L, E])."""
        ce_total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        counts_total = None
        m = self.cfg.model
        coef = m.aux_loss_coef
        for x, y, docs, rows, _ in batches:
            with self.autocast():
                ce_sum, prob_sums, counts = self.model(
                    x, y, router_probs=coef > 0, documents=docs, target_rows=rows
                )
            loss = ce_sum / n_targets
            if prob_sums is not None:
                # The aux loss of this micro-batch over all ranks: pooled counts, local probabilities.
                global_counts = self.all_reduce(counts.detach().clone())
                rows = self.all_reduce(torch.full((), x.numel(), device=self.device))
                aux = load_balancing_loss(global_counts, prob_sums, rows, m.aux_loss_type == "per_layer")
                # with the experts split by columns every tp rank computes this loss in full: each
                # counts 1/tp (tensor_parallel.py); otherwise each its own tokens' share
                share = self.dims.tp if self.dims.moe_split else 1
                loss = loss + coef * aux / (self.plan.accum_steps * share)
                aux_total += aux.detach() / self.plan.accum_steps
            loss.backward()
            ce_total += ce_sum.detach()
            counts_total = counts if counts_total is None else counts_total + counts
        if coef > 0 and self.dims.tp > 1 and not self.dims.moe_split:  # each tp rank logged its tokens' share
            dist.all_reduce(aux_total, group=self.meshes.tp.get_group())
        return ce_total, aux_total, counts_total

    def pipeline_forward_backward(self, batches: list, n_targets: torch.Tensor) -> tuple:
        """The micro-batches through the pipeline schedule; the loss and the counts of every
        layer summed over the stages, so every rank holds them."""
        x = torch.cat([b.tokens for b in batches])
        y = torch.cat([b.targets for b in batches])
        rows = [b.rows for b in batches]  # the head on the counted rows alone, as without pp
        ce_total, counts = self.pipeline.step(x, y, n_targets, [b.layout for b in batches], rows)
        a = self.plan.args
        counts_total = torch.zeros(a.n_layers, a.num_experts, dtype=torch.int64, device=self.device)
        for layer, c in counts.items():
            counts_total[layer] = c
        dist.all_reduce(counts_total, group=self.meshes.pp.get_group())
        return ce_total, torch.zeros((), device=self.device), counts_total

    def clip_gradients(self, step: int) -> torch.Tensor:
        """The global gradient norm, clipped to training.max_norm (tests inject bad gradients here)."""
        pp = self.meshes.pp.get_group() if self.pipeline is not None else None
        return clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, pp, self.device)

    def settle(self) -> None:
        """Account for the last step's skip decision on the host: advance the LR schedule if it was
        applied; SkipLimitReached (exit 3) after training.max_skipped_steps skips in a row."""
        g = self.guard
        skipped = g.settle()
        if skipped is None:
            return
        spike = ", or a loss spike" if g.sigma else ""
        if not skipped:
            self.lr_scheduler.step()
        else:
            logger.info(
                f"step {g.last_step} skipped: loss or gradient norm not finite{spike} "
                f"({g.skipped_in_a_row} in a row, {g.skipped_total} in all)"
            )
        if g.must_stop:
            raise SkipLimitReached(
                f"{g.skipped_in_a_row} steps in a row were skipped (loss or gradient norm not finite"
                f"{spike}), the last at step {g.last_step}"
            )
