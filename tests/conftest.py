"""Shared test helpers: tiny models, synthetic data, free ports, metrics readers, process launchers;
more in tests/helpers/ (checkpointing runs, equivalence runs, the sampler's command line).

Markers: `slow` (pyproject) marks tests that take more than a few seconds on 2 cores; daily work
runs `pytest -m "not slow"` (under 3 minutes), CI runs everything.

Disk: a passing test's tmp_path is deleted when it ends (pyproject); runs shared by a module's tests
go in `module_tmp`, deleted after the module's last test. GPTOSS_TEST_DU=FILE records the bytes
under pytest's base temporary folder after each test (FILE: one JSON line per test; a table per
module at the end): `GPTOSS_TEST_DU=/tmp/du.jsonl pytest tests/parallel/test_equivalence.py`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from gptoss_titan.model import ModelArgs, Transformer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers (not CI's command) share the cores: one thread in each worker and in
    # every process a test starts (the launcher keeps a set OMP_NUM_THREADS). Measured with -n 2 and
    # 2 threads each: OpenMP's waiting threads on oversubscribed cores made a 200-step run take
    # > 1800 s instead of ~200 s. (With one thread, test_reward_rises_on_the_toy_task's trajectory
    # differs: its sampled rewards depend on the summation order; its log-probability check less.)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def tiny_args(**kw) -> ModelArgs:
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        vocab_size=256,
        num_experts=4,
        top_k=2,
        moe_inter_dim=32,
        sliding_window=8,
        max_seq_len=128,
    )
    base.update(kw)
    return ModelArgs(**base)


def build(args: ModelArgs, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    torch.manual_seed(seed)
    m.init_weights()
    return m


@pytest.fixture
def tiny():
    return tiny_args()


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A folder for the runs a module's tests share, deleted when the module's last test is done
    (like a passing test's tmp_path; kept when a test failed meanwhile). A plain module-scoped
    tmp_path_factory.mktemp folder would stay until the session ends, so the modules' runs would
    pile up on disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


def synthetic_data(folder: Path, vocab: int = 8192, n: int = 20000, seed: int = 0) -> Path:
    """A learnable stream: repeated random 'sentences' of 12 tokens, as train.bin / val.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, vocab, (8, 12))
    for split, count in (("train", n), ("val", n // 10)):
        idx = rng.integers(0, 8, count // 12)
        phrases[idx].reshape(-1).astype(np.uint32).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"tokenizer": "synthetic", "vocab_size": vocab}))
    return folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 3-step checkpoint of the debug flavor (real vocabulary), shared by the converter and sampler tests."""
    from gptoss_titan.train import main

    tmp = tmp_path_factory.mktemp("export")
    data = synthetic_data(tmp / "data", vocab=201088)
    assert (
        main(
            [
                "--model.flavor=debug",
                f"--data.dataset_path={data}",
                f"--job.dump_folder={tmp / 'run'}",
                "--training.steps=3",
                "--training.seq_len=32",
                "--training.local_batch_size=2",
                "--validation.enable=false",
                "--checkpoint.enable=true",
                "--optimizer.lr=1e-2",
            ]
        )
        == 0
    )
    return tmp


@pytest.fixture(scope="session")
def trained_hf(trained):
    """That checkpoint exported as a Hugging Face folder (fp32, shards of at most 40 MB)."""
    out = trained / "hf32"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/convert_dcp_to_safetensors.py"),
            "--checkpoint",
            str(trained / "run"),
            "--output",
            str(out),
            "--dtype",
            "float32",
            "--max-shard-size",
            "40MB",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def python_cmd(nproc: int, *args: str) -> list[str]:
    """`python ARGS` on one process, or nproc processes on a free port through our launcher (torchrun's
    options and agent, the workers' exit code, no interpreter teardown: runtime/launcher.py); args may
    start with -m."""
    if nproc == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        "-m",
        "gptoss_titan.runtime.launcher",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        *args,
    ]


def run_ok(cmd: list[str], env: dict | None = None, timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    """Run cmd with one intra-op thread per process (as the launch scripts do on 2 cores); assert exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def run_train_sh(env_extra: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """scripts/run_train.sh with these environment variables (NGPU, CONFIG_FILE, ...) and overrides."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), **env_extra}
    return subprocess.run(
        [str(ROOT / "scripts" / "run_train.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def two_at_a_time(fn, items) -> list:
    """fn over items, two calls at a time, the results in order: for quick subprocesses (error
    cases) that mostly import, which overlap on 2 cores."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, items))


def one_line_error(stderr: str) -> str:
    """The message of a user error: one line starting with 'error: ', no traceback."""
    err = stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ~400 MB in fp32: big enough that holding it twice shows in a process's peak memory
BIG_ARGS = ModelArgs(
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=2,
    head_dim=64,
    vocab_size=1024,
    num_experts=16,
    top_k=2,
    moe_inter_dim=512,
    sliding_window=128,
    max_seq_len=1024,
)


def write_random_hf(folder: Path, args: ModelArgs) -> Path:
    """A Hugging Face folder (fp32, shards of ~60 MB, with an index) of random weights for args."""
    from safetensors.torch import save_file

    from gptoss_titan.model.hf import hf_config, name_pairs

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(args, "float32")))
    shard, weight_map, n = {}, {}, 0
    for _, name, shape in name_pairs(args):
        shard[name] = torch.randn(shape) * 0.02
        if sum(t.numel() for t in shard.values()) * 4 > 60e6:
            save_file(shard, str(folder / f"part{n}.safetensors"))
            weight_map.update({k: f"part{n}.safetensors" for k in shard})
            shard, n = {}, n + 1
    save_file(shard, str(folder / f"part{n}.safetensors"))
    weight_map.update({k: f"part{n}.safetensors" for k in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def peak_rss(cmd: list[str], env: dict | None = None) -> int:
    """The largest peak resident size (bytes) of any process cmd starts (torchrun: of any rank)."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=ROOT,
    )
    return int(out.stdout.split()[-1])


# ----- disk use: GPTOSS_TEST_DU=FILE records the bytes under pytest's base temporary folder ------
def disk_usage(path: Path) -> int:
    """Bytes allocated under path (du: blocks of regular files, links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


if os.environ.get("GPTOSS_TEST_DU"):
    import threading

    _DU: dict[str, dict] = {}

    def _du_record(item, key: str, used: int | None = None) -> None:
        used = disk_usage(item.config._tmp_path_factory.getbasetemp()) if used is None else used
        row = _DU.setdefault(item.nodeid, {"test": item.nodeid})
        row[key] = max(used, row.get(key, 0))
        if key == "left":
            with open(os.environ["GPTOSS_TEST_DU"], "a") as f:
                f.write(json.dumps(row) + "\n")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item):
        """Samples the disk use every second while the test runs (its peak: a test may delete what it
        wrote before it ends), and once more at its end, before fixture teardown."""
        base, done = item.config._tmp_path_factory.getbasetemp(), threading.Event()

        def sample():
            while not done.wait(1.0):
                _du_record(item, "peak", disk_usage(base))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            return (yield)
        finally:
            done.set()
            sampler.join()
            _du_record(item, "end")
            _du_record(item, "peak", _DU[item.nodeid]["end"])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(item, nextitem):
        try:
            return (yield)
        finally:
            _du_record(item, "left")

    def pytest_terminal_summary(terminalreporter):
        modules: dict[str, list[int]] = {}
        for row in _DU.values():
            module = row["test"].split("::")[0]
            peak, _ = modules.get(module, (0, 0))
            modules[module] = [max(peak, row.get("peak", 0)), row.get("left", 0)]
        terminalreporter.section("disk under the base temporary folder (GPTOSS_TEST_DU)")
        for module, (peak, left) in modules.items():
            terminalreporter.write_line(
                f"{module}: peak {peak / 2**20:,.0f} MiB, after its last test {left / 2**20:,.0f} MiB"
            )
