"""Expert parallelism's dispatch and combine (parallel/expert_parallel.py) on ep = world size gloo
ranks against the same experts on one process, in fp64: outputs, input gradients and the expert
parameters' gradients (one process's, summed over the ranks' tokens). Each rank routes its own rows,
with experts that get no rows from some rank. Run with torchrun; exits non-zero on a mismatch.
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_module

from gptoss_titan.model import ModelArgs
from gptoss_titan.model.moe import GroupedExperts
from gptoss_titan.parallel.expert_parallel import ExpertParallel
from gptoss_titan.runtime.cli import exit_now
from gptoss_titan.runtime.distributed import shutdown

E, H, INTER = 8, 16, 8


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    args = ModelArgs(dim=H, n_heads=2, n_kv_heads=1, head_dim=8, num_experts=E, top_k=2, moe_inter_dim=INTER)
    torch.manual_seed(0)  # the same full experts on every rank
    one = GroupedExperts(args).double()
    for p in one.parameters():
        torch.nn.init.normal_(p, std=0.3)
    split = copy.deepcopy(one)
    style = ExpertParallel(E)
    distribute_module(
        split, mesh, partition_fn=style.partition, input_fn=style.dispatch, output_fn=style.combine
    )
    local_e = E // world
    assert all(tuple(p.to_local().shape)[0] == local_e for p in split.parameters())

    g = torch.Generator().manual_seed(1 + rank)  # this rank's own rows
    counts = torch.randint(0, 5, (E,), generator=g)
    counts[(rank * 3) % E] = 0  # an expert that gets nothing from this rank
    x = torch.randn(int(counts.sum()), H, generator=g, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = one(x1, counts), split(x2, counts)
    (y1 * grad).sum().backward()
    (y2 * grad).sum().backward()
    checks = [("output", y2, y1), ("input grad", x2.grad, x1.grad)]
    for (name, p1), p2 in zip(one.named_parameters(), split.parameters()):
        dist.all_reduce(p1.grad)  # one process would see every rank's rows
        checks.append((f"{name} grad", p2.grad.to_local(), p1.grad[rank * local_e : (rank + 1) * local_e]))
    for name, a, b in checks:
        err = (a - b).abs().max().item()
        assert err < 1e-12, f"rank {rank}: {name} differs by {err}"
    assert y1.abs().max() > 0.1 and all(p.grad.abs().max() > 0 for p in one.parameters())
    if rank == 0:
        print(f"expert parallel dispatch/combine on {world} ranks: {len(checks)} tensors equal one process")
    shutdown()  # gc first: a bare destroy sometimes aborts at exit (runtime/distributed.py)


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown (runtime/cli.py)
