"""Document masking: the per-document kernels against the definition, and packed = one by one."""

from __future__ import annotations

import pytest
import torch

from gptoss_titan.model.attention import sink_attention
from gptoss_titan.model.documents import doc_flash_sink_op, document_attention, find_documents
from gptoss_titan.model.tokens import EOT_ID


def packed(lengths_per_row: list[list[int]], vocab: int = 50, seed: int = 0) -> torch.Tensor:
    """[B, T] token ids whose documents have the given lengths (each ends with <|endoftext|>, except
    a row's last piece, which runs on as a cut document would)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        row = []
        for i, n in enumerate(lengths):
            doc = torch.randint(0, vocab, (n,), generator=g)
            if i < len(lengths) - 1:
                doc[-1] = EOT_ID
            row.append(doc)
        rows.append(torch.cat(row))
    return torch.stack(rows)


def reference(q, k, v, sinks, window, ids):
    """The definition with a dense [B, T, T] mask: causal, same document, within the window."""
    B, N, T, D = q.shape
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]).expand(B, T, T) & (ids[:, :, None] == ids[:, None, :])
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    return torch.cat(
        [
            sink_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], sinks, window, allowed[b])
            for b in range(B)
        ]
    )


def test_find_documents_segments_ids_positions():
    tokens = packed([[3, 4, 2], [9]])
    docs = find_documents(tokens)
    assert docs.segments.tolist() == [[0, 0, 3], [0, 3, 7], [0, 7, 9], [1, 0, 9]]
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9]
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1], list(range(9))]
    # a batch ending exactly at a document end, and a row that is one document end after another
    t = torch.tensor([[1, EOT_ID, EOT_ID, 5, EOT_ID]])
    assert find_documents(t).segments.tolist() == [[0, 0, 2], [0, 2, 3], [0, 3, 5]]


@pytest.mark.parametrize("window", [None, 4])
def test_document_attention_equals_definition_fwd_bwd_fp64(window):
    """Forward and backward (q, k, v and the sink) equal the dense-mask definition in fp64, with
    GQA, documents shorter and longer than the window, and one-token documents."""
    torch.manual_seed(0)
    tokens = packed([[1, 7, 3, 11], [22]])
    B, T = tokens.shape
    N, G, D = 4, 2, 8
    docs = find_documents(tokens)
    q = torch.randn(B, N, T, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, G, T, D, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(N, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, T, D, dtype=torch.float64)
    out = document_attention(q, k, v, sinks, window, docs)
    grads = torch.autograd.grad(out, (q, k, v, sinks), g)
    ref = reference(q, k, v, sinks, window, docs.ids.long())
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_doc_op_passes_opcheck():
    torch.manual_seed(0)
    docs = find_documents(packed([[5, 9]]))
    q = torch.randn(1, 2, 14, 8, requires_grad=True)
    k = torch.randn(1, 1, 14, 8, requires_grad=True)
    v = torch.randn(1, 1, 14, 8, requires_grad=True)
    sinks = torch.randn(2, requires_grad=True)
    torch.library.opcheck(doc_flash_sink_op, (q, k, v, sinks, docs.segments, 4, 0.35))


def test_packed_loss_equals_documents_one_by_one():
    """The summed loss of a packed batch with document masking equals the sum of the losses of its
    documents run alone (each from position 0), and so do the gradients; the mean loss is then the
    token-weighted mean of the documents' mean losses. Sliding window 8 < some documents."""
    from tests.conftest import build, tiny_args

    eot = 255
    model = build(tiny_args(vocab_size=256))  # fp32 (norms and the loss compute in fp32 anyway)
    g = torch.Generator().manual_seed(1)
    lengths = [[5, 19, 1, 7], [32]]
    rows = []
    for row in lengths:
        parts = [torch.randint(0, eot, (n,), generator=g) for n in row]
        for p in parts[:-1]:
            p[-1] = eot
        rows.append(torch.cat(parts))
    tokens = torch.stack(rows)  # [2, 32]
    targets = torch.randint(0, eot, tokens.shape, generator=g)
    docs = find_documents(tokens, eot_id=eot)
    ce, _, _ = model(tokens, targets, documents=docs)
    grads = torch.autograd.grad(ce, list(model.parameters()), allow_unused=True)
    alone = torch.zeros((), dtype=ce.dtype)
    for b, s, e in docs.segments.tolist():
        alone = alone + model(tokens[b : b + 1, s:e], targets[b : b + 1, s:e])[0]
    alone_grads = torch.autograd.grad(alone, list(model.parameters()), allow_unused=True)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, alone, **tol)
    for a, b in zip(grads, alone_grads):
        if a is not None:
            torch.testing.assert_close(a, b, **tol)
    # and without masking the packed loss differs (the documents do see each other)
    assert not torch.allclose(model(tokens, targets)[0], ce, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 4])
def test_flex_document_mask_forward_equals_definition(window):
    """The CUDA path's document block mask, checked through flex_attention's CPU forward."""
    from gptoss_titan.model.attention import flex_sink_attention
    from gptoss_titan.model.documents import flex_document_mask

    torch.manual_seed(0)
    tokens = packed([[1, 7, 3, 11], [22]])
    B, T = tokens.shape
    docs = find_documents(tokens)
    q, k, v = torch.randn(B, 4, T, 8), torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8)
    sinks = torch.randn(4)
    out = flex_sink_attention(q, k, v, sinks, window, flex_document_mask(docs, window, "cpu"))
    torch.testing.assert_close(out, reference(q, k, v, sinks, window, docs.ids.long()), rtol=1e-5, atol=1e-5)


def test_document_block_mask_is_built_by_compiled_code_once_per_window():
    """The CUDA path's document BlockMask comes from a compiled create_block_mask (eager, it
    evaluates the mask on all [B, T, T] positions every step): run here on the CPU, it equals the
    eager mask for new document layouts without compiling again (one graph per window kind)."""
    from torch._dynamo.utils import counters

    from gptoss_titan.model.documents import flex_document_mask

    g = torch.Generator().manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    for _ in range(3):
        x = torch.randint(0, 50, (2, 256), generator=g)
        x[x < 3] = EOT_ID
        docs = find_documents(x, torch.device("cpu"))
        for window in (None, 32):
            compiled = flex_document_mask(docs, window, "cpu", compiled=True)
            assert torch.equal(
                compiled.to_dense(), flex_document_mask(docs, window, "cpu", compiled=False).to_dense()
            )
    assert counters["stats"]["unique_graphs"] - before == 2
