"""An MoE-aware roofline for prefill and decode, with each layout's communication.

Per layer and step: time = max(FLOPs / (peak x compute_eff), bytes / (bandwidth x memory_eff)) + comm.
(The roofline model of Williams et al., CACM 2009; per-layer form as in llm-analysis [lla].)

Decode reads the weights a batch touches. Routed experts: with top-k of E and B tokens routed
independently and uniformly, an expert is untouched with probability (1 - k/E)^B, so the expected
number of distinct experts per layer is E(1 - (1 - k/E)^B), and on an EP rank holding E_r experts
E_r(1 - (1 - k/E)^B). Peers charge all E (llm-analysis) or k (GenZ), whatever the batch.

FLOPs: 2 x active compute parameters per token, plus attention over the context: 4 x heads x head_dim
x context per token and layer (QK^T and AV); MLA in its absorbed form scores against the latent,
4 x heads x (kv_lora_rank + qk_rope_head_dim / 2) x context (DeepSeek-V2 paper, appendix on absorption).

Communication (ring collectives, NCCL's algorithms): all-reduce of n bytes over g ranks moves
2(g-1)/g x n per rank; TP does two per layer. EP all-to-all dispatch and combine move
tokens x k x hidden x bytes x (ep-1)/ep per rank, each way: bf16 both ways, or fp8 dispatch (with
one fp32 scale per 128 values) and bf16 combine when the experts compute in fp8. When EP spans
nodes, the share bound for peers on the same node goes over NVLink while the rest goes over the
NIC at the same time. Pipeline sends tokens x hidden x 2 bytes between stages. Links from the
catalog: NVLink or PCIe inside a node, 50 GB/s between nodes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from moeplan.hardware import HOST_RAM_GB_PER_S, HOST_TFLOPS, INTER_NODE_GB_PER_S, INTER_NODE_LATENCY_US, Gpu
from moeplan.kv_cache import attention_flops, decode_read_bytes
from moeplan.layout import Layout, Scenario, expert_share, stage_bounds
from moeplan.params import (
    ATTENTION, DENSE_FFN, DENSE_MLP, LM_HEAD, MAMBA, ROUTED_EXPERTS, SHARED_EXPERTS, expert_params, layer_params,
)  # fmt: skip
from moeplan.plan import Plan, Speed, layout_of
from moeplan.quant import QuantScheme, kv_dtype_bytes
from moeplan.spec import LayerSpec, ModelSpec

# A floor per decoder layer per step: even under CUDA graphs a MoE layer runs 10-20 kernels
# (norms, projections, rotary, attention, router, top-k, grouped GEMMs, combine) of a few
# microseconds each; 30 us per layer is the launch/sync floor we charge (an estimate, not fitted;
# docs/validation.md compares the resulting TPOT with SGLang's published DeepSeek-R1 figures on 8xH200).
LAYER_FLOOR_S = 30e-6


class Efficiency(BaseModel):
    """Fractions of peak reached in practice. Defaults: memory 0.80, as aiconfigurator derates HBM
    bandwidth ([aic] systems/*.yaml, mem_bw x 0.8); compute 0.60, the large-GEMM efficiency vLLM and
    SGLang prefill reach on H100 (MFU reports of 50-70% for bf16 GEMMs; aiconfigurator's measured
    GEMM tables). Replaced by `moeplan bench --save-calibration` when a calibration exists."""

    model_config = ConfigDict(frozen=True)
    memory: float = 0.80
    compute: float = 0.60
    source: str = "defaults: memory 0.80 ([aic] bandwidth derate), compute 0.60 (published GEMM MFU)"


def distinct_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts B tokens touch in one layer: E(1 - (1 - k/E)^B)."""
    if num_experts == 0 or tokens <= 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def distinct_experts_per_rank(num_experts: int, top_k: int, tokens: float, ep: int, rank: int = 0) -> float:
    """The same on EP rank `rank`, which holds E//ep (+1 for the first E%ep ranks) of the experts."""
    local = expert_share(num_experts, ep, rank)
    if tokens <= 0:
        return 0.0
    return local * (1 - (1 - top_k / num_experts) ** tokens)


def efficiency_for(gpu: Gpu, dtype: str, override: Efficiency | None = None) -> Efficiency:
    if override is not None:
        return override
    try:
        from moeplan.calibration import load_calibration
    except ImportError:  # pragma: no cover - calibration ships with the package
        return Efficiency()
    cal = load_calibration(gpu.name, dtype)
    if cal:
        return Efficiency(memory=cal["memory"], compute=cal["compute"],
                          source=f"calibration from moeplan bench ({cal.get('source', '')}, {cal.get('date', '')})")
    return Efficiency()


class StepCost(BaseModel):
    model_config = ConfigDict(frozen=True)
    seconds: float
    compute_s: float
    memory_s: float
    comm_s: float
    bytes: float  # bytes read per step on the busiest GPU of each stage, summed over stages
    flops: float
    distinct_experts: float  # per MoE layer, over the whole model
    bound: str


def _link(gpus: tuple[Gpu, ...], group: int, nodes: int) -> tuple[float, float]:
    """(GB/s per direction, latency s) for a collective over `group` GPUs."""
    per_node = len(gpus) // max(nodes, 1)
    if group > per_node:
        return INTER_NODE_GB_PER_S, INTER_NODE_LATENCY_US * 1e-6
    gpu = gpus[0]
    return max(gpu.link_gb_per_s, 1.0), gpu.link_latency_us * 1e-6


def _allreduce(nbytes: float, ranks: int, bw: float, lat: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (bw * 1e9) + 2 * (ranks - 1) * lat


def _alltoall(nbytes: float, ranks: int, bw: float, lat: float) -> float:
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (bw * 1e9) + lat


def _ep_alltoall(nbytes: float, ranks: int, gpus: tuple[Gpu, ...], nodes: int) -> float:
    """All-to-all of `nbytes` per rank over `ranks` EP ranks, which may span nodes.

    Each rank sends nbytes/ranks to every peer. Peers on its own node are reached over NVLink (or
    PCIe), peers elsewhere through its NIC, both at once (NCCL's all-to-all is point-to-point sends
    per peer over the P2P and network transports; DeepEP's normal kernels likewise move the NVLink
    and RDMA shares concurrently), so the slower of the two shares sets the time."""
    if ranks <= 1:
        return 0.0
    per_node = len(gpus) // max(nodes, 1)
    gpu = gpus[0]
    intra_bw, intra_lat = max(gpu.link_gb_per_s, 1.0), gpu.link_latency_us * 1e-6
    if ranks <= per_node:
        return _alltoall(nbytes, ranks, intra_bw, intra_lat)
    intra = (per_node - 1) / ranks * nbytes / (intra_bw * 1e9)
    inter = (ranks - per_node) / ranks * nbytes / (INTER_NODE_GB_PER_S * 1e9)
    return max(intra, inter) + INTER_NODE_LATENCY_US * 1e-6


def ep_alltoall_seconds(nbytes: float, ranks: int, gpu: Gpu, nodes: int = 1) -> float:
    """One EP all-to-all of `nbytes` per rank over `ranks` GPUs like `gpu` on `nodes` nodes: the
    communication model step_cost charges for dispatch and for combine (bench compares with it)."""
    return _ep_alltoall(nbytes, ranks, (gpu,) * ranks, nodes)


def step_cost(
    spec: ModelSpec,
    scheme: QuantScheme,
    layout: Layout,
    gpus: tuple[Gpu, ...],
    *,
    tokens_per_seq: int,
    batch: int,
    context: int,
    kv_dtype: str = "bf16",
    nodes: int = 1,
    efficiency: Efficiency | None = None,
    offloaded: frozenset[int] = frozenset(),
    with_head: bool = True,
) -> StepCost:
    """One forward step: `batch` sequences each adding `tokens_per_seq` tokens on `context` cached.

    Decode: tokens_per_seq = 1. Prefill of S tokens: tokens_per_seq = S, context = S."""
    g = layout.gpus_per_stage
    tp = 1 if layout.dp_attention else layout.tp
    gpu = min(gpus, key=lambda x: x.hbm_gb_per_s)
    eff = efficiency_for(gpu, scheme.compute if scheme.compute != "fp32" else "fp32", efficiency)
    peak = gpu.bf16_tflops
    if scheme.compute == "fp8" and gpu.fp8_tflops:
        peak = gpu.fp8_tflops
    elif scheme.compute == "fp4" and gpu.fp4_tflops:
        peak = gpu.fp4_tflops
    elif scheme.compute == "int8" and gpu.int8_tops:
        peak = gpu.int8_tops
    elif scheme.compute == "fp32":
        peak = gpu.bf16_tflops / 4
    flops_rate = peak * 1e12 * eff.compute
    bw = gpu.hbm_gb_per_s * 1e9 * eff.memory
    link_bw, link_lat = _link(gpus, g, nodes)
    tokens = batch * tokens_per_seq
    # Tokens one GPU's attention sees: all of them under TP, its share of sequences under DP attention.
    attn_seqs = math.ceil(batch / layout.ep) if layout.dp_attention else batch
    attn_tokens = attn_seqs * tokens_per_seq
    kvb = kv_dtype_bytes(kv_dtype)
    if layout.ep > 1:
        local_touched = distinct_experts_per_rank(spec.num_experts, spec.experts_per_token, tokens, layout.ep)
    else:
        local_touched = distinct_experts(spec.num_experts, spec.experts_per_token, tokens) / tp
    touched = distinct_experts(spec.num_experts, spec.experts_per_token, tokens)
    one_expert = expert_params(spec)
    # Tokens bound for fp8 experts are quantized before dispatch, not after: DeepEP's V3 setting is
    # fp8 dispatch with a per-128 fp32 scale and bf16 combine (deepseek-ai/DeepEP README), as SGLang
    # and DeepSeek's own serving run it. Otherwise activations travel in bf16 both ways.
    dispatch_bytes = 1 + 4 / 128 if scheme.compute == "fp8" else 2.0

    total = compute_t = memory_t = comm_t = bytes_all = flops_all = 0.0
    for stage, (start, end) in enumerate(stage_bounds(layout.stage_layers)):
        for layer, times in Counter(spec.layers[start:end]).items():
            ids = [i for i in range(start, end) if spec.layers[i] == layer]
            off = sum(1 for i in ids if i in offloaded)
            parts = layer_params(spec, layer)
            b = f = 0.0
            for comp, (n_total, n_active) in parts.items():
                bits = scheme.bits_for(comp) / 8
                if comp == ROUTED_EXPERTS:
                    b += local_touched * one_expert * bits
                    # each token runs k experts, spread over the ep (or tp) ranks
                    f += 2 * n_active * tokens / (layout.ep if layout.ep > 1 else tp)
                elif comp == ATTENTION:
                    b += n_total * bits / tp
                    f += 2 * n_total * attn_tokens / tp
                elif comp in (MAMBA, DENSE_FFN, SHARED_EXPERTS, DENSE_MLP):
                    b += n_total * bits / tp
                    f += 2 * n_total * (attn_tokens if layout.dp_attention else tokens) / tp
                else:  # router, norms, hyper-connections, per-layer input gates: replicated
                    b += n_total * bits
                    f += 2 * n_total * attn_tokens
            # The cache this layer reads (KV rows, a sparse top-k, fixed states read and written) and
            # its score FLOPs, from the one per-layer ledger (moeplan.kv_cache).
            b += attn_seqs * decode_read_bytes(spec, layer, context, kvb, tp)
            f += attention_flops(spec, layer, attn_tokens, context) / tp
            t_c = f / flops_rate
            t_m = b / bw
            t_comm = 0.0
            act = tokens * spec.hidden_size * 2
            if tp > 1:
                t_comm += 2 * _allreduce(act, tp, link_bw, link_lat)
            if layout.ep > 1 and layer.ffn == "moe":
                local_tokens = attn_tokens if layout.dp_attention else tokens / g
                values = local_tokens * spec.experts_per_token * spec.hidden_size
                t_comm += _ep_alltoall(values * dispatch_bytes, layout.ep, gpus, nodes)  # dispatch
                t_comm += _ep_alltoall(values * 2, layout.ep, gpus, nodes)  # combine, bf16
            per = max(t_c, t_m) + t_comm + LAYER_FLOOR_S
            if off and layer.ffn == "moe":
                per += off / times * _offload_time(spec, scheme, touched, gpu, tokens)
                b_off = touched * one_expert * scheme.bits_for(ROUTED_EXPERTS) / 8
                # the GPU no longer reads those experts itself
                per -= off / times * min(t_m, b_off / bw)
            total += times * per
            compute_t += times * t_c
            memory_t += times * t_m
            comm_t += times * t_comm
            bytes_all += times * b
            flops_all += times * f
        if stage == layout.pp - 1 and with_head:
            head = spec.vocab_size * spec.hidden_size
            last = batch  # logits only for each sequence's last token
            b_head = head * scheme.bits_for(LM_HEAD) / 8 / tp
            f_head = 2 * head * last / tp
            total += max(b_head / bw, f_head / flops_rate)
            bytes_all += b_head
            flops_all += f_head
        if stage > 0:
            # pipeline send of the residual stream (hc_mult streams under DeepSeek-V4's hyper-connections)
            total += tokens * spec.hidden_size * spec.hc_mult * 2 / (link_bw * 1e9) + link_lat
    bound = "compute" if compute_t > memory_t else "memory"
    return StepCost(seconds=total, compute_s=compute_t, memory_s=memory_t, comm_s=comm_t, bytes=bytes_all,
                    flops=flops_all, distinct_experts=touched, bound=bound)


def _offload_time(spec: ModelSpec, scheme: QuantScheme, touched: float, gpu: Gpu, tokens: int) -> float:
    """One offloaded layer's routed experts: run on the CPU from RAM, or streamed over PCIe to the
    GPU; the faster of the two (llama.cpp runs them on the CPU; streaming wins for large batches)."""
    nbytes = touched * expert_params(spec) * scheme.bits_for(ROUTED_EXPERTS) / 8
    flops = 2 * tokens * spec.experts_per_token * expert_params(spec)
    on_cpu = max(nbytes / (HOST_RAM_GB_PER_S * 1e9), flops / (HOST_TFLOPS * 1e12))
    streamed = nbytes / (gpu.pcie_gb_per_s * 1e9)
    return min(on_cpu, streamed)


class PerfResult(BaseModel):
    """`model_dump()` is exactly `moeplan perf --json`."""

    model_config = ConfigDict(frozen=True)
    model: str
    gpus: str
    quant: str
    layout: str
    batch: int
    context: int
    prompt: int
    decode_tok_per_s: float
    decode_tok_per_s_total: float
    prefill_tok_per_s: float
    ttft_s: float
    tpot_s: float
    bound: str
    decode_bytes_per_step: float
    decode_distinct_experts: float
    comm_s_per_step: float
    efficiency: Efficiency
    sweep: list[dict[str, float | int | str]]
    notes: list[str]


def speed(
    spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario, *,
    prompt: int | None = None, nodes: int = 1, efficiency: Efficiency | None = None,
) -> tuple[Speed, StepCost, StepCost]:
    layout = layout_of(plan)
    off = frozenset(plan.offload.offloaded_layer_ids) if plan.offload else frozenset()
    dec = step_cost(spec, scheme, layout, gpus, tokens_per_seq=1, batch=sc.batch, context=sc.context,
                    kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency, offloaded=off)
    s = prompt or min(sc.context, 1024)
    pre = step_cost(spec, scheme, layout, gpus, tokens_per_seq=s, batch=1, context=s, kv_dtype=sc.kv_dtype,
                    nodes=nodes, efficiency=efficiency, offloaded=off)
    tpot = dec.seconds
    sp = Speed(decode_tok_per_s=1 / tpot, decode_tok_per_s_total=sc.batch / tpot, prefill_tok_per_s=s / pre.seconds,
               ttft_s=pre.seconds, tpot_s=tpot, bound=dec.bound)
    return sp, dec, pre


def ranker(*, nodes: int = 1, prompt: int | None = None) -> Callable[..., Plan]:
    """fit's ranking hook for a deployment over `nodes` nodes (an EP all-to-all beyond one node
    crosses the network) and a prompt of `prompt` tokens for TTFT."""

    def rank(spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
        sp, _, _ = speed(spec, scheme, plan, gpus, sc, prompt=prompt, nodes=nodes)
        return plan.model_copy(update={"speed": sp})

    return rank


def rank_plan(spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
    """Attach the speed of a plan on one node (fit's ranking hook; `ranker` for more nodes)."""
    sp, _, _ = speed(spec, scheme, plan, gpus, sc)
    return plan.model_copy(update={"speed": sp})


SWEEP_BATCHES = (1, 4, 16, 64, 256, 1024)


def perf_report(
    spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario, *,
    prompt: int, nodes: int = 1, gpus_label: str = "", sweep: bool = True, efficiency: Efficiency | None = None,
) -> PerfResult:
    sp, dec, pre = speed(spec, scheme, plan, gpus, sc, prompt=prompt, nodes=nodes, efficiency=efficiency)
    eff = efficiency_for(min(gpus, key=lambda x: x.hbm_gb_per_s), scheme.compute, efficiency)
    rows: list[dict[str, float | int | str]] = []
    notes = [f"efficiency: memory {eff.memory:.2f}, compute {eff.compute:.2f} ({eff.source})"]
    if any(g.generic for g in gpus):
        notes.append(next(g.source for g in gpus if g.generic))
    if plan.ep > 1 and scheme.compute == "fp8":
        notes.append("EP dispatch assumed in fp8 with a bf16 combine (DeepEP's DeepSeek-V3 setting, as SGLang "
                     "runs it with DeepEP); an engine that dispatches bf16 moves about twice the dispatch bytes")
    if sweep:
        layout = layout_of(plan)
        dense_bytes = sum(
            n * scheme.bits_for(c) / 8 for layer in spec.layers for c, (n, _) in layer_params(spec, layer).items()
        ) / layout.gpus_per_stage
        fade = None
        for b in SWEEP_BATCHES:
            cost = step_cost(spec, scheme, layout, gpus, tokens_per_seq=1, batch=b, context=sc.context,
                             kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency)
            # A dense model of equal total size reads every weight each step.
            dense_s = max(cost.seconds, dense_bytes / (min(g.hbm_gb_per_s for g in gpus) * 1e9 * eff.memory))
            advantage = dense_s / cost.seconds
            if fade is None and advantage < 1.25:
                fade = b
            rows.append(dict(batch=b, distinct_experts=round(cost.distinct_experts, 2),
                             bytes_per_step=round(cost.bytes), bound=cost.bound, tpot_s=cost.seconds,
                             decode_tok_per_s_total=b / cost.seconds, moe_advantage=round(advantage, 2)))
        if spec.is_moe:
            notes.append(f"MoE advantage over a dense model of equal size fades (<1.25x) at batch {fade}"
                         if fade else "MoE keeps a >1.25x advantage over a dense model across the sweep")
    return PerfResult(
        model=spec.name, gpus=gpus_label or ",".join(g.name for g in gpus), quant=scheme.name, layout=plan.layout,
        batch=sc.batch, context=sc.context, prompt=prompt, decode_tok_per_s=sp.decode_tok_per_s,
        decode_tok_per_s_total=sp.decode_tok_per_s_total, prefill_tok_per_s=sp.prefill_tok_per_s, ttft_s=sp.ttft_s,
        tpot_s=sp.tpot_s, bound=sp.bound, decode_bytes_per_step=dec.bytes, decode_distinct_experts=dec.distinct_experts,
        comm_s_per_step=dec.comm_s, efficiency=eff, sweep=rows, notes=notes,
    )  # fmt: skip


class LayerPrediction(BaseModel):
    model_config = ConfigDict(frozen=True)
    decode_s: float
    prefill_s: float
    decode_bytes: float
    decode_flops: float
    prefill_bytes: float
    prefill_flops: float


def predict_layers(
    spec: ModelSpec, gpu: Gpu, *, layers: tuple[LayerSpec, ...], batch: int, context: int, prompt: int,
    dtype_bytes: float, efficiency: Efficiency | None = None,
) -> LayerPrediction:
    """Time of `layers` alone on one GPU (what `moeplan bench` measures): no embedding, no head."""
    from moeplan.quant import get_scheme

    scheme = get_scheme({4: "fp32", 2: "bf16"}.get(int(dtype_bytes), "bf16"))
    sub = spec.model_copy(update={"layers": layers, "mtp_layers": 0})
    layout = Layout(tp=1, ep=1, pp=1, stage_layers=(len(layers),))
    eff = efficiency or Efficiency()
    kv = "fp32" if dtype_bytes == 4 else "bf16"

    dec = step_cost(sub, scheme, layout, (gpu,), tokens_per_seq=1, batch=batch, context=context,
                    kv_dtype=kv, efficiency=eff, with_head=False)
    pre = step_cost(sub, scheme, layout, (gpu,), tokens_per_seq=prompt, batch=1, context=prompt, kv_dtype=kv,
                    efficiency=eff, with_head=False)
    return LayerPrediction(decode_s=dec.seconds, prefill_s=pre.seconds, decode_bytes=dec.bytes,
                           decode_flops=dec.flops, prefill_bytes=pre.bytes, prefill_flops=pre.flops)


def host_gpu() -> Gpu:
    """The CPU as a 'device' for bench predictions: desktop DDR5 bandwidth, ~1 TFLOP/s."""
    return Gpu(name="cpu", memory_bytes=0, usable_bytes=0, hbm_gb_per_s=HOST_RAM_GB_PER_S, bf16_tflops=HOST_TFLOPS,
               link="none", link_gb_per_s=0, source="host CPU assumption (hardware.HOST_RAM_GB_PER_S)")
