"""Tensor parallelism (tp) with sequence parallelism, as a pass over the meta model.

Shape legend: B batch, T tokens (this rank's share under cp), H hidden, N/G query/kv heads,
I expert intermediate size, V vocabulary; tp ranks hold the same tokens.

Between the parts named below the residual stream is split along the sequence: each tp rank holds
[B, T/tp, H] (sequence parallelism), so the RMSNorms and the residual adds run on 1/tp of the
tokens. A part that needs whole sequences gathers them on entry (all-gather; its backward a
reduce-scatter) and returns partial sums that are reduce-scattered back to the split layout:

  embedding  rows of the vocabulary (Shard(0)); each rank looks up the tokens it holds, zero for
             the others -> reduce-scatter
  attention  gather -> q/k/v column-wise (heads split: N/tp query and G/tp kv heads per rank, the
             sinks and q/k/v biases with them) -> attention on the local heads -> o row-wise ->
             reduce-scatter, + the o bias on the local tokens
  MoE        gather -> router replicated (every rank routes alike) -> experts split along I (the
             interleaved gate/up columns in pairs, the down rows), optionally also by expert
             index over ep -> weighted sum (partial) -> reduce-scatter; the down bias, which every
             rank adds in full, counts 1/tp on each. Or (expert_tensor_parallel_degree = 1) on the
             rank's share of the sequence with whole experts, expert parallelism spanning the tp
             ranks; the routing counts are summed over tp
  lm_head    gather -> rows of the vocabulary; the fused loss combines the row maxima, sums of
             exponentials and target logits over tp (model/loss.py): no rank holds full logits

Parameters split by tp are DTensors (layout-free checkpoints; FSDP composes on top). Parameters
held whole on every tp rank (the norms, the o bias, the router, the down bias) see gradients of
a share of the computation on each rank; `sync_replicated_grads` sums those over tp after
backward, so every rank keeps identical copies. A loss computed in full on every tp rank (the
aux load-balancing loss) is weighted 1/tp by the trainer for the same reason.

Forwards whose length is not a multiple of tp (generation) run without the sequence split: the
embedding and the row-wise outputs all-reduce, the gathers do nothing; they do not train.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from ..model.local import local
from ..model.lora import LoRALinear
from ..model.model import OutputHead
from ..model.moe import _expert_of_row
from ..runtime.compat import CHECKPOINT_WRAPPED_MODULE


class TPContext:
    """The tp mesh, and whether the current forward splits the sequence (set per forward)."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.split = True
        self.replicated_grads: set[str] = set()  # parameter names whose gradients sync_replicated_grads sums

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Routing counts [E] of this rank's tokens -> of the tp ranks' tokens together."""
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return counts

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T/tp, H] -> [B, T, H] (backward: the gradients of the tp ranks summed, then split)."""
        if not self.split:
            return x
        return _waited(funcol.all_gather_single(x.contiguous(), gather_dim=1, group=self.group))

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] partial sums -> [B, T/tp, H] of the total (backward: gathered gradients)."""
        if self.split:
            return _waited(
                funcol.reduce_scatter_single(x.contiguous(), "sum", scatter_dim=1, group=self.group)
            )
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                f"a tensor-parallel forward of {x.shape[1]} tokens (not a multiple of tp = {self.size}) cannot train"
            )
        return funcol.all_reduce(x, "sum", group=self.group)


def _waited(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor instead of funcol's AsyncCollectiveTensor wrapper (eager mode): FSDP's hooks
    on a module's outputs lose the gradient of the wrapper when a compiled module consumes it."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


class ColwiseLinear(nn.Linear):
    """Output features split: weight and bias Shard(0); input whole, output this rank's features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, local(self.weight), local(self.bias))


class RowwiseLinear(nn.Linear):
    """Input features split: weight Shard(1); the partial products are summed (reduce-scattered
    to the sequence split), then the whole bias is added once, on the local tokens."""

    tp: TPContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.scatter(F.linear(x, local(self.weight))) + local(self.bias)


class ColwiseLoRALinear(ColwiseLinear, LoRALinear):
    """ColwiseLinear with its LoRA adapter: lora_A [r, in] whole on every rank (its gradient, a
    share of the whole on each, is summed over tp), lora_B [out, r] split by output features like
    the weight: this rank's output features, exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        adapter = F.linear(F.linear(h, local(self.lora_A)), local(self.lora_B)) * self.lora_scale
        return F.linear(x, local(self.weight), local(self.bias)) + adapter


class RowwiseLoRALinear(RowwiseLinear, LoRALinear):
    """RowwiseLinear with its LoRA adapter: lora_A [r, in] split by input features like the weight,
    so x A^T is a partial sum like x W^T; lora_B [out, r] whole (gradient summed over tp). Both
    partial sums are reduce-scattered together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        adapter = F.linear(F.linear(h, local(self.lora_A)), local(self.lora_B)) * self.lora_scale
        return self.tp.scatter(F.linear(x, local(self.weight)) + adapter) + local(self.bias)


class VocabParallelEmbedding(nn.Embedding):
    """Vocabulary rows split (Shard(0)): each rank embeds the tokens in its rows, zeros elsewhere;
    the sum over ranks is the embedding (reduce-scattered to the sequence split)."""

    tp: TPContext

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = local(self.weight)  # [V/tp, H]
        ids = tokens - self.tp.rank * w.shape[0]
        here = (ids >= 0) & (ids < w.shape[0])
        h = F.embedding(ids.clamp(0, w.shape[0] - 1), w) * here.unsqueeze(-1).to(w.dtype)
        return self.tp.scatter(h)


class _VocabCombine:
    """model/loss.py's RowCombine over the tp group (plain collectives: inside the loss's forward)."""

    def __init__(self, group):
        self.group = group

    def max(self, mx: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.group)
        return mx

    def sum(self, sumexp: torch.Tensor, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = self.sum_rows(torch.stack([sumexp.squeeze(1), picked]))  # [2, C]: one collective for both
        return both[0].unsqueeze(1), both[1]

    def sum_rows(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(OutputHead):
    """lm_head with vocabulary rows split (Shard(0)): the loss of the whole vocabulary from each
    rank's rows; without targets the logits are gathered along the vocabulary."""

    tp: TPContext

    def parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        w = local(self.weight)  # [V/tp, H]
        split = {"vocab_start": self.tp.rank * w.shape[0], "combine": _VocabCombine(self.tp.group)}
        return self.tp.gather(h), w, split  # [B, T, H]: the whole sequence, then its last position

    def whole_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, V/tp] -> [B, T, V]"""
        return _waited(funcol.all_gather_single(logits.contiguous(), gather_dim=2, group=self.tp.group))


def _shard(module: nn.Module, name: str, mesh: DeviceMesh, placements: list) -> None:
    p = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(p, mesh, placements), p.requires_grad))


def _swap(module: nn.Module, cls: type, tp: TPContext) -> None:
    """Give a module the tensor-parallel forward of `cls` (a subclass of its class: same
    parameters, same names, so checkpoints do not change)."""
    module.__class__ = cls
    module.tp = tp


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, experts_mesh: DeviceMesh, ep: int, split_experts: bool = True
) -> TPContext:
    """Split the model over tp_mesh (see the module doc); experts_mesh is ("ep", "tp") when expert
    parallelism also splits the experts (their parameters then carry both placements), else the
    tp mesh. split_experts False (expert_tensor_parallel_degree = 1): the MoE runs on each rank's
    share of the sequence with whole experts, the tp ranks being expert-parallel ranks; the
    routing counts are then summed over tp. Returns the context; the model keeps it as `model.tp`."""
    tp = TPContext(tp_mesh)
    replicated = tp.replicated_grads
    if model.tok_embeddings is not None:  # a pipeline stage holds some of the modules
        _shard(model.tok_embeddings, "weight", tp_mesh, [Shard(0)])
        _swap(model.tok_embeddings, VocabParallelEmbedding, tp)
    if model.output is not None:
        _shard(model.output, "weight", tp_mesh, [Shard(0)])
        _swap(model.output, VocabParallelHead, tp)
        replicated.add("norm.weight")
    lead = [Shard(0)] if ep > 1 else []  # the expert-parallel split of dim 0 comes first
    for block in model.blocks():
        attn = block.attention
        names = ["attention_norm.weight", "ffn_norm.weight", "attention.wo.bias"]
        for name in ("wq", "wk", "wv"):
            lin, adapted = getattr(attn, name), isinstance(getattr(attn, name), LoRALinear)
            _shard(lin, "weight", tp_mesh, [Shard(0)])
            _shard(lin, "bias", tp_mesh, [Shard(0)])
            lin.__class__ = ColwiseLoRALinear if adapted else ColwiseLinear
            if adapted:
                _shard(lin, "lora_B", tp_mesh, [Shard(0)])
                names.append(f"attention.{name}.lora_A")
        adapted = isinstance(attn.wo, LoRALinear)
        _shard(attn.wo, "weight", tp_mesh, [Shard(1)])
        _swap(attn.wo, RowwiseLoRALinear if adapted else RowwiseLinear, tp)
        if adapted:
            _shard(attn.wo, "lora_A", tp_mesh, [Shard(1)])
            names.append("attention.wo.lora_B")
        _shard(attn, "sinks", tp_mesh, [Shard(0)])
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp.size, attn.n_kv_heads // tp.size
        attn.register_forward_pre_hook(lambda m, args: (tp.gather(args[0]), *args[1:]))
        moe = block.moe
        names += ["moe.router.gate.weight", "moe.router.gate.bias"]
        if isinstance(moe.router.gate, LoRALinear):  # replicated like the router
            names += ["moe.router.gate.lora_A", "moe.router.gate.lora_B"]
        if split_experts:
            moe.register_forward_pre_hook(lambda m, args: (tp.gather(args[0]), *args[1:]))
            moe.register_forward_hook(lambda m, args, out: (tp.scatter(out[0]), *out[1:]))
            experts = moe.experts
            for name, dim in _expert_splits(experts):
                _shard(experts, name, experts_mesh, [*lead, Shard(dim)])
            for name in ("lora_gate_up_A", "lora_down_B"):  # whole on every tp rank: gradients summed
                if hasattr(experts, name):
                    if ep > 1:
                        _shard(experts, name, experts_mesh, [Shard(0), Replicate()])
                    names.append(f"moe.experts.{name}")
            if ep > 1:
                _shard(experts, "b_down", experts_mesh, [Shard(0), Replicate()])
            experts.register_forward_hook(_down_bias_share(tp.size))  # before expert parallelism's combine
            names.append("moe.experts.b_down")
        else:
            moe.register_forward_hook(lambda m, args, out: (out[0], tp.sum_counts(out[1]), out[2]))
        replicated.update(f"layers.{block.layer_id}.{n}" for n in names)

    def split_if_whole_sequences(module, args, kwargs):
        tokens = args[0] if args else kwargs["tokens"]  # [B, T], or a pipeline stage's [B, T/tp, H]
        tp.split = tokens.dim() == 3 or tokens.shape[1] % tp.size == 0

    model.register_forward_pre_hook(split_if_whole_sequences, with_kwargs=True)
    model.tp = tp
    return tp


def _expert_splits(experts: nn.Module) -> list[tuple[str, int]]:
    """(parameter, dim) of the experts split along I: the gate-up columns (interleaved gate/up
    pairs) and the down rows, as weights [E, in, out] or as MXFP4 blocks [E, out, in/32, 16] and
    scales [E, out, in/32] (a LoRA base: the down split is along its 32-value blocks); the
    adapters' B of gate-up and A of down follow their weights."""
    if experts.mxfp4_base:
        out = [("w_gate_up_blocks", 1), ("w_gate_up_scales", 1), ("w_down_blocks", 2), ("w_down_scales", 2)]
    else:
        out = [("w_gate_up", 2), ("w_down", 1)]
    out.append(("b_gate_up", 1))
    return out + [(n, d) for n, d in (("lora_gate_up_B", 2), ("lora_down_A", 1)) if hasattr(experts, n)]


def _down_bias_share(tp_size: int):
    """Every tp rank adds the whole down bias to its partial expert output; keep 1/tp of it on
    each, so the sum over ranks holds it once (its gradient is then 1/tp of the total on each
    rank: sync_replicated_grads sums them)."""

    def hook(module, args, y):
        counts = args[1]  # [El] rows of each local expert
        rows = _expert_of_row(counts, y.shape[0])
        b = local(module.b_down)
        return y - b[rows].to(y.dtype) * (1 - 1 / tp_size)

    return hook


def _clean(name: str) -> str:
    return name.replace(f"{CHECKPOINT_WRAPPED_MODULE}.", "")  # compile works in place: no _orig_mod


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> None:
    """Sum over tp the gradients of the parameters every tp rank holds whole (one all-reduce).
    Call after the last backward of a step, before clipping; nothing to do without tp."""
    tp: TPContext | None = getattr(model, "tp", None)
    if tp is None:
        return
    grads = [
        local(p.grad)
        for n, p in model.named_parameters()
        if p.grad is not None and _clean(n) in tp.replicated_grads
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=tp.group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
