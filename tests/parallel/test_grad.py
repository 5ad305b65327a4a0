"""The global gradient norm and clipping (parallel/grad.py): plain and DTensor gradients, fp64 sums,
clipping in place, the pipeline's sum over stages. Sharded gradients over several ranks are checked
by every multi-process equivalence test (grad norms to 1e-5: tests/parallel/test_equivalence.py)."""

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from gptoss_titan.parallel.grad import clip_grad_norm_

from ..helpers.groups import one_rank_group


def params_with_grads(*grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


def exact_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def test_norm_in_fp64_and_no_clipping_below_max_norm():
    g = [torch.randn(10, 7), torch.randn(3)]
    ps = params_with_grads(*g) + [torch.nn.Parameter(torch.ones(4))]  # one without a gradient
    total = clip_grad_norm_(ps, max_norm=1e6)
    assert total.dtype == torch.float64 and total.dim() == 0
    assert total.item() == pytest.approx(exact_norm(g), rel=1e-12)
    assert all(torch.equal(p.grad, gi) for p, gi in zip(ps, g))  # within max_norm: untouched


def test_sums_of_squares_are_fp64():
    """An lm_head-like gradient (12.9M elements, nearly all tiny, a few large): the norm equals the
    exact one to 1e-9 (fp64 sums of 12.9M squares: measured 2.6e-11 off; the same reduction with
    fp32 sums of squares is 4.9e-3 off)."""
    g = torch.full((201088, 64), 3e-4)
    g[0, :4] = torch.tensor([5.0, -3.0, 2.0, 1.0])
    total = clip_grad_norm_(params_with_grads(g), max_norm=0)
    assert total.item() == pytest.approx(exact_norm([g]), rel=1e-9)


@pytest.mark.parametrize("max_norm", [0.0, math.inf])
def test_zero_or_inf_max_norm_only_measures(max_norm):
    g = torch.randn(100) * 10
    ps = params_with_grads(g)
    assert clip_grad_norm_(ps, max_norm).item() == pytest.approx(exact_norm([g]), rel=1e-12)
    assert torch.equal(ps[0].grad, g)


def test_clipping_scales_every_gradient_in_place():
    g = [torch.randn(50) * 3, torch.randn(20, 5) * 3]
    ps = params_with_grads(*g)
    before = clip_grad_norm_(ps, max_norm=1.0)
    assert before.item() == pytest.approx(exact_norm(g), rel=1e-12) and before.item() > 1
    assert exact_norm([p.grad for p in ps]) == pytest.approx(1.0, rel=1e-5)
    for p, gi in zip(ps, g):  # the same direction: one common factor
        torch.testing.assert_close(p.grad, gi / (before.item() + 1e-6), rtol=1e-6, atol=0)


def test_no_gradients_is_a_zero_norm():
    assert clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0.0


@pytest.fixture(name="one_rank_group")
def one_rank_group_fixture():
    """A real (gloo) process group of one rank in this process, destroyed after the test."""
    with one_rank_group():
        yield


def test_dtensor_gradients_on_several_meshes(one_rank_group):
    """Gradients on different meshes and placements (dense, expert) are separate groups whose norms
    combine as a root sum of squares; clipping scales the local shards."""
    dense = init_device_mesh("cpu", (1,), mesh_dim_names=("dense",))
    ep = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    g = [torch.randn(8, 4) * 2, torch.randn(6) * 2, torch.randn(2, 3, 3) * 2, torch.randn(5) * 2]
    placed = [(dense, Shard(0)), (dense, Replicate()), (ep, Shard(0)), None]
    ps = []
    for gi, where in zip(g, placed):
        if where is None:  # a plain tensor beside them
            ps += params_with_grads(gi)
            continue
        mesh, placement = where
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(gi), mesh, [placement]))
        p.grad = distribute_tensor(gi.clone(), mesh, [placement])
        ps.append(p)
    total = clip_grad_norm_(ps, max_norm=1.0)
    assert total.item() == pytest.approx(exact_norm(g), rel=1e-12)
    after = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in ps]
    assert exact_norm(after) == pytest.approx(1.0, rel=1e-5)


def test_pipeline_stages_sum_their_squares(one_rank_group):
    """stages_group: each stage's sum of squares is all-reduced; a stage without gradients adds
    zero (on the given device)."""
    g = torch.randn(30)
    assert clip_grad_norm_(params_with_grads(g), 0, stages_group=dist.group.WORLD).item() == pytest.approx(
        exact_norm([g]), rel=1e-12
    )
    none = clip_grad_norm_(
        [torch.nn.Parameter(torch.ones(2))], 1.0, stages_group=dist.group.WORLD, device="cpu"
    )
    assert none.item() == 0.0 and none.dtype == torch.float64
