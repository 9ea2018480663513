"""`fit`: the search over quantizations and layouts, the largest context and batch, expert offload.

A plan fits only when every GPU fits on its own: the memory of several cards is never pooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from moeplan.errors import MoeplanError, RedundantExpertsError
from moeplan.record import Record
from moeplan.hardware import Gpu
from moeplan.layout import (
    GpuUse, Layout, Scenario, candidate_layouts, dispatch_buffer_bytes, even_stages, gpu_rows, stage_activation_bytes,
    stage_kv_fn, uneven_stages,
)  # fmt: skip
from moeplan.kv_cache import cache_bytes
from moeplan.memory import MAX_CONTEXT, activation_bytes, check_context, overhead_bytes, weight_bytes
from moeplan.offload import DEFAULT_LOCALITY, DEFAULT_RAM, DISK_GB_PER_S, RAM_GB_PER_S
from moeplan.params import (
    EMBEDDING, HYPER_CONNECTIONS, LM_HEAD, PER_LAYER_EMBEDDING, ROUTED_EXPERTS, VISION, hyper_head_params,
    expert_params, layer_params, norm_params, per_layer_embedding_params, vision_params,
)  # fmt: skip
from moeplan.quant import LADDER, QuantScheme, get_scheme, kv_dtype_bytes, kv_dtype_usable, native_scheme
from moeplan.spec import ModelSpec

GiB = 2**30
CPU_RAM_FRACTION = 0.90  # leave a tenth of host RAM to the OS and the engine's host buffers
OFFLOAD_LADDER = ("q8_0", "q6_k", "q4_k_m", "q3_k_m", "q2_k", "iq1_s")
LLAMACPP_UBATCH = 512  # llama.cpp n_ubatch default: its prefill chunk


class OffloadOptions(Record):
    """Host-side settings of an offload plan (moeplan.offload): RAM and disk bandwidth, routing locality,
    and a fixed number of GPU cache slots per offloaded layer (None: what the GPUs have left)."""

    host_gb_per_s: float = RAM_GB_PER_S[DEFAULT_RAM]
    disk_gb_per_s: float = DISK_GB_PER_S
    locality: float | None = None  # None: Mixtral's measured 0.34, or the routing's independent reuse if higher
    cache_slots: int | None = None
    cpu_moe_layers: int | None = None  # llama.cpp --n-cpu-moe as the user runs it (None: the fewest that fit)


class Offload(Record):
    """Routed experts of the first `cpu_moe_layers` MoE layers kept in host memory (llama.cpp
    --n-cpu-moe), RAM first and disk (mmap) for what RAM cannot hold."""

    engine: str = "llama.cpp"
    cpu_moe_layers: int
    moe_layers: int
    cpu_bytes: int
    cpu_budget_bytes: int
    gpu_layers: tuple[int, ...]  # decoder layers per GPU (llama.cpp --tensor-split)
    offloaded_layer_ids: tuple[int, ...]
    tier: str = "ram"  # "disk" when RAM holds only ram_share of the offloaded experts
    ram_share: float = 1.0
    host_gb_per_s: float = RAM_GB_PER_S[DEFAULT_RAM]
    disk_gb_per_s: float = DISK_GB_PER_S
    locality: float = DEFAULT_LOCALITY
    locality_given: bool = False  # --locality given: used as it is, even below the routing's independent reuse
    cache_slots: int = 0  # experts per offloaded layer an engine with a GPU expert cache would keep
    expert_bytes: int = 0


class Speed(Record):
    decode_tok_per_s: float
    decode_tok_per_s_total: float
    prefill_tok_per_s: float
    ttft_s: float
    tpot_s: float
    bound: str
    # The most output tok/s the layout sustains: at its largest batch that fits, up to the engine's
    # max_num_seqs (what --prefer throughput ranks by).
    capacity_batch: int = 0
    capacity_tok_per_s: float = 0.0
    engine: str = ""
    # Error band from the validation residuals of this engine and regime (perf.error_band).
    tpot_s_low: float = 0.0
    tpot_s_high: float = 0.0
    ttft_s_low: float = 0.0
    ttft_s_high: float = 0.0
    decode_tok_per_s_low: float = 0.0
    decode_tok_per_s_high: float = 0.0
    decode_tok_per_s_total_low: float = 0.0
    decode_tok_per_s_total_high: float = 0.0
    band_regime: str = ""
    # Cost, only with --price (moeplan.cost): USD per hour of the plan's GPUs and per million tokens,
    # output at the batch asked and at capacity, input at the prefill rate.
    usd_per_hour: float | None = None
    usd_per_million_output_tokens: float | None = None
    usd_per_million_output_tokens_at_capacity: float | None = None
    usd_per_million_input_tokens: float | None = None
    # Expert offload (moeplan.offload): llama.cpp's time per token (no cache) and its p99, and what an
    # engine with an LRU GPU expert cache of the plan's slots would give.
    offload_p99_tpot_s: float | None = None
    cache_hit_rate: float | None = None
    cache_locality: float | None = None  # the locality the hit rate used (the routing's reuse when higher)
    cache_tpot_s: float | None = None
    cache_p99_tpot_s: float | None = None


class Plan(Record):
    quant: str
    layout: str
    tp: int
    ep: int
    pp: int
    dp_attention: bool
    stage_layers: tuple[int, ...]
    fits: bool
    per_gpu: list[GpuUse]
    overflow: str | None  # which GPU overflows by how much
    overflow_bytes: int
    max_context: int
    max_batch: int
    offload: Offload | None = None
    speed: Speed | None = None
    engine: str = "vllm"  # the engine that runs this layout: vllm, sglang (DP attention) or llama.cpp (GGUF)


PREFERENCES = ("latency", "throughput", "memory")


class LayoutRequest(Record):
    """A layout the user forces (`--tp N --ep N --pp N --dp-attention`, or a spec's `layout:`)."""

    tp: int | None = None
    ep: int | None = None
    pp: int | None = None
    dp_attention: bool = False

    @property
    def label(self) -> str:
        parts = [f"--{k} {v}" for k, v in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp)) if v is not None]
        return " ".join(parts + (["--dp-attention"] if self.dp_attention else [])) or "(none)"


MAX_REDUNDANT_EXPERTS_PER_EXPERT = 1  # EPLB gives a hot expert a few replicas, not the whole model again


def check_expert_options(spec: ModelSpec, redundant: int, capacity_factor: float | None,
                         gpus: tuple[Gpu, ...] = (), quant: str | None = None) -> None:
    """--redundant-experts and --capacity-factor in range, before any planning; with `gpus`, replicas
    that could not fit on them even alone (EP over every GPU, the smallest expert format tried)."""
    if capacity_factor is not None and (not math.isfinite(capacity_factor) or capacity_factor <= 0
                                        or capacity_factor > 64):
        raise MoeplanError(f"--capacity-factor must be above 0 (and at most 64), got {capacity_factor}")
    if redundant < 0:
        raise MoeplanError(f"--redundant-experts must be 0 or more, got {redundant}")
    if redundant and not spec.is_moe:
        raise MoeplanError(f"--redundant-experts: {spec.name} has no experts")
    if redundant > spec.num_experts * MAX_REDUNDANT_EXPERTS_PER_EXPERT:
        raise MoeplanError(f"--redundant-experts {redundant} is more replicas than {spec.name}'s {spec.num_experts} "
                           "experts (DeepSeek serves V3's 256 with 32)")
    if redundant and gpus:
        g, e = len(gpus), spec.num_experts
        bits = min(s.expert_bits for s in quant_candidates(spec, quant))
        per_slot = spec.num_moe_layers * expert_params(spec) * bits / 8  # one more expert per MoE layer
        extra = -(-(e + redundant) // g) - -(-e // g)
        cap = max(gpu.usable_bytes for gpu in gpus)
        if extra * per_slot > cap:
            most = (-(-e // g) + int(cap // per_slot)) * g - e
            raise RedundantExpertsError(
                f"--redundant-experts {redundant}: the replicas alone need {extra * per_slot / GiB:,.1f} GiB on each "
                f"GPU ({extra} more expert slots per MoE layer on each of {g} GPUs at {bits:g} bits), more than a GPU "
                f"holds ({cap / GiB:,.1f} GiB); use at most {max(most, 0)}")


def engine_for(scheme: QuantScheme, layout: Layout) -> str:
    """Which engine runs a layout: llama.cpp for GGUF, SGLang for DP attention (--enable-dp-attention),
    else vLLM (TP, TP+EP with --enable-expert-parallel, PP)."""
    if scheme.gguf:
        return "llama.cpp"
    return "sglang" if layout.dp_attention else "vllm"


def engine_runs(scheme: QuantScheme, layout: Layout) -> bool:
    """llama.cpp splits a model by layers across GPUs (--split-mode layer, --tensor-split); it has no
    tensor or expert parallelism, so GGUF plans are one GPU per stage."""
    return not scheme.gguf or layout.gpus_per_stage == 1


def check_request(spec: ModelSpec, gpus: tuple[Gpu, ...], nodes: int, req: LayoutRequest) -> Layout:
    """The Layout a forced request means, or MoeplanError saying why it cannot be formed."""
    n = len(gpus)
    per_node = n // max(nodes, 1)
    pp = req.pp or 1
    for name, value in (("--tp", req.tp), ("--ep", req.ep), ("--pp", req.pp)):
        if value is not None and value < 1:
            raise MoeplanError(f"{name} must be at least 1, got {value}")
    if n % pp:
        raise MoeplanError(f"--pp {pp} does not divide the {n} GPUs")
    if pp > spec.num_layers:
        raise MoeplanError(f"--pp {pp} exceeds {spec.name}'s {spec.num_layers} layers")
    g = n // pp
    if req.dp_attention:
        if not spec.is_moe:
            raise MoeplanError(f"--dp-attention pairs attention data parallelism with expert parallelism; "
                               f"{spec.name} has no experts")
        ep = req.ep or g
        if ep != g or (req.tp is not None and req.tp not in (1, g)):
            raise MoeplanError(
                f"--dp-attention over {g} GPUs per stage ({n} GPUs / --pp {pp}) runs attention data-parallel "
                f"and experts over all {g}: use --ep {g} (SGLang --tp {g} --dp {g} --enable-dp-attention)")
        if ep > spec.num_experts:
            raise MoeplanError(f"--ep {ep} exceeds {spec.name}'s {spec.num_experts} experts")
        return Layout(tp=1, ep=ep, pp=pp, dp_attention=True, stage_layers=even_stages(spec.num_layers, pp))
    tp = req.tp or g
    if tp * pp != n:
        raise MoeplanError(f"--tp {tp} x --pp {pp} = {tp * pp} GPUs, but --gpus gives {n}; "
                           f"use --tp {g} with --pp {pp}")
    if tp > per_node:
        raise MoeplanError(f"--tp {tp} spans nodes ({per_node} GPUs per node): engines keep tensor parallelism "
                           "inside a node; use --pp across nodes or --dp-attention with --ep")
    if spec.num_attention_heads % tp:
        raise MoeplanError(f"--tp {tp} does not divide {spec.name}'s {spec.num_attention_heads} attention heads")
    kv = spec.num_kv_heads
    if spec.attention == "gqa" and kv % tp and tp % kv:
        raise MoeplanError(f"--tp {tp} and {spec.name}'s {kv} KV heads: one must divide the other (vLLM)")
    ep = req.ep or 1
    if ep not in (1, tp):
        raise MoeplanError(f"--ep {ep} with --tp {tp}: expert parallelism spans the tensor-parallel group "
                           f"(vLLM --enable-expert-parallel): use --ep {tp}, or --ep {g} --dp-attention")
    if ep > 1 and not spec.is_moe:
        raise MoeplanError(f"--ep {ep}: {spec.name} has no experts")
    if ep > spec.num_experts:
        raise MoeplanError(f"--ep {ep} exceeds {spec.name}'s {spec.num_experts} experts")
    return Layout(tp=tp, ep=ep, pp=pp, stage_layers=even_stages(spec.num_layers, pp))


class QuantVerdict(Record):
    quant: str
    fits: bool
    weights_bytes: int
    reason: str


class FitResult(Record):
    """`model_dump()` is exactly `moeplan fit --json`."""

    model: str
    gpus: str
    num_gpus: int
    nodes: int
    context: int
    batch: int
    kv_dtype: str
    mem_fraction: float
    # true: a plan fits on the GPUs; "offload": it runs with experts in host memory (exit 0); false: neither.
    fits: bool | Literal["offload"]
    best: Plan | None
    plans: list[Plan]
    verdicts: list[QuantVerdict]
    notes: list[str]


def layout_of(plan: Plan) -> Layout:
    return Layout(tp=plan.tp, ep=plan.ep, pp=plan.pp, dp_attention=plan.dp_attention, stage_layers=plan.stage_layers)


def _overflow(rows: list[GpuUse]) -> tuple[str | None, int]:
    worst = min(rows, key=lambda r: r.free_bytes)
    if worst.free_bytes >= 0:
        return None, 0
    over = -worst.free_bytes
    who = f"GPU {worst.index} ({worst.name})" + (f" and {worst.count - 1} like it" if worst.count > 1 else "")
    return (
        f"{who} needs {worst.used_bytes / GiB:,.2f} GiB of its {worst.budget_bytes / GiB:,.2f} GiB budget: "
        f"over by {over / GiB:,.2f} GiB ({over / 1e9:,.2f} GB)",
        over,
    )


def _max_search(lo: int, hi: int, slack: Callable[[int], float]) -> int:
    """Largest x in [lo, hi] with slack(x) >= 0, slack non-increasing in x (bytes to spare on the
    tightest GPU); 0 when none. A bracketing search: the secant through the bracket's ends guesses
    where slack crosses 0 (memory is nearly linear in context and batch, so the guess is usually the
    answer, checked with its neighbour), and every other step halves the bracket: about five probes
    where bisection takes seventeen, at worst three per halving. The answer is the one bisection gives
    (tests/test_fit.py checks both, on every bundled card)."""
    if hi < lo:
        return 0
    s_lo = slack(lo)
    if s_lo < 0:
        return 0
    s_hi = slack(hi)
    if s_hi >= 0:
        return hi
    secant = True  # invariant: slack(lo) >= 0 > slack(hi)
    while hi - lo > 1:
        if secant:
            guess = lo + int((hi - lo) * (s_lo / (s_lo - s_hi)))
            mid = min(max(guess, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        s = slack(mid)
        if s >= 0:
            lo, s_lo = mid, s
            if secant and mid + 1 < hi:  # the guess fits: does the next one not?
                s = slack(mid + 1)
                if s < 0:
                    return mid
                lo, s_lo = mid + 1, s
        else:
            hi, s_hi = mid, s
            if secant and mid - 1 > lo:  # the guess does not fit: does the one before?
                s = slack(mid - 1)
                if s >= 0:
                    return mid - 1
                hi, s_hi = mid - 1, s
        secant = not secant
    return lo


def _rows_slack(spec: ModelSpec, layout: Layout, rows: list[GpuUse], sc: Scenario) -> Callable[[int, int], int]:
    """`(context, batch) -> bytes the tightest of these rows has to spare` (negative: over budget). Only
    KV and activations change; each row's cache terms are gathered once for the contexts and batches
    the searches try."""
    checks = [(row, stage_kv_fn(spec, layout, row.stage, sc.kv_dtype),
               dispatch_buffer_bytes(spec, layout, sc, row.local_experts)) for row in rows]

    def slack(context: int, batch: int) -> int:
        spare = None
        for row, kv_bytes, dispatch in checks:
            kv = kv_bytes(context, batch)
            act = stage_activation_bytes(spec, layout, row.stage, sc, context, batch)
            act += dispatch
            left = row.budget_bytes - (row.weights_bytes + kv + act + row.overhead_bytes)
            spare = left if spare is None or left < spare else spare
        return 0 if spare is None else spare

    return slack


def context_limit(spec: ModelSpec) -> int:
    return min(spec.max_position_embeddings or MAX_CONTEXT, MAX_CONTEXT)


def evaluate(spec: ModelSpec, scheme: QuantScheme, layout: Layout, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
    rows = gpu_rows(spec, scheme, layout, gpus, sc)
    overflow, over = _overflow(rows)
    fits = overflow is None
    max_ctx = max_batch = 0
    if fits:
        spare = _rows_slack(spec, layout, rows, sc)
        max_ctx = _max_search(1, context_limit(spec), lambda c: spare(c, sc.batch))
        max_batch = _max_search(1, 65536, lambda b: spare(sc.context, b))
    return Plan(
        quant=scheme.name, layout=layout.label, tp=layout.tp, ep=layout.ep, pp=layout.pp,
        dp_attention=layout.dp_attention, stage_layers=layout.stage_layers, fits=fits, per_gpu=rows,
        overflow=overflow, overflow_bytes=over, max_context=max_ctx, max_batch=max_batch,
        engine=engine_for(scheme, layout),
    )  # fmt: skip


def plans_for_quant(
    spec: ModelSpec, scheme: QuantScheme, gpus: tuple[Gpu, ...], nodes: int, sc: Scenario,
    request: LayoutRequest | None = None,
) -> list[Plan]:
    plans = []
    mixed = len({g.name for g in gpus}) > 1
    if scheme.gguf:
        # llama.cpp: prefill in n_ubatch chunks, no vLLM profile run; its compute buffers are small.
        sc = sc.model_copy(update={"chunk_tokens": LLAMACPP_UBATCH, "cuda_graphs": False})
    layouts = [check_request(spec, gpus, nodes, request)] if request else candidate_layouts(spec, gpus, nodes)
    for layout in layouts:
        if not engine_runs(scheme, layout):
            continue
        plan = evaluate(spec, scheme, layout, gpus, sc)
        plans.append(plan)
        if layout.pp > 1 and (mixed or not plan.fits):
            stages = uneven_stages(spec, scheme, layout, gpus, sc)
            if stages:
                uneven = layout.model_copy(update={"stage_layers": stages})
                plans.append(evaluate(spec, scheme, uneven, gpus, sc))
    return plans


def quant_candidates(spec: ModelSpec, quant: str | None) -> list[QuantScheme]:
    """The one asked for; else the checkpoint as shipped first, then smaller formats."""
    if quant:
        return [get_scheme(quant).for_model(spec)]
    native = native_scheme(spec).for_model(spec)
    out = [native]
    for name in LADDER:
        scheme = get_scheme(name).for_model(spec)
        if native.gguf and not scheme.gguf:
            continue  # a GGUF file is re-quantized by llama.cpp tools to other GGUF types, not to vLLM formats
        if scheme.expert_bits < native.expert_bits and scheme.name not in {s.name for s in out}:
            out.append(scheme)
    return out


def fit(
    spec: ModelSpec,
    gpus: tuple[Gpu, ...],
    *,
    nodes: int = 1,
    context: int = 4096,
    batch: int = 1,
    quant: str | None = None,
    kv_dtype: str = "bf16",
    mem_fraction: float = 0.90,
    cpu_mem_bytes: int | None = None,
    rank: Callable[[ModelSpec, QuantScheme, Plan, tuple[Gpu, ...], Scenario], Plan] | None = None,
    gpus_label: str = "",
    layout: LayoutRequest | None = None,
    prefer: str | None = None,
    redundant_experts: int = 0,
    capacity_factor: float | None = None,
    offload: OffloadOptions | None = None,
) -> FitResult:
    """Every quantization candidate x every layout (or the one `layout` forces), checked per GPU.
    `rank` attaches speed; `prefer` orders the plans (latency at batch 1, throughput otherwise)."""
    check_context(context, batch)
    if prefer is not None and prefer not in PREFERENCES:
        raise MoeplanError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    prefer = prefer or ("latency" if batch == 1 else "throughput")
    # A forced layout that cannot be formed: say why, before anything is planned.
    forced = check_request(spec, gpus, nodes, layout) if layout is not None else None
    if not 0.1 <= mem_fraction <= 1.0:
        raise MoeplanError(f"--mem-fraction must be between 0.1 and 1.0, got {mem_fraction}")
    check_expert_options(spec, redundant_experts, capacity_factor, gpus, quant)
    sc = Scenario(context=context, batch=batch, kv_dtype=kv_dtype, mem_fraction=mem_fraction,
                  redundant_experts=redundant_experts, capacity_factor=capacity_factor)
    notes: list[str] = []
    if redundant_experts:
        notes.append(f"{redundant_experts} redundant experts (EPLB) on expert-parallel layouts: replicas of the "
                     "hottest experts, ceil((E + N) / ep) expert slots per GPU; layouts without EP ignore them")
    if capacity_factor is not None:
        notes.append(f"capacity factor {capacity_factor:g}: each EP rank reserves dispatch and combine buffers of "
                     "ceil(C x chunk x k / E) tokens per expert; vLLM and SGLang inference enforce no capacity and "
                     "drop no tokens, so this applies only to engines that set one")
    schemes = quant_candidates(spec, quant)
    usable = [s for s in schemes if kv_dtype_usable(kv_dtype, s)]
    if not usable:  # the asked-for quant (or every candidate) cannot use this KV type: say why
        kv_dtype_bytes(kv_dtype, schemes[0])
    if len(usable) < len(schemes):
        # Without --quant the ladder mixes engines; a KV type only one engine has rules the others out.
        skipped = [s for s in schemes if s not in usable]
        engine = "llama.cpp" if skipped[0].gguf else "vLLM/SGLang"
        notes.append(f"skipped {', '.join(s.name for s in skipped)}: {engine} has no {kv_dtype} KV cache")
    schemes = usable
    if context > context_limit(spec):
        notes.append(f"context {context:,} exceeds the model's max_position_embeddings ({context_limit(spec):,})")
    if spec.vision is not None and any(s.gguf for s in schemes):
        notes.append("GGUF plans hold the text model only: llama.cpp loads the vision tower from its mmproj file "
                     f"with --mmproj ({vision_params(spec) * 2 / 1e9:,.2f} GB at f16 more)")
    if any(g.generic for g in gpus):
        notes.append(next(g.source for g in gpus if g.generic))
    verdicts: list[QuantVerdict] = []
    fitting: list[Plan] = []
    closest: list[Plan] = []
    if forced is not None and layout is not None and any(not engine_runs(s, forced) for s in schemes):
        skipped = [s.name for s in schemes if not engine_runs(s, forced)]
        if len(skipped) == len(schemes):
            raise MoeplanError(f"llama.cpp (GGUF --quant {skipped[0]}) splits a model by layers, one GPU per "
                               f"stage: drop {layout.label} or use --pp {len(gpus)}")
        notes.append(f"skipped {', '.join(skipped)}: llama.cpp splits by layers only, not {layout.label}")
        schemes = [s for s in schemes if engine_runs(s, forced)]
    for scheme in schemes:
        plans = plans_for_quant(spec, scheme, gpus, nodes, sc, layout)
        if not plans:
            continue
        good = [p for p in plans if p.fits]
        if rank is not None:
            good = [rank(spec, scheme, p, gpus, sc) for p in good]
        w = weight_bytes(spec, scheme).total
        if good:
            verdicts.append(QuantVerdict(quant=scheme.name, fits=True, weights_bytes=w,
                                         reason=f"fits in {len(good)} layout(s)"))
            fitting.extend(good)
        else:
            near = min(plans, key=lambda p: p.overflow_bytes)
            closest.append(near)
            verdicts.append(QuantVerdict(quant=scheme.name, fits=False, weights_bytes=w,
                                         reason=f"best layout {near.layout}: {near.overflow}"))
    if not fitting and redundant_experts:
        _replicas_too_many(spec, schemes, gpus, nodes, sc, layout)
    offload_plan = None
    offload_plans: list[Plan] = []
    if not fitting and cpu_mem_bytes:
        offload_plans = plan_offloads(spec, gpus, sc, cpu_mem_bytes, quant, options=offload)
        ladder = [get_scheme(q) for q in offload_ladder(spec)]
        if not offload_plans and spec.is_moe and not quant and not any(kv_dtype_usable(kv_dtype, s) for s in ladder):
            notes.append(f"expert offload is planned for llama.cpp (--n-cpu-moe), which has no {kv_dtype} KV cache: "
                         "use --kv-dtype fp16, q8_0 or q4_0 for an offload plan")
        if rank is not None:
            offload_plans = [rank(spec, get_scheme(p.quant).for_model(spec), p, gpus, sc) for p in offload_plans]
        in_ram = [p for p in offload_plans if p.offload is not None and p.offload.tier == "ram"]
        offload_plan = (in_ram or offload_plans or [None])[0]
        if offload_plan is None and offload is not None and offload.cpu_moe_layers is not None:
            notes.append(f"--n-cpu-moe {offload.cpu_moe_layers} leaves more on the GPUs than they hold with every "
                         "type tried: offload more layers, or leave --n-cpu-moe out for the fewest that fit")
        if quant and offload_plan is not None and offload_gguf(quant) != quant:
            notes.append(f"--quant {quant} offloads as {offload_gguf(quant)}, the GGUF type llama.cpp loads for it")
        if offload_plan is not None and offload_plan.offload is not None and offload_plan.offload.tier == "disk":
            notes.append("no offload type fits the host RAM: the rest of the experts are read from disk (llama.cpp "
                         "mmaps the model file); give more --cpu-mem or a smaller --quant")
    elif not fitting and spec.is_moe:
        notes.append("nothing fits on the GPUs: give --cpu-mem (host RAM, e.g. 768GB) for an expert-offload plan")
    score = scorer(prefer)
    best = _best(fitting, schemes, score) if fitting else offload_plan
    if fitting:
        plans = _shortlist(fitting, best, score)
    else:
        plans = ([offload_plan] if offload_plan else []) + [p for p in offload_plans if p is not offload_plan] + closest
    notes.append(f"ranked for {prefer}" + (" (the default at batch 1)" if prefer == "latency" and batch == 1 else "")
                 + {"latency": ": lowest TPOT at the batch asked", "throughput": ": most output tok/s at the largest "
                    "batch each layout holds", "memory": ": most free memory on the fullest GPU"}[prefer])
    return FitResult(
        model=spec.name, gpus=gpus_label or ",".join(g.name for g in gpus), num_gpus=len(gpus), nodes=nodes,
        context=context, batch=batch, kv_dtype=kv_dtype, mem_fraction=mem_fraction,
        fits=True if fitting else ("offload" if offload_plan is not None else False),
        best=best, plans=plans, verdicts=verdicts, notes=notes,
    )  # fmt: skip


def _replicas_too_many(spec: ModelSpec, schemes: list[QuantScheme], gpus: tuple[Gpu, ...], nodes: int, sc: Scenario,
                       layout: LayoutRequest | None) -> None:
    """Nothing fits with the replicas but an expert-parallel layout fits without them: the replicas are
    more than the GPUs hold, a bad --redundant-experts (exit 2) naming the most that fit."""
    bare = sc.model_copy(update={"redundant_experts": 0})
    most, where = -1, ""
    for scheme in schemes:
        for plan in plans_for_quant(spec, scheme, gpus, nodes, bare, layout):
            if not plan.fits or plan.ep <= 1:
                continue
            per_slot = spec.num_moe_layers * expert_params(spec) * scheme.expert_bits / 8 / max(plan.pp, 1)
            free = min(r.free_bytes for r in plan.per_gpu)
            e = spec.num_experts
            n = (-(-e // plan.ep) + int(free // per_slot)) * plan.ep - e
            if n > most:
                most, where = n, f"{scheme.name} {plan.layout}"
    if most >= 0:
        raise RedundantExpertsError(
            f"--redundant-experts {sc.redundant_experts}: the GPUs cannot hold that many replicas beside the model "
            f"(without them {where} fits); use at most {most}, or more GPUs")


def scorer(prefer: str) -> Callable[[Plan], tuple[float, ...]]:
    """Sort key for plans (smaller first) under a preference; ties go to fewer pipeline stages, then
    to more headroom."""

    def headroom(plan: Plan) -> float:
        return min(r.free_bytes / r.budget_bytes for r in plan.per_gpu) if plan.per_gpu else 0.0

    def key(plan: Plan) -> tuple[float, ...]:
        sp = plan.speed
        if prefer == "memory":
            return (-headroom(plan), plan.pp, sp.tpot_s if sp else 0.0)
        if prefer == "throughput":
            rate = (sp.capacity_tok_per_s or sp.decode_tok_per_s_total) if sp else 0.0
            return (-rate, plan.pp, -headroom(plan))
        return (sp.tpot_s if sp else math.inf, sp.ttft_s if sp else math.inf, plan.pp, -headroom(plan))

    return key


def _best(fitting: list[Plan], schemes: list[QuantScheme], score: Callable[[Plan], tuple[float, ...]]) -> Plan:
    """The highest-precision quantization that fits, in its best layout for the preference."""
    order = [s.name for s in schemes]
    first = min(order.index(p.quant) for p in fitting)
    return min((p for p in fitting if order.index(p.quant) == first), key=score)


def _shortlist(fitting: list[Plan], best: Plan, score: Callable[[Plan], tuple[float, ...]], keep: int = 8
               ) -> list[Plan]:
    same = sorted((p for p in fitting if p.quant == best.quant and p is not best), key=score)
    others = []
    seen = {best.quant}
    for p in sorted(fitting, key=score):
        if p.quant not in seen:
            seen.add(p.quant)
            others.append(p)
    return [best, *same[: keep - 1], *others]


# ---------------------------------------------------------------------------------------------
# Expert offload: llama.cpp's --n-cpu-moe N keeps the routed experts of the first N layers in RAM.
# ---------------------------------------------------------------------------------------------


def _layer_bytes(spec: ModelSpec, scheme: QuantScheme, offloaded: set[int], sc: Scenario) -> list[tuple[int, int]]:
    """(GPU bytes, CPU bytes) per decoder layer: weights and KV, experts to CPU when offloaded."""
    out = []
    cache = {layer: cache_bytes(spec, sc.context, sc.batch, sc.kv_dtype, layers=[layer], engine=True).total
             for layer in set(spec.layers)}
    for i, layer in enumerate(spec.layers):
        gpu = cpu = 0
        for comp, (total, _) in layer_params(spec, layer).items():
            b = math.ceil(total * scheme.bits_for(comp) / 8)
            if comp == ROUTED_EXPERTS and i in offloaded:
                cpu += b
            else:
                gpu += b
        out.append((gpu + cache[layer], cpu))
    return out



def _assign(layer_gpu_bytes: list[int], rooms: list[int]) -> tuple[int, ...] | None:
    """Contiguous layers to GPUs in order, each GPU filled to its room (llama.cpp layer split)."""
    counts, g, used = [0] * len(rooms), 0, 0
    for b in layer_gpu_bytes:
        while g < len(rooms) and used + b > rooms[g]:
            g, used = g + 1, 0
        if g == len(rooms):
            return None
        counts[g] += 1
        used += b
    return tuple(counts)


def offload_ladder(spec: ModelSpec) -> tuple[str, ...]:
    """GGUF types to try for expert offload, largest first. gpt-oss ships its experts in MXFP4, and its
    GGUFs keep them so (llama.cpp MXFP4_MOE): that is the first rung for a model shipped in MXFP4."""
    if spec.checkpoint_quant == "mxfp4":
        return ("mxfp4_moe", *OFFLOAD_LADDER)
    return OFFLOAD_LADDER


# Offload runs on llama.cpp, which loads GGUF files: a plain or checkpoint name asked for maps to the
# GGUF type that keeps its precision (MXFP4 experts are GGUF's MXFP4_MOE, llama.cpp PR#15091).
OFFLOAD_GGUF = {"mxfp4": "mxfp4_moe", "int8": "q8_0", "fp8": "q8_0", "int4": "q4_k_m"}


def offload_gguf(quant: str) -> str:
    return OFFLOAD_GGUF.get(quant.strip().lower(), quant)


def plan_offload(
    spec: ModelSpec, gpus: tuple[Gpu, ...], sc: Scenario, cpu_mem_bytes: int, quant: str | None, *,
    options: OffloadOptions | None = None,
) -> Plan | None:
    """The best expert-offload plan: plan_offloads' first that keeps its experts in RAM, else its first."""
    plans = plan_offloads(spec, gpus, sc, cpu_mem_bytes, quant, options=options)
    in_ram = [p for p in plans if p.offload is not None and p.offload.tier == "ram"]
    return (in_ram or plans or [None])[0]


def plan_offloads(
    spec: ModelSpec, gpus: tuple[Gpu, ...], sc: Scenario, cpu_mem_bytes: int, quant: str | None, *,
    options: OffloadOptions | None = None,
) -> list[Plan]:
    """For each offload-capable GGUF type, largest first: the fewest CPU-MoE layers that fit the GPUs
    (llama.cpp --n-cpu-moe). Experts beyond the RAM budget are read from disk (llama.cpp mmaps the
    file), which the plan says as its tier."""
    if not spec.is_moe:
        return []
    opts = options or OffloadOptions()
    sc = sc.model_copy(update={"chunk_tokens": LLAMACPP_UBATCH, "cuda_graphs": False})
    cpu_budget = int(cpu_mem_bytes * CPU_RAM_FRACTION)
    moe_ids = [i for i, layer in enumerate(spec.layers) if layer.ffn == "moe"]
    asked = (offload_gguf(quant),) if quant else offload_ladder(spec)
    schemes = [get_scheme(q).for_model(spec) for q in asked]
    schemes = [s for s in schemes if kv_dtype_usable(sc.kv_dtype, s) and s.gguf]
    emb = spec.vocab_size * spec.hidden_size
    plans: list[Plan] = []
    for scheme in schemes:
        first_extra = math.ceil(emb * scheme.bits_for(EMBEDDING) / 8) + math.ceil(
            vision_params(spec) * scheme.bits_for(VISION) / 8) + math.ceil(
            per_layer_embedding_params(spec) * scheme.bits_for(PER_LAYER_EMBEDDING) / 8)
        head = 0 if spec.tie_word_embeddings else emb
        last_extra = math.ceil(head * scheme.bits_for(LM_HEAD) / 8) + norm_params(spec, spec.hidden_size) * 2
        last_extra += math.ceil(hyper_head_params(spec) * scheme.bits_for(HYPER_CONNECTIONS) / 8)
        over = overhead_bytes(len(gpus), cuda_graphs=False)
        act = activation_bytes(spec, min(LLAMACPP_UBATCH, sc.context * sc.batch))
        rooms = [int(g.usable_bytes * sc.mem_fraction) - over - act for g in gpus]
        rooms[0] -= first_extra
        rooms[-1] -= last_extra
        if min(rooms) <= 0:
            continue

        def attempt(k: int) -> tuple[tuple[int, ...], int, int] | None:
            off = set(moe_ids[:k])
            per_layer = _layer_bytes(spec, scheme, off, sc)
            cpu = sum(c for _, c in per_layer)
            split = _assign([g for g, _ in per_layer], rooms)
            if split is None:
                return None
            used = sum(g for g, _ in per_layer)
            return split, cpu, sum(rooms) - used

        k = next((k for k in _offload_steps(len(moe_ids)) if attempt(k) is not None), None)
        if k is None:
            continue
        # attempt(k) fits; search downward for the fewest offloaded layers.
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(mid) is not None:
                hi = mid
            else:
                lo = mid + 1
        if opts.cpu_moe_layers is not None:
            # llama.cpp's --n-cpu-moe N counts blocks: the experts of blocks 0..N-1, so leading dense
            # blocks count too; `lo` counts MoE layers.
            if opts.cpu_moe_layers > spec.num_layers:
                raise MoeplanError(f"--n-cpu-moe {opts.cpu_moe_layers}: {spec.name} has {spec.num_layers} blocks")
            wanted = sum(1 for i in moe_ids if i < opts.cpu_moe_layers)
            if wanted < lo or wanted == 0:
                continue  # too few experts on the CPU for this type: its GPU share does not fit
            lo = wanted
        result = attempt(lo)
        if result is None or lo == 0:
            continue  # lo == 0 would mean it fits without offload: the normal search covers that
        split, cpu, _ = result
        rows = _offload_rows(spec, scheme, gpus, sc, set(moe_ids[:lo]), split, rooms)
        layout = Layout(tp=1, ep=1, pp=len(gpus), stage_layers=split)
        one_expert = math.ceil(expert_params(spec) * scheme.bits_for(ROUTED_EXPERTS) / 8)
        # An engine with a GPU expert cache (mixtral-offloading's design) keeps every layer's experts in
        # host memory and fills what the GPUs have left with cache slots, the same number per layer.
        # llama.cpp itself keeps whole layers on the CPU or the GPU and caches none.
        all_off = _layer_bytes(spec, scheme, set(moe_ids), sc)
        room = sum(rooms) - sum(g for g, _ in all_off)
        slots = min(spec.num_experts, max(0, room // max(one_expert * len(moe_ids), 1)))
        if opts.cache_slots is not None:
            need = opts.cache_slots * one_expert * len(moe_ids)
            if opts.cache_slots > spec.num_experts or need > max(room, 0):
                raise MoeplanError(
                    f"--expert-cache {opts.cache_slots}: {opts.cache_slots} experts x {len(moe_ids)} layers need "
                    f"{need / 1e9:,.1f} GB of GPU memory; the GPUs have {max(room, 0) / 1e9:,.1f} GB left beside "
                    f"everything else (at most {slots} per layer with {scheme.name})")
            slots = opts.cache_slots
        ram_share = min(1.0, cpu_budget / cpu) if cpu else 1.0
        offload = Offload(cpu_moe_layers=lo, moe_layers=len(moe_ids), cpu_bytes=cpu, cpu_budget_bytes=cpu_budget,
                          gpu_layers=split, offloaded_layer_ids=tuple(moe_ids[:lo]),
                          tier="ram" if ram_share >= 1 else "disk", ram_share=ram_share,
                          host_gb_per_s=opts.host_gb_per_s, disk_gb_per_s=opts.disk_gb_per_s,
                          locality=DEFAULT_LOCALITY if opts.locality is None else opts.locality,
                          locality_given=opts.locality is not None, cache_slots=int(slots), expert_bytes=one_expert)
        plans.append(Plan(
            quant=scheme.name, layout=f"llama.cpp layer split over {len(gpus)} GPU(s) + CPU experts", tp=1, ep=1,
            pp=layout.pp, dp_attention=False, stage_layers=split, fits=True, per_gpu=rows, overflow=None,
            overflow_bytes=0, max_context=sc.context, max_batch=sc.batch, offload=offload, engine="llama.cpp",
        ))  # fmt: skip
    return plans


def _offload_steps(n: int) -> list[int]:
    return sorted({min(n, 2**i) for i in range(n.bit_length() + 1)} | {n})


def _offload_rows(
    spec: ModelSpec, scheme: QuantScheme, gpus: tuple[Gpu, ...], sc: Scenario, off: set[int],
    split: tuple[int, ...], rooms: list[int],
) -> list[GpuUse]:
    per_layer = _layer_bytes(spec, scheme, off, sc)
    rows, start = [], 0
    over = overhead_bytes(len(gpus), cuda_graphs=False)
    act = activation_bytes(spec, min(LLAMACPP_UBATCH, sc.context * sc.batch))
    for i, (gpu, n) in enumerate(zip(gpus, split)):
        layers = list(range(start, start + n))
        start += n
        budget = int(gpu.usable_bytes * sc.mem_fraction)
        held = cache_bytes(spec, sc.context, sc.batch, sc.kv_dtype, layers=[spec.layers[j] for j in layers],
                           engine=True)
        kv = held.total
        layer_b = sum(per_layer[j][0] for j in layers)
        extra = budget - over - act - rooms[i]  # embedding / lm_head on the end GPUs
        weights = layer_b - kv + extra
        used = weights + kv + act + over
        rows.append(GpuUse(
            name=gpu.name, index=i, stage=i, capacity_bytes=gpu.usable_bytes, budget_bytes=budget, used_bytes=used,
            weights_bytes=weights, kv_bytes=kv, activation_bytes=act, overhead_bytes=over, free_bytes=budget - used,
            local_experts=spec.num_experts, weights={"layers": layer_b - kv, "embedding/lm_head": extra},
            state_bytes=held.state,
        ))  # fmt: skip
    return rows

