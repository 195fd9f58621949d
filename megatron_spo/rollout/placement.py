"""Where a step's generation runs and where its results go: rollout groups and actor replicas.

Two layouts share the torchrun world of W ranks:

- **Rollout groups** (engines): contiguous blocks of R = `rollout.engine.tensor_parallel_size` ranks,
  group g = ranks [g R, (g + 1) R). This is how vLLM's `external_launcher` builds its tensor-parallel
  groups on an already initialised world ("ExternalDP x DP x PP x PCP x TP", TP fastest:
  `vllm/distributed/parallel_state.py::initialize_model_parallel`), so each block is one engine
  whose ranks must all call `generate` with identical requests (SPMD). An engine that is not SPMD
  (the `hf` engine) is run by the group's leader (its first rank) alone.
- **Actor replicas** (data-parallel ranks): the TP x PP ranks of one Megatron model replica, in
  Megatron's default rank order (TP fastest, then DP, then PP: `order="tp-cp-ep-dp-pp"`), so
  replica d holds ranks t + tp d + tp dp p.

Each prompt position of a step is generated once, by one rollout group (`assign`), chosen among
the groups that share a rank with the replica training on it, least loaded first; the results
then travel (`Route`, `exchange`) to every rank of that replica, which all train on identical
sequences. With DP only (tp = pp = R = 1) every rank generates exactly its own prompts and nothing
moves; with TP = R and PP = 1 a group is a replica and an SPMD engine already left the results on
every rank of it.

Everything but `exchange` is pure arithmetic on ranks and positions (unit-tested without a process
group). `exchange` moves Python objects with one `all_gather_object` over a CPU (gloo) group:
each rank receives every item that some rank lacked, not only its own (at most a factor DP more
bytes than it needs; one collective, no point-to-point ordering to deadlock on).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from megatron_spo.errors import UserError


def replica_ranks(world_size: int, tp: int, pp: int) -> tuple[tuple[int, ...], ...]:
    """Global ranks of each actor replica (data-parallel rank), ascending, in Megatron's default
    order: rank = t + tp d + tp dp p for TP rank t, DP rank d, PP rank p."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ValueError(f"tp {tp} x pp {pp} does not divide the world size {world_size}")
    dp = world_size // (tp * pp)
    return tuple(tuple(t + tp * d + tp * dp * p for p in range(pp) for t in range(tp)) for d in range(dp))


@dataclasses.dataclass(frozen=True)
class Route:
    """Per position: the ranks that hold its result after generation and the ranks that need it.

    The first holder is the position's source (the one rank that sends it when it must move)."""

    holders: tuple[tuple[int, ...], ...]
    wanters: tuple[tuple[int, ...], ...]

    def held_by(self, rank: int) -> list[int]:
        return [p for p, ranks in enumerate(self.holders) if rank in ranks]

    def wanted_by(self, rank: int) -> list[int]:
        return [p for p, ranks in enumerate(self.wanters) if rank in ranks]

    def sent_by(self, rank: int) -> list[int]:
        """Positions `rank` is the source of and some rank that does not hold them needs."""
        return [p for p, (held, wanted) in enumerate(zip(self.holders, self.wanters))
                if held[0] == rank and any(w not in held for w in wanted)]

    @property
    def needs_exchange(self) -> bool:
        """False when every rank already holds all it needs (then `exchange` is not collective)."""
        return any(w not in held for held, wanted in zip(self.holders, self.wanters) for w in wanted)


@dataclasses.dataclass(frozen=True)
class RolloutPlacement:
    """Rollout groups over the world and the actor replicas they serve (module docstring)."""

    world_size: int
    rollout_tp: int
    """R: ranks per rollout group (one engine)."""
    replicas: tuple[tuple[int, ...], ...]
    """Global ranks of each actor replica (`replica_ranks`)."""
    spmd: bool = True
    """True: every rank of a group runs the engine with the same requests (vLLM); False: the
    group's leader alone generates (the `hf` engine)."""
    standalone: bool = False
    """A simulated rank with no peers (the GPU dry run): `plan` has it generate everything it
    needs itself, and nothing moves."""

    @classmethod
    def build(cls, world_size: int, rollout_tp: int, *, tp: int = 1, pp: int = 1, spmd: bool = True,
              standalone: bool = False, key: str = "rollout.engine.tensor_parallel_size") -> RolloutPlacement:
        """Validate R against the world (a one-line UserError naming `key`) and lay it out."""
        if rollout_tp < 1 or world_size % rollout_tp:
            raise UserError(f"{key} ({rollout_tp}) must divide the world size {world_size} (torchrun nodes x "
                            f"processes per node): rollout groups are contiguous blocks of that many ranks")
        return cls(world_size=world_size, rollout_tp=rollout_tp, replicas=replica_ranks(world_size, tp, pp),
                   spmd=spmd, standalone=standalone)

    @property
    def num_groups(self) -> int:
        return self.world_size // self.rollout_tp

    def group_of(self, rank: int) -> int:
        return rank // self.rollout_tp

    def group_ranks(self, group: int) -> tuple[int, ...]:
        return tuple(range(group * self.rollout_tp, (group + 1) * self.rollout_tp))

    def leader(self, group: int) -> int:
        return group * self.rollout_tp

    def engine_ranks(self, group: int) -> tuple[int, ...]:
        """Ranks that call the engine for `group`'s requests (and so hold its results)."""
        return self.group_ranks(group) if self.spmd else (self.leader(group),)

    def replica_of(self, rank: int) -> int:
        return next(d for d, ranks in enumerate(self.replicas) if rank in ranks)

    def serving(self, replica: int | None) -> list[int]:
        """Groups that share a rank with `replica` (None: every group)."""
        if replica is None:
            return list(range(self.num_groups))
        return sorted({self.group_of(r) for r in self.replicas[replica]})

    def assign(self, owners: Sequence[int | None]) -> list[int]:
        """The rollout group that generates each position; `owners[p]` is the replica that trains
        on position p, or None when every rank needs it (evaluation, soft-SPO's Q0). A position
        goes to the least loaded group serving its owner (ties: the lower group), so the work is
        spread evenly and, where possible, generated inside the replica that uses it."""
        load = [0] * self.num_groups
        out = []
        for owner in owners:
            group = min(self.serving(owner), key=lambda g: (load[g], g))
            load[group] += 1
            out.append(group)
        return out

    def generated_by(self, rank: int, assignment: Sequence[int]) -> list[int]:
        """Positions `rank` asks its engine for (ascending; empty if it runs no engine)."""
        group = self.group_of(rank)
        if rank not in self.engine_ranks(group):
            return []
        return [p for p, g in enumerate(assignment) if g == group]

    def plan(self, owners: Sequence[int | None], rank: int) -> Plan:
        """`rank`'s part in one generation pass over positions with these owners (`assign`)."""
        everyone = tuple(range(self.world_size))
        needed_by = tuple(everyone if d is None else self.replicas[d] for d in owners)
        if self.standalone:
            mine = [p for p, ranks in enumerate(needed_by) if rank in ranks]
            identity = Route(holders=needed_by, wanters=needed_by)
            return Plan(generate=mine, results=identity, inputs=identity)
        assignment = self.assign(owners)
        engines = tuple(self.engine_ranks(g) for g in assignment)
        return Plan(generate=self.generated_by(rank, assignment), results=Route(holders=engines, wanters=needed_by),
                    inputs=Route(holders=needed_by, wanters=engines))


@dataclasses.dataclass(frozen=True)
class Plan:
    """One generation pass of a step (prompt positions 0..n-1), seen from one rank."""

    generate: list[int]
    """Positions this rank asks its engine for, ascending (empty: it runs no engine)."""
    results: Route
    """From the engines that generate each position to the ranks that need the result."""
    inputs: Route
    """The other way: from the ranks that need a position to its engines, for a second pass
    over the same positions that needs what only they hold (spo_chain: the actor's log-probs)."""


def exchange(held: Mapping[int, Any], route: Route, rank: int, group=None) -> dict[int, Any]:
    """The items of the positions `rank` wants, from the ranks that hold them.

    `held` maps position -> item for (at least) the positions this rank holds. Collective over
    `group` (all ranks of the world, a gloo group on GPU; None = the default group) unless
    `route.needs_exchange` is False, which every rank computes alike."""
    wanted = route.wanted_by(rank)
    merged = dict(held)
    if route.needs_exchange:
        import torch.distributed as dist

        outgoing = {p: held[p] for p in route.sent_by(rank)}
        parts: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, outgoing, group=group)
        for part in parts:
            merged.update(part)
    missing = [p for p in wanted if p not in merged]
    if missing:
        raise RuntimeError(f"rank {rank}: rollout results of positions {missing[:8]} never arrived")
    return {p: merged[p] for p in wanted}
