"""Token log-probs and entropies (model/logprobs.py) through a vocabulary split over 2 gloo ranks
(tensor parallelism's lm_head: rows of w, the row statistics combined over the ranks) against the
whole vocabulary on one process: values, the gradient to h (summed over the ranks, as the head's
gather does) and each rank's rows of the gradient to w. Several chunks, ignored rows, a target
in each part, temperature 0.7. Run with torchrun; exits non-zero on a mismatch.
"""

import torch
import torch.distributed as dist

from gptoss_titan.model.logprobs import token_logprobs
from gptoss_titan.model.loss import IGNORE_INDEX
from gptoss_titan.parallel.tensor_parallel import _VocabCombine
from gptoss_titan.runtime.cli import exit_now
from gptoss_titan.runtime.distributed import shutdown

M, H, V = 13, 8, 40


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank
    h = torch.randn(M, H, generator=g)
    w = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    targets[[2, 7]] = IGNORE_INDEX
    upstream = torch.randn(M, generator=g)
    part = V // world
    kw = {"temperature": 0.7, "chunk_elems": 5 * part, "path": "cpu"}  # chunks of 5 rows, 3 chunks
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp1, ent1 = token_logprobs(h1, w1, targets, **kw)
    (logp1 * upstream).sum().backward()
    h2, w2 = h.clone().requires_grad_(), w[rank * part : (rank + 1) * part].clone().requires_grad_()
    logp2, ent2 = token_logprobs(h2, w2, targets, vocab_start=rank * part, combine=_VocabCombine(None), **kw)
    (logp2 * upstream).sum().backward()
    grad_h = h2.grad.clone()
    dist.all_reduce(grad_h)
    # fp32 logits summed in other groupings (per part, then combined): a few fp32 roundings
    checks = [
        ("logprobs", logp2, logp1),
        ("entropy", ent2, ent1),
        ("grad h", grad_h, h1.grad),
        ("grad w", w2.grad, w1.grad[rank * part : (rank + 1) * part]),
    ]
    for name, a, b in checks:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"rank {rank}: {n}: {m}")
    assert bool((logp2[[2, 7]] == 0).all() and (ent2[[2, 7]] == 0).all())
    assert ((targets >= rank * part) & (targets < (rank + 1) * part)).any()
    if rank == 0:
        print(f"vocabulary split over {world}: log-probs, entropies and gradients equal one process")
    shutdown()  # gc first: a bare destroy sometimes aborts at exit (runtime/distributed.py)


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown (runtime/cli.py)
