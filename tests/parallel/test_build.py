"""plan_run and build_model (parallel/build.py), the one way the trainer, the dry run and the
sampler build a rank's model: the batch layout and its one-line errors, initialization that does
not depend on being asked twice, a checkpoint-bound build that draws no weights, the meta build,
and pipeline ranks that hold disjoint stages covering every layer."""

import pytest
import torch
import torch.distributed as dist

from gptoss_titan.config import ConfigError, parse_args
from gptoss_titan.parallel.build import build_model, plan_run
from gptoss_titan.runtime.compat import fake_process_group

from ..helpers.training import SMALL, argv_for


def cfg_for(tmp_path, *extra):
    return parse_args(argv_for(tmp_path, *SMALL, *extra))


def test_plan_layout_and_errors(tmp_path):
    plan = plan_run(cfg_for(tmp_path, "--training.global_batch_size=8"), 1)
    assert (plan.global_batch, plan.accum_steps, plan.args.dim, plan.dims.dp_degree) == (8, 4, 64, 1)
    plan = plan_run(cfg_for(tmp_path, "--training.global_batch_size=8"), 2)  # FSDP over 2 ranks
    assert (plan.global_batch, plan.accum_steps, plan.dims.dp_degree) == (8, 2, 2)
    with pytest.raises(ConfigError, match="global_batch_size = 6 must be -1 or a positive multiple of"):
        plan_run(cfg_for(tmp_path, "--training.global_batch_size=6"), 2)
    pp = cfg_for(tmp_path, "--parallelism.pipeline_parallel_degree=2")
    with pytest.raises(ConfigError, match="needs at least 2 micro-batches"):
        plan_run(pp, 2)


def test_init_is_repeatable_and_a_checkpoint_bound_build_draws_nothing(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path)
    plan = plan_run(cfg, 1)
    cpu = torch.device("cpu")
    a, b = build_model(cfg, plan, None, cpu), build_model(cfg, plan, None, cpu)
    assert a.pipeline is None and a.stages == [(0, a.model)]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    drawn = []
    from gptoss_titan.model import init as init_module

    real = init_module.init_param
    monkeypatch.setattr(init_module, "init_param", lambda *x: drawn.append(x[1]) or real(*x))
    c = build_model(cfg, plan, None, cpu, init=False)
    assert not drawn  # no weight drawn: a checkpoint overwrites them all
    assert torch.equal(c.model.rope_cos, a.model.rope_cos)  # buffers are set
    build_model(cfg, plan, None, cpu)
    assert "tok_embeddings.weight" in drawn  # the hook sees the draws of an initializing build
    meta = build_model(cfg, plan, None, torch.device("meta"))
    assert all(p.is_meta for p in meta.model.parameters())


def test_pipeline_ranks_hold_disjoint_stages_covering_every_layer(tmp_path):
    cfg = cfg_for(
        tmp_path,
        "--model.args.n_layers=4",
        "--parallelism.pipeline_parallel_degree=2",
        "--parallelism.pipeline_parallel_stages_per_rank=2",
        "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
        "--training.global_batch_size=8",
    )
    plan = plan_run(cfg, 2)
    fake_process_group(2)
    try:
        meshes = plan.dims.build_meshes("cpu")
        held = {}
        for pp_rank in range(2):
            built = build_model(cfg, plan, meshes, torch.device("meta"), pp_rank=pp_rank)
            assert built.pipeline is None  # shapes only on meta
            held[pp_rank] = {s: [b.layer_id for b in part.blocks()] for s, part in built.stages}
    finally:
        dist.destroy_process_group()
    assert held == {0: {0: [0], 2: [2]}, 1: {1: [1], 3: [3]}}
