"""Activation checkpointing (parallel/activation_checkpoint.py) with and without compile: what it
keeps, what it recomputes, on every device path's attention op."""

import pytest
import torch

from gptoss_titan.config import ActivationCheckpoint
from gptoss_titan.model import attention
from gptoss_titan.parallel.activation_checkpoint import apply_activation_checkpointing, save_list
from gptoss_titan.parallel.compile import apply_compile

from ..conftest import build, tiny_args


def test_save_list_covers_the_attention_op_of_every_device_path():
    """CPU: the flash custom op; CUDA: flex_attention traced into a compiled block, or (eager
    checkpointing around the separately compiled flex kernel) the compiled region that carries it;
    SDPA variants for other devices."""
    eager, compiled = save_list(compiled=False), save_list(compiled=True)
    for ops in (eager, compiled):
        assert torch.ops.gptoss_titan.flash_sink.default in ops
        assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in ops
        assert torch.ops.aten._scaled_dot_product_efficient_attention.default in ops
        assert torch.ops.aten.mm.default in ops and torch.ops.aten._grouped_mm.default in ops
    assert torch.ops.higher_order.flex_attention in compiled
    assert torch.ops.higher_order.inductor_compiled_code in eager
    from gptoss_titan.runtime.compat import flex_compile_options

    assert flex_compile_options() == {
        "wrap_inductor_compiled_regions": True
    }  # what makes that region visible


@pytest.mark.parametrize(
    "mode, compiled, kernel_calls",
    [
        ("none", False, 2),
        ("selective", False, 2),
        ("full", False, 4),
        pytest.param("selective", True, 2, marks=pytest.mark.slow),
        pytest.param("full", True, 4, marks=pytest.mark.slow),
    ],
)
def test_per_op_checkpointing_keeps_the_attention_output(monkeypatch, mode, compiled, kernel_calls):
    """Forward + backward of 2 layers: per-op checkpointing runs the attention kernel once per layer
    (its output is kept), eager and compiled (the compiled module is the checkpoint wrapper, so the
    policy is traced into the graph); full checkpointing recomputes it (twice per layer)."""
    calls = []
    real = attention._FLASH_CPU
    monkeypatch.setattr(attention, "_FLASH_CPU", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = build(tiny_args(n_layers=2, sliding_window=8))
    apply_activation_checkpointing(m, ActivationCheckpoint(mode=mode, selective_ac_option="op"), compiled)
    if compiled:
        apply_compile(m)
        assert m.layers[0].attention.__class__.__name__ == (
            "CheckpointWrapper" if mode == "selective" else "Attention"
        )
    tok = torch.randint(0, 256, (2, 20))
    for _ in range(2):  # the first call compiles
        calls.clear()
        ce, _, _ = m(tok, tok)
        ce.backward()
    assert len(calls) == kernel_calls


@pytest.mark.slow
def test_per_op_checkpointing_runs_no_collective_again_in_backward(tmp_path):
    """TP 2 (the sequence all-gather before attention, the reduce-scatter after its output
    projection, both inside the checkpointed attention): a training step with per-op
    checkpointing dispatches as many collectives as one without checkpointing; full
    checkpointing, which recomputes them, dispatches more (what the count would catch)."""
    import json

    from ..conftest import python_cmd, run_ok
    from ..helpers.training import argv_for

    counts = {}
    for mode, ac in {
        "none": ["--activation_checkpoint.mode=none"],
        "op": ["--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_ac_option=op"],
        "full": ["--activation_checkpoint.mode=full"],
    }.items():
        out = tmp_path / f"{mode}.json"
        argv = argv_for(tmp_path, "--parallelism.tensor_parallel_degree=2", "--validation.enable=false",
                        f"--job.dump_folder={tmp_path / mode}", *ac)  # fmt: skip
        run_ok(python_cmd(2, "tests/parallel/sac_collectives_job.py", str(out), *argv))
        counts[mode] = json.loads(out.read_text())
    assert counts["op"] == counts["none"] > 0 and counts["full"] > counts["none"], counts
