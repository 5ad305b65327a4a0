"""ParallelDims: parallelism degrees from the config -> the named device meshes, with checks.

World = dp_replicate x dp_shard (pipeline, tensor and context parallelism are not supported yet).
Expert parallelism borrows from the shard dimension: dp_shard = efsdp x ep.

Meshes (views of one 1-D world mesh):
  dense    ("dp_replicate", "dp_shard") or ("dp_shard",)   FSDP (HSDP when replicate > 1) of dense params
  ep       ("ep",)                                         experts split by index; token all-to-all
  efsdp    ("dp_replicate", "efsdp") or ("efsdp",)         FSDP of the expert params (each ep rank's slice)
  dp       flattened world                                 data loading: every rank reads its own batch
  loss     same as dp                                      global token counts, loss and expert loads
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

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int, num_experts: int) -> ParallelDims:
        """Resolve -1 and check every degree against the world size and the experts."""
        check_degrees(p, num_experts)
        rep, shard, ep = (
            p.data_parallel_replicate_degree,
            p.data_parallel_shard_degree,
            p.expert_parallel_degree,
        )
        if shard == -1:
            if world_size % rep:
                raise ConfigError(
                    f"world size {world_size} is not divisible by parallelism.data_parallel_replicate_degree = "
                    f"{rep}; choose a replicate degree that divides {world_size}"
                )
            shard = world_size // rep
        if rep * shard != world_size:
            raise ConfigError(
                f"data_parallel_replicate_degree x data_parallel_shard_degree = {rep} x {shard} = {rep * shard} "
                f"!= world size {world_size}; set data_parallel_shard_degree = -1 or to {world_size // rep}"
            )
        if shard % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide data_parallel_shard_degree = {shard} "
                f"(expert parallelism borrows from the shard dimension); use a divisor of {shard}"
            )
        return cls(dp_replicate=rep, dp_shard=shard, ep=ep, world_size=world_size)

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @property
    def dp_degree(self) -> int:
        """Ranks that read different data (all of them: no TP / CP yet)."""
        return self.world_size

    def build_meshes(self, device_type: str) -> Meshes:
        """One 1-D world mesh, unflattened into the dense (replicate, shard) and the expert
        (replicate, efsdp, ep) views; all share the world as their root, as FSDP2 with
        expert-sharded DTensors requires."""
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
        dense = unflatten_mesh(world, 0, (self.dp_replicate, self.dp_shard), ("dp_replicate", "dp_shard"))
        moe = unflatten_mesh(
            world, 0, (self.dp_replicate, self.efsdp, self.ep), ("dp_replicate", "efsdp", "ep")
        )
        rep = self.dp_replicate > 1
        return Meshes(
            world=world,
            dense=dense if rep else dense["dp_shard"],
            ep=moe["ep"],
            efsdp=moe["dp_replicate", "efsdp"] if rep else moe["efsdp"],
            dp=world,
        )


@dataclass
class Meshes:
    world: DeviceMesh
    dense: DeviceMesh
    ep: DeviceMesh
    efsdp: DeviceMesh
    dp: DeviceMesh

    @property
    def loss(self) -> DeviceMesh:
        return self.dp

    def groups(self) -> list:
        """Every process group behind these meshes (once each)."""
        out = []
        for mesh in (self.world, self.dense, self.ep, self.efsdp, self.dp):
            for g in mesh.get_all_groups():
                if all(g is not h for h in out):
                    out.append(g)
        return out
