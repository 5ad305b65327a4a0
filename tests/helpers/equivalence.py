"""A run of the trainer on N processes (tests/parallel/run_job.py, torchrun on CPU with gloo) and its
comparison with one process; document-masked data; a metric read back from a run's metrics.jsonl.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from gptoss_titan.model.tokens import EOT_ID, VOCAB_SIZE

from ..conftest import ROOT, python_cmd, run_ok, synthetic_data

RUN_JOB = ROOT / "tests" / "parallel" / "run_job.py"
STEPS = 5
# PyTorch's collective consistency check: each process group wrapped; before each collective the
# ranks compare its fingerprint (op, shapes, dtypes) and fail, naming both sides, on a mismatch. A
# mismatch gloo would absorb on CPU (sizes that happen to work) is then an error here, so it cannot
# wait for NCCL to hang. One run per layout family passes it (tests/parallel/test_collective_trace.py
# lists them); the results file records the level (debug_level).
DETAIL = {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}


def run(
    tmp: Path,
    name: str,
    nproc: int,
    *overrides: str,
    batch: int = 4,
    env: dict | None = None,
    vocab: int = VOCAB_SIZE,
) -> dict:
    """run_job.py (the trainer) on nproc processes: per-step losses, grad norms, final full weights.

    The debug flavor, 5 steps of `batch` sequences x 32 tokens in all, on synthetic data in
    tmp.parent (made on first use) with `vocab` token ids; a vocabulary other than the real one
    (201,088) sets the model's vocab_size to match (the embedding and lm_head then shrink from 2 x
    12.9M parameters to 2 x 64 x vocab). The run folder is tmp/name, the results tmp/name.pt.
    """
    data = tmp.parent / ("data" if vocab == VOCAB_SIZE else f"data_vocab{vocab}")
    if not data.exists():
        synthetic_data(data, vocab=vocab)
    out = tmp / f"{name}.pt"
    args = [
        str(RUN_JOB),
        str(out),
        "--model.flavor=debug",
        *([] if vocab == VOCAB_SIZE else [f"--model.args.vocab_size={vocab}"]),
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


def assert_same(ref: dict, got: dict, rtol: float = 1e-5, floor: float = 1e-12) -> None:
    """Losses and grad norms to rtol; each weight tensor to rtol of max(its norm, floor).

    How the equivalence tests choose rtol and floor, from the numerics (not from one machine):
    - fp32's unit roundoff is u = 2^-24 = 6e-8. A parallel layout adds each gradient element's n
      terms (one per token of the step: 128 or 256 here) in another order than one process - per
      rank and micro-batch, then across ranks - and every CPU's BLAS blocks its sums its own way
      (AVX2, AVX-512 and AMX differ). Reordering moves a sum by about sqrt(n) u (n u at worst)
      times the sum of its terms' magnitudes S: ~1e-6 of S for n = 256.
    - Where the terms do not cancel (|sum| ~ S), that is ~1e-6 relative, and losses, grad norms and
      whole weight tensors differ by about as much: rtol = 1e-5 leaves a 10x margin.
    - A bias element whose terms nearly cancel (|sum| ~ 1e-5 S, as for some elements of
      attention.wo.bias) gets a gradient whose relative error is large, and Adam, which turns any
      gradient into a step of ~lr, passes it on as an absolute move of the weight. Biases start at
      zero and after 5 steps of lr 1e-3 have norms of ~1e-2, so that move is large next to their
      own norm: relative to the norm it can pass 1e-5 on one machine's summation order and not
      on another's (pipeline pp2_cp2_tp2_ep2: 1.14e-5 on an AMX Xeon).
    - tests/parallel/reorder_estimate.py estimates that move for a run's configuration: it replays
      each bias element's Adam steps with every step's gradient moved by +-sqrt(n) u S (the signs
      that move it most). The estimate is 4-5x what two machines measured for the same tensors
      (tensor parallel, AVX-512 EPYC: 7e-7 for 3.4e-6 estimated; pipeline, AMX Xeon: 1.2e-7 for
      4.8e-7).
    - So weights are compared relative to max(norm, floor): an absolute budget rtol x floor for
      tensors smaller than the floor (biases, sinks, expert biases) and still rtol of the norm for
      every larger one. Each module takes the smallest floor of 0.1, 0.2 and 0.5 whose budget
      covers its configuration's largest estimate (its docstring gives them), and never more than
      0.5: a wrong factor or a missing reduction moves whole tensors by 1e-3 of their norm or more
      (and the losses and grad norms), which for a bias of norm 0.01 is 1e-5, twice the largest
      budget.
    """
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=rtol)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=max(rtol, 1e-5))
    assert set(got["state"]) == set(ref["state"])
    for k, v in ref["state"].items():
        rel = ((got["state"][k].float() - v).norm() / v.norm().clamp(min=floor)).item()
        assert rel <= rtol, f"{k}: relative difference {rel:.2e}"


def drop_outputs(tmp: Path, name: str, keep: tuple[str, ...] = ()) -> None:
    """Delete what a compared run wrote that no later test reads: its checkpoints (but the step
    folders named in keep) and, unless keep names it, its results file (tmp/name.pt). With the real
    vocabulary a step folder holds ~320 MB (weights and two AdamW moments) and the results file
    ~110 MB; a module's runs would otherwise pile up until its last test."""
    for step in sorted((tmp / name / "checkpoint").glob("step-*")):
        if step.name in keep:
            continue
        if step.is_dir():
            shutil.rmtree(step)
        else:
            step.unlink()
    if f"{name}.pt" not in keep:
        (tmp / f"{name}.pt").unlink(missing_ok=True)


def doc_data(folder: Path) -> Path:
    """Documents of 3 to 40 tokens built from repeated phrases, each ending with <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    phrases = rng.integers(0, 8192, (8, 12))
    for split, n_docs in (("train", 1500), ("val", 150)):
        docs = []
        for _ in range(n_docs):
            doc = np.concatenate([phrases[rng.integers(0, 8)] for _ in range(4)])[: rng.integers(3, 41)]
            doc[-1] = EOT_ID
            docs.append(doc)
        np.concatenate(docs).astype(np.uint32).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text('{"tokenizer": "synthetic", "vocab_size": 201088}')
    return folder


def logged(folder: Path, name: str, key: str) -> list:
    """Every value of `key` in folder/name/metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]
