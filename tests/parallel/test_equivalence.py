"""Every parallel layout trains exactly like one process (CPU, gloo, spawned with torchrun).

Same data, seed and global batch (4 sequences x 32 tokens of the debug flavor with an 8,192-token
vocabulary: the vocabulary is not under test here, and the real one's embedding and lm_head would
make every run ~100 MB bigger on disk; fp32, 5 steps): per-step losses and grad norms equal to 1e-5
relative, final weights to 1e-5 of max(their norm, 0.2) (per-tensor L2 norm).

Adam's eps is 1e-6 here (default 1e-8): a gradient that is zero up to rounding (a bias of an
expert that saw almost no tokens) has a sign that depends on summation order, and with a tiny eps
Adam turns it into a full +-lr step. That is the optimizer amplifying 1e-12 noise, not a
parallelism error; with eps 1e-6 such elements move by ~1e-9 and the comparison stays strict.

The weights' floor of 0.2 (tests/helpers/equivalence.py, assert_same, derives it): a layout sums
each gradient element's 128 per-token terms in another order (per rank, then across ranks; and
AVX2, AVX-512 and AMX kernels block their sums differently), which moves the sum by about
sqrt(128) x 6e-8 (fp32's unit roundoff) = 7e-7 of the terms' magnitudes. A bias element whose
terms nearly cancel takes that as a large part of its gradient, and Adam passes it on:
tests/parallel/reorder_estimate.py estimates up to 1.66e-6 after 5 steps for the expert biases
layers.3.moe.experts.b_down (4.9e-5 of their norm 0.034; 1.65e-6 with the aux loss and balancing
biases). Relative to the tensor's own norm that is over 1e-5, so a floor at the norm itself passes
only where the summation orders happen to agree; rtol x 0.2 = 2e-6 covers it, and tensors of norm
above 0.2 stay at 1e-5 of their norm.
"""

import numpy as np
import pytest
import torch

from ..helpers.equivalence import DETAIL, assert_same, run

pytestmark = pytest.mark.slow
VOCAB = 8192  # synthetic token ids and the model's vocab_size
FLOOR = 0.2  # the weights' comparison: rtol of max(norm, FLOOR) (docstring)


@pytest.fixture(scope="module")
def workdir(module_tmp):
    return module_tmp / "runs"


@pytest.fixture(scope="module")
def reference(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    return run(workdir, "reference", 1, vocab=VOCAB)


CASES = {
    "fsdp2": (2, []),
    "fsdp2_no_reshard": (2, ["--parallelism.fsdp_reshard_after_forward=never"]),
    "hsdp2x2": (4, ["--parallelism.data_parallel_replicate_degree=2"]),
    "fsdp2_ep2": (2, ["--parallelism.expert_parallel_degree=2"]),
    "ep4": (4, ["--parallelism.expert_parallel_degree=4"]),
    # the 20b/120b layout: full AC, experts split over EP 2 and sharded over FSDP 2 (also the FSDP 4 x
    # EP 2 and full-AC checks)
    "full_ac_fsdp2_ep2": (4, ["--activation_checkpoint.mode=full", "--parallelism.expert_parallel_degree=2"]),
    "selective_op_ac_ep2": (
        2,
        ["--activation_checkpoint.mode=selective", "--parallelism.expert_parallel_degree=2"],
    ),
    "selective_every2_ac": (
        1,
        ["--activation_checkpoint.mode=selective", "--activation_checkpoint.selective_ac_option=2"],
    ),
    "compile": (1, ["--compile.enable=true"]),
    "all_together": (
        4,
        [
            "--parallelism.data_parallel_replicate_degree=2",
            "--parallelism.expert_parallel_degree=2",
            "--activation_checkpoint.mode=selective",
            "--compile.enable=true",
            "--parallelism.fsdp_reshard_after_forward=never",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_one_process(case, reference, workdir):
    nproc, overrides = CASES[case]
    detail = case == "fsdp2_ep2"  # and every collective consistent across the ranks (DETAIL)
    got = run(workdir, case, nproc, *overrides, vocab=VOCAB, env=DETAIL if detail else None)
    assert_same(reference, got, floor=FLOOR)
    assert got["debug_level"] == ("DETAIL" if detail else "OFF")


def test_batched_expert_gemms_equal_one_process(reference, workdir):
    """FSDP x2 + EP 2 with every expert op as one batched BLAS call (forced: the debug flavor's 8
    experts would take the loop) trains like one process with the loop."""
    from gptoss_titan.model import blas_batch

    if not blas_batch.available(torch.float32):
        pytest.skip("no batched BLAS in this PyTorch build (MKL on x86-64 Linux has it)")
    got = run(
        workdir,
        "fsdp2_ep2_blas_batch",
        2,
        "--parallelism.expert_parallel_degree=2",
        "--model.expert_kernel=batched",
        vocab=VOCAB,
    )
    assert_same(reference, got, floor=FLOOR)


def test_fsdp3_uneven_expert_shards(workdir):
    """8 experts over 3 shards: uneven FSDP shards of the expert dimension."""
    ref = run(workdir, "reference_b3", 1, batch=3, vocab=VOCAB)
    assert_same(ref, run(workdir, "fsdp3", 3, batch=3, vocab=VOCAB), floor=FLOOR)


def test_sharded_init_is_bitwise_one_process_init(workdir):
    one = run(workdir, "init1", 1, "--init-only", vocab=VOCAB)
    four = run(
        workdir,
        "init4",
        4,
        "--init-only",
        "--parallelism.data_parallel_replicate_degree=2",
        "--parallelism.expert_parallel_degree=2",
        vocab=VOCAB,
    )
    assert set(one["state"]) == set(four["state"])
    for k, v in one["state"].items():
        assert torch.equal(v, four["state"][k]), k


def test_balancing_aux_loss_and_expert_bias_with_ep(workdir):
    """Expert loads are all-reduced over the loss mesh: the bias update matches one process."""
    extra = (
        "--model.aux_loss_coef=0.01",
        "--model.load_balance_bias=true",
        "--model.load_balance_bias_rate=0.01",
    )
    ref = run(workdir, "reference_balance", 1, *extra, vocab=VOCAB)
    got = run(workdir, "balance_ep2", 2, *extra, "--parallelism.expert_parallel_degree=2", vocab=VOCAB)
    assert_same(ref, got, floor=FLOOR)
    assert any("expert_bias" in k and v.abs().sum() > 0 for k, v in got["state"].items())


def test_balanced_routing_with_ep_equals_accumulation(workdir):
    """model.balanced_routing decides per routed batch (the ranks' own tokens), so one process
    accumulating the ranks' micro-batches routes alike; the plain choice's loads, summed over the
    ranks, drive the bias update there and here. Capacity 1.0: the fallback acts at every step."""
    extra = (
        "--model.load_balance_bias=true",
        "--model.load_balance_bias_rate=0.01",
        "--model.balanced_routing=1.0",
    )
    accumulate = ("--training.local_batch_size=2", "--training.global_batch_size=4")
    ref = run(workdir, "reference_balanced", 1, *extra, *accumulate, vocab=VOCAB)
    got = run(workdir, "balanced_ep2", 2, *extra, "--parallelism.expert_parallel_degree=2", vocab=VOCAB)
    assert_same(ref, got, floor=FLOOR)
    assert all(n >= 1 for n in got["balanced_layers"]), got["balanced_layers"]


def test_bf16_mixed_precision_close_to_fp32(reference, workdir):
    got = run(workdir, "bf16", 2, "--training.mixed_precision_param=bfloat16", vocab=VOCAB)
    # bf16 params in compute, fp32 master weights and reductions: losses within 1% over 5 steps.
    # bf16's unit roundoff is 2^-8 = 3.9e-3: rounding the parameters and activations to bf16 (the same
    # on every CPU) dominates; fp32 summation order adds ~1e-6, so no machine tunes this bound.
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-2)
    assert all(v.dtype == torch.float32 for v in got["state"].values())  # master weights stay fp32
