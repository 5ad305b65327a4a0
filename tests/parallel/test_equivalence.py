"""Every parallel layout trains exactly like one process (CPU, gloo, spawned with torchrun).

Same data, seed and global batch (4 sequences x 32 tokens of the debug flavor, fp32, 5 steps):
per-step losses equal to 1e-5 relative, final weights to 1e-5 relative (per-tensor L2 norm).

Adam's eps is 1e-6 here (default 1e-8): a gradient that is zero up to rounding (a bias of an
expert that saw almost no tokens) has a sign that depends on summation order, and with a tiny eps
Adam turns it into a full +-lr step. That is the optimizer amplifying 1e-12 noise, not a
parallelism error; with eps 1e-6 such elements move by ~1e-9 and the comparison stays strict.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from ..conftest import python_cmd, run_ok, synthetic_data

HERE = Path(__file__).parent
STEPS = 5
pytestmark = pytest.mark.slow


def run(tmp: Path, name: str, nproc: int, *overrides: str, batch: int = 4, env: dict | None = None) -> dict:
    """run_job.py (the trainer) on nproc processes: per-step losses, grad norms, final full weights."""
    data = tmp.parent / "data"
    if not data.exists():
        synthetic_data(data, vocab=201088)
    out = tmp / f"{name}.pt"
    args = [
        str(HERE / "run_job.py"),
        str(out),
        "--model.flavor=debug",
        f"--data.dataset_path={data}",
        f"--training.steps={STEPS}",
        "--training.seq_len=32",
        f"--training.local_batch_size={batch // nproc}",
        "--metrics.log_freq=1",
        "--validation.enable=false",
        "--lr_scheduler.warmup_steps=2",
        "--optimizer.lr=1e-3",
        "--optimizer.eps=1e-6",
        f"--job.dump_folder={tmp / name}",
        *overrides,
    ]
    run_ok(
        python_cmd(nproc, *args), env={"TORCHINDUCTOR_CACHE_DIR": str(tmp.parent / "inductor"), **(env or {})}
    )
    return torch.load(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("equiv") / "runs"


@pytest.fixture(scope="module")
def reference(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    return run(workdir, "reference", 1)


def assert_same(ref: dict, got: dict, rtol: float = 1e-5, floor: float = 1e-12) -> None:
    """Losses and grad norms to rtol; each weight tensor to rtol of max(its norm, floor)."""
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=rtol)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=max(rtol, 1e-5))
    assert set(got["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        rel = ((got["state"][k].float() - v).norm() / v.norm().clamp(min=floor)).item()
        assert rel <= rtol, f"{k}: relative difference {rel:.2e}"


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
    assert_same(reference, run(workdir, case, nproc, *overrides))


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
    )
    assert_same(reference, got)


def test_fsdp3_uneven_expert_shards(workdir):
    """8 experts over 3 shards: uneven FSDP shards of the expert dimension."""
    ref = run(workdir, "reference_b3", 1, batch=3)
    assert_same(ref, run(workdir, "fsdp3", 3, batch=3))


def test_sharded_init_is_bitwise_one_process_init(workdir):
    one = run(workdir, "init1", 1, "--init-only")
    four = run(
        workdir,
        "init4",
        4,
        "--init-only",
        "--parallelism.data_parallel_replicate_degree=2",
        "--parallelism.expert_parallel_degree=2",
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
    ref = run(workdir, "reference_balance", 1, *extra)
    got = run(workdir, "balance_ep2", 2, *extra, "--parallelism.expert_parallel_degree=2")
    assert_same(ref, got)
    assert any("expert_bias" in k and v.abs().sum() > 0 for k, v in got["state"].items())


def test_bf16_mixed_precision_close_to_fp32(reference, workdir):
    got = run(workdir, "bf16", 2, "--training.mixed_precision_param=bfloat16")
    # bf16 params in compute, fp32 master weights and reductions: losses within 1% over 5 steps
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-2)
    assert all(v.dtype == torch.float32 for v in got["state"].values())  # master weights stay fp32
