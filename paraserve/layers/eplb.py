"""Expert placement for expert parallelism: which logical expert each physical slot holds.

With R redundant experts there are E + R physical slots, (E + R) / ep of them on each EP rank
(rank r holds slots [r*L, (r+1)*L)). `ExpertPlacement.balanced` is the greedy EPLB recipe
(DeepSeek's expert-parallel load balancer, as vLLM uses it): give each extra replica to the
expert with the highest load per replica, then pack replicas onto ranks heaviest first, each to
the least-loaded rank with a free slot that does not hold that expert yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from paraserve.config import ConfigError


@dataclass(frozen=True)
class ExpertPlacement:
    num_logical: int
    ep_size: int
    physical_to_logical: tuple[int, ...]  # [E + R], grouped by rank

    def __post_init__(self) -> None:
        n = len(self.physical_to_logical)
        if n % self.ep_size:
            raise ConfigError(f"{self.num_logical} experts + {n - self.num_logical} redundant do not "
                              f"split evenly over expert parallel size {self.ep_size}")
        missing = set(range(self.num_logical)) - set(self.physical_to_logical)
        if missing or not all(0 <= e < self.num_logical for e in self.physical_to_logical):
            raise ValueError(f"a placement must hold each of experts 0..{self.num_logical - 1} at "
                             f"least once, got {self.physical_to_logical}")

    @property
    def num_physical(self) -> int:
        return len(self.physical_to_logical)

    @property
    def num_local(self) -> int:
        return self.num_physical // self.ep_size

    def local_experts(self, ep_rank: int) -> tuple[int, ...]:
        """Logical expert of each of this rank's slots."""
        return self.physical_to_logical[ep_rank * self.num_local:(ep_rank + 1) * self.num_local]

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, max replicas] physical slot of each replica, padded with its first one; [E] count)."""
        slots: list[list[int]] = [[] for _ in range(self.num_logical)]
        for p, e in enumerate(self.physical_to_logical):
            slots[e].append(p)
        width = max(len(s) for s in slots)
        table = torch.tensor([s + s[:1] * (width - len(s)) for s in slots], dtype=torch.long)
        return table, torch.tensor([len(s) for s in slots], dtype=torch.long)

    @classmethod
    def linear(cls, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """Contiguous blocks, no replicas: rank r holds experts [r*E/ep, (r+1)*E/ep)."""
        return cls(num_experts, ep_size, tuple(range(num_experts)))

    @classmethod
    def balanced(cls, load: Sequence[float], ep_size: int,
                 num_redundant: int = 0) -> "ExpertPlacement":
        """Greedy EPLB placement from per-expert load (token counts of a load history)."""
        num_experts = len(load)
        if num_redundant < 0:
            raise ConfigError(f"num_redundant_experts must be >= 0, got {num_redundant}")
        if (num_experts + num_redundant) % ep_size:
            raise ConfigError(f"{num_experts} experts + {num_redundant} redundant must be divisible by "
                              f"the expert parallel size {ep_size}")
        load = [float(x) for x in load]
        replicas = [1] * num_experts
        for _ in range(num_redundant):  # the hottest expert per replica gets one more
            e = max(range(num_experts), key=lambda i: (load[i] / replicas[i], -i))
            replicas[e] += 1
        items = sorted(((load[e] / replicas[e], e) for e in range(num_experts) for _ in range(replicas[e])),
                       key=lambda t: (-t[0], t[1]))
        per_rank = (num_experts + num_redundant) // ep_size
        ranks: list[list[int]] = [[] for _ in range(ep_size)]
        rank_load = [0.0] * ep_size
        for w, e in items:
            free = [r for r in range(ep_size) if len(ranks[r]) < per_rank]
            fresh = [r for r in free if e not in ranks[r]] or free
            r = min(fresh, key=lambda i: (rank_load[i], i))
            ranks[r].append(e)
            rank_load[r] += w
        return cls(num_experts, ep_size, tuple(e for r in ranks for e in sorted(r)))

    @classmethod
    def build(cls, num_experts: int, ep_size: int, num_redundant: int = 0,
              load: Optional[Sequence[float]] = None) -> "ExpertPlacement":
        """Linear without a load history or redundancy, otherwise balanced (uniform load if none)."""
        if load is None and num_redundant == 0:
            if num_experts % ep_size:
                raise ConfigError(f"{num_experts} experts are not divisible by the expert parallel "
                                  f"size {ep_size}; add redundant experts or pick another size")
            return cls.linear(num_experts, ep_size)
        if load is not None and len(load) != num_experts:
            raise ValueError(f"load history has {len(load)} entries for {num_experts} experts")
        return cls.balanced(load if load is not None else [1.0] * num_experts, ep_size, num_redundant)

    def rank_loads(self, load: Sequence[float]) -> list[float]:
        """Expected load of each EP rank when each expert's load splits evenly over its replicas."""
        _, counts = self.replica_table()
        per_slot = [float(load[e]) / int(counts[e]) for e in self.physical_to_logical]
        return [sum(per_slot[r * self.num_local:(r + 1) * self.num_local]) for r in range(self.ep_size)]


def imbalance(counts: Sequence[float] | torch.Tensor) -> float:
    """max / mean of per-expert (or per-rank) token counts: 1.0 is perfectly balanced."""
    t = torch.as_tensor(counts, dtype=torch.float64)
    mean = float(t.mean()) if t.numel() else 0.0
    return float(t.max()) / mean if mean > 0 else 1.0
