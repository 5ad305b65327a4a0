"""Pipeline parallelism trains exactly like one process (CPU, gloo, torchrun) with every schedule,
composes with FSDP, EP, TP, CP, activation checkpointing and compile, and its checkpoints resume at
one process (and the reverse).

Every run: the debug flavor (4 layers) with an 8,192-token vocabulary (not under test here; the
real one would add ~100 MB per run and ~320 MB per checkpoint), 4 sequences of 64 tokens per step
as 2 micro-batches (the one-process reference accumulates the same 2), balancing biases on,
validation at the last step through the pipeline, a checkpoint every 3 steps.

Tolerances: losses, grad norms and the validation loss to 1e-5 relative; each weight tensor to
1e-5 of max(its norm, 0.1) (tests/helpers/equivalence.py, assert_same, derives this):
- fp32's unit roundoff is u = 2^-24 = 6e-8. Each gradient element is a sum of n = 256 per-token
  terms (2 micro-batches of 2 x 64); a layout adds them in another order (per stage and
  micro-batch, per cp and tp rank, then across ranks), and every CPU blocks its own sums its own
  way (AVX2, AVX-512, AMX). Reordering moves the sum by about sqrt(n) u = 1e-6 (n u = 1.5e-5 at
  worst) of the sum of the terms' magnitudes S.
- Where the terms do not cancel that is ~1e-6 relative: losses, grad norms and whole tensors
  stay well inside 1e-5.
- A bias element whose terms nearly cancel (layers.1.attention.wo.bias in the real-vocabulary
  runs: the sum is 3.7e-5 of S = 0.56) gets a gradient with a large relative error, which Adam
  turns into an absolute move of the weight, while the bias's own norm after 5 steps of lr 1e-3
  is only 0.0104. tests/parallel/reorder_estimate.py estimates that move at 4.8e-7 there (4.6e-5
  of the norm; 6.2e-7 at most over all tensors) and at up to 5.5e-7 with this vocabulary
  (layers.2.attention.wk.bias, 5.6e-5 of its norm 0.0099). So a bound of 1e-5 of a tensor's own
  norm holds only where the summation orders happen to agree: pp2 x cp2 x tp2 x ep2 (then compiled)
  measured 1.14e-5 of it (1.2e-7) on an AMX Xeon and passed on an AVX-512 EPYC. rtol x 0.1 = 1e-6 covers
  the estimates on any CPU; tensors of norm above 0.1 are still held to 1e-5 of their norm.
The resumed runs are compared the same way.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

from ..helpers.equivalence import DETAIL, assert_same, logged, run

pytestmark = pytest.mark.slow
VOCAB = 8192  # synthetic token ids and the model's vocab_size
FLOOR = 0.1  # the weights' comparison: rtol of max(norm, FLOOR) (docstring)
COMMON = (
    "--model.args.sliding_window=16",
    "--training.seq_len=64",
    "--training.global_batch_size=4",
    "--model.load_balance_bias=true",
    "--model.load_balance_bias_rate=0.01",
    "--validation.enable=true",
    "--validation.freq=5",
    "--validation.steps=3",  # 3 batches through 2 micro-batches: the last group is padded
    "--checkpoint.enable=true",
    "--checkpoint.interval=3",
)
PP = "--parallelism.pipeline_parallel_degree=2"


@pytest.fixture(scope="module")
def ppdir(module_tmp):
    d = module_tmp / "runs"
    d.mkdir(parents=True)
    return d


def pp_run(ppdir: Path, name: str, nproc: int, dp: int, *extra: str, env: dict | None = None) -> dict:
    """2 micro-batches of 4 / (2 x dp) sequences per data-parallel rank; several processes: every
    point-to-point send matched to its receive across the ranks (order, size, dtype; p2p_trace.py)."""
    trace = ["--trace-p2p"] if nproc > 1 else []
    return run(
        ppdir,
        name,
        nproc,
        *COMMON,
        f"--training.local_batch_size={4 // (2 * dp)}",
        *extra,
        *trace,
        vocab=VOCAB,
        env=env,
    )


@pytest.fixture(scope="module")
def reference(ppdir):
    return pp_run(ppdir, "reference", 1, 1)


def schedule(name: str, per_rank: int = 1) -> list[str]:
    return [
        PP,
        f"--parallelism.pipeline_parallel_schedule={name}",
        f"--parallelism.pipeline_parallel_stages_per_rank={per_rank}",
    ]


CASES = {
    "pp2_1f1b": (2, 1, schedule("1F1B")),
    # uneven stages; FSDP reshards after every micro-batch's forward (pp's default keeps them)
    "pp2_gpipe_uneven_reshard": (
        2,
        1,
        [
            *schedule("GPipe"),
            "--parallelism.pipeline_parallel_layers=1,3",
            "--parallelism.fsdp_reshard_after_forward=always",
        ],
    ),
    # compiled blocks (each block's attention and norms) under two stages per rank
    "pp2_interleaved_1f1b_compile": (2, 1, [*schedule("Interleaved1F1B", 2), "--compile.enable=true"]),
    "pp2_interleaved_zero_bubble": (2, 1, schedule("InterleavedZeroBubble", 2)),
    "pp2_fsdp2_ep2": (4, 2, [PP, "--parallelism.expert_parallel_degree=2"]),
    # everything at once: pp 2 x cp 2 x tp 2 (8 ranks), FSDP over the cp ranks, EP 2 borrowed from
    # them, full AC (compiled too it took 180 s of CI's 2 cores: 8 processes compiling; compile
    # under pp is the interleaved case above, per-op AC + compile test_equivalence's all_together)
    "pp2_cp2_tp2_ep2_ac": (
        8,
        1,
        [
            PP,
            "--parallelism.context_parallel_degree=2",
            "--parallelism.tensor_parallel_degree=2",
            "--parallelism.expert_parallel_degree=2",
            "--activation_checkpoint.mode=full",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_one_process(case, reference, ppdir):
    nproc, dp, extra = CASES[case]
    detail = case == "pp2_1f1b"  # and every collective consistent across the ranks (DETAIL)
    got = pp_run(ppdir, case, nproc, dp, *extra, env=DETAIL if detail else None)
    assert got["debug_level"] == ("DETAIL" if detail else "OFF")
    assert got["p2p_sends"] > 0  # (the job asserts that each send has its receive)
    assert_same(reference, got, floor=FLOOR)
    want_val = logged(ppdir, "reference", "val_loss")
    assert len(want_val) == 1
    np.testing.assert_allclose(logged(ppdir, case, "val_loss"), want_val, rtol=1e-5)


def test_balanced_routing_under_pp_equals_one_process(ppdir):
    """model.balanced_routing: each stage tallies its own layers' plain loads for their biases; the
    count of layers that took the fallback is summed over the stages (as one process counts)."""
    balanced = ("--model.balanced_routing=1.0",)
    want = pp_run(ppdir, "reference_balanced", 1, 1, *balanced)
    got = pp_run(ppdir, "pp2_1f1b_balanced", 2, 1, *schedule("1F1B"), *balanced)
    assert_same(want, got, floor=FLOOR)
    assert got["balanced_layers"] == want["balanced_layers"] and min(want["balanced_layers"]) >= 1


def test_pipeline_checkpoints_resume_at_one_process_and_back(reference, ppdir):
    """Saved at pp 2 x FSDP 2 x EP 2, resumed at one process; saved at one process, resumed at pp 2."""
    if not (ppdir / "pp2_fsdp2_ep2.pt").exists():
        pp_run(ppdir, "pp2_fsdp2_ep2", 4, 2, PP, "--parallelism.expert_parallel_degree=2")
    for src, name, nproc, extra in (
        ("pp2_fsdp2_ep2", "resume_pp_to_one", 1, []),
        ("reference", "resume_one_to_pp2", 2, [PP]),
    ):
        (ppdir / name / "checkpoint").mkdir(parents=True)
        shutil.copytree(ppdir / src / "checkpoint" / "step-3", ppdir / name / "checkpoint" / "step-3")
        got = pp_run(ppdir, name, nproc, 1, *extra)
        np.testing.assert_allclose(got["losses"], reference["losses"][3:], rtol=1e-5)
        assert_same({**reference, "losses": got["losses"], "grad_norms": got["grad_norms"]}, got, floor=FLOOR)


def test_pipeline_rejects_what_it_does_not_support(ppdir):
    from gptoss_titan.config import ConfigError, parse_args

    for extra, match in (
        (["--parallelism.pipeline_parallel_schedule=Interleaved1F1B"], "2 or more stages per rank"),
        (["--model.aux_loss_coef=0.01"], "aux_loss_coef = 0.01 is not supported with pipeline"),
        (["--parallelism.pipeline_parallel_layers=2,1"], r"\[2, 1\] must list 2 stages"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_args(["--model.flavor=debug", "--data.dataset=kjv", PP, *extra])
