"""Point-to-point matching for the torchrun jobs (ring_job.py, run_job.py --trace-p2p).

Every p2p op a rank posts - through `dist.batch_isend_irecv` (the ring attention) or the
pipelining schedules' `_batch_p2p` (which posts a homogeneous batch as single isend / irecv calls)
- is recorded in order as (kind, peer global rank, shape, dtype). `check` gathers every rank's
trace and asserts that, for each ordered pair of ranks, the sends of one are the other's receives
in the same order, sizes and dtypes: NCCL matches p2p by order, so a mismatch there hangs or
corrupts instead of failing; gloo's tags would hide some of them.
"""

import torch.distributed as dist
from torch.distributed.pipelining import schedules


class P2PTrace:
    def __init__(self):
        self.ops: list[tuple] = []
        self._batch, self._pipe = dist.batch_isend_irecv, schedules._batch_p2p
        dist.batch_isend_irecv = self._wrap(self._batch)
        schedules._batch_p2p = self._wrap(self._pipe)

    def _wrap(self, post):
        def record(ops, *args, **kwargs):
            for op in ops:
                kind = "send" if op.op is dist.isend else "recv"
                self.ops.append((kind, op.peer, tuple(op.tensor.shape), str(op.tensor.dtype)))
            return post(ops, *args, **kwargs)

        return record

    def check(self) -> int:
        """All ranks call it; returns the number of sends matched (asserts there was one)."""
        dist.batch_isend_irecv, schedules._batch_p2p = self._batch, self._pipe
        traces = [None] * dist.get_world_size()
        dist.all_gather_object(traces, self.ops)
        n = 0
        for a, ta in enumerate(traces):
            for b, tb in enumerate(traces):
                sent = [op[2:] for op in ta if op[0] == "send" and op[1] == b]
                got = [op[2:] for op in tb if op[0] == "recv" and op[1] == a]
                assert sent == got, f"p2p {a} -> {b}: sends {sent[:4]}... vs receives {got[:4]}..."
                n += len(sent)
        assert n > 0, "no point-to-point op was recorded"
        return n
