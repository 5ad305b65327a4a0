"""Data at scale: preparation with 1 vs N workers, loader start-up on a 20 GB folder, mixture shares.

    python benchmarks/bench_data.py [--copies 30] [--workers 2] [--big_gib 20] [--gzip]

1. Preparation: a JSON-lines corpus (the bundled KJV's chapters, `--copies` times; `--gzip`) is
   tokenized by scripts' `prepare()` with 1 and with `--workers` processes, side by side in this
   run; tokens/s of each, their ratio, and whether the two outputs are identical byte for byte.
2. Start-up: a format-2 folder of `--big_gib` GiB of (sparse) shards opens from meta.json and file
   sizes only; compared with the scan that opening a single-file folder without a recorded max id
   still does (the old behaviour for every folder).
3. Mixture: the share of each source over 10,000 samples against the weights.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptoss_titan.data.loader import MixtureLoader, open_split  # noqa: E402
from gptoss_titan.data.prepare import prepare  # noqa: E402
from gptoss_titan.data.shards import FORMAT, open_tokens  # noqa: E402
from gptoss_titan.data.sources import file_items, kjv_documents  # noqa: E402
from gptoss_titan.model.tokens import VOCAB_SIZE  # noqa: E402


def bench_prepare(work: Path, copies: int, workers: int, compressed: bool) -> None:
    src = work / ("corpus.jsonl.gz" if compressed else "corpus.jsonl")
    docs = list(kjv_documents())
    with gzip.open(src, "wt") if compressed else open(src, "w") as f:
        for c in range(copies):
            for d in docs:
                f.write(json.dumps({"text": f"[{c}] {d}"}) + "\n")
    rows = []
    for n in (1, workers, 1, workers):  # alternated: machine noise hits both
        out = work / f"w{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        prepare(file_items([str(src)]), out, "bench", progress=False, workers=n, shard_tokens=1 << 20)
        dt = time.perf_counter() - t0
        meta = json.loads((out / "meta.json").read_text())
        rows.append((n, (meta["train_tokens"] + meta["val_tokens"]) / dt, dt))
    best = {n: max(r[1] for r in rows if r[0] == n) for n in (1, workers)}
    same = all(
        (work / "w1" / s["file"]).read_bytes() == (work / f"w{workers}" / s["file"]).read_bytes()
        for split in ("train", "val")
        for s in json.loads((work / "w1" / "meta.json").read_text())["shards"][split]
    )
    meta = json.loads((work / "w1" / "meta.json").read_text())
    print(
        f"preparation ({'gzipped' if compressed else 'plain'} jsonl): "
        f"{meta['train_tokens'] + meta['val_tokens']:,} tokens, {len(docs) * copies:,} documents"
    )
    for n, tps, dt in rows:
        print(f"  workers {n}: {tps:,.0f} tokens/s ({dt:.1f} s)")
    print(
        f"  best of each: {workers} workers / 1 = {best[workers] / best[1]:.2f}x; outputs identical: {same}"
    )


def bench_startup(work: Path, gib: int) -> None:
    big = work / "big"
    big.mkdir()
    per = 1 << 30  # 4 GiB shards
    n_shards = max(1, gib // 4)
    shards = []
    for i in range(n_shards):
        with open(big / f"train-{i:05d}.bin", "wb") as f:
            f.truncate(4 * per)
        shards.append({"file": f"train-{i:05d}.bin", "tokens": per, "documents": 1, "max_id": 0})
    meta = {"format": FORMAT, "tokenizer": "o200k_harmony", "shards": {"train": shards, "val": []}}
    (big / "meta.json").write_text(json.dumps(meta))
    t0 = time.perf_counter()
    stream = open_split(big, "train", VOCAB_SIZE, 4096)
    batch = stream[12345 : 12345 + 4097]
    dt = time.perf_counter() - t0
    print(
        f"start-up on {n_shards * 4} GiB ({len(stream):,} tokens in {n_shards} shards): {dt * 1000:.1f} ms (+ one window read)"
    )
    one = work / "one"
    one.mkdir()
    with open(one / "train.bin", "wb") as f:
        f.truncate(4 * per)  # 4 GiB, single file, no max id recorded: scanned once
    t0 = time.perf_counter()
    open_tokens(one, "train", VOCAB_SIZE)
    scan = time.perf_counter() - t0
    print(
        f"  for comparison, the scan of one 4 GiB file without a recorded max id: {scan:.1f} s "
        f"(~{scan * n_shards:.0f} s for {n_shards * 4} GiB)"
    )
    assert len(batch) == 4097


def bench_mixture(work: Path) -> None:
    from gptoss_titan.data.shards import write_shard

    streams = []
    for i, n in enumerate((100_000, 3_000, 40_000)):
        d = work / f"src{i}"
        d.mkdir()
        info = write_shard(d, "train", 0, np.full(n, i, dtype=np.uint32), np.array([0]))
        (d / "meta.json").write_text(json.dumps({"format": FORMAT, "shards": {"train": [info], "val": []}}))
        streams.append(open_split(d, "train", 10, 64))
    weights = [0.6, 0.1, 0.3]
    mix = MixtureLoader(streams, weights, ["a", "b", "c"], 64, 1)
    seen = np.bincount([mix.source_of(g)[0] for g in range(10_000)], minlength=3) / 10_000
    print(
        f"mixture over 10,000 samples: shares {seen.round(4).tolist()} for weights {weights}; "
        f"max deviation {np.abs(seen - weights).max() * 100:.2f} percentage points"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--big_gib", type=int, default=20)
    p.add_argument(
        "--gzip", action="store_true", help="the corpus as .jsonl.gz (the reading process decompresses)"
    )
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_prepare(work, a.copies, a.workers, a.gzip)
        bench_startup(work, a.big_gib)
        bench_mixture(work)


if __name__ == "__main__":
    main()
