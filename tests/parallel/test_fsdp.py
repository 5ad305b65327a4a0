"""FSDP2 (parallel/fsdp.py): what each module is sharded over and how, checked on a fake process
group; and 2 real processes (FSDP x2, gloo) training exactly like one, in the fast tier."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import Shard

from gptoss_titan.config import parse_args
from gptoss_titan.model import Transformer
from gptoss_titan.parallel import ParallelDims, parallelize
from gptoss_titan.runtime.compat import fake_process_group

from ..conftest import tiny_args
from ..helpers.equivalence import assert_same, run


def sharded(world: int, *overrides: str) -> Transformer:
    """tiny_args (4 experts, 2 layers) on the meta device after every parallel pass, as rank 0 of
    `world` ranks of a fake process group (collectives do nothing)."""
    cfg = parse_args(["--data.dataset=kjv", *overrides])
    dims = ParallelDims.from_config(cfg.parallelism, world, 4)
    fake_process_group(world)
    try:
        with torch.device("meta"):
            model = Transformer(tiny_args(num_experts=4))
        return parallelize(model, dims, dims.build_meshes("cpu"), cfg)
    finally:
        dist.destroy_process_group()


def group(module):
    """The FSDP parameter group a module owns (its mesh, reshard-after-forward, mixed precision)."""
    return module._get_fsdp_state()._fsdp_param_group


@pytest.mark.parametrize(
    "world, ep, dims, local_shape",
    [
        (2, 1, (0,), (2, 64, 64)),  # 4 experts over 2 shards: whole experts
        (4, 2, (0, 0), (1, 64, 64)),  # 2 local experts over efsdp 2: one each
        (8, 2, (1, 0), (2, 16, 64)),  # 2 local experts over efsdp 4: inside each expert
    ],
)
def test_experts_shard_by_expert_or_inside_them(world, ep, dims, local_shape):
    """Experts shard over the efsdp mesh on top of their ep split: by expert (dim 0) while every
    shard gets one, inside each expert (dim 1) when there are fewer local experts than shards."""
    model = sharded(world, f"--parallelism.expert_parallel_degree={ep}")
    for block in model.layers:
        w = block.moe.experts.w_gate_up  # [E, H, 2I] = [4, 64, 64]
        # (efsdp, ep) placements, Shard or (efsdp over an ep split) _StridedShard: their dims
        assert tuple(p.dim for p in w.placements) == dims and tuple(w.to_local().shape) == local_shape
        names = ("efsdp", "ep") if ep > 1 else ("efsdp",)
        assert w.device_mesh.mesh_dim_names == names
        dense = block.attention.wq.weight
        assert tuple(dense.placements) == (Shard(0),) and dense.device_mesh.mesh_dim_names == ("dp_shard",)
        assert dense.to_local().shape[0] == dense.shape[0] // world


@pytest.mark.parametrize(
    "policy, blocks_reshard, head_reshards",
    [("default", True, False), ("always", True, True), ("never", False, False)],
)
def test_reshard_after_forward_and_mixed_precision(policy, blocks_reshard, head_reshards):
    """Blocks free their gathered parameters after forward unless told not to; the final norm and
    lm_head, which backward needs first, keep them by default. Gradients are summed (divide
    factor 1, plain SUM for gloo); params and reductions in the configured dtypes."""
    model = sharded(
        2,
        f"--parallelism.fsdp_reshard_after_forward={policy}",
        "--training.mixed_precision_param=bfloat16",
    )
    for block in model.layers:
        assert (group(block).post_forward_mesh_info is not None) == blocks_reshard
    head = group(model.output)
    assert head is group(model.norm) and (head.post_forward_mesh_info is not None) == head_reshards
    for m in model.modules():
        if isinstance(m, FSDPModule) and group(m) is not None:
            g = group(m)
            assert g.gradient_divide_factor == 1.0 and g.force_sum_reduction_for_comms
            assert (g.mp_policy.param_dtype, g.mp_policy.reduce_dtype) == (torch.bfloat16, torch.float32)


# The smallest run the equivalence machinery takes: 2 layers, a 512-token vocabulary, 3 steps.
TINY = ("--model.args.n_layers=2", "--training.steps=3")
TINY_VOCAB = 512


def test_two_processes_fsdp_train_like_one(tmp_path):
    """FSDP x2 on 2 gloo processes against one process: the same per-step losses, grad norms and
    final weights (test_equivalence.py's runs at a smaller shape). Tolerances as
    tests/helpers/equivalence.py (assert_same) derives them: 1e-5, weights of max(norm, 0.2)
    (tests/parallel/reorder_estimate.py for this run: up to 1.1e-6, layers.1.moe.experts.b_down)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    one = run(runs, "one", 1, *TINY, vocab=TINY_VOCAB)
    two = run(runs, "fsdp2", 2, *TINY, vocab=TINY_VOCAB)
    assert len(one["losses"]) == 3
    assert_same(one, two, floor=0.2)
