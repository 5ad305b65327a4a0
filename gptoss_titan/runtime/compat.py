"""Every private or version-dependent torch API the package uses, in one place.

The floor is torch 2.10 (pyproject and README say so): `DeviceMesh._unflatten` arrived in 2.10;
flex attention's `AuxRequest` and DCP's `DefaultStager` in 2.9; `torch._grouped_mm` on CPU in 2.9
(CUDA 2.8); FSDP2's `set_force_sum_reduction_for_comms` and `mm(..., out_dtype=)` (CUDA) in 2.8.
CI runs the pinned torch 2.13.0. When torch renames one of these, only this file changes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd  # noqa: F401 (re-export)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_WRAPPED_MODULE,
    checkpoint_wrapper,  # noqa: F401
)
from torch.distributed.device_mesh import DeviceMesh

TORCH_FLOOR = (2, 10)

# The attribute under which torch's activation-checkpoint wrapper holds the wrapped module: a
# wrapped block's parameter names carry it ("layers.0._checkpoint_wrapped_module.attention.wq.weight").
CHECKPOINT_WRAPPED_MODULE = _CHECKPOINT_WRAPPED_MODULE

# The fused CPU flash-attention kernels (forward returns the log-sum-exp), private aten ops.
FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def set_cuda_allocator_settings(settings: str) -> None:
    """CUDA caching allocator options (as PYTORCH_CUDA_ALLOC_CONF), settable after import."""
    torch.cuda.memory._set_allocator_settings(settings)


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep up to `limit` graphs per code object (default 8) before it gives up."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def unflatten_mesh(mesh: DeviceMesh, dim: int, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """Split one mesh dimension into several named ones that share the mesh's root (torch >= 2.10)."""
    return mesh._unflatten(dim, sizes, names)


def set_pg_timeout(timeout: timedelta, groups: list) -> None:
    """Change the timeout of the default process group and of `groups` (TorchTitan does this after
    the first step; torch 2.13 has only the private `_set_pg_timeout`)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for group in [None, *groups]:
        _set_pg_timeout(timeout, group)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [R, in] @ w[e] [in, out] for the rows of each group e (offs: int32 end rows) -> [R, out]."""
    return torch._grouped_mm(x, w, offs=offs)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def fake_process_group(world_size: int, rank: int = 0) -> None:
    """A process group that pretends to be `rank` of world_size (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def fsdp_mesh_size(module: torch.nn.Module) -> int | None:
    """The size of the mesh an FSDP2 module shards its own parameters over (None: it holds none)."""
    group = module._get_fsdp_state()._fsdp_param_group
    return None if group is None else group.mesh_info.mesh.size()


def pinned_memory_stager():
    """DCP's stager that copies state into reused pinned host buffers (CUDA; torch >= 2.9)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(
        StagingOptions(
            use_pinned_memory=True,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=True,
        )
    )


def flex_attention_lse(compiled_flex, q, k, v, block_mask, scale: float, enable_gqa: bool):
    """flex_attention's output and its log-sum-exp [B, N, T] (AuxRequest: torch >= 2.9)."""
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = compiled_flex(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_aux=AuxRequest(lse=True)
    )
    return out, aux.lse


@contextlib.contextmanager
def autograd_in_custom_op():
    """Autograd records again inside a custom op's implementation (which runs with the autograd
    dispatch keys excluded): for a recompute-and-differentiate inside a backward op. Private
    dispatch-key guards; tests/parallel/ring_job.py's backward fails if they change."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(keys.AutogradFunctionality).remove(keys.AutogradOther)  # every device's
    with (
        torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude),
        torch.enable_grad(),
    ):
        yield


def fp32_out_gemms(t: torch.Tensor) -> bool:
    """Whether bf16/fp16 GEMMs with an fp32 output (`out_dtype`) run on t's device: CUDA (the
    fake-GPU test step forces it on the CPU by patching this function)."""
    return t.is_cuda


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32) = a @ b. fp32 inputs: a plain GEMM. bf16/fp16 inputs on CUDA: one low-precision
    GEMM with an fp32 output (`out_dtype`, torch >= 2.8 on CUDA); elsewhere the product rounded to
    the input dtype, then copied."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif fp32_out_gemms(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(a @ b)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation; low-precision a, b stay low precision on CUDA
    (one GEMM with an fp32 output) instead of an fp32 GEMM at a fraction of the speed. On CUDA the
    GEMM accumulates into acc in place (addmm with out_dtype, beta 1) where that works here, so no
    fp32 product of acc's size (the fused loss's [V, H]: 2.3 GB at 20b) is made per call."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fp32_out_gemms(a) and inplace_addmm_fp32_works(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif fp32_out_gemms(a):
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_((a @ b).float())


@functools.cache
def inplace_addmm_fp32_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Probe once per device and dtype: addmm with an fp32 out_dtype into its own input gives
    acc + a @ b (a torch without the op, or one that refuses the aliasing, takes the copying way)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(24, 40, device=device, generator=g).to(dtype)
        b = torch.randn(40, 16, device=device, generator=g).to(dtype)
        acc = torch.randn(24, 16, device=device, generator=g)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def attention_save_ops(traced: bool) -> set:
    """Higher-order ops that carry attention in compiled code, for per-op activation checkpointing.
    traced=True (the checkpoint region is compiled): flex_attention as traced inside it. Else the
    separately compiled flex region as an eager region sees it: `inductor_compiled_code`, with
    `wrap_inductor_compiled_regions` (where this torch has it; Dynamo cannot trace a policy that
    names it, hence the two sets)."""
    import torch._higher_order_ops.wrap  # noqa: F401  (registers inductor_compiled_code where it exists)

    if traced:
        return {torch.ops.higher_order.flex_attention}
    return {getattr(torch.ops.higher_order, "inductor_compiled_code", torch.ops.higher_order.flex_attention)}


def flex_compile_options() -> dict:
    """inductor options for the separately compiled flex kernel: run it as one visible region, so an
    eager per-op checkpoint policy can save its output instead of recomputing it."""
    import torch._inductor.config as inductor_config

    return (
        {"wrap_inductor_compiled_regions": True}
        if hasattr(inductor_config, "wrap_inductor_compiled_regions")
        else {}
    )


def local_shape_and_offset(shape: torch.Size, mesh: DeviceMesh, placements) -> tuple[tuple, tuple]:
    """This rank's shape and global offset of a DTensor with these placements (strided FSDP splits included)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)


class Torchrun(NamedTuple):
    """The parts of torchrun the launcher (runtime/launcher.py) is built from: public modules, but
    only `torchrun` itself is documented. The launcher also sets `LaunchConfig.shutdown_timeout`
    (the grace between SIGTERM and SIGKILL to the workers) and reads ChildFailedError's `failures`
    (rank -> ProcessFailure with exitcode, pid, error_file, signal_name())."""

    parse_args: Callable
    config_from_args: Callable
    elastic_launch: type
    ChildFailedError: type[Exception]
    SignalException: type[Exception]


def torchrun() -> Torchrun:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    return Torchrun(parse_args, config_from_args, elastic_launch, ChildFailedError, SignalException)
