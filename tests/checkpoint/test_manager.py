"""The CheckpointManager through the trainer: exact resume (1 and 2 processes, async), resharding,
crash safety, retention, seed checkpoints, model-only saves, what is loaded."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptoss_titan.train import main

from ..conftest import losses, python_cmd, run_ok, synthetic_data
from ..helpers.checkpoint import base_args, weights

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def launch(nproc: int, tmp: Path, argv: list[str], slow_save_s: float = 0.0, wait: bool = True):
    """The trainer on nproc processes; slow_save_s > 0 runs it with a checkpoint writer that sleeps
    that long before writing (tests/reliability/chaos_train.py, one process)."""
    if slow_save_s:
        cmd = python_cmd(
            1, str(HERE.parent / "reliability" / "chaos_train.py"), "--slow-save", str(slow_save_s), *argv
        )
    else:
        cmd = python_cmd(nproc, "-m", "gptoss_titan.train", *argv)
    if not wait:
        return subprocess.Popen(
            cmd,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return run_ok(cmd)


def test_exact_resume_one_process_async(tmp_path):
    assert main(base_args(tmp_path, "straight")) == 0
    assert main(base_args(tmp_path, "resumed", "--training.steps=3", "--checkpoint.async_mode=async")) == 0
    assert main(base_args(tmp_path, "resumed", "--checkpoint.async_mode=async")) == 0
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(b) == 6 and a == b  # bitwise
    wa, wb = weights(tmp_path / "straight/checkpoint/step-6"), weights(tmp_path / "resumed/checkpoint/step-6")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exact_resume_two_processes_fsdp_ep2_and_reshard(tmp_path):
    ep = [
        "--parallelism.expert_parallel_degree=2",
        "--checkpoint.async_mode=async",
        "--training.local_batch_size=2",
    ]
    launch(2, tmp_path, base_args(tmp_path, "straight", *ep))
    launch(2, tmp_path, base_args(tmp_path, "resumed", *ep, "--training.steps=3"))
    launch(2, tmp_path, base_args(tmp_path, "resumed", *ep))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(b) == 6 and a == b
    wa, wb = weights(tmp_path / "straight/checkpoint/step-6"), weights(tmp_path / "resumed/checkpoint/step-6")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # reshard: the 2-process step-3 checkpoint continues on 1 process like the run that never stopped
    one = base_args(
        tmp_path,
        "one",
        "--training.local_batch_size=4",
        f"--checkpoint.initial_load_path={tmp_path / 'straight/checkpoint/step-3'}",
        "--checkpoint.initial_load_model_only=false",
    )
    assert main(one) == 0
    np.testing.assert_allclose(losses(tmp_path / "one"), a[3:], rtol=1e-5)


def test_reshard_four_to_two_and_one(tmp_path):
    four = [
        "--parallelism.data_parallel_shard_degree=4",
        "--parallelism.expert_parallel_degree=2",
        "--training.local_batch_size=1",
    ]
    launch(4, tmp_path, base_args(tmp_path, "four", *four))
    ref = losses(tmp_path / "four")
    src = f"--checkpoint.initial_load_path={tmp_path / 'four/checkpoint/step-3'}"
    full = "--checkpoint.initial_load_model_only=false"
    launch(2, tmp_path, base_args(tmp_path, "two", "--training.local_batch_size=2", src, full))
    assert main(base_args(tmp_path, "one", src, full)) == 0
    np.testing.assert_allclose(losses(tmp_path / "two"), ref[3:], rtol=1e-5)
    np.testing.assert_allclose(losses(tmp_path / "one"), ref[3:], rtol=1e-5)


def test_sigkill_during_async_save_resumes_from_previous(tmp_path):
    args = base_args(tmp_path, "run", "--checkpoint.async_mode=async", "--checkpoint.interval=2")
    p = launch(1, tmp_path, args, slow_save_s=10, wait=False)
    ck = tmp_path / "run/checkpoint"
    deadline = time.time() + 300
    # every save takes 10 s: wait until step 2's is complete and step 4's is in flight
    while not ((ck / "step-2").exists() and (ck / "step-4.tmp").exists()):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "the save never started"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert (ck / "step-2").is_dir() and not (ck / "step-4").exists() and (ck / "step-4.tmp").exists()
    # Restart with the same thread count (CPU reductions split by thread count round differently).
    launch(1, tmp_path, args)  # resumes from step 2, finishes, cleans the abandoned .tmp
    assert sorted(x.name for x in ck.iterdir()) == ["step-2", "step-4", "step-6"]
    launch(1, tmp_path, base_args(tmp_path, "straight", "--checkpoint.enable=false"))
    assert losses(tmp_path / "run")[-4:] == losses(tmp_path / "straight")[2:]  # steps 3..6, bitwise


def test_retention_keeps_k(tmp_path):
    assert (
        main(
            base_args(
                tmp_path,
                "run",
                "--checkpoint.interval=1",
                "--checkpoint.keep_latest_k=2",
                "--checkpoint.async_mode=async",
            )
        )
        == 0
    )
    assert sorted(x.name for x in (tmp_path / "run/checkpoint").iterdir()) == ["step-5", "step-6"]


def test_seed_checkpoint_same_start_any_world_size(tmp_path):
    assert main(base_args(tmp_path, "seed", "--checkpoint.create_seed_checkpoint=true")) == 0
    seed = tmp_path / "seed/checkpoint/step-0"
    assert (seed / ".metadata").is_file() and sorted(p.name for p in seed.parent.iterdir()) == ["step-0"]
    src = f"--checkpoint.initial_load_path={seed}"
    # a different init seed proves the weights come from the seed checkpoint
    assert main(base_args(tmp_path, "one", src, "--training.steps=1", "--training.seed=7")) == 0
    launch(
        2,
        tmp_path,
        base_args(
            tmp_path,
            "two",
            src,
            "--training.steps=1",
            "--training.local_batch_size=2",
            "--training.seed=7",
            "--parallelism.expert_parallel_degree=2",
        ),
    )
    w0 = weights(seed)
    assert losses(tmp_path / "one")[0] == pytest.approx(losses(tmp_path / "two")[0], rel=1e-6)
    fresh = base_args(
        tmp_path, "fresh", "--training.steps=1", "--training.seed=7", "--checkpoint.enable=false"
    )
    assert main(fresh) == 0
    assert losses(tmp_path / "fresh")[0] != losses(tmp_path / "one")[0]
    assert "tok_embeddings.weight" in w0


def test_resume_follows_the_current_schedule(tmp_path):
    """Extending a run (more training.steps) continues on the new schedule, not the saved lr."""
    from gptoss_titan.config import LRScheduler
    from gptoss_titan.train.optim import lr_factor

    args = [a for a in base_args(tmp_path, "run") if not a.startswith("--lr_scheduler.decay_steps")]
    assert main(args + ["--training.steps=3"]) == 0
    assert main(args + ["--training.steps=8"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lr4 = next(r["lr"] for r in rows if r.get("step") == 4)
    assert lr4 == pytest.approx(1e-3 * lr_factor(4, 8, LRScheduler(warmup_steps=2)))


def test_exclude_from_loading_and_model_only_last_save(tmp_path):
    assert (
        main(
            base_args(
                tmp_path,
                "run",
                "--training.steps=3",
                "--checkpoint.last_save_model_only=true",
                "--checkpoint.export_dtype=bfloat16",
            )
        )
        == 0
    )
    last = weights(tmp_path / "run/checkpoint/step-3")
    assert all(v.dtype == torch.bfloat16 for v in last.values())
    # step 3 holds the model only: a resume restores the weights and starts the count again; the
    # new steps 1.. replace the rows of the old ones (one row per step in metrics.jsonl)
    assert main(base_args(tmp_path, "run", "--training.steps=4")) == 0
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    # excluding the data position restarts the data stream but keeps the rest
    assert main(base_args(tmp_path, "ex", "--training.steps=3")) == 0
    assert main(base_args(tmp_path, "ex", "--checkpoint.exclude_from_loading=dataloader,optimizer")) == 0
    rows = [json.loads(x) for x in (tmp_path / "ex/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_one_pinned_stager_per_run_closed_at_the_end(tmp_path):
    """async_with_pinned_mem builds its stager (pinned buffers) once and reuses it for every save;
    the run closes it. (The pinned one needs CUDA; a plain DefaultStager stands in here.)"""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from gptoss_titan.config import parse_args
    from gptoss_titan.train import Trainer

    made = []

    class Stager(DefaultStager):
        closed = False

        def close(self):
            Stager.closed = True
            super().close()

    def make():
        made.append(Stager(StagingOptions(False, False, False, False)))
        return made[-1]

    cfg = parse_args(
        base_args(tmp_path, "run", "--checkpoint.interval=1", "--checkpoint.async_mode=async_with_pinned_mem")
    )
    Trainer(cfg, checkpoint_stager=make).train()
    assert len(made) == 1 and Stager.closed
    assert sorted(p.name for p in (tmp_path / "run/checkpoint").iterdir()) == [
        f"step-{i}" for i in range(1, 7)
    ]


def test_a_resumed_run_does_not_draw_weights_it_will_load(tmp_path, monkeypatch):
    """Initialization is skipped when a checkpoint overwrites every parameter (it would cost minutes
    per rank at 120b), and happens when the model is excluded from loading."""
    import gptoss_titan.model.init as model_module

    assert main(base_args(tmp_path, "run", "--training.steps=3")) == 0
    drawn = []
    real = model_module.init_param
    monkeypatch.setattr(model_module, "init_param", lambda *a: drawn.append(a[1]) or real(*a))
    assert main(base_args(tmp_path, "run", "--training.steps=4")) == 0
    assert drawn == []
    assert (
        main(base_args(tmp_path, "run", "--training.steps=5", "--checkpoint.exclude_from_loading=model")) == 0
    )
    assert "tok_embeddings.weight" in drawn


def test_mixture_resumes_exactly_across_data_parallel_degrees(tmp_path):
    """[[data.sources]] (two corpora, 3:1): 2 processes for 3 steps, then 1 process from that
    checkpoint, equal the run that never stopped on 1 process."""
    a, b = synthetic_data(tmp_path / "a", seed=1), synthetic_data(tmp_path / "b", seed=2)
    mix = [f"--data.sources={a}:3,{b}:1", "--data.dataset_path="]
    launch(1, tmp_path, base_args(tmp_path, "straight", *mix))
    ref = losses(tmp_path / "straight")
    launch(
        2, tmp_path, base_args(tmp_path, "two", *mix, "--training.local_batch_size=2", "--training.steps=3")
    )
    np.testing.assert_allclose(losses(tmp_path / "two"), ref[:3], rtol=1e-5)
    src = f"--checkpoint.initial_load_path={tmp_path / 'two/checkpoint/step-3'}"
    launch(1, tmp_path, base_args(tmp_path, "one", *mix, src, "--checkpoint.initial_load_model_only=false"))
    np.testing.assert_allclose(losses(tmp_path / "one"), ref[3:], rtol=1e-5)
    cfg = json.loads((tmp_path / "straight/config.json").read_text())
    assert cfg["data"]["sources"] == [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}]


def test_old_checkpoints_are_deleted_in_the_background(tmp_path, monkeypatch):
    """Retention renames old steps out of the listing at once and deletes them in a thread: a
    final save does not keep rank 0 deleting (minutes for a large checkpoint on network storage)
    while the other ranks wait for it under the training timeout. Checked with a deletion that
    cannot finish until released."""
    import shutil
    import threading
    from types import SimpleNamespace

    import gptoss_titan.checkpoint.manager as manager
    from gptoss_titan.checkpoint.files import complete_steps

    for s in (1, 2, 3):
        (tmp_path / f"step-{s}").mkdir()
        (tmp_path / f"step-{s}" / ".metadata").write_text("x")
    (tmp_path / "step-4.tmp").mkdir()  # abandoned by a killed save
    release, real_rmtree = threading.Event(), shutil.rmtree

    def slow_rmtree(path, ignore_errors=False):
        release.wait()
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(manager.shutil, "rmtree", slow_rmtree)
    fake = SimpleNamespace(folder=tmp_path, cfg=SimpleNamespace(keep_latest_k=1))
    manager.CheckpointManager._retain(fake, 3)  # returns while every deletion is still blocked
    assert complete_steps(tmp_path) == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-1.discarded", "step-2.discarded", "step-3", "step-4.tmp.discarded"
    ]  # fmt: skip
    release.set()
    manager.finish_discards()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
