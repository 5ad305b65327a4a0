"""ParallelDims: parallelism degrees from the config -> the named device meshes, with checks.

World = dp_replicate x dp_shard x cp (pipeline and tensor parallelism are not supported yet); the
cp ranks of a data-parallel rank are adjacent. Context-parallel ranks hold different tokens of the
same sequences, so they shard parameters like data-parallel ranks (TorchTitan's dp_shard_cp):
the FSDP shard group of dense parameters is dp_shard x cp. Expert parallelism borrows from it:
dp_shard x cp = efsdp x ep.

Meshes (views of one 1-D world mesh):
  dense    ("dp_replicate", "dp_shard") or ("dp_shard",)   FSDP (HSDP when replicate > 1) of dense params,
           ("dp_shard_cp",) with cp                         dp_shard x cp ranks
  ep       ("ep",)                                         experts split by index; token all-to-all
  efsdp    ("dp_replicate", "efsdp") or ("efsdp",)         FSDP of the expert params (each ep rank's slice)
  cp       ("cp",)                                         ranks sharing one batch, each a part of each sequence
  dp       flattened world                                 global token counts, loss and expert loads
Data loading: data-parallel rank = world rank // cp, degree = world / cp.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..compat import unflatten_mesh
from ..config import ConfigError, Parallelism, check_degrees


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    world_size: int
    cp: int = 1

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int, num_experts: int) -> ParallelDims:
        """Resolve -1 and check every degree against the world size and the experts."""
        check_degrees(p, num_experts)
        rep, shard, ep, cp = (
            p.data_parallel_replicate_degree,
            p.data_parallel_shard_degree,
            p.expert_parallel_degree,
            p.context_parallel_degree,
        )
        if shard == -1:
            if world_size % (rep * cp):
                raise ConfigError(
                    f"world size {world_size} is not divisible by parallelism.data_parallel_replicate_degree x "
                    f"context_parallel_degree = {rep} x {cp}; choose degrees whose product divides {world_size}"
                )
            shard = world_size // (rep * cp)
        if rep * shard * cp != world_size:
            raise ConfigError(
                f"data_parallel_replicate_degree x data_parallel_shard_degree x context_parallel_degree = "
                f"{rep} x {shard} x {cp} = {rep * shard * cp} != world size {world_size}; set "
                f"data_parallel_shard_degree = -1 or to {world_size // (rep * cp)}"
            )
        if (shard * cp) % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide data_parallel_shard_degree x "
                f"context_parallel_degree = {shard * cp} (expert parallelism borrows from the shard ranks); "
                f"use a divisor of {shard * cp}"
            )
        return cls(dp_replicate=rep, dp_shard=shard, ep=ep, world_size=world_size, cp=cp)

    @property
    def efsdp(self) -> int:
        return self.dp_shard * self.cp // self.ep

    @property
    def dp_degree(self) -> int:
        """Ranks that read different data (cp ranks share theirs)."""
        return self.world_size // self.cp

    def dp_rank(self, rank: int) -> int:
        return rank // self.cp

    def build_meshes(self, device_type: str) -> Meshes:
        """One 1-D world mesh, unflattened into the dense (replicate, shard x cp), the expert
        (replicate, efsdp, ep) and the cp views; all share the world as their root, as FSDP2 with
        expert-sharded DTensors requires."""
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
        shard_name = "dp_shard_cp" if self.cp > 1 else "dp_shard"
        dense = unflatten_mesh(
            world, 0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", shard_name)
        )
        moe = unflatten_mesh(
            world, 0, (self.dp_replicate, self.efsdp, self.ep), ("dp_replicate", "efsdp", "ep")
        )
        cp = unflatten_mesh(world, 0, (self.world_size // self.cp, self.cp), ("dp_data", "cp"))["cp"]
        rep = self.dp_replicate > 1
        return Meshes(
            world=world,
            dense=dense if rep else dense[shard_name],
            ep=moe["ep"],
            efsdp=moe["dp_replicate", "efsdp"] if rep else moe["efsdp"],
            dp=world,
            cp=cp,
        )


@dataclass
class Meshes:
    world: DeviceMesh
    dense: DeviceMesh
    ep: DeviceMesh
    efsdp: DeviceMesh
    dp: DeviceMesh
    cp: DeviceMesh

    @property
    def loss(self) -> DeviceMesh:
        return self.dp

    def groups(self) -> list:
        """Every process group behind these meshes (once each)."""
        out = []
        for mesh in (self.world, self.dense, self.ep, self.efsdp, self.dp, self.cp):
            for g in mesh.get_all_groups():
                if all(g is not h for h in out):
                    out.append(g)
        return out
