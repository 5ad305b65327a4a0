import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptoss_titan.config import parse_args
from gptoss_titan.runtime.distributed import apply_process_settings, shutdown
from gptoss_titan.train import Trainer, main

from ..conftest import read_metrics, synthetic_data
from ..helpers.training import argv_for


def test_training_learns_and_writes_metrics(tmp_path):
    assert main(argv_for(tmp_path, "--training.steps=30", "--validation.freq=10")) == 0
    run = tmp_path / "run"
    rows = read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mem_peak_rss_gib"):
        assert key in steps[0]
    assert [r["step"] for r in vals] == [10, 20, 30]
    assert steps[-1]["loss"] < steps[0]["loss"] - 2.0
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert abs(steps[0]["loss"] - np.log(8192)) < 0.5  # starts at chance level
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["flavor"] == "bench" and cfg["training"]["steps"] == 30
    assert json.loads((run / "model_args.json").read_text())["vocab_size"] == 8192
    assert list((run / "tb").glob("events.out.tfevents.*"))


def run_trainer(argv):
    tr = Trainer(parse_args(argv))
    tr.train()
    losses = [r["loss"] for r in read_metrics(tr.dump) if "loss" in r]
    return losses, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def test_gradient_accumulation_equals_big_batch(tmp_path):
    base = argv_for(tmp_path, "--validation.enable=false", "--training.steps=3")
    a_loss, a_params = run_trainer(
        base + ["--training.local_batch_size=4", f"--job.dump_folder={tmp_path}/a"]
    )
    b_loss, b_params = run_trainer(
        base
        + [
            "--training.local_batch_size=2",
            "--training.global_batch_size=4",
            f"--job.dump_folder={tmp_path}/b",
        ]
    )
    np.testing.assert_allclose(a_loss, b_loss, rtol=1e-5)
    for k in a_params:
        # Adam turns near-zero gradients into +-lr steps, so a 1e-7 gradient difference can move a
        # weight by ~1e-5; 1e-4 is still 30x below one step's maximum move (lr = 3e-3).
        torch.testing.assert_close(a_params[k], b_params[k], rtol=1e-4, atol=1e-4)


def test_bf16_close_to_fp32_and_balancing_options(tmp_path):
    base = argv_for(tmp_path, "--validation.enable=false", "--training.steps=3")
    f32, _ = run_trainer(base + [f"--job.dump_folder={tmp_path}/f"])
    bf16, _ = run_trainer(
        base + ["--training.mixed_precision_param=bfloat16", f"--job.dump_folder={tmp_path}/h"]
    )
    np.testing.assert_allclose(f32, bf16, rtol=2e-2)
    aux_run = Trainer(
        parse_args(
            base
            + [
                "--model.aux_loss_coef=0.01",
                "--model.load_balance_bias=true",
                "--model.balanced_routing=1.0",  # at step 1 only: afterwards the plain top-k
                "--model.balanced_routing_steps=1",
                f"--job.dump_folder={tmp_path}/x",
            ]
        )
    )
    aux_run.train()
    rows = read_metrics(aux_run.dump)
    assert all(r["aux_loss"] >= 0 for r in rows)
    assert rows[0]["balanced_routing_layers"] >= 1
    assert all("balanced_routing_layers" not in r for r in rows[1:])  # the window ended
    router = aux_run.model.layers[0].moe.router
    assert router.balanced_routing == 0 and router.choice_counts.sum() == 0
    bias = router.expert_bias
    assert bias.abs().sum() > 0 and bias.sum().abs() < 1e-6 * 8 + 1e-3 * 8
    assert bias.abs().max() > 1.5e-3  # steps of 1e-3 went on after the window (1e-3 if they had not)


BAD = [
    (lambda t: ["--config", str(t / "missing.toml")], "missing.toml"),
    (lambda t: ["--config", str(_w(t, "[training\n"))], "not valid TOML"),
    (lambda t: ["--config", str(_w(t, "[training]\nsteps_ = 1\n"))], "did you mean 'steps'"),
    (lambda t: ["--training.steps=ten"], "training.steps must be int"),
    (lambda t: ["--optimizer.lr=-1"], "optimizer.lr = -1.0 must be > 0"),
    (lambda t: ["--training.seq_len=9999"], "exceeds the bench model's limit 4096"),
    (lambda t: ["--training.global_batch_size=3"], "global_batch_size = 3"),
    (lambda t: [f"--data.dataset_path={t / 'nodata'}"], "train.bin"),
    (lambda t: ["--model.flavor=20bb"], "did you mean '20b'"),
    (lambda t: _mix(t, "empty"), "has 0 tokens, fewer than seq_len + 1 = 33"),
    (lambda t: _mix(t, "missing"), "train-00001.bin' listed in meta.json is missing"),
    (lambda t: _mix(t, "nometa"), "has no meta.json; prepare it with scripts/prepare_data.py"),
]


def _mix(t, kind):
    """A two-source mixture whose second source is broken in one way."""
    from gptoss_titan.data.shards import FORMAT, write_shard

    bad = t / kind
    bad.mkdir()
    shards = []
    if kind != "empty":
        for i in range(2):
            shards.append(write_shard(bad, "train", i, np.arange(100, dtype=np.uint32), np.array([0])))
    if kind == "missing":
        (bad / shards[1]["file"]).unlink()
    if kind != "nometa":
        meta = {"format": FORMAT, "shards": {"train": shards, "val": shards}}
        (bad / "meta.json").write_text(json.dumps(meta))
    return ["--data.dataset_path=", f"--data.sources={synthetic_data(t / 'ok')}:2,{bad}:1"]


def _w(t, text):
    (t / "bad.toml").write_text(text)
    return t / "bad.toml"


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    make, expected = BAD[case]
    argv = argv_for(tmp_path) + make(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_bad_token_ids_are_rejected(tmp_path, capsys):
    data = synthetic_data(tmp_path / "baddata")
    with open(data / "train.bin", "ab") as f:
        np.array([8999], dtype=np.uint32).tofile(f)  # one id beyond the bench vocab (8192)
    assert main(argv_for(tmp_path) + [f"--data.dataset_path={data}"]) == 2
    err = capsys.readouterr().err
    assert "token id 8999 >= the model's vocab_size 8192" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "gptoss_titan.train", "--optimizer.lr=-3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
    h = subprocess.run([sys.executable, "-m", "gptoss_titan.train", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--training.local_batch_size" in h.stdout


# ----- the GPU code paths, checked on the CPU ---------------------------------------------------
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "masked_select",
    "item",
}
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "linear", "matmul"}


def _device_to_host(name: str, args, kwargs) -> bool:
    if name == "_to_copy":
        dst = kwargs.get("device")
        return args[0].device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    return args[0].device.type == "cpu" and args[1].device.type != "cpu"  # copy_(dst, src)


class HostSyncAudit:
    """Records, during a block, every op that makes a GPU wait for the host (a scalar read, a
    data-dependent shape, Tensor.tolist, a tensor made from host data such as an index list) and
    every GEMM on fp32 operands (when compute is bf16)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        audit = self
        self.syncs, self.fp32_gemms = [], []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if name in SYNC_OPS:
                    audit.syncs.append(str(func))
                if name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
                    audit.syncs.append("boolean-mask indexing")
                if name in ("lift_fresh", "lift_fresh_copy"):  # torch.tensor(host data), x[[list]]
                    audit.syncs.append(f"{func}: a tensor from host data (a blocking host -> device copy)")
                if name == "repeat_interleave" and kwargs.get("output_size") is None:
                    audit.syncs.append("repeat_interleave without output_size")
                if name in ("_to_copy", "copy_") and _device_to_host(name, args, kwargs):
                    audit.syncs.append(f"{func}: device -> host copy")
                if name in GEMMS and any(
                    isinstance(a, torch.Tensor) and a.dim() >= 2 and a.dtype == torch.float32
                    for a in args[:3]
                ):
                    audit.fp32_gemms.append(
                        f"{func} {[tuple(a.shape) for a in args[:3] if isinstance(a, torch.Tensor)]}"
                    )
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        audit = self

        def tolist(t):
            audit.syncs.append("Tensor.tolist")
            return audit._tolist(t)

        torch.Tensor.tolist = tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist


def test_train_step_on_the_gpu_paths_never_waits_for_the_host(tmp_path, monkeypatch):
    """One whole training step (forward, loss, backward, clipping, AdamW, LR, expert bias and its
    balanced-routing fallback, aux loss) forced onto the GPU code paths - grouped-mm experts, the accelerator loss branch, bf16
    compute - runs no op that syncs with the host and no fp32 GEMM."""
    import gptoss_titan.model.loss as loss_module

    monkeypatch.setattr(loss_module, "loss_path", lambda device: "accel")
    tr = Trainer(
        parse_args(
            argv_for(
                tmp_path,
                "--model.expert_kernel=grouped",
                "--training.mixed_precision_param=bfloat16",
                "--model.aux_loss_coef=0.01",
                "--model.load_balance_bias=true",
                "--model.balanced_routing=1.0",  # the capacity-limited fallback too (any imbalance)
                "--training.global_batch_size=4",
                "--validation.enable=false",
            )
        )
    )
    assert tr.accum_steps == 2 and tr.model.layers[0].moe.experts.kernel == "grouped"
    tr.train_step()  # AdamW creates its state in the first step
    batches = [tr.train_loader.next_batch() for _ in range(tr.accum_steps)]  # host data, read on the host
    with HostSyncAudit() as audit:
        result = tr.train_module(batches, tr.step)
    assert audit.syncs == [] and audit.fp32_gemms == [], (audit.syncs, audit.fp32_gemms[:5])
    stats = result.stats()  # reading the results is where the host waits
    assert math.isfinite(stats["loss"]) and stats["balanced_routing_layers"] >= 1  # the fallback ran


def test_the_audit_catches_syncs_and_fp32_gemms():
    with HostSyncAudit() as audit:
        t = torch.arange(6)
        int(t.sum()), t.tolist(), torch.bincount(t), t[t > 2], torch.repeat_interleave(t, t)
        t[[0, 2]]  # the list becomes a tensor on the host, copied to the device
        torch.randn(4, 4) @ torch.randn(4, 4)
    assert len(audit.syncs) == 6 and len(audit.fp32_gemms) == 1, audit.syncs


@pytest.mark.slow
def test_compile_with_periodic_samples(tmp_path):
    """torch.compile (attention fullgraph) and samples every few steps: the KV-cached sampling path
    runs through the compiled attention (prefill and decode) without data-dependent guards."""
    argv = argv_for(
        tmp_path,
        "--model.flavor=debug",
        "--compile.enable=true",
        "--metrics.sample_freq=2",
        "--metrics.sample_tokens=5",
        "--training.seq_len=160",
    )
    data = synthetic_data(tmp_path / "data201k", vocab=201088)
    argv = [a for a in argv if not a.startswith("--data.dataset_path")] + [f"--data.dataset_path={data}"]
    cfg = parse_args(argv)
    apply_process_settings(cfg)  # as the entry point does: the compile limit is process-wide
    tr = Trainer(cfg)
    samples = []
    tr.sample_text = lambda real=tr.sample_text: samples.append(real()) or samples[-1]
    tr.train()
    assert len(samples) == 2 and all(isinstance(s, str) and s for s in samples)
    assert [r["step"] for r in read_metrics(tr.dump) if "loss" in r] == [1, 2, 3, 4]


def test_custom_model_shape_trains(tmp_path):
    """[model.args] on top of a flavor: the run builds, trains and records that shape."""
    argv = argv_for(
        tmp_path,
        "--training.steps=2",
        "--model.args.n_layers=2",
        "--model.args.num_experts=4",
        "--model.args.top_k=1",
        "--model.args.moe_inter_dim=64",
        "--validation.enable=false",
    )
    assert main(argv) == 0
    saved = json.loads((tmp_path / "run" / "model_args.json").read_text())
    assert (saved["n_layers"], saved["num_experts"], saved["top_k"], saved["moe_inter_dim"]) == (2, 4, 1, 64)
    assert len(read_metrics(tmp_path / "run")[-1]["expert_load_max"]) == 2  # two layers' loads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_train_step_on_cuda_never_waits_for_the_host(tmp_path):
    """The same audit on real CUDA: bf16, the kernel auto picks for this GPU, the accelerator loss."""
    tr = Trainer(
        parse_args(
            argv_for(
                tmp_path,
                "--training.mixed_precision_param=bfloat16",
                "--model.aux_loss_coef=0.01",
                "--model.load_balance_bias=true",
                "--validation.enable=false",
            )
        )
    )
    assert tr.device.type == "cuda"
    tr.train_step()
    with HostSyncAudit() as audit:
        result = tr.train_step()
    assert audit.syncs == [] and audit.fp32_gemms == [], (audit.syncs, audit.fp32_gemms[:5])
    assert math.isfinite(result.stats()["loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_deterministic_mode_on_cuda_is_bitwise_repeatable(tmp_path):
    """training.deterministic on CUDA: cuBLAS gets its workspace setting before CUDA starts (a fresh
    process), and two runs give the same losses bit for bit (the MoE combine has no atomics)."""
    runs = []
    for name in ("a", "b"):
        argv = argv_for(
            tmp_path,
            "--training.deterministic=true",
            "--training.mixed_precision_param=bfloat16",
            "--training.steps=3",
            f"--job.dump_folder={tmp_path / name}",
        )
        r = subprocess.run(
            [sys.executable, "-m", "gptoss_titan.train", *argv], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append([x["loss"] for x in read_metrics(tmp_path / name) if "loss" in x])
    assert runs[0] == runs[1]


def test_fsdp_on_one_process_trains_as_without(tmp_path):
    """parallelism.fsdp_one_process (the GPU smoke check's one-GPU path through FSDP2, DTensor
    parameters and DCP with a process group): the same losses as a plain one-process run, and its
    checkpoint resumes."""
    from torch.distributed.tensor import DTensor

    from ..conftest import losses

    base = argv_for(tmp_path, "--checkpoint.enable=true", "--checkpoint.interval=2", "--validation.enable=false",
                    "--lr_scheduler.decay_steps=3")  # (the schedule of 4 steps also in the first half)  # fmt: skip
    one = [*base, "--parallelism.fsdp_one_process=true", f"--job.dump_folder={tmp_path / 'fsdp'}"]
    assert main([*one, "--training.steps=2"]) == 0
    assert main(one) == 0  # resumed at step 2 through the process group
    tr = Trainer(parse_args([*one, f"--job.dump_folder={tmp_path / 'look'}"]))
    assert all(isinstance(p, DTensor) for p in tr.model.parameters())
    tr.run_lock.release()
    shutdown()
    assert main([*base, f"--job.dump_folder={tmp_path / 'plain'}"]) == 0
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)
