"""Expert parallelism: experts split by index over the `ep` mesh, tokens moved with all-to-all.

Shape legend: R rows routed by this rank (tokens x K, sorted by global expert), E experts,
El = E / ep local experts, R' rows this rank's experts receive, H hidden.

Where it sits: the first pass (parallel/__init__.py), on the meta model, before activation
checkpointing, compile and FSDP. The expert parameters become DTensors Shard(0) on the ep mesh
(FSDP later shards each rank's slice over the efsdp mesh). The experts module keeps its
interface - forward(x [R, H] sorted by expert, counts [E]) - and hooks around it do:

  dispatch: exchange per-expert counts (all-to-all), send each rank the rows for its experts
            (all-to-all, uneven and zero splits), regroup the received rows by local expert
  compute:  the local experts on grouped matmul (unchanged model code)
  combine:  undo the regrouping and send the results back (all-to-all); autograd flows through
            both all-to-alls, so gradients reach the tokens' home ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

from ..runtime.compat import all_to_all_single_autograd


class ExpertParallel:
    """Dispatch / combine state for one experts module (one forward at a time)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._pending: list[tuple[torch.Tensor, list[int], list[int]]] = []

    def partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            if isinstance(p, DTensor):  # split by expert and tensor parallelism at once (tensor_parallel.py)
                continue
            dt = nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]), requires_grad=p.requires_grad)
            module.register_parameter(pname, dt)

    def dispatch(self, module: nn.Module, inputs, mesh: DeviceMesh):
        x, counts = inputs  # [R, H], [E]
        ep = mesh.size()
        group = mesh.get_group()
        local_e = self.num_experts // ep
        send_counts = counts.reshape(ep, local_e)  # [ep, El] rows for each destination, per its expert
        recv_counts = torch.empty_like(send_counts)  # [ep (source), El]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
        in_splits = send_counts.sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        x_recv = all_to_all_single_autograd(x, out_splits, in_splits, group)  # [R', H] by source, then expert
        local_id = torch.arange(local_e, device=x.device).repeat(ep)  # [ep x El]
        expert_of_row = torch.repeat_interleave(
            local_id, recv_counts.reshape(-1), output_size=sum(out_splits)
        )
        order = torch.argsort(expert_of_row, stable=True)  # [R'] regroup by local expert
        self._pending.append((order, in_splits, out_splits))
        return x_recv[order], recv_counts.sum(0)  # [R', H], [El]

    def combine(self, module: nn.Module, y: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        order, in_splits, out_splits = self._pending.pop()
        y_src = torch.empty_like(y).index_copy(0, order, y)  # [R'] back in arrival order
        return all_to_all_single_autograd(y_src, in_splits, out_splits, mesh.get_group())  # [R, H]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Split every MoE layer's experts over ep_mesh and route tokens with all-to-all."""
    for block in model.blocks():
        experts = block.moe.experts
        style = ExpertParallel(block.moe.num_experts)
        distribute_module(
            experts, ep_mesh, partition_fn=style.partition, input_fn=style.dispatch, output_fn=style.combine
        )
