"""The private and version-dependent torch APIs behind one name each (runtime/compat.py): the
version floor, the recompile limit, the mixed-precision GEMM helpers, the grouped GEMM, the ops
activation checkpointing saves, meshes on a fake process group."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

from gptoss_titan.runtime import compat


def test_torch_version_and_the_floor(monkeypatch):
    assert compat.torch_version() >= compat.TORCH_FLOOR == (2, 10)  # this environment runs the package
    for version, parsed in (("2.13.0+cpu", (2, 13)), ("2.10.0a0+git1234", (2, 10)), ("3.0.1", (3, 0))):
        monkeypatch.setattr(torch, "__version__", version)
        assert compat.torch_version() == parsed


def test_recompile_limit_is_only_raised():
    import torch._dynamo.config as dynamo_config

    saved = dynamo_config.recompile_limit  # (monkeypatch's undo would delete a config entry)
    try:
        dynamo_config.recompile_limit = 8
        compat.raise_recompile_limit(64)
        assert dynamo_config.recompile_limit == 64
        compat.raise_recompile_limit(16)
        assert dynamo_config.recompile_limit == 64
    finally:
        dynamo_config.recompile_limit = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_output_gemms(dtype):
    """out = a @ b and acc += a @ b land in fp32: fp32 inputs as one fp32 GEMM; low-precision inputs
    on CPU as their own product (rounded to the input dtype), then widened."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(s, generator=g).to(dtype) for s in ((5, 7), (7, 3)))
    want = torch.mm(a, b).float()
    out = torch.empty(5, 3)
    compat.mm_fp32_out(a, b, out)
    assert out.dtype == torch.float32 and torch.equal(out, want)
    acc = torch.ones(5, 3)
    compat.addmm_fp32_(acc, a, b)
    torch.testing.assert_close(acc, want + 1, rtol=1e-6, atol=1e-6)


def test_grouped_mm_is_one_gemm_per_group():
    assert compat.has_grouped_mm()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 8, generator=g), torch.randn(3, 8, 4, generator=g)  # rows of 16-byte multiples
    offs = torch.tensor([2, 2, 9], dtype=torch.int32)  # end rows: 2 rows, none, 7 rows
    want = torch.cat([x[:2] @ w[0], x[2:9] @ w[2]])
    torch.testing.assert_close(compat.grouped_mm(x, w, offs), want)


def test_attention_save_ops():
    assert compat.attention_save_ops(traced=True) == {torch.ops.higher_order.flex_attention}
    assert compat.attention_save_ops(traced=False) == {torch.ops.higher_order.inductor_compiled_code}


def test_meshes_on_a_fake_process_group():
    """Rank 1 of 4, pretended: a world mesh unflattened into named dimensions, and the shape and
    offset of a rank's shard of a DTensor (the global offset of its rows)."""
    compat.fake_process_group(4, rank=1)
    try:
        world = init_device_mesh("cpu", (4,), mesh_dim_names=("world",))
        mesh = compat.unflatten_mesh(world, 0, (2, 2), ("dp", "ep"))
        assert mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.shape) == (2, 2)
        assert mesh["ep"].size() == 2 and mesh["dp"].size() == 2
        assert compat.local_shape_and_offset(torch.Size((8, 6)), world, [Shard(0)]) == ((2, 6), (2, 0))
        assert compat.local_shape_and_offset(torch.Size((8, 6)), world, [Shard(1)])[0] == (8, 2)
    finally:
        dist.destroy_process_group()


def test_the_torchrun_parts_the_launcher_uses():
    """torch.distributed.run's parser and config builder, the agent's entry and exceptions, and the
    LaunchConfig field the launcher sets (its stop grace)."""
    run = compat.torchrun()
    args = run.parse_args(
        ["--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:1", "x.py", "a"]
    )
    config, cmd, cmd_args = run.config_from_args(args)
    assert (
        config.nproc_per_node == 2
        and config.min_nodes == config.max_nodes == 1
        and cmd_args == ["-u", "x.py", "a"]
    )
    assert hasattr(config, "shutdown_timeout") and callable(run.elastic_launch(config=config, entrypoint=cmd))
    assert issubclass(run.ChildFailedError, Exception) and issubclass(run.SignalException, Exception)
