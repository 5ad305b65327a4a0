"""A training step's forward and backward on the GPU code paths without a GPU, for each parallel
layout and custom shapes: the model built with every pass on a fake process group of the layout's
world size (rank 0's view; collectives do nothing), materialized as fake tensors (shapes, dtypes
and strides, no data), bf16 compute, and each CUDA branch forced: the expert kernel chosen as on a
CUDA device, flex_attention for the attention (context parallelism's ring pairs too), the fused
loss's accelerator path with its fp32-output GEMMs (`mm` / `addmm` with `out_dtype`). Each op runs
its meta function, which carries the kernel's dtype, stride and alignment rules: `_grouped_mm`
(bf16 only, 16-byte rows) most of all, the one CUDA kernel of the step whose rules the CPU kernels
do not share. Expert parallelism's split sizes (read on the host) become symbolic sizes.

The fake tensors are CPU tensors standing for CUDA ones (a CPU-only torch cannot index a tensor
that says "cuda": Python indexing opens a device guard), so device placement itself is not
checked here, and flex_attention runs its eager (unfused) form. Pipeline ranks run their
schedule (1F1B, interleaved, zero bubble) with the sends and receives doing nothing: what crosses
the wire is checked by the gloo runs (tests/parallel/p2p_trace.py).
"""

import contextlib
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention as flex_attention_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from gptoss_titan.config import ConfigError, parse_args
from gptoss_titan.model.documents import find_documents
from gptoss_titan.model.tokens import EOT_ID
from gptoss_titan.parallel.build import build_model, choose_expert_kernel, plan_run
from gptoss_titan.runtime.compat import fake_process_group

BASE = ("--model.flavor=debug", "--training.mixed_precision_param=bfloat16", "--training.seq_len=64",
        "--training.local_batch_size=2")  # fmt: skip


def counting_fake_mode() -> tuple[FakeTensorMode, Counter]:
    """A FakeTensorMode that counts the aten ops it runs. Not a dispatch mode of its own on top:
    flex_attention refuses to run under a user dispatch mode, and its fake rule is registered for
    FakeTensorMode itself, not for subclasses."""
    mode, ops = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()), Counter()
    dispatch = mode.dispatch

    def counted(func, types, args=(), kwargs=None):
        if hasattr(func, "overloadpacket"):
            ops[func.overloadpacket.__name__] += 1
            if "dtype" in func._overloadname:  # GEMMs with an fp32 output: mm.dtype_out, addmm.dtype_out
                ops[func.name().removeprefix("aten::")] += 1
        return dispatch(func, types, args, kwargs)

    mode.dispatch = counted
    return mode, ops


def force_gpu_paths(monkeypatch) -> Counter:
    """Every CUDA branch of a training step taken on the CPU; returns the flex_attention call count
    (a higher-order op: the fake mode's op count does not see it)."""
    import gptoss_titan.model.attention as attention_module
    import gptoss_titan.model.documents as documents_module
    import gptoss_titan.model.loss as loss_module
    import gptoss_titan.model.moe as moe_module
    import gptoss_titan.parallel.ring_blocks as ring_blocks
    import gptoss_titan.runtime.compat as compat

    monkeypatch.setattr(loss_module, "loss_path", lambda device: "accel")
    monkeypatch.setattr(moe_module, "grouped_mm_works", lambda device, dtype: dtype == torch.bfloat16)
    for module in (attention_module, documents_module):
        monkeypatch.setattr(module, "attention_path", lambda device: "flex")
    flex_calls = Counter()

    def counted_flex(*args, **kwargs):
        flex_calls["flex_attention"] += 1
        return flex_attention_module.flex_attention(*args, **kwargs)

    for module in (attention_module, ring_blocks):
        monkeypatch.setattr(module, "flex_kernel", lambda device_type: counted_flex)
    # flex_attention refuses a backward for CPU tensors up front (its CUDA kernel has one): the
    # fake tensors are CPU tensors standing for CUDA ones
    monkeypatch.setattr(flex_attention_module, "_validate_device", lambda q, k, v: None)
    monkeypatch.setattr(ring_blocks, "block_kernel", lambda t: "flex")
    monkeypatch.setattr(compat, "fp32_out_gemms", lambda t: True)
    monkeypatch.setattr(compat, "inplace_addmm_fp32_works", lambda device, dtype: True)
    return flex_calls


@contextlib.contextmanager
def fake_world(world: int, rank: int = 0):
    """A fake process group of this size as `rank` sees it; no flex mask built inside outlives it."""
    from gptoss_titan.model.attention import flex_block_mask

    flex_block_mask.cache_clear()
    fake_process_group(world, rank)
    try:
        yield
    finally:
        flex_block_mask.cache_clear()
        dist.destroy_process_group()


def fake_gpu_step(
    monkeypatch, world: int, *argv: str, kernel: str | None = None, documents: bool = False
) -> tuple[str, Counter]:
    """(the expert kernel a CUDA run picks, or `kernel` forced; the ops of one forward + backward)."""
    flex_calls = force_gpu_paths(monkeypatch)
    cfg = parse_args([*BASE, *argv])
    plan = plan_run(cfg, world)
    with fake_world(world):
        meshes = plan.dims.build_meshes("cpu")
        model = build_model(cfg, plan, meshes, torch.device("meta")).model
        choose_expert_kernel(model, cfg, plan.dims, torch.device("cuda"))
        if kernel is not None:
            model.set_expert_kernel(kernel)
        chosen = model.blocks()[0].moe.experts.kernel if hasattr(model.blocks()[0], "moe") else None
        tokens = torch.randint(0, 1000, (2, 64))
        tokens[:, [10, 40]] = EOT_ID  # three packed documents a row (found on the host, as the trainer does)
        docs = find_documents(tokens) if documents else None
        mode, ops = counting_fake_mode()
        # expert parallelism's split sizes are read on the host: unbacked sizes under the fake mode,
        # which flex_attention's own tracing (later layers) would otherwise take as leaked
        with mode, fx_config.patch(soft_pending_unbacked_not_found_error=True):
            model.to_empty(device="cpu")
            ops.clear()
            ce, _, _ = model(tokens, tokens, documents=docs)
            ce.backward()
        return chosen, ops + flex_calls


BALANCED = ("--model.load_balance_bias=true", "--model.balanced_routing=1.0")  # the fallback's sorts on CUDA
LAYOUTS = {
    "one_process": (1, ()),
    "tp2": (2, ("--parallelism.tensor_parallel_degree=2",)),
    "tp2_whole_experts": (2, ("--parallelism.tensor_parallel_degree=2", "--parallelism.expert_tensor_parallel_degree=1")),
    "fsdp2_ep2": (2, ("--parallelism.expert_parallel_degree=2", *BALANCED)),
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
    # the CUDA attention in every layer (4 in the debug flavor), never the CPU kernels
    assert ops["flex_attention"] >= 4 and ops["_scaled_dot_product_flash_attention_for_cpu"] == 0, ops
    # the fused loss: fp32 logits from bf16 GEMMs (forward), dW accumulated in place in fp32
    # (backward; none when LoRA freezes the head)
    head_trains = not any(a.startswith("--lora.rank") for a in argv)
    assert ops["mm.dtype_out"] > 0 and (ops["addmm.dtype_out"] > 0) == head_trains, ops
    if BALANCED[1] in argv:  # the fallback's assignment ran: 8 rounds of 2 sorts in each of 4 layers
        assert ops["sort"] >= 4 * 8 * 2, ops["sort"]


def test_gpu_step_document_mask(monkeypatch):
    """Packed documents on CUDA: one flex document block mask per window type, no CPU kernel."""
    _, ops = fake_gpu_step(monkeypatch, 1, "--training.document_mask=true", documents=True)
    assert ops["flex_attention"] == 4 and ops["_scaled_dot_product_flash_attention_for_cpu"] == 0, ops


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


PIPELINES = {  # name: (pipeline rank, schedule, stages per rank)
    "1f1b_first_stage": (0, "1F1B", 1),
    "1f1b_last_stage": (1, "1F1B", 1),
    "interleaved_1f1b_rank1": (1, "Interleaved1F1B", 2),
    "interleaved_zero_bubble_rank0": (0, "InterleavedZeroBubble", 2),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_gpu_step_pipeline(monkeypatch, name):
    """One pipeline rank's training step on the GPU paths (pp 2, 4 micro-batches): its stages built,
    materialized fake and run by the schedule, the neighbours' sends and receives doing nothing on
    the fake group. Every trainable parameter of the rank gets a gradient; flex_attention runs in
    each block for each micro-batch; the fused loss (its fp32-output GEMMs) runs only on the rank
    holding the last stage."""
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.stage import InferenceMode

    from gptoss_titan.parallel.pipeline import Pipeline

    rank, schedule, per_rank = PIPELINES[name]
    flex_calls = force_gpu_paths(monkeypatch)

    def static_warmup(self, stages, has_backward, p2p_done):
        # the schedule's warm-up vote goes through its neighbours and is read on the host
        # (`.item()`), which a fake group and fake tensors cannot give; with example inputs and
        # outputs given (as Pipeline does) every stage votes STATIC
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    monkeypatch.setattr(schedules._PipelineSchedule, "_warmup_p2p", static_warmup, raising=False)
    cfg = parse_args([*BASE, "--training.global_batch_size=8", "--parallelism.pipeline_parallel_degree=2",
                      f"--parallelism.pipeline_parallel_schedule={schedule}",
                      f"--parallelism.pipeline_parallel_stages_per_rank={per_rank}"])  # fmt: skip
    plan, t = plan_run(cfg, 2), cfg.training
    with fake_world(2, rank):
        meshes = plan.dims.build_meshes("cpu")
        stages = build_model(cfg, plan, meshes, torch.device("meta"), pp_rank=rank).stages
        for _, part in stages:
            choose_expert_kernel(part, cfg, plan.dims, torch.device("cuda"))
        mode, ops = counting_fake_mode()
        with mode:
            for _, part in stages:
                part.to_empty(device="cpu")
            pipe = Pipeline(stages, cfg.parallelism, meshes.pp, torch.device("cpu"), plan.accum_steps,
                            (t.local_batch_size, t.seq_len), (plan.args.dim, torch.bfloat16))  # fmt: skip
            tokens = torch.randint(0, 1000, (8, 64))
            ops.clear()
            pipe.step(tokens, tokens, torch.tensor(512.0))
            missing = [
                n
                for _, part in stages
                for n, p in part.named_parameters()
                if p.requires_grad and p.grad is None
            ]
    assert plan.accum_steps == 4 and not missing, missing
    blocks = sum(len(part.blocks()) for _, part in stages)
    assert ops["_grouped_mm"] > 0 and flex_calls["flex_attention"] == 4 * blocks, (ops, flex_calls)
    last = any(s == 2 * per_rank - 1 for s, _ in stages)
    assert (ops["mm.dtype_out"] > 0) == last and (ops["addmm.dtype_out"] > 0) == last, ops
