"""FSDP2 weights gathered once per rollout (parallel/fsdp.py gathered_weights) on 2 gloo ranks,
fp64: the same samples and decode log-probs as gathering per forward, with one all-gather per
FSDP group instead of one per group and forward; afterwards the parameters are sharded again and
each group reshards after forward as before. Run with torchrun; exits non-zero on a mismatch.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from gptoss_titan.model import ModelArgs, Transformer
from gptoss_titan.parallel.fsdp import gathered_weights
from gptoss_titan.rl.prompts import Prompt
from gptoss_titan.rl.rollout import rollout
from gptoss_titan.runtime.cli import exit_now
from gptoss_titan.runtime.distributed import shutdown

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=256, num_experts=4)
ARGS.update(top_k=2, moe_inter_dim=32, sliding_window=8, max_seq_len=128)
GROUPS = 2 + 1  # one FSDP group per block and the root's


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = Transformer(ModelArgs(**ARGS))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.double()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)

    calls = [0]
    gather = dist.all_gather_single

    def counted(*a, **kw):
        calls[0] += 1
        return gather(*a, **kw)

    dist.all_gather_single = counted
    prompts = [Prompt([5 + rank, 6, 7, 8], {}, {}), Prompt([9, 10, 11], {}, {})]  # each rank its own

    def sample():
        model.reshard()  # the root too (it keeps its weights after forward)
        calls[0] = 0
        ro = rollout(
            model,
            prompts,
            3,
            6,
            0.8,
            1.0,
            1 + rank,
            torch.device("cpu"),
            torch.autocast("cpu", enabled=False),
        )
        return ro, calls[0]

    per_forward, n_per = sample()
    with gathered_weights(model):
        once, n_once = sample()
    assert torch.equal(once.tokens, per_forward.tokens), f"rank {rank}: other samples"
    assert torch.equal(once.decode_logprobs, per_forward.decode_logprobs), f"rank {rank}: other log-probs"
    forwards = 2 * 6  # two batches (prompt lengths 4 and 3), 1 prefill + 5 decode steps each
    assert n_once == GROUPS, f"rank {rank}: {n_once} all-gathers with the weights gathered once"
    assert n_per == (GROUPS - 1) * forwards + 1, f"rank {rank}: {n_per} all-gathers per forward"
    assert all(isinstance(p, DTensor) for p in model.parameters()), "not resharded on exit"
    calls[0] = 0
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1, 2, 3]]))
    assert calls[0] == 2 * (GROUPS - 1) + 1, f"rank {rank}: reshard after forward not restored ({calls[0]})"
    assert all(isinstance(m, FSDPModule) for m in model.blocks())
    dist.all_gather_single = gather
    dist.barrier()  # both ranks done before either tears its group down
    if rank == 0:
        print(
            f"gathered once: {n_once} all-gathers for {forwards} forwards (per forward: {n_per}); same samples"
        )
    shutdown()  # gc first: a bare destroy sometimes aborts at exit (runtime/distributed.py)


if __name__ == "__main__":
    main()
    exit_now(0)  # no interpreter teardown (runtime/cli.py)
