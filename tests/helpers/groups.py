"""Process groups inside the test process."""

import contextlib

import torch.distributed as dist


@contextlib.contextmanager
def one_rank_group(backend: str = "gloo"):
    """A real process group of this one process (gloo, or nccl on a GPU), destroyed on exit."""
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
