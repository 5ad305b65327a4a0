"""Expert parallelism (parallel/expert_parallel.py): the experts split by index over the ep mesh,
and tokens moved there and back with all-to-all (2 gloo ranks against one process: ep_job.py).
Whole runs with EP against one process: test_equivalence.py (fsdp2_ep2, ep4, ...)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from gptoss_titan.model import Transformer
from gptoss_titan.parallel.expert_parallel import apply_expert_parallel
from gptoss_titan.runtime.compat import fake_process_group

from ..conftest import python_cmd, run_ok, tiny_args

HERE = Path(__file__).parent


@pytest.mark.parametrize("ep", [2, 4])
def test_experts_split_by_index_and_nothing_else(ep):
    """On a fake process group of ep ranks (rank 0's view): every expert parameter becomes a DTensor
    Shard(0) on the ep mesh holding 4 / ep experts; attention, router and norms stay plain."""
    fake_process_group(ep)
    try:
        mesh = init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
        with torch.device("meta"):
            model = Transformer(tiny_args(num_experts=4))
        apply_expert_parallel(model, mesh)
        for name, p in model.named_parameters():
            if ".moe.experts." in name:
                assert isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),), name
                assert p.to_local().shape[0] == 4 // ep and p.shape[0] == 4, name
            else:
                assert not isinstance(p, DTensor), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_dispatch_and_combine_equal_one_process():
    r = run_ok(python_cmd(2, str(HERE / "ep_job.py")), timeout=600)
    assert "equal one process" in r.stdout + r.stderr
