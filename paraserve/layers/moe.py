"""Mixture-of-experts block: a top-k router and stacked expert weights, expert-parallel aware.

Every rank routes its tokens (the router is replicated). Each (token, expert) assignment is
mapped to a physical expert slot (an expert's assignments take its replicas in turn), and
the assignments are sorted by slot (one argsort), so each slot's tokens are one contiguous group
that runs one batched SiLU-gated MLP: a loop over local experts, never over tokens.

One process (ep = 1): every slot is local; with tp > 1 each expert's intermediate dimension is
split over the tp group and the partial outputs are summed by an all-reduce.
Expert parallel (ep > 1): the slots are spread over the EP group. Send counts per slot are
exchanged first, then the sorted rows travel to the slots' ranks with one all-to-all, are
regrouped by local slot, run, and come back with a second all-to-all (combine). Tokens are
replicated over the tp group, so when the EP group spans tp ranks each takes a slice of them and
an all-reduce over tp puts the slices (and any expert-TP partial sums) back together.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from paraserve.config import ConfigError
from paraserve.distributed import comm
from paraserve.distributed.parallel_state import get_ep_group, get_etp_group, get_tp_group
from paraserve.layers import eplb
from paraserve.layers.eplb import ExpertPlacement
from paraserve.layers.weight_utils import Loaded, narrow, shape_of


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, placement: Optional[ExpertPlacement] = None) -> None:
        super().__init__()
        self.tp, self.ep, self.etp = get_tp_group(), get_ep_group(), get_etp_group()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.placement = placement or ExpertPlacement.build(num_experts, self.ep.size)
        if (self.placement.num_logical, self.placement.ep_size) != (num_experts, self.ep.size):
            raise ValueError(f"placement is for {self.placement.num_logical} experts over "
                             f"{self.placement.ep_size} ranks, not {num_experts} over {self.ep.size}")
        self.local_experts = self.placement.local_experts(self.ep.rank)  # logical id of each slot
        if intermediate_size % self.etp.size:
            raise ConfigError(f"expert intermediate size ({intermediate_size}) is not divisible by "
                              f"the expert tensor parallel size ({self.etp.size})")
        self.intermediate_size = intermediate_size // self.etp.size  # this rank's shard
        # the tp group holds the same tokens; its tp/etp distinct EP ranks each take one slice
        self.num_slices = self.tp.size // self.etp.size if self.ep.size > 1 else 1
        self.slice_index = self.tp.rank // self.etp.size if self.ep.size > 1 else 0
        num_local, i = len(self.local_experts), self.intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_local, 2 * i, hidden_size),
                                requires_grad=False)  # gate rows then up rows
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, i), requires_grad=False)
        self.w13.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.w2.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        slots, replicas = self.placement.replica_table()
        self.register_buffer("replica_slots", slots, persistent=False)  # [E, max replicas]
        self.register_buffer("replica_counts", replicas, persistent=False)  # [E]
        # load counters (metrics, EPLB history): assignments this rank's router made per logical
        # expert (the same on every tp rank), and rows each local slot computed
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("slot_counts", torch.zeros(num_local, dtype=torch.long), persistent=False)

    # ---- weights -------------------------------------------------------------------------

    def weight_loader(self, param: nn.Parameter, loaded: Loaded,
                      shard_id: Optional[object] = None) -> None:
        """shard_id = (expert, "w1" | "w3" | "w2") for one checkpoint expert, or None for stacked
        [E, ...] weights. Only this rank's slots, and their expert-TP shard, are read."""
        i, lo = self.intermediate_size, self.etp.rank * self.intermediate_size
        if shard_id is None:  # (lazy slices read only the indexed part)
            for slot, expert in enumerate(self.local_experts):
                if param is self.w13:  # [E, 2I, H]: gate rows then up rows, each split over etp
                    up = shape_of(loaded)[1] // 2
                    param.data[slot, :i].copy_(loaded[expert, lo:lo + i])
                    param.data[slot, i:].copy_(loaded[expert, up + lo:up + lo + i])
                else:  # [E, H, I]
                    param.data[slot].copy_(loaded[expert, :, lo:lo + i])
            return
        expert, which = shard_id  # type: ignore[misc]
        for slot in (s for s, e in enumerate(self.local_experts) if e == expert):
            if which == "w1":
                param.data[slot, :i].copy_(narrow(loaded, 0, lo, i))
            elif which == "w3":
                param.data[slot, i:].copy_(narrow(loaded, 0, lo, i))
            elif which == "w2":
                param.data[slot].copy_(narrow(loaded, 1, lo, i))
            else:
                raise ValueError(f"unknown expert weight {which!r}; expected w1, w2 or w3")

    # ---- routing -------------------------------------------------------------------------

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def _slots(self, experts: torch.Tensor) -> torch.Tensor:
        """[T, k] logical experts -> physical slots: the n-th assignment (in token order) of an
        expert with r replicas goes to replica n % r, so replicas share its load evenly."""
        if self.replica_slots.shape[1] == 1:  # no replicas: one slot per expert
            return self.replica_slots[experts, 0]
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts  # each expert's first index in `order`
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        replica = nth.view_as(experts) % self.replica_counts[experts]
        return self.replica_slots[experts, replica]

    # ---- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], router_logits [T, E] -> [T, hidden], the same on every tp rank."""
        weights, experts = self.route(router_logits)
        self.expert_counts += torch.bincount(experts.flatten(), minlength=self.num_experts)
        if self.num_slices == 1:
            out = self._apply(x, weights.to(x.dtype), self._slots(experts))
            return comm.all_reduce(out, self.tp)  # expert-TP partial sums (no-op at tp 1)
        n, rem = divmod(x.shape[0], self.num_slices)
        start = self.slice_index * n + min(self.slice_index, rem)
        end = start + n + (self.slice_index < rem)
        part = self._apply(x[start:end], weights[start:end].to(x.dtype),
                           self._slots(experts[start:end]))
        out = torch.zeros_like(x)
        out[start:end] = part
        return comm.all_reduce(out, self.tp)  # slices from the other tp ranks (+ etp partials)

    def _apply(self, x: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        flat = slots.flatten()  # [T * k]
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.placement.num_physical)  # [ep * local]
        rows = x[token_of]  # [T * k, hidden], grouped by slot (so by destination rank)
        if self.ep.size == 1:
            y = self._run_experts(rows, counts)
        else:
            y = self._dispatch_run_combine(rows, counts)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, y * weights.flatten()[order].unsqueeze(-1))
        return out

    def _dispatch_run_combine(self, rows: torch.Tensor, send_counts: torch.Tensor) -> torch.Tensor:
        """rows grouped by global slot -> expert outputs in the same order, via the EP ranks."""
        ep, local = self.ep.size, len(self.local_experts)
        recv_counts = comm.exchange_counts(send_counts, self.ep).view(ep, local)  # [source, slot]
        send_split = send_counts.view(ep, local).sum(1).tolist()
        recv_split = recv_counts.sum(1).tolist()
        received = comm.all_to_all(rows, self.ep, recv_split, send_split)  # by (source, slot)
        slot_of = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        regroup = torch.argsort(slot_of, stable=True)  # -> by (slot, source)
        y = torch.empty_like(received)
        y[regroup] = self._run_experts(received[regroup], recv_counts.sum(0))
        return comm.all_to_all(y, self.ep, send_split, recv_split)  # back in the senders' order

    def _run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, hidden] grouped by local slot, counts [local] -> [N, hidden]."""
        self.slot_counts += counts
        out = torch.empty_like(rows)
        start = 0
        for slot, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = F.linear(rows[start:start + n], self.w13[slot])  # [n, 2I]
            gate, up = h.chunk(2, dim=-1)
            out[start:start + n] = F.linear(F.silu(gate) * up, self.w2[slot])  # [n, hidden]
            start += n
        return out

    # ---- load metrics --------------------------------------------------------------------

    @property
    def imbalance(self) -> float:
        """max / mean of the per-expert assignment counts since the last reset."""
        return eplb.imbalance(self.expert_counts)

    def reset_counters(self) -> None:
        self.expert_counts.zero_()
        self.slot_counts.zero_()
