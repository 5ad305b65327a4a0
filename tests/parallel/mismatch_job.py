"""The negative control of test_collective_trace.py: rank 1 all-reduces a tensor of another shape
than rank 0's. Under TORCH_DISTRIBUTED_DEBUG=DETAIL the call fails on every rank, naming the
mismatch, instead of summing garbage or hanging; without it, gloo would go on."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
dist.all_reduce(torch.ones(4))  # agreed
dist.all_reduce(torch.ones(4 + rank))  # not agreed: [4] on rank 0, [5] on rank 1
print(f"rank {rank}: the mismatched all-reduce went through")
dist.destroy_process_group()
