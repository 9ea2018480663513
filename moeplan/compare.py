"""`moeplan compare`: several models (MoE or dense) on the same GPUs, side by side, and the verdict in
words: which wins on latency, on throughput and on cost, and why (weight reads vs compute vs KV).

Each model is planned as `fit` plans it (its best quantization and layout at the context and batch
asked), then timed as `perf` times it: at the batch asked, and at its capacity, the largest batch
that fits up to the engine's max_num_seqs. The reasons come from the decode step itself: bytes read
per step (weights the batch touches, plus KV) and FLOPs per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from moeplan.cost import NO_PRICE_NOTE, Price
from moeplan.errors import MoeplanError
from moeplan.hardware import Gpu
from moeplan.kv_cache import cache_bytes
from moeplan.layout import Scenario
from moeplan.memory import weight_bytes
from moeplan.params import count_params
from moeplan.perf import PerfResult, perf_report, ranker, step_cost
from moeplan.plan import fit, layout_of
from moeplan.quant import get_scheme
from moeplan.spec import ModelSpec


class CompareRow(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    model: str
    kind: str  # "MoE k/E" or "dense"
    total_params: int
    active_params: int
    fits: bool
    quant: str | None = None
    layout: str | None = None
    engine: str | None = None
    weights_bytes: int | None = None
    kv_bytes_per_sequence: int = 0  # at the context asked, as the engines allocate it
    ttft_s: float | None = None
    tpot_s: float | None = None
    decode_tok_per_s: float | None = None
    # Weights one token reads over all GPUs (its active parameters at the plan's bits), the figure
    # that decides batch-1 decode; and the bytes a step reads on the busiest GPU at the batch asked.
    weights_read_per_token_bytes: float | None = None
    decode_bytes_per_step: float | None = None
    decode_flops_per_step: float | None = None
    max_batch: int = 0
    capacity_batch: int = 0
    capacity_tok_per_s: float | None = None
    tok_per_s_per_user_at_common_batch: float | None = None
    usd_per_million_output_tokens: float | None = None  # at capacity, with --price
    usd_per_million_input_tokens: float | None = None  # at the prefill rate, with --price
    reason: str = ""  # why it does not fit


class CompareResult(BaseModel):
    """`model_dump()` is exactly `moeplan compare --json`."""

    model_config = ConfigDict(frozen=True, defer_build=True)
    gpus: str
    context: int
    batch: int
    common_batch: int  # the batch the per-user rate is also compared at (the smallest capacity)
    rows: list[CompareRow]
    verdict: list[str]
    notes: list[str]


def compare(
    specs: Sequence[ModelSpec], gpus: tuple[Gpu, ...], *, nodes: int = 1, quant: str | None = None,
    context: int = 4096, batch: int = 1, price: Price | None = None, gpus_label: str = "",
) -> tuple[CompareResult, list[PerfResult]]:
    """The comparison, and each fitting model's perf report with its batch sweep (for plots)."""
    if len(specs) < 2:
        raise MoeplanError("compare needs at least two models, e.g. `moeplan compare mixtral-8x7b llama-2-70b "
                           "--gpus 2xA100-80GB`")
    if price is not None:
        price.per_hour(gpus)
    rank = ranker(nodes=nodes, price=price)
    sc = Scenario(context=context, batch=batch)
    rows: list[CompareRow] = []
    reports: list[PerfResult] = []
    plans = []
    for spec in specs:
        count = count_params(spec)
        kind = f"MoE {spec.experts_per_token}/{spec.num_experts}" if spec.is_moe else "dense"
        res = fit(spec, gpus, nodes=nodes, context=context, batch=batch, quant=quant, rank=rank, gpus_label=gpus_label)
        best = res.best if res.best is not None and res.best.offload is None else None
        kv = cache_bytes(spec, context, engine=True).total
        if best is None or best.speed is None:
            why = next((v.reason for v in res.verdicts if not v.fits), "nothing fits")
            rows.append(CompareRow(model=spec.name, kind=kind, total_params=count.total_params,
                                   active_params=count.active_params, fits=False, kv_bytes_per_sequence=kv, reason=why))
            plans.append(None)
            continue
        scheme = get_scheme(best.quant).for_model(spec)
        rep = perf_report(spec, scheme, best, gpus, sc, prompt=min(context, 1024), nodes=nodes, price=price,
                          gpus_label=gpus_label)
        reports.append(rep)
        dec = step_cost(spec, scheme, layout_of(best), gpus, tokens_per_seq=1, batch=batch, context=context,
                        nodes=nodes, engine=best.engine)
        sp = best.speed
        rows.append(CompareRow(
            model=spec.name, kind=kind, total_params=count.total_params, active_params=count.active_params, fits=True,
            quant=best.quant, layout=best.layout, engine=best.engine, weights_bytes=weight_bytes(spec, scheme).total,
            kv_bytes_per_sequence=kv, ttft_s=sp.ttft_s, tpot_s=sp.tpot_s, decode_tok_per_s=sp.decode_tok_per_s,
            weights_read_per_token_bytes=sum(c.active * scheme.bits_for(c.name) / 8 for c in count.components),
            decode_bytes_per_step=dec.bytes, decode_flops_per_step=dec.flops, max_batch=best.max_batch,
            capacity_batch=sp.capacity_batch, capacity_tok_per_s=sp.capacity_tok_per_s,
            usd_per_million_output_tokens=sp.usd_per_million_output_tokens_at_capacity,
            usd_per_million_input_tokens=sp.usd_per_million_input_tokens,
        ))  # fmt: skip
        plans.append((spec, scheme, best))
    fitting = [r for r in rows if r.fits]
    common = min((r.capacity_batch for r in fitting), default=batch) or batch
    for i, (row, plan) in enumerate(zip(rows, plans)):
        if plan is None:
            continue
        spec, scheme, best = plan
        step = step_cost(spec, scheme, layout_of(best), gpus, tokens_per_seq=1, batch=common, context=context,
                         nodes=nodes, engine=best.engine)
        rows[i] = row.model_copy(update={"tok_per_s_per_user_at_common_batch": 1 / step.seconds})
    notes = [] if price is not None else [NO_PRICE_NOTE]
    return CompareResult(gpus=gpus_label or ",".join(g.name for g in gpus), context=context, batch=batch,
                         common_batch=common, rows=rows, verdict=verdict(rows, batch, common), notes=notes), reports


def verdict(rows: list[CompareRow], batch: int, common: int) -> list[str]:
    """Which model wins on latency, throughput and cost, and why, in words."""
    fitting = [r for r in rows if r.fits]
    out = [f"{r.model} does not fit: {r.reason}" for r in rows if not r.fits]
    if len(fitting) < 2:
        if fitting:
            out.append(f"only {fitting[0].model} fits, so it wins by default")
        return out
    by_tpot = sorted(fitting, key=lambda r: r.tpot_s or 0.0)
    fast, slow = by_tpot[0], by_tpot[-1]
    ratio = (slow.tpot_s or 0) / (fast.tpot_s or 1)
    gb_fast = (fast.weights_read_per_token_bytes or 0) / 1e9
    gb_slow = (slow.weights_read_per_token_bytes or 0) / 1e9
    if batch == 1 and gb_fast < gb_slow:
        why = f"a token reads {gb_fast:,.1f} GB of its weights against {gb_slow:,.1f} GB (weight reads decide batch-1 decode)"
    else:  # at a batch, or as many weights per token: the step's own reads and FLOPs say it
        why = (f"a step at batch {batch} reads {(fast.decode_bytes_per_step or 0) / 1e9:,.2f} GB on the busiest GPU "
               f"(of each pipeline stage, summed) against {(slow.decode_bytes_per_step or 0) / 1e9:,.2f} GB and computes "
               f"{(fast.decode_flops_per_step or 0) / 1e12:,.2f} against {(slow.decode_flops_per_step or 0) / 1e12:,.2f} "
               "TFLOP")
    out.append(f"latency: {fast.model} decodes {ratio:,.2f}x faster per user at batch {batch} "
               f"({(fast.tpot_s or 0) * 1e3:,.2f} vs {(slow.tpot_s or 0) * 1e3:,.2f} ms per token): {why}")
    quants = {"16-bit" if r.quant in ("bf16", "fp16") else r.quant for r in fitting}  # bf16 and fp16: alike
    if len(quants) > 1:
        out.append("quantization differs: " + ", ".join(f"{r.model} fits best as {r.quant}" for r in fitting)
                   + " (each model's highest precision that fits; --quant compares them alike)")
    if common > batch:
        users = {r.model: r.tok_per_s_per_user_at_common_batch or 0.0 for r in fitting}
        narrowed = users[fast.model] / max(users[slow.model], 1e-12)
        if narrowed < ratio:
            cause = ("a large batch touches more of the MoE's experts, so its weight reads approach its total"
                     if fast.kind.startswith("MoE") and not slow.kind.startswith("MoE") else
                     "weight reads are shared by the batch while KV reads and compute grow with every sequence")
        else:
            cause = (f"{slow.model} holds more KV per sequence ({slow.kv_bytes_per_sequence / 1e9:,.2f} GB against "
                     f"{fast.kv_bytes_per_sequence / 1e9:,.2f} GB), read again at every step"
                     if slow.kv_bytes_per_sequence > fast.kv_bytes_per_sequence else
                     f"{slow.model}'s compute per token grows its step faster")
        out.append(f"at batch {common:,} (the smallest of the models' largest batches) the per-user ratio "
                   f"{'narrows' if narrowed < ratio else 'widens'} to {narrowed:,.2f}x: {cause}")
    by_cap = sorted(fitting, key=lambda r: -(r.capacity_tok_per_s or 0.0))
    top = by_cap[0]
    rest = ", ".join(f"{r.model} {r.capacity_tok_per_s or 0:,.0f} at batch {r.capacity_batch:,}" for r in by_cap[1:])
    out.append(f"throughput: {top.model} serves the most, {top.capacity_tok_per_s or 0:,.0f} output tok/s at "
               f"batch {top.capacity_batch:,} (the largest batch it holds, up to the engine's cap), against {rest}; "
               "the batch a model can hold is set by the memory its weights leave for KV")
    priced = [r for r in fitting if r.usd_per_million_output_tokens is not None]
    if priced:
        cheap = min(priced, key=lambda r: r.usd_per_million_output_tokens or 0.0)
        out.append(f"cost: {cheap.model} is cheapest at {cheap.usd_per_million_output_tokens:,.3f} USD per million "
                   "output tokens at its largest batch"
                   + (f" ({cheap.usd_per_million_input_tokens:,.3f} per million input tokens)"
                      if cheap.usd_per_million_input_tokens is not None else ""))
    return out
