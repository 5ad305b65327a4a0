"""Context parallelism trains exactly like one process (CPU, gloo, torchrun), with and without
document masking, and its checkpoints resume at another cp degree.

The debug flavor with a sliding window of 16 at seq_len 64 (4x the window): with cp 4 each rank
holds two chunks of 8 tokens, so a sliding layer's halo spans two chunks of other ranks. The data
holds documents of 3 to 40 tokens, so document masking changes the result (checked). The real
vocabulary stays: documents end with <|endoftext|> (id 199999) and each run samples text.

Tolerances (tests/helpers/equivalence.py, assert_same, derives them): losses and validation
losses to 1e-5 relative; weights to 1e-5 of max(their norm, 0.5). Each gradient element sums 256
per-token terms, in another order under cp (each rank its two chunks, then across ranks; and each
CPU's kernels block their sums their own way), which moves it by about sqrt(256) x 6e-8 = 1e-6 of
its terms' magnitudes. For bias elements whose terms nearly cancel, Adam turns that into an
absolute move that tests/parallel/reorder_estimate.py estimates at up to 4.0e-6 with documents
(layers.2.moe.experts.b_down, 1.2e-4 of its norm 0.032) and 8.8e-7 without: far above 1e-5 of the
tensors' own norms, so a floor at the norm passes only where the summation orders happen to
agree; rtol x 0.5 = 5e-6 covers it. The resumed runs' weights are compared the same way.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ..helpers.equivalence import DETAIL, assert_same, doc_data, drop_outputs, run

pytestmark = pytest.mark.slow
SHAPE = ("--model.args.sliding_window=16", "--training.seq_len=64")
FLOOR = 0.5  # the weights' comparison: rtol of max(norm, FLOOR) (docstring)
# what test_checkpoint_resumes_across_cp_degrees reads of the earlier runs (the rest is deleted)
KEEP = {"ref_docs1": ("step-3",), "cp2_docs1": ("step-3", "cp2_docs1.pt")}


@pytest.fixture(scope="module")
def cpdir(module_tmp):
    d = module_tmp / "runs"
    d.mkdir(parents=True)
    doc_data(d.parent / "docs")
    return d


def cp_run(
    cpdir: Path, name: str, nproc: int, cp: int, docs: bool, *extra: str, env: dict | None = None
) -> dict:
    """run_job.py with 4 sequences per step in total, whatever the data-parallel degree."""
    dp = nproc // cp
    return run(
        cpdir,
        name,
        nproc,
        *SHAPE,
        f"--data.dataset_path={cpdir.parent / 'docs'}",
        f"--training.local_batch_size={4 // dp}",
        f"--parallelism.context_parallel_degree={cp}",
        f"--training.document_mask={str(docs).lower()}",
        "--validation.enable=true",  # validation and a sample at the last step, under cp too
        "--validation.freq=5",
        "--validation.steps=2",
        "--metrics.sample_freq=5",
        "--metrics.sample_tokens=4",
        "--checkpoint.enable=true",  # every run saves at step 3 (test_checkpoint_resumes_across_cp_degrees)
        "--checkpoint.interval=3",
        *extra,
        env=env,
    )


def val_losses(cpdir: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (cpdir / name / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def references(cpdir):
    refs = {docs: cp_run(cpdir, f"ref_docs{int(docs)}", 1, 1, docs) for docs in (False, True)}
    for docs in (False, True):
        name = f"ref_docs{int(docs)}"
        drop_outputs(cpdir, name, KEEP.get(name, ()))
    return refs


CASES = {
    "cp2": (2, 2, []),
    "cp4": (4, 4, []),
    "cp2_hsdp2": (4, 2, ["--parallelism.data_parallel_replicate_degree=2"]),
    # cp 2 x FSDP 2 x EP 2 with per-op AC and compile: in test_tensor_parallel.py's everything case
    # (cp 2 x tp 2 x FSDP 2 x EP 2, per-op AC, compile, documents), one 8-process job for both
    "cp2_fsdp2_ep2": (4, 2, ["--parallelism.expert_parallel_degree=2"]),
}


# the other layouts run with documents only (CI time; the ring without documents at cp 4 is
# tests/parallel/test_ring_attention.py's)
PLAIN_TOO = ("cp2",)


@pytest.mark.parametrize("case, docs", [(c, d) for c in CASES for d in (False, True) if d or c in PLAIN_TOO])
def test_context_parallel_equals_one_process(case, docs, references, cpdir):
    nproc, cp, extra = CASES[case]
    name = f"{case}_docs{int(docs)}"
    detail = name == "cp2_docs1"  # and every collective consistent across the ranks (DETAIL)
    got = cp_run(cpdir, name, nproc, cp, docs, *extra, env=DETAIL if detail else None)
    assert_same(references[docs], got, floor=FLOOR)
    assert got["debug_level"] == ("DETAIL" if detail else "OFF")
    got, want = val_losses(cpdir, name), val_losses(cpdir, f"ref_docs{int(docs)}")
    assert len(got) == 1 and np.allclose(got, want, rtol=1e-5), (got, want)
    drop_outputs(cpdir, name, KEEP.get(name, ()))


def test_document_masking_changes_the_result(references):
    assert not np.allclose(references[True]["losses"], references[False]["losses"], rtol=1e-4)


def test_checkpoint_resumes_across_cp_degrees(references, cpdir):
    """Saved at cp 2, resumed at cp 1, and the reverse: the resumed steps equal the uninterrupted run
    (the saved runs are the documents reference and the cp2 case above)."""
    if not (cpdir / "cp2_docs1.pt").exists():
        cp_run(cpdir, "cp2_docs1", 2, 2, True)
    full = {1: references[True], 2: torch.load(cpdir / "cp2_docs1.pt")}
    for saved, resumed, src in ((2, 1, "cp2_docs1"), (1, 2, "ref_docs1")):
        name = f"resume_cp{saved}_to_cp{resumed}"
        (cpdir / name / "checkpoint").mkdir(parents=True)
        shutil.copytree(cpdir / src / "checkpoint" / "step-3", cpdir / name / "checkpoint" / "step-3")
        got = cp_run(cpdir, name, resumed, resumed, True)
        np.testing.assert_allclose(got["losses"], full[saved]["losses"][3:], rtol=1e-5)
        np.testing.assert_allclose(got["losses"], full[resumed]["losses"][3:], rtol=1e-5)
        for k, v in full[saved]["state"].items():
            rel = ((got["state"][k].float() - v).norm() / v.norm().clamp(min=FLOOR)).item()
            assert rel <= 1e-5, f"{name} {k}: relative difference {rel:.2e}"
        drop_outputs(cpdir, name)
    assert torch.is_tensor(full[1]["state"]["tok_embeddings.weight"])
