"""Context-parallel attention on cp = world size gloo ranks against the one-process definition in
fp64: outputs and gradients of q, k, v and the sink, full layers (ring) and sliding layers (halo),
balanced and uneven pieces, GQA, with and without documents, each pair kernel: the fused CPU
kernels and the plain-math one (forward and backward; the latter shares its recomputing backward
with CUDA's flex kernel), and flex_attention itself in forward (CPU flex has no backward): the
block masks CUDA builds from the document ids, rows that see no key. Run with torchrun; exits
non-zero on the first mismatch.
"""

import torch
import torch.distributed as dist

from gptoss_titan.model.attention import sink_attention
from gptoss_titan.model.documents import find_documents
from gptoss_titan.model.tokens import EOT_ID
from gptoss_titan.parallel import ring_blocks
from gptoss_titan.parallel.context_parallel import CPBatch, CPLayout


def reference(q, k, v, sinks, window, ids):
    B, T = ids.shape
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & (ids[:, :, None] == ids[:, None, :])
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    return torch.cat(
        [
            sink_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], sinks, window, allowed[b])
            for b in range(B)
        ]
    )


def check(layout: CPLayout, window, with_docs: bool, group, label: str, backward: bool = True) -> None:
    rank = dist.get_rank(group)
    g = torch.Generator().manual_seed(7)
    B, N, G, T, D = 2, 4, 2, layout.T, 8
    tokens = torch.randint(0, 100, (B, T), generator=g)
    if with_docs:
        tokens[0, [2, 9, 10, 21]] = EOT_ID  # documents of 3, 7, 1, 11 and the rest
        tokens[1, [14]] = EOT_ID
    docs = find_documents(tokens)
    ids = docs.ids.long() if with_docs else torch.zeros(B, T, dtype=torch.long)
    q = torch.randn(B, N, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, G, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, N, T, D, generator=g, dtype=torch.float64)
    ref = reference(q, k, v, sinks, window, ids)
    rq, rk, rv, rs = torch.autograd.grad(ref, (q, k, v, sinks), grad)

    idx = layout.index(rank)
    lq, lk, lv = (t[:, :, idx].detach().requires_grad_() for t in (q, k, v))
    ls = sinks.detach().clone().requires_grad_()
    batch = CPBatch(idx.expand(B, -1), docs.ids.long() if with_docs else None, layout, rank, group.group_name)
    if not backward:
        with torch.no_grad():  # (inputs that require grad are refused by CPU flex)
            out = batch.attend(lq.detach(), lk.detach(), lv.detach(), ls.detach(), window)
        err = (out - ref[:, :, idx]).abs().max().item()
        assert err < 1e-10, f"{label}: out differs by {err}"
        return
    out = batch.attend(lq, lk, lv, ls, window)
    dq, dk, dv, ds = torch.autograd.grad(out, (lq, lk, lv, ls), grad[:, :, idx])
    dist.all_reduce(ds, group=group)
    for name, a, b in (
        ("out", out, ref[:, :, idx]),
        ("dq", dq, rq[:, :, idx]),
        ("dk", dk, rk[:, :, idx]),
        ("dv", dv, rv[:, :, idx]),
        ("dsink", ds, rs),
    ):
        err = (a - b).abs().max().item()
        assert err < 1e-10, f"{label}: {name} differs by {err}"
    assert rs.abs().max() > 1e-3, "the sink gradient must not vanish"


class P2PTrace:
    """Every point-to-point op this rank posts through batch_isend_irecv, in order: (kind, peer,
    shape, dtype). `check` compares all ranks' traces: for each ordered pair of ranks, the sends
    of one are the other's receives, in the same order, sizes and dtypes (NCCL matches them by
    order; a mismatch there hangs or corrupts instead of failing)."""

    def __init__(self):
        self.ops: list[tuple] = []
        self._orig = dist.batch_isend_irecv
        dist.batch_isend_irecv = self._record

    def _record(self, ops):
        for op in ops:
            kind = "send" if op.op in (dist.isend, dist.send) else "recv"
            self.ops.append((kind, op.peer, tuple(op.tensor.shape), str(op.tensor.dtype)))
        return self._orig(ops)

    def check(self) -> int:
        traces = [None] * dist.get_world_size()
        dist.all_gather_object(traces, self.ops)
        n = 0
        for a, ta in enumerate(traces):
            for b, tb in enumerate(traces):
                sent = [op[2:] for op in ta if op[0] == "send" and op[1] == b]
                got = [op[2:] for op in tb if op[0] == "recv" and op[1] == a]
                assert sent == got, f"p2p {a} -> {b}: sends {sent[:4]}... vs receives {got[:4]}..."
                n += len(sent)
        assert n > 0
        return n


def main() -> None:
    dist.init_process_group("gloo")
    trace = P2PTrace()
    cp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(cp)))
    T = 24
    uneven = CPLayout(T, (((0, 5), (17, 24)), ((5, 11), (11, 17))), (5,)) if cp == 2 else None
    layouts = [("balanced", CPLayout.balanced(T, cp, (5,)))] + ([("uneven", uneven)] if uneven else [])
    n = 0
    for kernel in ("cpu", "math", "flex"):
        ring_blocks.block_kernel = lambda t, kernel=kernel: kernel
        for lname, layout in layouts:
            for window in (None, 5):
                for docs in (False, True):
                    label = f"{kernel} {lname} window={window} docs={docs}"
                    check(layout, window, docs, group, label, backward=kernel != "flex")
                    n += 1
    sends = trace.check()
    if rank == 0:
        print(f"ring/halo attention: {n} cases equal the definition on {cp} ranks; {sends} p2p sends matched")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
