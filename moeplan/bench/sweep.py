"""The measured side of `moeplan bench`: each sweep point timed on built layers, and the routing the
layers really produce counted against the planner's formulas. Imports torch (moeplan.bench only).

A point is one step: a prefill of one sequence of `prompt` tokens from an empty cache, or a decode
step of `batch` tokens over a random, full cache of `context` tokens each. Before it is timed, its
routing is fixed (skewed routing draws its ids once, outside the timed region), so every timed run
and replay routes alike and the bytes it moved are known exactly from the experts it touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
import torch

from moeplan.bench import harness
from moeplan.bench.layers import BenchModel, expert_counts, sample_routes
from moeplan.bench.predict import StepShape
from moeplan.routing import blocks, pick_probs


@dataclass(frozen=True)
class Measured:
    shape: StepShape
    timing: harness.Timing
    mode: str  # the mode that ran (a graph that failed to capture ran eagerly)
    graph_note: str | None
    bytes: int
    flops: float
    distinct_experts: list[int]  # per MoE layer, in the timed step
    peak_bytes: int | None = None  # prefill only
    peak_approximate: bool = False


def inputs(model: BenchModel, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """Random hidden states (B, T, H) for layers, or random token ids (B, T) for a full model."""
    spec = model.model_spec
    if model.full:
        return torch.randint(0, spec.vocab_size, (batch, tokens), device=device)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, tokens, spec.hidden_size, device=device, dtype=dtype)


def _generator(device: torch.device, seed: int) -> torch.Generator | None:
    """A seeded generator on the device (None on MPS, whose generators older torch lacks)."""
    return None if device.type == "mps" else torch.Generator(device=device).manual_seed(seed)


def fix_routes(model: BenchModel, tokens: int, seed: int, device: torch.device) -> None:
    """Draw the ids skewed routing sends the next step's `tokens` tokens to (no-op for the router's own)."""
    gen = _generator(device, seed)
    for block in model.moe_blocks():
        block.draw_routes(tokens, gen)


def measure_point(model: BenchModel, shape: StepShape, *, device: torch.device, mode: str, warmup: int,
                  repeats: int, seed: int, on_tick: Callable[[], None] | None = None) -> Measured:  # fmt: skip
    """Time one sweep point in `mode`; a prefill also has its peak memory measured (eagerly, first)."""
    with torch.no_grad():
        fix_routes(model, shape.batch * shape.tokens, seed, device)
        x = inputs(model, shape.batch, shape.tokens, device)
        if shape.kind == "prefill":
            caches = model.new_caches(1, shape.tokens)
            step = partial(model, x, caches, 0)
            step()  # warm: first-call allocations and kernel selection stay out of the peak
            resident = harness.param_bytes(model) + sum(c.nbytes for c in caches) + harness.tensors_bytes(x)
            peak, approximate = harness.peak_bytes_of(step, device=device, resident_bytes=resident)
        else:
            caches = model.new_caches(shape.batch, shape.context + 1, fill=True)  # random KV: only its size matters
            step = partial(model, x, caches, shape.context)
            peak, approximate = None, False
        graph, note = None, None
        if mode == harness.GRAPH:
            try:
                graph = harness.capture_graph(step, device)
            except harness.GraphUnavailable as exc:
                note = str(exc)
        if graph is not None:
            timing = harness.time_graph(graph, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick)
        else:
            timing = harness.time_fn(step, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick)
        ran = harness.GRAPH if graph is not None else harness.EAGER
        # Read while the graph (whose pool holds the last replay's expert counts) is alive.
        measured = Measured(
            shape=shape, timing=timing, mode=ran, graph_note=note,
            bytes=harness.step_bytes(model, caches, shape.batch),  # after the step: distinct experts known
            flops=harness.step_flops(model, shape.batch, shape.tokens, shape.context),
            distinct_experts=harness.distinct_experts(model), peak_bytes=peak, peak_approximate=approximate,
        )  # fmt: skip
    for block in model.moe_blocks():
        block.fixed_ids = None
    del step, caches, x, graph
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def kernel_path(model: BenchModel, device: torch.device, batch: int, context: int) -> harness.KernelPath:
    """Profile one small decode step and read which MoE kernel path ran."""
    with torch.no_grad():
        fix_routes(model, batch, 0, device)
        caches = model.new_caches(batch, min(context, 16) + 1)
        x = inputs(model, batch, 1, device)
        model(x, caches, min(context, 16))  # warm: first-call selection stays out of the profile
        found = harness.detect_kernel_path(partial(model, x, caches, min(context, 16)), model, device)
    for block in model.moe_blocks():
        block.fixed_ids = None
    return found


@dataclass(frozen=True)
class RoutingCounts:
    batch: int
    draws: int
    distinct: float  # mean distinct experts per MoE layer and draw
    busiest_distinct: float | None  # mean over draws of the busiest EP rank's distinct experts
    busiest_assignments: float | None  # and of its token-expert pairs


def routing_counts(model: BenchModel, batch: int, *, draws: int, ranks: int, device: torch.device,
                   seed: int = 1) -> RoutingCounts:  # fmt: skip
    """Route `draws` random batches of `batch` tokens through each built MoE layer's router (and
    skewed routing's sampler) as a step does, and count distinct experts, and per EP rank (experts in
    contiguous blocks, moeplan.routing.blocks) distinct experts and assignments."""
    gen = _generator(device, seed)
    spec = model.model_spec
    e, k = spec.num_experts, spec.experts_per_token
    owner = torch.zeros(e, dtype=torch.int64, device=device)
    for r, rng in enumerate(blocks(e, max(ranks, 1))):
        owner[rng.start : rng.stop] = r
    distinct, busy_d, busy_a = [], [], []
    with torch.no_grad():
        for block in model.moe_blocks():
            dtype = block.router.gate.weight.dtype
            x = torch.randn(draws * batch, spec.hidden_size, device=device, dtype=dtype, generator=gen)
            fixed = None if block.route_q is None else sample_routes(block.route_q, draws * batch, k, gen)
            _, ids = block.router(x, fixed)  # (D*B, K)
            ids = ids.view(draws, batch * k) + torch.arange(draws, device=device)[:, None] * e  # one id space per draw
            counts = expert_counts(ids.flatten(), draws * e).view(draws, e)  # (D, E)
            touched = counts > 0
            distinct.append(touched.sum(1).double().mean().item())
            if ranks > 1:
                per_rank = torch.zeros(draws, ranks, dtype=torch.int64, device=device)
                per_rank_d = per_rank.index_add(1, owner, touched.long())  # (D, R)
                per_rank_a = per_rank.index_add(1, owner, counts)  # (D, R)
                busy_d.append(per_rank_d.max(1).values.double().mean().item())
                busy_a.append(per_rank_a.max(1).values.double().mean().item())
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)  # noqa: E731
    return RoutingCounts(batch=batch, draws=draws, distinct=mean(distinct) or 0.0, busiest_distinct=mean(busy_d),
                         busiest_assignments=mean(busy_a))  # fmt: skip


def set_routing(model: BenchModel, shares: Sequence[Sequence[float] | None], device: torch.device) -> None:
    """Give each built MoE layer its pick probabilities q (moeplan.routing.pick_probs of its shares),
    or None for the router's own top-k."""
    spec = model.model_spec
    for block, probs in zip(model.moe_blocks(), shares):
        if probs is None:
            block.route_q = None
        else:
            q = pick_probs(list(probs), spec.num_experts, spec.experts_per_token)
            block.route_q = torch.tensor(q, dtype=torch.float64, device=device)
