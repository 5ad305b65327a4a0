"""The part of a parameter this process holds (local.py)."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from gptoss_titan.model.local import local
from gptoss_titan.runtime.compat import fake_process_group


def test_a_plain_tensor_is_its_own_local_part():
    t = torch.randn(3, 4)
    assert local(t) is t


def test_a_dtensor_gives_this_ranks_shard_and_its_gradient_flows_back():
    full = torch.arange(12.0).view(6, 2)
    for rank in range(2):  # rank r of a fake world of 2
        fake_process_group(2, rank)
        try:
            mesh = init_device_mesh("cpu", (2,))
            p = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
            part = local(p)
            assert not isinstance(part, type(p)) and torch.equal(part, full[3 * rank : 3 * rank + 3])
            (part * 2).sum().backward()
            assert torch.equal(p.grad.to_local(), torch.full((3, 2), 2.0))
        finally:
            dist.destroy_process_group()
