"""MoE dispatch choice: which lowering each engine role gets, under a target's rules.

Roles: `prefill` (many new tokens per row), `decode` (one per row), and `exact` (the engine a
step is rerun on when a capacity-limited engine reports overflow; present only then).

`auto` lowers every candidate the target can run, prices each role's step with the cost
model (graphs/cost.py) under the target's machine balance (roofline time: the larger of
FLOPs / peak FLOP/s and weight bytes / bandwidth, weight bytes that a Gather copies counted
twice more for the write and re-read), and keeps the cheapest. A capacity-limited candidate
also pays its rerun: the probability that some expert overflows under uniformly random
routing times the exact engine's price. Ties go to the exact strategy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from llama4_deploy.graphs.cost import node_costs, profile_points, step_cost, summed_cost, with_ring
from llama4_deploy.graphs.forms import AUTO, MoEDispatch, values
from llama4_deploy.graphs.lower_moe_capacity import CapacityConfig, LowerMoeCapacityPass
from llama4_deploy.graphs.lower_moe_dense import LowerMoeDensePass
from llama4_deploy.graphs.lower_moe_gather import LowerMoeGatherPass
from llama4_deploy.graphs.lower_moe_native import LowerMoeNativePass
from llama4_deploy.graphs.moe_pass import MoeLoweringPass

EXACT = ("native", "gather", "dense")  # preference order among exact strategies
STRATEGIES: tuple[str, ...] = values(MoEDispatch)


@dataclasses.dataclass(frozen=True)
class Machine:
    flops_per_s: float
    bytes_per_s: float


@dataclasses.dataclass(frozen=True)
class DispatchRules:
    """What a target allows of MoE dispatch (llama4_deploy/targets/ gives each target's)."""

    target: str  # its name, for messages
    strategies: tuple[str, ...]  # the lowerings its backend can run
    machine: Machine  # the balance candidates are priced at (not a benchmark)
    capacity_combine: str  # how the capacity lowering combines expert outputs (lower_moe_capacity.CapacityConfig)


def lowering(
    strategy: str,
    capacity_factor: float = 1.25,
    combine: str = "scatter_add",
    split: int | None = None,
    layout: str = "matmul",
) -> MoeLoweringPass:
    """The MoE lowering pass of `strategy`. `combine`: how the capacity lowering combines expert outputs (the
    target's, DispatchRules.capacity_combine). `split`: parts per expert of the native re-layout (native, and gather
    with `layout` "native": a gather reading the native graph's expert weights, lower_moe_gather.py)."""
    if strategy == "dense":
        return LowerMoeDensePass()
    if strategy == "gather":
        return LowerMoeGatherPass(layout, split)
    if strategy == "capacity":
        return LowerMoeCapacityPass(CapacityConfig(capacity_factor=capacity_factor, combine=combine))
    if strategy == "native":
        return LowerMoeNativePass(split)
    raise ValueError(f"unknown MoE dispatch {strategy!r}; choose one of {', '.join((*STRATEGIES, AUTO))}")


@dataclasses.dataclass(frozen=True)
class Priced:
    """A graph the planner prices in place of the whole lowered model: `multiplicity(node name)` says how many
    of the model's nodes each of its nodes stands for (one layer per kind, llama4_deploy/build/stage_graphs.py)."""

    model: ir.Model
    multiplicity: Callable[[str], int]


def estimated_seconds(model: ir.Model | Priced, facts: dict[str, Any], dims: dict[str, int], machine: Machine) -> float:
    multiplicity = None
    if isinstance(model, Priced):
        model, multiplicity = model.model, model.multiplicity
    dims = with_ring(dims, facts)
    costs = node_costs(model, dims)  # one shape inference serves both sums
    report = step_cost(model, facts, dims, multiplicity, costs=[costs])
    _, gathered, _ = summed_cost(costs, "/experts/Gather", multiplicity)  # weight copies: written, then read again
    weight_traffic = report.graph.weight_bytes + 2 * gathered.weight_bytes
    return max(report.graph.flops / machine.flops_per_s, weight_traffic / machine.bytes_per_s)


def overflow_probability(tokens: int, experts: int, top_k: int, capacity_factor: float, trials: int = 500) -> float:
    """P(max expert load > capacity) for uniformly random top-k routing (seeded Monte Carlo)."""
    capacity = min(tokens, math.ceil(capacity_factor * tokens * top_k / experts))
    rng = np.random.default_rng(0)
    if top_k == 1:
        choices = rng.integers(0, experts, size=(trials, tokens))
    else:  # k distinct experts per token
        choices = np.argpartition(rng.random((trials, tokens, experts)), top_k, axis=-1)[..., :top_k]
    flat = (choices.reshape(trials, -1) + experts * np.arange(trials)[:, None]).ravel()
    loads = np.bincount(flat, minlength=trials * experts).reshape(trials, experts)
    return float((loads.max(axis=1) > capacity).mean())


def choose(
    requested: str,
    rules: DispatchRules,
    lowered: Callable[[str], ir.Model | Priced],
    facts: dict[str, Any],
    profiles: dict[str, int],
    capacity_factor: float = 1.25,
    excluded: tuple[str, ...] = (),
) -> dict[str, str]:
    """{role: strategy}. `lowered(strategy)` returns the linked model lowered with it (or a Priced graph that
    costs the same: one layer per kind, each node counted as often as the model holds it); `excluded`
    strategies are never planned (e.g. native for a precision the fused kernel cannot take)."""
    allowed = tuple(s for s in rules.strategies if s not in excluded)
    machine = rules.machine

    points = profile_points(profiles)
    seconds_cache: dict[tuple[str, str], float] = {}

    def seconds_at(strategy: str, dims: dict[str, int]) -> float:
        key = (strategy, repr(sorted(dims.items())))
        if key not in seconds_cache:
            seconds_cache[key] = estimated_seconds(lowered(strategy), facts, dims, machine)
        return seconds_cache[key]

    def price(strategy: str, role: str) -> float:
        """Summed over the role's reporting points (e.g. decode at batch 1 and 8)."""
        total = 0.0
        for _, point_role, dims in points:
            if point_role != role:
                continue
            seconds = seconds_at(strategy, dims)
            if strategy == "capacity":
                tokens = dims["batch"] * dims["new"]
                p = overflow_probability(tokens, facts["num_experts"], facts["top_k"], capacity_factor)
                seconds += p * min(seconds_at(s, dims) for s in allowed if s in EXACT)
            total += seconds
        return total

    if requested != AUTO:
        if requested not in allowed:
            raise ValueError(
                f"MoE dispatch {requested!r} is not available for the {rules.target} backend "
                f"(choose one of {', '.join(allowed)} or auto)"
            )
        roles = {"prefill": requested, "decode": requested}
    else:
        roles = {}
        for role in ("prefill", "decode"):
            priced = {s: price(s, role) for s in allowed}
            roles[role] = min(priced, key=lambda s: (priced[s], s not in EXACT))
    if "capacity" in roles.values():
        exact = [s for s in EXACT if s in allowed]
        if requested == AUTO:
            exact.sort(key=lambda s: price(s, "prefill"))
        roles["exact"] = exact[0]
    return roles
