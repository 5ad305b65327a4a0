import pytest

from gptoss_titan.config import ConfigError, Parallelism
from gptoss_titan.parallel import ParallelDims


def dims(world, experts=8, **kw):
    return ParallelDims.from_config(Parallelism(**kw), world, experts)


def test_context_parallel_joins_the_shard_group():
    """cp ranks read one batch (data-parallel degree world / cp) and shard like data ranks."""
    d = dims(8, context_parallel_degree=2, expert_parallel_degree=4)
    assert (d.dp_shard, d.cp, d.efsdp, d.dp_degree, d.dp_rank(5)) == (4, 2, 2, 4, 2)


def test_tensor_parallel_ranks_share_data():
    """tp innermost: tp ranks read one batch; with cp, a data rank spans cp x tp ranks."""
    d = dims(16, tensor_parallel_degree=2, context_parallel_degree=2, expert_parallel_degree=4)
    assert (d.dp_shard, d.cp, d.tp, d.efsdp, d.dp_degree, d.dp_rank(5), d.dp_rank(4)) == (4, 2, 2, 2, 4, 1, 1)
    d = dims(64, experts=128, tensor_parallel_degree=2, expert_parallel_degree=8)
    assert (d.dp_shard, d.efsdp, d.dp_degree) == (32, 4, 32)


def test_pipeline_stages_are_outermost():
    """pp outermost: rank r and r + world/pp are the same data rank in consecutive stages."""
    d = dims(16, pipeline_parallel_degree=2, tensor_parallel_degree=2, expert_parallel_degree=2)
    assert (d.dp_shard, d.efsdp, d.dp_degree, d.dp_rank(3), d.dp_rank(11)) == (4, 2, 4, 1, 1)


def test_resolves_shard_degree():
    d = dims(8, data_parallel_replicate_degree=2, expert_parallel_degree=2)
    assert (d.dp_replicate, d.dp_shard, d.ep, d.efsdp, d.dp_degree) == (2, 4, 2, 2, 8)
    d = dims(64, experts=128, expert_parallel_degree=8)
    assert (d.dp_shard, d.efsdp) == (64, 8)


@pytest.mark.parametrize(
    "world, kw, match",
    [
        (4, dict(data_parallel_shard_degree=3), r"1 x 1 x 3 x 1 x 1 = 3 != world size 4"),
        (
            6,
            dict(data_parallel_replicate_degree=4),
            r"not divisible by parallelism.pipeline_parallel_degree x data_parallel_replicate_degree x "
            r"context_parallel_degree x tensor_parallel_degree = 1 x 4 x 1 x 1 = 4",
        ),
        (6, dict(tensor_parallel_degree=4), r"tensor_parallel_degree = 1 x 1 x 1 x 4 = 4; choose"),
        (
            8,
            dict(tensor_parallel_degree=2, data_parallel_shard_degree=2),
            r"1 x 1 x 2 x 1 x 2 = 4 != world size 8",
        ),
        (8, dict(tensor_parallel_degree=0), "must be >= 1"),
        (
            6,
            dict(expert_parallel_degree=4),
            "expert_parallel_degree = 4 does not divide data_parallel_shard_degree x context_parallel_degree = 6",
        ),
        (6, dict(expert_parallel_degree=3), "does not divide the 8 experts"),
        (4, dict(data_parallel_replicate_degree=0), "must be >= 1"),
        (4, dict(expert_parallel_degree=0), "must be >= 1"),
        (4, dict(pipeline_parallel_degree=0), "must be >= 1"),
        (6, dict(pipeline_parallel_degree=4), r"pipeline_parallel_degree x .* = 4 x 1 x 1 x 1 = 4"),
        (4, dict(context_parallel_degree=0), "must be >= 1"),
        (6, dict(context_parallel_degree=4), r"tensor_parallel_degree = 1 x 1 x 4 x 1 = 4"),
        (
            8,
            dict(context_parallel_degree=2, data_parallel_shard_degree=2),
            r"1 x 1 x 2 x 2 x 1 = 4 != world size 8",
        ),
        (
            4,
            dict(context_parallel_degree=2, expert_parallel_degree=8),
            "does not divide data_parallel_shard_degree x",
        ),
        (
            1,
            dict(expert_parallel_degree=2),
            "does not divide data_parallel_shard_degree x context_parallel_degree = 1",
        ),
    ],
)
def test_mesh_errors(world, kw, match):
    with pytest.raises(ConfigError, match=match):
        dims(world, **kw)
