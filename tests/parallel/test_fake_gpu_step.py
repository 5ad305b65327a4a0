"""A training step's forward and backward on the GPU code paths without a GPU, for each parallel
layout and custom shapes: the model built with every pass on a fake process group of the layout's
world size (rank 0's view; collectives do nothing), materialized as fake tensors (shapes, dtypes
and strides, no data), bf16 compute, the expert kernel chosen as on a CUDA device, the
accelerator loss branch. Each op runs its meta function, which carries the kernel's dtype, stride
and alignment rules: `_grouped_mm` (bf16 only, 16-byte rows) most of all, the one CUDA kernel of
the step whose rules the CPU kernels do not share. Expert parallelism's split sizes (read on the
host) become symbolic sizes.

Not covered: the attention's CUDA branch (flex_attention needs real CUDA tensors even when fake,
so the fake step runs the CPU attention kernels' meta functions), pipeline schedules (their
point-to-point sends), the GEMMs with an fp32 output dtype.
"""

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._python_dispatch import TorchDispatchMode

from gptoss_titan.config import ConfigError, parse_args
from gptoss_titan.parallel.build import build_model, choose_expert_kernel, plan_run
from gptoss_titan.runtime.compat import fake_process_group

BASE = ("--model.flavor=debug", "--training.mixed_precision_param=bfloat16", "--training.seq_len=64",
        "--training.local_batch_size=2")  # fmt: skip


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def fake_gpu_step(monkeypatch, world: int, *argv: str, kernel: str | None = None) -> tuple[str, Counter]:
    """(the expert kernel a CUDA run picks, or `kernel` forced; the ops of one forward + backward)."""
    import gptoss_titan.model.loss as loss_module
    import gptoss_titan.model.moe as moe_module

    monkeypatch.setattr(loss_module, "loss_path", lambda device: "accel")
    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: dtype == torch.bfloat16)
    cfg = parse_args([*BASE, *argv])
    plan = plan_run(cfg, world)
    fake_process_group(world)
    try:
        meshes = plan.dims.build_meshes("cpu")
        model = build_model(cfg, plan, meshes, torch.device("meta")).model
        choose_expert_kernel(model, cfg, plan.dims, torch.device("cuda"))
        if kernel is not None:
            model.set_expert_kernel(kernel)
        chosen = model.blocks()[0].moe.experts.kernel if hasattr(model.blocks()[0], "moe") else None
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):
            model.to_empty(device="cpu")
            tokens = torch.randint(0, 1000, (2, 64))
            with OpCount() as count:
                ce, _, _ = model(tokens, tokens)
                ce.backward()
        return chosen, count.ops
    finally:
        dist.destroy_process_group()


LAYOUTS = {
    "one_process": (1, ()),
    "tp2": (2, ("--parallelism.tensor_parallel_degree=2",)),
    "tp2_whole_experts": (2, ("--parallelism.tensor_parallel_degree=2", "--parallelism.expert_tensor_parallel_degree=1")),
    "fsdp2_ep2": (2, ("--parallelism.expert_parallel_degree=2",)),
    "cp2": (2, ("--parallelism.context_parallel_degree=2",)),
    "tp2_fsdp2_ep2": (4, ("--parallelism.tensor_parallel_degree=2", "--parallelism.expert_parallel_degree=2")),
    "hsdp_2x2": (4, ("--parallelism.data_parallel_replicate_degree=2",)),
    "lora_attention_experts": (1, ("--lora.rank=4", "--lora.targets=attention,experts")),
    "selective_ac": (1, ("--activation_checkpoint.mode=selective",)),
    "custom_shape": (1, ("--model.args.dim=96", "--model.args.moe_inter_dim=48", "--model.args.num_experts=6")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gpu_step_per_layout(monkeypatch, name):
    world, argv = LAYOUTS[name]
    kernel, ops = fake_gpu_step(monkeypatch, world, *argv)
    assert kernel == "grouped" and ops["_grouped_mm"] > 0, (kernel, ops["_grouped_mm"])


def test_widths_grouped_mm_cannot_take():
    """I / tp = 18 bf16 elements (36 bytes) is not whole 16-byte rows: a CUDA run picks the loop
    kernel on its own and says why; asking for "grouped" is a one-line config error with the numbers;
    and forced past that check, the fake step meets _grouped_mm's own rule - the rule these tests
    exist to run into before a GPU does."""
    mp = pytest.MonkeyPatch()
    odd = ("--parallelism.tensor_parallel_degree=2", "--model.args.dim=72", "--model.args.moe_inter_dim=36")
    try:
        kernel, ops = fake_gpu_step(mp, 2, *odd)
        assert kernel == "loop" and ops["_grouped_mm"] == 0
        with pytest.raises(ConfigError, match="moe_inter_dim / tp = 18"):
            fake_gpu_step(mp, 2, *odd, "--model.expert_kernel=grouped")
        with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
            fake_gpu_step(mp, 2, *odd, kernel="grouped")
    finally:
        mp.undo()
