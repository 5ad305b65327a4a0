"""ModelInputs (train/batching.py): host batches -> the model's inputs on this rank: as they are,
with the documents of packed sequences found on the whole sequence, and each cp rank's share of
every sequence (the balanced layout: chunks r and 2cp-1-r) with the documents' global positions;
the rows whose targets count, found on the host."""

import torch

from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.model.tokens import EOT_ID
from gptoss_titan.parallel.context_parallel import CPLayout
from gptoss_titan.train.batching import ModelInputs


def batch():
    x = torch.arange(1, 17).repeat(2, 1)
    x[0, 5] = x[1, 10] = EOT_ID  # row 0: documents [0, 6) [6, 16); row 1: [0, 11) [11, 16)
    return x, torch.roll(x, -1, 1)


def test_plain_and_documents():
    x, y = batch()
    cpu = torch.device("cpu")
    tx, ty, layout, rows, n = ModelInputs(False, cpu)(x, y)
    assert torch.equal(tx, x) and torch.equal(ty, y) and layout is None
    assert rows is None and n == 32  # every target counts: the head runs on all rows
    _, _, docs, _, _ = ModelInputs(True, cpu)(x, y)
    assert docs.segments.tolist() == [[0, 0, 6], [0, 6, 16], [1, 0, 11], [1, 11, 16]]
    assert docs.positions[0, 6].item() == 0 and docs.positions[1, 15].item() == 4


def test_each_cp_rank_takes_its_chunks_with_global_document_positions():
    x, y = batch()
    layout = CPLayout.balanced(16, 2)
    shares = [ModelInputs(True, torch.device("cpu"), layout, r, None)(x, y) for r in range(2)]
    # T = 16, cp = 2: chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert shares[0][0][0].tolist() == x[0, [0, 1, 2, 3, 12, 13, 14, 15]].tolist()
    assert shares[1][0][0].tolist() == x[0, 4:12].tolist()
    assert torch.equal(torch.cat([shares[1][1], shares[0][1]], 1).sort(1).values, y.sort(1).values)
    full = ModelInputs(True, torch.device("cpu"))(x, y)[2]
    for rank, (_, _, cpb, _, _) in enumerate(shares):
        held = [i for s, e in layout.pieces[rank] for i in range(s, e)]
        assert cpb.rank == rank and cpb.layout is layout
        assert torch.equal(cpb.positions, full.positions[:, held])  # RoPE positions within documents
        assert torch.equal(cpb.ids, full.ids.to(cpb.ids.dtype))  # document ids of every global position


def test_the_rows_whose_targets_count():
    """A chat batch's ignored targets (prompts, padding): rows lists the others' flat positions, in
    order, and n counts them; with cp, those of the rank's share."""
    x, y = batch()
    y[0, :5] = y[1, 12:] = IGNORE_INDEX
    _, ty, _, rows, n = ModelInputs(False, torch.device("cpu"))(x, y)
    assert n == 23 and rows.tolist() == [*range(5, 16), *range(16, 28)]
    assert torch.equal(ty.reshape(-1)[rows], y[y != IGNORE_INDEX])
    layout = CPLayout.balanced(16, 2)
    for r in range(2):
        _, ty, _, rows, n = ModelInputs(True, torch.device("cpu"), layout, r, None)(x, y)
        assert n == rows.numel() == int((ty != IGNORE_INDEX).sum())
        assert torch.equal(ty.reshape(-1)[rows], ty[ty != IGNORE_INDEX])
