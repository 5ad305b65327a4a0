"""ParallelDims: parallelism degrees from the config -> the named device meshes, with checks.

World = pp x dp_replicate x dp_shard x cp x tp, pp outermost (each pipeline stage is a copy of
the other layouts), tp innermost: the tp ranks of a data-parallel rank are adjacent, then its cp
ranks. Context-parallel
ranks hold different tokens of the same sequences, so they shard parameters like data-parallel
ranks (TorchTitan's dp_shard_cp): the FSDP shard group of dense parameters is dp_shard x cp.
Expert parallelism borrows from it: dp_shard x cp = efsdp x ep. Tensor-parallel ranks hold the
same tokens and different parts of the parameters (heads, expert columns, vocabulary rows); with
expert_tensor_parallel_degree = 1 the experts stay whole and the tp ranks join expert parallelism
instead (each routes its share of the sequence): dp_shard x cp x tp = efsdp x ep.

Meshes (views of one 1-D world mesh; the pp and tp dimensions exist only when > 1; every view
below is within this rank's pipeline stage):
  dense    ("dp_replicate", "dp_shard") or ("dp_shard",)   FSDP (HSDP when replicate > 1) of dense params,
           ("dp_shard_cp",) with cp                         dp_shard x cp ranks
  ep       ("ep",)                                         experts split by index; token all-to-all
  efsdp    ("dp_replicate", "efsdp") or ("efsdp",)         FSDP of the expert params (each ep rank's slice)
  cp       ("cp",)                                         ranks sharing one batch, each a part of each sequence
  tp       ("tp",)                                         ranks sharing one batch and one sequence part
  experts  ("ep", "tp") / ("tp",) / ("ep",)                 the expert parameters' split before FSDP
                                                           (("ep",) also when ep borrows the tp ranks)
  batch    every rank, or ("batch",) with tp or pp         global token counts, loss and expert loads
  pp       ("pp",)                                         the ranks of one pipeline (stage order)
Data loading: data-parallel rank = (world rank mod world / pp) // (cp x tp), degree = world /
(pp x cp x tp); every stage reads its data-parallel rank's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError, Parallelism, check_degrees
from ..runtime.compat import unflatten_mesh


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    world_size: int
    cp: int = 1
    tp: int = 1
    pp: int = 1
    etp: int = 1  # tp ranks that split each expert's columns: tp, or 1 (ep borrows the tp ranks)

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int, num_experts: int) -> ParallelDims:
        """Resolve -1 and check every degree against the world size and the experts."""
        check_degrees(p, num_experts)
        rep, shard, ep, cp, tp, pp = (
            p.data_parallel_replicate_degree,
            p.data_parallel_shard_degree,
            p.expert_parallel_degree,
            p.context_parallel_degree,
            p.tensor_parallel_degree,
            p.pipeline_parallel_degree,
        )
        others = pp * rep * cp * tp
        if shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by parallelism.pipeline_parallel_degree x "
                    f"data_parallel_replicate_degree x context_parallel_degree x tensor_parallel_degree = "
                    f"{pp} x {rep} x {cp} x {tp} = {others}; choose degrees whose product divides {world_size}"
                )
            shard = world_size // others
        if shard * others != world_size:
            fix = (
                f"set data_parallel_shard_degree = -1 or to {world_size // others}"
                if world_size % others == 0
                else f"choose degrees whose product is {world_size}"
            )
            raise ConfigError(
                f"pipeline_parallel_degree x data_parallel_replicate_degree x data_parallel_shard_degree x "
                f"context_parallel_degree x tensor_parallel_degree = {pp} x {rep} x {shard} x {cp} x {tp} = "
                f"{shard * others} != world size {world_size}; {fix}"
            )
        etp = tp if p.expert_tensor_parallel_degree == -1 else p.expert_tensor_parallel_degree
        if etp not in (1, tp):
            raise ConfigError(
                f"parallelism.expert_tensor_parallel_degree = {etp} must be -1 (= tensor_parallel_degree {tp}: "
                "experts split by columns) or 1 (whole experts; the tp ranks join expert parallelism)"
            )
        pool, what = (shard * cp, "data_parallel_shard_degree x context_parallel_degree")
        if etp == 1 and tp > 1:
            pool, what = shard * cp * tp, f"{what} x tensor_parallel_degree"
        if pool % ep:
            raise ConfigError(
                f"parallelism.expert_parallel_degree = {ep} does not divide {what} = {pool} (expert parallelism "
                f"borrows from those ranks); use a divisor of {pool}"
            )
        return cls(
            dp_replicate=rep, dp_shard=shard, ep=ep, world_size=world_size, cp=cp, tp=tp, pp=pp, etp=etp
        )

    @property
    def efsdp(self) -> int:
        return self.dp_shard * self.cp * (self.tp // self.etp) // self.ep

    @property
    def moe_split(self) -> bool:
        """tp ranks hold the same tokens in the MoE, each a share of every expert's columns."""
        return self.tp > 1 and self.etp == self.tp

    @property
    def dp_degree(self) -> int:
        """Ranks that read different data (cp, tp and pipeline ranks share theirs)."""
        return self.world_size // (self.pp * self.cp * self.tp)

    def dp_rank(self, rank: int) -> int:
        return rank % (self.world_size // self.pp) // (self.cp * self.tp)

    def build_meshes(self, device_type: str) -> Meshes:
        """One 1-D world mesh, unflattened into the dense (replicate, shard x cp), the expert
        (replicate, efsdp, ep), the cp, tp and batch views; all share the world as their root, as
        FSDP2 with expert- or tensor-sharded DTensors requires."""
        W, tp, pp = self.world_size, self.tp, self.pp
        world = init_device_mesh(device_type, (W,), mesh_dim_names=("dp",))
        t_size, t_name = ((tp,), ("tp",)) if tp > 1 else ((), ())
        p_size, p_name = ((pp,), ("pp",)) if pp > 1 else ((), ())

        def view(sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
            return unflatten_mesh(world, 0, p_size + sizes + t_size, p_name + names + t_name)

        shard_name = "dp_shard_cp" if self.cp > 1 else "dp_shard"
        dense = view((self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", shard_name))
        moe_names = ("dp_replicate", "efsdp", "ep")
        if self.moe_split or tp == 1:
            moe = view((self.dp_replicate, self.efsdp, self.ep), moe_names)
        else:  # ep borrows the tp ranks: no tp dimension in the experts' view
            moe = unflatten_mesh(
                world, 0, p_size + (self.dp_replicate, self.efsdp, self.ep), p_name + moe_names
            )
        cp = view((W // (pp * self.cp * tp), self.cp), ("dp_data", "cp"))["cp"]
        rep = self.dp_replicate > 1
        tp_mesh = dense["tp"] if tp > 1 else None
        if self.moe_split:
            experts = moe["ep", "tp"] if self.ep > 1 else tp_mesh
        else:
            experts = moe["ep"]
        return Meshes(
            world=world,
            dense=dense["dp_replicate", shard_name] if rep else dense[shard_name],
            ep=moe["ep"],
            efsdp=moe["dp_replicate", "efsdp"] if rep else moe["efsdp"],
            batch=view((W // (pp * tp),), ("batch",))["batch"] if tp * pp > 1 else world,
            cp=cp,
            tp=tp_mesh,
            experts=experts,
            pp=unflatten_mesh(world, 0, (pp, W // pp), ("pp", "stage"))["pp"] if pp > 1 else None,
        )


@dataclass
class Meshes:
    world: DeviceMesh
    dense: DeviceMesh
    ep: DeviceMesh
    efsdp: DeviceMesh
    batch: DeviceMesh
    cp: DeviceMesh
    tp: DeviceMesh | None = None
    experts: DeviceMesh | None = None
    pp: DeviceMesh | None = None

    @property
    def loss(self) -> DeviceMesh:
        """The ranks whose tokens differ: losses, token counts and expert loads are summed over it."""
        return self.batch

    def groups(self) -> list:
        """Every process group behind these meshes (once each)."""
        out = []
        for mesh in (
            self.world,
            self.dense,
            self.ep,
            self.efsdp,
            self.batch,
            self.cp,
            self.tp,
            self.pp,
            self.experts,
        ):
            if mesh is None:
                continue
            for g in mesh.get_all_groups():
                if all(g is not h for h in out):
                    out.append(g)
        return out
