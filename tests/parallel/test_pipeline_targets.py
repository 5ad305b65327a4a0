"""Under pipeline parallelism the head runs on the counted rows alone: each micro-batch's rows
travel inside the target the schedule splits (parallel/pipeline.py: pack_targets), padded with one
of that micro-batch's ignored positions. In process: the packing round trip through the schedule's
own split, and the loss and gradients on padded rows equal those on the rows alone. The training
run under pp (tests/data/test_packed.py) checks it end to end."""

import numpy as np
import torch
from torch.distributed.pipelining.microbatch import TensorChunkSpec, split_args_kwargs_into_chunks

from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.parallel.pipeline import pack_targets, unpack_targets

from ..conftest import build, tiny_args

M, B, T = 3, 2, 8  # micro-batches, sequences each, tokens


def masked_targets(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y [M x B, T] with micro-batch i counting a different number of positions; its rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 256, (M * B, T), generator=g)
    keep = torch.rand(M * B, T, generator=g) < torch.tensor([0.2, 0.2, 0.9, 0.9, 0.5, 0.5])[:, None]
    y = torch.where(keep, y, IGNORE_INDEX)
    rows = [torch.from_numpy(np.flatnonzero((c.reshape(-1) != IGNORE_INDEX).numpy())) for c in y.split(B)]
    assert len({int(r.numel()) for r in rows}) == M and all(0 < r.numel() < B * T for r in rows)
    return y, rows


def test_each_micro_batch_gets_back_its_targets_and_rows():
    y, rows = masked_targets()
    packed = pack_targets(y, rows, M)
    # the schedule's own split of a target (dim 0 into M chunks), as PipelineSchedule does
    _, chunks = split_args_kwargs_into_chunks(
        (), {"t": packed}, M, kwargs_chunk_spec={"t": TensorChunkSpec(0)}
    )
    k = max(r.numel() for r in rows)
    for i, chunk in enumerate(chunks):
        targets, got = unpack_targets(chunk["t"], (B, T))
        assert torch.equal(targets, y[i * B : (i + 1) * B])
        n = rows[i].numel()
        assert got.numel() == k and torch.equal(got[:n], rows[i])
        assert bool((targets.reshape(-1)[got[n:]] == IGNORE_INDEX).all())  # the padding adds nothing
    # a micro-batch that counts every target: the head runs on every row, as before
    assert pack_targets(y, [rows[0], None, rows[2]], M) is y and pack_targets(y, None, M) is y


def test_the_loss_on_padded_rows_equals_the_loss_on_the_rows():
    torch.manual_seed(0)
    model = build(tiny_args())
    y, rows = masked_targets()
    x = torch.randint(0, 256, y.shape)
    packed = pack_targets(y, rows, M)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(M):
        xi, yi = x[i * B : (i + 1) * B], y[i * B : (i + 1) * B]
        targets, padded = unpack_targets(packed[i : i + 1], (B, T))
        want = model(xi, yi, target_rows=rows[i])[0]
        got = model(xi, targets, target_rows=padded)[0]
        # the padded rows add exact zeros; GEMMs of another height may block the sums differently
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
