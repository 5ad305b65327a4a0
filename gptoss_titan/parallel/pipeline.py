"""Pipeline parallelism (pp) with torch.distributed.pipelining.

Shape legend: M micro-batches (the gradient accumulation steps), b sequences per micro-batch
(training.local_batch_size), T tokens, H hidden; under tp each rank holds T/tp of them.

The layers are cut into pp x v stages (`config.pipeline_layout`: even by default, or
parallelism.pipeline_parallel_layers); rank p of the pipeline holds stages p, p + pp, ... (v per
rank for the interleaved schedules). Each stage is a copy of the meta model with the modules of
the other stages set to None (the model's forward runs what it holds: model.py), so parameter
names, and with them checkpoints, stay those of the whole model. The other passes (tp, ep, AC,
compile, FSDP) then apply to each stage as to a whole model.

The first stage embeds the tokens, the last applies the final norm; the schedule's loss function
runs the last stage's lm_head with its fused loss (summed cross-entropy / the step's global target
count, so gradients need no rescaling: scale_grads=False). Routing counts are collected by hooks
on the blocks, the loss of each micro-batch by the loss function; the trainer sums both over the
pipeline, so every rank logs and decides (skips, clipping) alike.

The head runs on the counted targets' rows alone (a chat batch's prompts cost it nothing, as without
a pipeline: train/batching.py): the schedule hands the loss function one micro-batch's targets and
no index, so each micro-batch's rows travel inside its target, padded to a common length with one
of its ignored positions (which adds nothing to the loss or to any gradient): `pack_targets`.

Each micro-batch's layout (its documents under training.document_mask, or context parallelism's
share of its sequences) reaches every stage's forward for that micro-batch: the schedule splits a
host tensor of micro-batch indices like any input and hands each stage its piece as a keyword,
which a pre-forward hook (ahead of FSDP's, which would move it to the device) turns into the
layout.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from ..config import ConfigError, Parallelism, pipeline_layout
from ..model.loss import IGNORE_INDEX


def split_stages(model: nn.Module, pp_rank: int, p: Parallelism) -> list[tuple[int, nn.Module]]:
    """(stage index, that stage's copy of the meta model) for the stages of pipeline rank pp_rank."""
    layout = pipeline_layout(p, model.args.n_layers)
    starts = [sum(layout[:s]) for s in range(len(layout))]
    out = []
    for s in range(pp_rank, len(layout), p.pipeline_parallel_degree):
        part = copy.deepcopy(model)
        held = range(starts[s], starts[s] + layout[s])
        for i in range(model.args.n_layers):
            if i not in held:
                part.layers[i] = None
        if s != 0:
            part.tok_embeddings = None
        if s != len(layout) - 1:
            part.norm = part.output = None
        out.append((s, part))
    return out


class StageView(nn.Module):
    """The parameters of one rank's stages under the whole model's names (modules shared with
    the stages): what the optimizer, the checkpoint and gradient clipping see."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        first = parts[0]
        self.args = first.args
        self.tok_embeddings = next((m.tok_embeddings for m in parts if m.tok_embeddings is not None), None)
        self.layers = nn.ModuleList([None] * first.args.n_layers)
        for part in parts:
            for name, block in part.layers.named_children():
                self.layers[int(name)] = block
        self.norm = next((m.norm for m in parts if m.norm is not None), None)
        self.output = next((m.output for m in parts if m.output is not None), None)

    def blocks(self) -> list[nn.Module]:
        return [b for b in self.layers if b is not None]


class Pipeline:
    """This rank's stages and the schedule that runs them; `step` trains on one global step's
    micro-batches, `evaluate` runs the forward only."""

    def __init__(
        self,
        stages: list[tuple[int, nn.Module]],
        p: Parallelism,
        pp_mesh: DeviceMesh,
        device: torch.device,
        n_microbatches: int,
        micro_shape: tuple[int, int],
        hidden: tuple[int, torch.dtype],
    ):
        self.parts = [part for _, part in stages]
        n_stages = p.pipeline_parallel_degree * p.pipeline_parallel_stages_per_rank
        self.has_first = any(s == 0 for s, _ in stages)
        self.last = next((part for s, part in stages if s == n_stages - 1), None)
        b, T = micro_shape
        dim, dtype = hidden
        pipeline_stages = []
        for s, part in stages:
            # every stage passes hidden states [b, T (or T/tp), H]; the first reads tokens
            tp = part.tp.size if getattr(part, "tp", None) is not None else 1
            # (requires_grad: the received activations take it from these examples)
            h = torch.empty(b, T // tp, dim, dtype=dtype, device="meta", requires_grad=True)
            x = torch.empty(b, T, dtype=torch.long, device="meta") if s == 0 else h
            pipeline_stages.append(
                PipelineStage(
                    part, s, n_stages, device, input_args=(x,), output_args=(h,), group=pp_mesh.get_group()
                )
            )
        cls = get_schedule_class(p.pipeline_parallel_schedule)
        multi = issubclass(cls, PipelineScheduleMulti)
        try:
            self.schedule = cls(
                pipeline_stages if multi else pipeline_stages[0],
                n_microbatches=n_microbatches,
                loss_fn=self._loss,
                scale_grads=False,
            )
        except ValueError as e:  # e.g. fewer micro-batches than stages
            raise ConfigError(
                f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r} with {n_microbatches} "
                f"micro-batches (the gradient accumulation steps): {e}; raise training.global_batch_size"
            ) from None
        self.n_microbatches = n_microbatches
        self.group = pp_mesh.get_group()
        self.device = device
        self.n_targets: torch.Tensor | None = None
        self.targets_shape, self.packed = (b, T), False  # one micro-batch's targets; rows packed in (_run)
        self.ce: list[torch.Tensor] = []
        self.counts: dict[int, torch.Tensor] = {}
        self.layouts: list = []  # each micro-batch's layout (Documents, CPBatch or None), set by _run
        for part in self.parts:
            part.register_forward_pre_hook(self._layout, with_kwargs=True, prepend=True)
            for block in part.blocks():
                block.register_forward_hook(self._count(block.layer_id))

    def _layout(self, module, args, kwargs):
        """The stage's keyword `microbatch` (its index, a host tensor [1]) -> `documents`, its layout."""
        if "microbatch" in kwargs:
            kwargs = dict(kwargs)
            kwargs["documents"] = self.layouts[int(kwargs.pop("microbatch"))]
        return args, kwargs

    def _count(self, layer_id: int):
        def hook(module, args, out):  # (h, counts [E], prob sums): once per micro-batch forward
            c = out[1].detach()
            self.counts[layer_id] = self.counts[layer_id] + c if layer_id in self.counts else c.clone()

        return hook

    def _loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        targets, rows = unpack_targets(target, self.targets_shape) if self.packed else (target, None)
        ce = self.last.output(h, targets, rows=rows)  # summed cross-entropy of the micro-batch
        self.ce.append(ce.detach())
        return ce / self.n_targets

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, layouts: list | None, train: bool, rows=None
    ) -> torch.Tensor:
        self.ce, self.counts, self.layouts = [], {}, layouts or [None] * self.n_microbatches
        args = (x,) if self.has_first else ()
        self.targets_shape = (y.shape[0] // self.n_microbatches, y.shape[1])
        target = pack_targets(y, rows, self.n_microbatches) if self.last is not None else None
        self.packed = target is not None and target is not y
        run = self.schedule.step if train else self.schedule.eval
        # every stage runs the positions of whole sequences (of its cp share), each micro-batch's
        # layout its own (_layout); one layout for all (None: plain sequences) goes as it is
        kwargs = dict(hidden_states=True, seq_len=y.shape[1])
        if all(layout is self.layouts[0] for layout in self.layouts):
            kwargs["documents"] = self.layouts[0]
        else:
            kwargs["microbatch"] = torch.arange(self.n_microbatches)
        run(*args, target=target, losses=[] if target is not None else None, **kwargs)
        ce = torch.stack(self.ce).sum() if self.ce else torch.zeros((), device=self.device)
        dist.all_reduce(ce, group=self.group)  # from the last stage to every stage
        return ce

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_targets: torch.Tensor,
        layouts: list | None = None,
        rows=None,
    ) -> tuple:
        """x, y [M x b, T]: forward and backward of every micro-batch (layouts: each micro-batch's
        Documents, context parallelism's CPBatch or None, or None for all; rows: each micro-batch's counted
        positions, train/batching.py's, or None); returns the summed cross-entropy (on every stage)
        and this rank's routing counts {layer: [E]}."""
        self.n_targets = n_targets
        return self._run(x, y, layouts, train=True, rows=rows), self.counts

    @torch.no_grad()
    def evaluate(self, batches: list[tuple]) -> torch.Tensor:
        """Summed cross-entropy of these (tokens, targets, rows, layout) batches (any number), M at
        a time; a short last group is filled with batches whose targets are all ignored (no rows)."""
        self.n_targets = torch.ones((), device=self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        none = torch.zeros(0, dtype=torch.long, device=self.device)  # a filler's rows
        for g in range(0, len(batches), self.n_microbatches):
            group = batches[g : g + self.n_microbatches]
            x, y, _, layout = group[0]
            filler = (x, torch.full_like(y, IGNORE_INDEX), none, layout)
            group = group + [filler] * (self.n_microbatches - len(group))
            x = torch.cat([b[0] for b in group])
            y = torch.cat([b[1] for b in group])
            total += self._run(x, y, [b[3] for b in group], train=False, rows=[b[2] for b in group]).double()
        return total

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def eval(self) -> None:
        self.train(False)


def pack_targets(y: torch.Tensor, rows: list | None, m: int) -> torch.Tensor:
    """y [M x b, T] and each micro-batch's counted flat positions [K_i] (None: all count) -> what the
    schedule splits into M micro-batch targets: y itself when some micro-batch counts every target,
    else [M, b x T + K] with each micro-batch's rows after its targets, padded to K = max K_i with
    its first ignored position (one exists where K_i < K <= b x T; found on the device: no sync)."""
    if rows is None or any(r is None for r in rows):
        return y
    k = max(r.numel() for r in rows)
    flat = y.view(m, -1)
    padded = []
    for i, r in enumerate(rows):
        if r.numel() < k:
            first_ignored = (flat[i] == IGNORE_INDEX).int().argmax().view(1)
            r = torch.cat([r, first_ignored.expand(k - r.numel())])
        padded.append(r)
    return torch.cat([flat, torch.stack(padded)], dim=1)


def unpack_targets(target: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's packed target [1, b x T + K] -> (targets [b, T], rows [K])."""
    b, t = shape
    return target[0, : b * t].view(b, t), target[0, b * t :]
