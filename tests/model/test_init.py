"""Initialization (init.py): each rank draws only its part, and the parts are the one-process values."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from gptoss_titan.model import init
from gptoss_titan.runtime.compat import fake_process_group


@pytest.mark.parametrize(
    "shape, placement, world",
    [
        ((8, 64, 96), Shard(1), 4),  # experts sharded inside (fewer local experts than FSDP shards)
        ((11, 40), Shard(0), 3),  # uneven rows
        ((5,), Shard(0), 4),  # 2, 2, 1 and 0 rows per rank
    ],
)
def test_each_rank_draws_its_part_of_the_one_process_values(monkeypatch, shape, placement, world):
    monkeypatch.setattr(init, "BLOCK_ELEMS", 200)  # several blocks per tensor, split by the shards
    full = torch.empty(shape)
    init.init_param(full, "w", "normal", 0.02, base_seed=7)
    assert full.std() > 0.01
    for rank in range(world):  # rank r of a fake world: its DTensor shard, filled locally
        fake_process_group(world, rank)
        try:
            mesh = init_device_mesh("cpu", (world,))
            p = distribute_tensor(torch.empty(shape), mesh, [placement], src_data_rank=None)
            init.init_param(p, "w", "normal", 0.02, base_seed=7)
            want = distribute_tensor(full, mesh, [placement], src_data_rank=None).to_local()
            assert torch.equal(p.to_local(), want), rank
        finally:
            dist.destroy_process_group()
