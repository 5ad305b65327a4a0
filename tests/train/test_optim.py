"""AdamW's parameter groups and the warmup + decay schedule (train/optim.py)."""

import pytest

from ..conftest import build, tiny_args


def test_lr_schedule():
    from gptoss_titan.config import LRScheduler
    from gptoss_titan.train.optim import lr_factor

    cfg = LRScheduler(warmup_steps=10, decay_steps=100, decay_type="cosine", min_lr_factor=0.1)
    assert lr_factor(1, 1000, cfg) == pytest.approx(1 / 11)
    assert lr_factor(10, 1000, cfg) == pytest.approx(10 / 11)
    assert lr_factor(11, 1000, cfg) == pytest.approx(1.0, abs=1e-3)
    assert lr_factor(60, 1000, cfg) == pytest.approx(0.55)
    assert lr_factor(110, 1000, cfg) == pytest.approx(0.1) and lr_factor(500, 1000, cfg) == pytest.approx(0.1)
    cfg.decay_type = "linear"
    assert lr_factor(60, 1000, cfg) == pytest.approx(0.55)


def test_no_weight_decay_on_norms_biases_sinks_embeddings():
    from gptoss_titan.config import Optimizer
    from gptoss_titan.train.optim import build_optimizer

    m = build(tiny_args())
    opt = build_optimizer(m, Optimizer())
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert all(
        not any(s in n for s in ("norm", "bias", "sinks", "tok_embeddings", "b_gate_up", "b_down"))
        for n in decayed
    )
    assert "output.weight" in decayed and "layers.0.moe.experts.w_gate_up" in decayed
    assert len(decayed) + len(opt.param_groups[1]["params"]) == len(list(m.parameters()))
