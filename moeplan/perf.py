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
catalog: NVLink or PCIe inside a node, one NDR 400G NIC (46 GB/s, moeplan.comm.NIC) between nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


from moeplan.record import Record
from moeplan.comm import NIC, LinkClass, allreduce_s, alltoall_s, link_for
from moeplan.cost import NO_PRICE_NOTE, Price, per_million
from moeplan.engines import overhead
from moeplan.hardware import HOST_RAM_GB_PER_S, HOST_TFLOPS, Gpu
from moeplan.kv_cache import attention_flops, decode_read_bytes
from moeplan.layout import Layout, Scenario, expert_share, stage_bounds
from moeplan.params import (
    ATTENTION, DENSE_FFN, DENSE_MLP, LM_HEAD, MAMBA, ROUTED_EXPERTS, SHARED_EXPERTS, expert_params, is_moe,
    layer_group_ids, layer_groups, layer_params,
)  # fmt: skip
from moeplan.plan import Plan, Speed, layout_of
from moeplan.quant import QuantScheme, kv_dtype_bytes
from moeplan.offload import independent_reuse, offload_speed
from moeplan.routing import Routing, drop_fraction, rank_load
from moeplan.spec import LayerSpec, ModelSpec

class Efficiency(Record):
    """Fractions of peak reached in practice. Memory: per engine class, fitted on the validation
    fitting set (ENGINE_MEMORY_EFFICIENCY below), which default_efficiency uses; the 0.80 here,
    aiconfigurator's HBM derate ([aic] systems/*.yaml, mem_bw x 0.8), is only an Efficiency() made
    directly (tests, bench). Compute 0.60, the large-GEMM efficiency vLLM and
    SGLang prefill reach on H100 (MFU reports of 50-70% for bf16 GEMMs; aiconfigurator's measured
    GEMM tables). Replaced by `moeplan bench --save-calibration` when a calibration exists."""

    memory: float = 0.80
    compute: float = 0.60
    # Measured overheads (a calibration's intercepts): when set they replace the engine's per-layer
    # floor and per-step cost (moeplan.engines).
    layer_s: float | None = None
    step_s: float | None = None
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


# Memory efficiency per engine class, FITTED on the fitting set (docs/validation.md): the value that
# brings the geometric mean of the speed ratios of these rows to 1, or, for the classes that fit a
# per-layer cost with it (NVIDIA serving, llama.cpp; moeplan.engines), the least-squares pair, found
# by `python benchmarks/validate.py --fit-efficiency` (tests/test_validation.py checks these equal
# its output):
# - gpu serving (vLLM, SGLang on NVIDIA): InferenceX #870, SGLang 0.5.7, DeepSeek-R1 TP8 on 8 x H200 at
#   concurrency 8-64, and the sgl-cookbook's B200 rows (SGLang 0.5.6, TP8, five models of 36-94
#   layers, concurrency 1 and 16);
# - gpu serving (AMD): vLLM and SGLang on AMD GPUs, the sgl-cookbook Llama 4 rows (SGLang 0.5.7, TP8 on
#   8 x MI300X, concurrency 1 and 16);
# - llama.cpp (NVIDIA GPUs, CUDA kernels): XiongjieDai's GPU-Benchmarks-on-LLM-Inference tables
#   (llama.cpp llama-bench tg128, Llama 3 8B / 70B Q4_K_M on RTX 4090, RTX 3090, RTX A6000);
# - llama.cpp (Apple): the M2 Max llama-bench table of llama.cpp PR#4406 (Mixtral, seven
#   quantizations) and XiongjieDai's M2 Ultra / M3 Max rows (Llama 3 8B / 70B Q4_K_M);
# - llama.cpp cpu experts: the share of the host RAM bandwidth (--cpu-bw) llama.cpp's CPU kernels reach
#   on experts kept in RAM (--n-cpu-moe), on the two offload rows (ollama#1556; llmfit PR#755).
# aiconfigurator's 0.80 bandwidth derate ([aic] systems/*.yaml) stays the figure for anything else.
ENGINE_MEMORY_EFFICIENCY: dict[str, float] = {"gpu serving": 0.548, "gpu serving (AMD)": 0.26, "llama.cpp": 0.884,
                                              "llama.cpp (Apple)": 0.837, "llama.cpp cpu experts": 0.45}
EFFICIENCY_FIT_ROWS = {
    "gpu serving": ("inferencex-c8-tpot", "inferencex-c16-tpot", "inferencex-c32-tpot", "inferencex-c64-tpot",
                    "b200-qwen3-235b-c1", "b200-qwen3-235b-c16", "b200-dsr1-c1", "b200-dsr1-c16", "b200-glm46-c1",
                    "b200-glm46-c16", "b200-gptoss120b-c1", "b200-qwen3next-c1"),
    "llama.cpp": ("xd-rtx4090-8b", "xd-rtx3090-8b", "xd-a6000-8b", "xd-a6000-70b"),
    "llama.cpp (Apple)": ("m2max-q2_k", "m2max-q3_k_m", "m2max-q4_k_m", "m2max-q4_0", "m2max-q5_k_m", "m2max-q6_k",
                          "m2max-q8_0", "xd-m2ultra-8b", "xd-m2ultra-70b", "xd-m3max-8b", "xd-m3max-70b"),
    "llama.cpp cpu experts": ("rtx4090-offload", "llmfit-755-qwen3-30b"),
    "gpu serving (AMD)": ("mi300x-maverick-c1", "mi300x-maverick-c16", "mi300x-scout-c1", "mi300x-scout-c16"),
}


def engine_class(engine: str | None, vendor: str | None = None) -> str:
    """The class an engine's fitted efficiency and error band belong to. vLLM and SGLang on AMD GPUs
    (ROCm kernels) are their own class: fitted on AMD rows, not NVIDIA ones; so is llama.cpp on Apple
    GPUs (Metal kernels, unified memory), fitted on Apple rows."""
    if engine in ("llama.cpp", "llamacpp"):
        return "llama.cpp (Apple)" if vendor == "apple" else "llama.cpp"
    return "gpu serving (AMD)" if vendor == "amd" else "gpu serving"


def default_efficiency(engine: str | None = None, vendor: str | None = None) -> Efficiency:
    cls = engine_class(engine, vendor)
    mem = ENGINE_MEMORY_EFFICIENCY.get(cls, 0.80)
    return Efficiency(memory=mem, compute=0.60, source=(
        f"defaults for {cls}: memory {mem:.2f} (fitted on the validation fitting set), compute 0.60 "
        "(published GEMM MFU)"))


def slowest_gpu(gpus: Sequence[Gpu]) -> Gpu:
    """The GPU a step is costed on (and whose vendor picks the efficiency and band): the one with the
    least memory bandwidth, which every other GPU of a lock-step layout waits for."""
    return min(gpus, key=lambda x: x.hbm_gb_per_s)


def efficiency_for(gpu: Gpu, dtype: str, override: Efficiency | None = None, engine: str | None = None,
                   cuda_graphs: bool | None = None) -> Efficiency:
    """A saved calibration for this device and dtype, else the engine class's defaults. A calibration
    measures torch kernels, so a llama.cpp plan keeps llama.cpp's fitted efficiency; its per-layer and
    per-step overheads hold only for the launch mode they were timed in (CUDA graphs or eager)."""
    if override is not None:
        return override
    if engine_class(engine).startswith("llama.cpp"):
        return default_efficiency(engine, gpu.vendor)
    try:
        from moeplan.calibration import load_calibration
    except ImportError:  # pragma: no cover - calibration ships with the package
        return default_efficiency(engine, gpu.vendor)
    cal = load_calibration(gpu.name, dtype)
    if cal:
        mode = cal.get("mode")
        same_mode = mode is None or cuda_graphs is None or (mode == "cuda-graph") == cuda_graphs or gpu.vendor == "cpu"
        return Efficiency(memory=cal["memory"], compute=cal["compute"],
                          layer_s=cal.get("layer_s") if same_mode else None,
                          step_s=cal.get("step_s") if same_mode else None,
                          source=f"calibration from moeplan bench ({cal.get('source', '')}, {cal.get('date', '')})")
    return default_efficiency(engine, gpu.vendor)


class StepCost(Record):
    seconds: float
    compute_s: float
    memory_s: float
    comm_s: float
    bytes: float  # bytes read per step on the busiest GPU of each stage, summed over stages
    flops: float
    distinct_experts: float  # per MoE layer, over the whole model
    bound: str
    # Bytes the busiest EP rank moves per MoE layer in one step, dispatch plus combine (0 without DP
    # attention + EP: TP's all-reduces carry the rest).
    a2a_bytes_busiest: float = 0.0


def _pipeline_send_s(nbytes: float, gpus: tuple[Gpu, ...], stage_gpus: int, nodes: int) -> float:
    """One pipeline send between stages: over the link inside a node, over a NIC between nodes."""
    per_node = len(gpus) // max(nodes, 1)
    link = link_for(gpus[0].link)
    if stage_gpus >= per_node or link is None:  # stages on different nodes (or no GPU link)
        return NIC["lat_us"] * 1e-6 + nbytes / (NIC["gb_per_s"] * 1e9)
    return link.a2a_lat_us * 1e-6 + nbytes / (link.a2a_busbw * 1e9)


def ep_alltoall_seconds(nbytes: float, ranks: int, gpu: Gpu, nodes: int = 1) -> float:
    """One EP all-to-all in which each rank moves `nbytes` over `ranks` GPUs like `gpu` on `nodes` nodes:
    the communication model step_cost charges for dispatch and for combine (bench compares with it)."""
    per_node = ranks // max(nodes, 1) if nodes > 1 else ranks
    return alltoall_s(nbytes, ranks, per_node, link_for(gpu.link))


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
    engine: str | None = None,
    cuda_graphs: bool = True,
    probs: Sequence[float] | None = None,
    redundant: int = 0,
    host_gb_per_s: float = HOST_RAM_GB_PER_S,
) -> StepCost:
    """One forward step: `batch` sequences each adding `tokens_per_seq` tokens on `context` cached.
    `host_gb_per_s`: what the CPU reaches on experts kept in host memory (the `offloaded` layers).

    Decode: tokens_per_seq = 1. Prefill of S tokens: tokens_per_seq = S, context = S. Under expert
    parallelism the step waits for the busiest rank (moeplan.routing); `probs` gives each expert's
    share of routed picks (uniform when None)."""
    g = layout.gpus_per_stage
    tp = 1 if layout.dp_attention else layout.tp
    gpu = slowest_gpu(gpus)
    engine = engine or default_engine(scheme, layout)
    eff = efficiency_for(gpu, scheme.compute if scheme.compute != "fp32" else "fp32", efficiency, engine, cuda_graphs)
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
    link = link_for(gpu.link)
    per_node = len(gpus) // max(nodes, 1)
    eng = overhead(engine, cuda_graphs, a100=gpu.link == "NVLink3", vendor=gpu.vendor)
    if eff.layer_s is not None or eff.step_s is not None:  # a calibration measured them on this device
        eng = eng.model_copy(update={"layer_s": eff.layer_s if eff.layer_s is not None else eng.layer_s,
                                     "step_s": eff.step_s if eff.step_s is not None else eng.step_s})
    tokens = batch * tokens_per_seq
    # Tokens one GPU's attention sees: all of them under TP, its share of sequences under DP attention.
    attn_seqs = math.ceil(batch / layout.ep) if layout.dp_attention else batch
    attn_tokens = attn_seqs * tokens_per_seq
    kvb = kv_dtype_bytes(kv_dtype)
    k = spec.experts_per_token
    moe = is_moe(spec)
    if moe and layout.ep > 1:
        load = rank_load(spec.num_experts, k, tokens, layout.ep, probs, redundant)
        local_touched = load.distinct_max  # the busiest rank's expert reads
        local_pairs = load.assignments_max  # and its token-expert pairs (FLOPs)
    elif moe:
        load = rank_load(spec.num_experts, k, tokens, 1, probs)
        local_touched = load.distinct_total / tp  # experts tensor-sliced over tp: every rank alike
        local_pairs = tokens * k / tp
    else:
        load, local_touched, local_pairs = None, 0.0, 0.0
    touched = load.distinct_total if load is not None else 0.0
    one_expert = expert_params(spec)
    # Tokens bound for fp8 experts are quantized before dispatch, not after: DeepEP's V3 setting is
    # fp8 dispatch with a per-128 fp32 scale and bf16 combine (deepseek-ai/DeepEP README), as SGLang
    # and DeepSeek's own serving run it. Otherwise activations travel in bf16 both ways.
    dispatch_bytes = 1 + 4 / 128 if scheme.compute == "fp8" else 2.0
    ep_moved = 0.0
    if layout.dp_attention and load is not None:
        # Decode uses DeepEP's low-latency kernels, one copy per (token, expert); prefill its normal
        # kernels, one copy per (token, destination rank). A rank sends its own tokens and receives
        # what routing sends it: the busier side sets the time.
        if tokens_per_seq == 1:
            ep_moved = max(attn_tokens * k, load.assignments_max) * spec.hidden_size
        else:
            hits_per_token = layout.ep * load.tokens_in_mean / max(tokens, 1)
            ep_moved = max(attn_tokens * hits_per_token, load.tokens_in_max) * spec.hidden_size

    total = compute_t = memory_t = comm_t = bytes_all = flops_all = 0.0
    kind_of = layer_group_ids(spec)
    for stage, (start, end) in enumerate(stage_bounds(layout.stage_layers)):
        for layer, times in layer_groups(spec, spec.layers[start:end]):
            # Offloaded layers of this kind in this stage (equal layers are one kind).
            off = sum(1 for i in range(start, end) if i in offloaded
                      and kind_of[id(spec.layers[i])] == kind_of[id(layer)]) if offloaded else 0
            parts = layer_params(spec, layer)
            b = f = 0.0
            for comp, (n_total, n_active) in parts.items():
                bits = scheme.bits_for(comp) / 8
                if comp == ROUTED_EXPERTS:
                    b += local_touched * one_expert * bits
                    f += 2 * one_expert * local_pairs
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
            f += attention_flops(spec, layer, tokens_per_seq, context, seqs=attn_seqs) / tp
            t_c = f / flops_rate
            t_m = b / bw
            t_comm = 0.0
            act = tokens * spec.hidden_size * 2
            if tp > 1 and link is not None:
                # Two all-reduces per layer (after attention, after the FFN; under TP+EP the experts'
                # partial outputs are summed by the second, vLLM FusedMoE reduce_results).
                t_comm += 2 * (allreduce_s(act, tp, link) + eng.collective_s)
            if layout.dp_attention and layer.ffn == "moe" and ep_moved:
                t_comm += ep_alltoall_moved(ep_moved * dispatch_bytes, layout.ep, per_node, link) + eng.collective_s
                t_comm += ep_alltoall_moved(ep_moved * 2, layout.ep, per_node, link) + eng.collective_s  # combine
            per = max(t_c, t_m) + t_comm + eng.layer_s
            if off and layer.ffn == "moe":
                per += off / times * _offload_time(spec, scheme, touched, gpu, tokens, host_gb_per_s)
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
            total += _pipeline_send_s(tokens * spec.hidden_size * spec.hc_mult * 2, gpus, g, nodes)
    if with_head:
        total += eng.step_s
    bound = "compute" if compute_t > memory_t else "memory"
    return StepCost(seconds=total, compute_s=compute_t, memory_s=memory_t, comm_s=comm_t, bytes=bytes_all,
                    flops=flops_all, distinct_experts=touched, bound=bound,
                    a2a_bytes_busiest=ep_moved * (dispatch_bytes + 2))


def ep_alltoall_moved(nbytes: float, ranks: int, per_node: int, link: LinkClass | None) -> float:
    """An EP dispatch or combine in which the busiest rank moves `nbytes`: all but its own share cross
    the link or the NIC (moeplan.comm.alltoall_s)."""
    return alltoall_s(nbytes, ranks, per_node, link)


def default_engine(scheme: QuantScheme, layout: Layout) -> str:
    """llama.cpp for GGUF, SGLang for DP attention, vLLM otherwise (moeplan.plan.engine_for)."""
    if scheme.gguf:
        return "llama.cpp"
    return "sglang" if layout.dp_attention else "vllm"


def _offload_time(spec: ModelSpec, scheme: QuantScheme, touched: float, gpu: Gpu, tokens: int,
                  host_gb_per_s: float = HOST_RAM_GB_PER_S) -> float:
    """One offloaded layer's routed experts: run on the CPU from RAM, or, for a batch of at least
    OP_OFFLOAD_MIN_TOKENS tokens, streamed over PCIe to the GPU when that is faster (llama.cpp's op
    offload: ggml-cuda offloads an op on host weights only from 32 tokens up, so decode stays on the CPU)."""
    nbytes = touched * expert_params(spec) * scheme.bits_for(ROUTED_EXPERTS) / 8
    flops = 2 * tokens * spec.experts_per_token * expert_params(spec)
    on_cpu = max(nbytes / (host_gb_per_s * 1e9), flops / (HOST_TFLOPS * 1e12))
    if tokens < OP_OFFLOAD_MIN_TOKENS:
        return on_cpu
    return min(on_cpu, nbytes / (gpu.pcie_gb_per_s * 1e9))


# ggml-cuda ggml_backend_cuda_device_offload_op: min_batch_size = 32 (llama.cpp --no-op-offload turns it off).
OP_OFFLOAD_MIN_TOKENS = 32


# Error bands: the lowest and highest speed ratio (predicted / published speed) of the fitting set's
# rows in each engine class and load (docs/validation.md; `python benchmarks/validate.py --bands`
# derives them, tests/test_validation.py checks these equal its output). A printed speed S carries
# [S / highest, S / lowest]; a printed time T carries [T x lowest, T x highest]. Keys with fewer than
# three fitting rows use "any", the whole fitting set's range.
ERROR_BANDS: dict[str, tuple[float, float]] = {
    "gpu serving (AMD), batch 1-4": (1.12, 1.41), "gpu serving (AMD), batch > 4": (0.76, 0.84),
    "gpu serving, batch 1-4": (0.68, 1.76), "gpu serving, batch > 4": (0.61, 1.32),
    "llama.cpp (Apple), batch 1-4": (0.91, 1.35), "llama.cpp, batch 1-4": (0.97, 1.05),
    "llama.cpp, offload": (0.94, 1.07), "any": (0.61, 1.76),
}
BAND_ROWS: dict[str, int] = {"gpu serving (AMD), batch 1-4": 2, "gpu serving (AMD), batch > 4": 2,
                             "gpu serving, batch 1-4": 7, "gpu serving, batch > 4": 19,
                             "llama.cpp (Apple), batch 1-4": 11, "llama.cpp, batch 1-4": 4, "llama.cpp, offload": 2,
                             "any": 47}
_MIN_BAND_ROWS = 3


def band_key(engine: str, batch: int, *, offload: bool = False, vendor: str | None = None) -> str:
    """The validation regime a prediction belongs to: engine class (with the GPU vendor) and load."""
    cls = engine_class(engine, vendor)
    load = "offload" if offload else ("batch 1-4" if batch <= 4 else "batch > 4")
    return f"{cls}, {load}"


def error_band(engine: str, batch: int, *, offload: bool = False,
               vendor: str | None = None) -> tuple[float, float, str]:
    """(lowest, highest speed ratio, the regime used) for a prediction of this engine and load."""
    key = band_key(engine, batch, offload=offload, vendor=vendor)
    if key not in ERROR_BANDS or BAND_ROWS.get(key, 0) < _MIN_BAND_ROWS:
        key = "any"
    lo, hi = ERROR_BANDS.get(key, (0.5, 2.0))
    return lo, hi, key


class PerfResult(Record):
    """`model_dump()` is exactly `moeplan perf --json`."""

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
    # The error band from the validation residuals of this engine and regime (ERROR_BANDS).
    tpot_s_low: float = 0.0
    tpot_s_high: float = 0.0
    ttft_s_low: float = 0.0
    ttft_s_high: float = 0.0
    decode_tok_per_s_low: float = 0.0
    decode_tok_per_s_high: float = 0.0
    decode_tok_per_s_total_low: float = 0.0
    decode_tok_per_s_total_high: float = 0.0
    band_regime: str = ""
    engine: str = ""
    # Cost, only with --price: USD per hour and per million tokens at this batch (moeplan.cost).
    usd_per_hour: float | None = None
    usd_per_million_output_tokens: float | None = None
    usd_per_million_input_tokens: float | None = None
    max_batch: int = 0  # the largest batch that fits at this context
    routing: str = "uniform"
    busiest_rank_experts: float = 0.0  # expected distinct experts on the busiest EP rank per decode step
    busiest_rank_pairs: float = 0.0  # and its token-expert pairs
    busiest_rank_a2a_bytes: float = 0.0  # what that rank sends or receives per MoE layer per decode step
    drop_fraction_decode: float | None = None  # with --capacity-factor: share of pairs over budget
    drop_fraction_prefill: float | None = None
    decode_bytes_per_step: float
    decode_distinct_experts: float
    comm_s_per_step: float
    efficiency: Efficiency
    sweep: list[dict[str, float | int | str]]
    notes: list[str]


def max_num_seqs(engine: str, gpus: tuple[Gpu, ...]) -> int:
    """The engine's default cap on running sequences: vLLM 1024 on GPUs of 70 GiB or more except
    A100s, else 256 (vllm/engine/arg_utils.py get_batch_defaults, API server); SGLang taken alike;
    llama-server 4 slots (its n_parallel auto default)."""
    if engine == "llama.cpp":
        return 4
    small = min(g.usable_bytes for g in gpus) < 70 * 2**30 or any("A100" in g.name for g in gpus)
    return 256 if small else 1024


def speed(
    spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario, *,
    prompt: int | None = None, nodes: int = 1, efficiency: Efficiency | None = None, price: Price | None = None,
    routing: Routing | None = None,
) -> tuple[Speed, StepCost, StepCost]:
    layout = layout_of(plan)
    probs = routing.mean() if routing is not None else None
    engine = plan.engine
    off = frozenset(plan.offload.offloaded_layer_ids) if plan.offload else frozenset()
    graphs = sc.cuda_graphs if not scheme.gguf else True  # llama.cpp captures CUDA graphs by default
    # Experts in host memory run at what llama.cpp's CPU kernels reach of the plan's RAM bandwidth:
    # the same figure for decode, prefill and capacity (moeplan.offload prices the disk tier on top).
    cpu_eff = ENGINE_MEMORY_EFFICIENCY["llama.cpp cpu experts"]
    host = plan.offload.host_gb_per_s * cpu_eff if plan.offload else HOST_RAM_GB_PER_S

    def step(tokens_per_seq: int, batch: int, context: int) -> StepCost:
        return step_cost(spec, scheme, layout, gpus, tokens_per_seq=tokens_per_seq, batch=batch, context=context,
                         kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency, offloaded=off, engine=engine,
                         cuda_graphs=graphs, probs=probs, redundant=sc.redundant_experts if layout.ep > 1 else 0,
                         host_gb_per_s=host)

    dec = step(1, sc.batch, sc.context)
    s = prompt or min(sc.context, 1024)
    pre = step(s, 1, s)
    tpot = dec.seconds
    offload_fields: dict[str, float] = {}
    if plan.offload is not None and spec.is_moe:
        # llama.cpp (--n-cpu-moe): `dec` already runs the offloaded layers' experts on the CPU from RAM;
        # moeplan.offload adds what the disk tier costs when RAM holds only part of them, and the p99.
        o = plan.offload
        resident = step_cost(spec, scheme, layout, gpus, tokens_per_seq=1, batch=sc.batch, context=sc.context,
                             kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency, engine=engine, probs=probs)
        k_eff = min(max(1, round(resident.distinct_experts)), spec.num_experts)  # experts a layer's step touches
        locality = o.locality if o.locality_given else max(o.locality, independent_reuse(spec.num_experts, k_eff,
                                                                                         probs))
        common = dict(base_tpot_s=0.0, offloaded_layers=o.cpu_moe_layers, num_experts=spec.num_experts, top_k=k_eff,
                      expert_bytes=o.expert_bytes, locality=locality, pcie_gb_per_s=min(g.pcie_gb_per_s for g in gpus),
                      host_gb_per_s=o.host_gb_per_s, disk_gb_per_s=o.disk_gb_per_s, probs=probs)
        tiers = offload_speed(slots=0, cpu_efficiency=cpu_eff, ram_share=o.ram_share, **common)  # type: ignore[arg-type]
        in_ram = offload_speed(slots=0, cpu_efficiency=cpu_eff, ram_share=1.0, **common)  # type: ignore[arg-type]
        tpot = dec.seconds + tiers.mean_tpot_s - in_ram.mean_tpot_s
        # The cache engine keeps every MoE layer's experts in host memory (RAM first, then disk),
        # o.cache_slots of them per layer on the GPU; hits are GPU reads (`resident`).
        every = o.moe_layers * spec.num_experts * o.expert_bytes
        cached = offload_speed(slots=o.cache_slots, ram_share=min(1.0, o.cpu_budget_bytes / max(every, 1)),
                               **{**common, "base_tpot_s": resident.seconds, "offloaded_layers": o.moe_layers})  # type: ignore[arg-type]
        offload_fields = {"offload_p99_tpot_s": tpot + tiers.p99_tpot_s - tiers.mean_tpot_s,
                          "cache_hit_rate": cached.hit_rate, "cache_locality": locality,
                          "cache_tpot_s": cached.mean_tpot_s,
                          "cache_p99_tpot_s": cached.p99_tpot_s}
    cap = min(max(plan.max_batch, sc.batch), max_num_seqs(engine, gpus)) if plan.max_batch else sc.batch
    cap_s = tpot if cap == sc.batch else step(1, cap, sc.context).seconds
    lo, hi, regime = error_band(engine, sc.batch, offload=plan.offload is not None, vendor=slowest_gpu(gpus).vendor)
    rate, total = 1 / tpot, sc.batch / tpot
    sp = Speed(decode_tok_per_s=rate, decode_tok_per_s_total=total, prefill_tok_per_s=s / pre.seconds,
               ttft_s=pre.seconds, tpot_s=tpot, bound=dec.bound, capacity_batch=cap, capacity_tok_per_s=cap / cap_s,
               engine=engine, tpot_s_low=tpot * lo, tpot_s_high=tpot * hi, ttft_s_low=pre.seconds * lo,
               ttft_s_high=pre.seconds * hi, decode_tok_per_s_low=rate / hi, decode_tok_per_s_high=rate / lo,
               decode_tok_per_s_total_low=total / hi, decode_tok_per_s_total_high=total / lo, band_regime=regime,
               **offload_fields)
    if price is not None:
        hourly = price.per_hour(gpus)
        sp = sp.model_copy(update={
            "usd_per_hour": hourly, "usd_per_million_output_tokens": per_million(hourly, total),
            "usd_per_million_output_tokens_at_capacity": per_million(hourly, sp.capacity_tok_per_s),
            "usd_per_million_input_tokens": per_million(hourly, sp.prefill_tok_per_s)})
    return sp, dec, pre


def ranker(*, nodes: int = 1, prompt: int | None = None, price: Price | None = None,
           routing: Routing | None = None) -> Callable[..., Plan]:
    """fit's ranking hook for a deployment over `nodes` nodes (an EP all-to-all beyond one node
    crosses the network), a prompt of `prompt` tokens for TTFT, a price for cost and the routing."""

    def rank(spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
        sp, _, _ = speed(spec, scheme, plan, gpus, sc, prompt=prompt, nodes=nodes, price=price, routing=routing)
        return plan.model_copy(update={"speed": sp})

    return rank


def rank_plan(spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
    """Attach the speed of a plan on one node (fit's ranking hook; `ranker` for more nodes)."""
    sp, _, _ = speed(spec, scheme, plan, gpus, sc)
    return plan.model_copy(update={"speed": sp})


SWEEP_BATCHES = (1, 4, 16, 64, 256, 1024)


def dense_counterpart(spec: ModelSpec) -> ModelSpec:
    """The dense model an MoE would be at the same total size: every MoE layer's experts (routed,
    shared and any dense MLP beside them) as one dense FFN of their summed width, every weight active;
    attention, KV cache and everything else unchanged."""
    width = spec.num_experts * spec.expert_intermediate_size + spec.shared_expert_intermediate_size
    width += spec.moe_dense_intermediate_size
    layers = tuple(layer.model_copy(update={"ffn": "dense", "dense_intermediate_size": width})
                   if layer.ffn == "moe" else layer for layer in spec.layers)
    return spec.model_copy(update={
        "name": f"{spec.name} (dense counterpart)", "layers": layers, "num_experts": 0, "experts_per_token": 0,
        "expert_intermediate_size": 0, "num_shared_experts": 0, "shared_expert_intermediate_size": 0,
        "moe_dense_intermediate_size": 0, "dense_intermediate_size": spec.dense_intermediate_size or width,
        "router_bias": False, "router_correction_bias": False, "router_scale": False, "shared_expert_gate": False,
        "expert_bias": False, "mtp_layers": 0})


def perf_report(
    spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario, *,
    prompt: int, nodes: int = 1, gpus_label: str = "", sweep: bool = True, efficiency: Efficiency | None = None,
    price: Price | None = None, routing: Routing | None = None,
) -> PerfResult:
    sp, dec, pre = speed(spec, scheme, plan, gpus, sc, prompt=prompt, nodes=nodes, efficiency=efficiency,
                         price=price, routing=routing)
    probs = routing.mean() if routing is not None else None
    redundant = sc.redundant_experts if plan.ep > 1 else 0
    eff = efficiency_for(slowest_gpu(gpus), scheme.compute, efficiency, plan.engine)
    rows: list[dict[str, float | int | str]] = []
    notes = [f"efficiency: memory {eff.memory:.2f}, compute {eff.compute:.2f} ({eff.source})"]
    if any(g.generic for g in gpus):
        notes.append(next(g.source for g in gpus if g.generic))
    if plan.ep > 1 and scheme.compute == "fp8":
        notes.append("EP dispatch assumed in fp8 with a bf16 combine (DeepEP's DeepSeek-V3 setting, as SGLang "
                     "runs it with DeepEP); an engine that dispatches bf16 moves about twice the dispatch bytes")
    hourly = price.per_hour(gpus) if price is not None else None
    if price is None:
        notes.append(NO_PRICE_NOTE)
    load = None
    if spec.is_moe:
        load = rank_load(spec.num_experts, spec.experts_per_token, sc.batch, max(plan.ep, 1), probs, redundant)
        if routing is not None and not routing.uniform:
            uniform = rank_load(spec.num_experts, spec.experts_per_token, sc.batch, max(plan.ep, 1))
            notes.append(f"routing {routing.label}: {load.distinct_total:,.1f} distinct experts per layer per decode "
                         f"step against {uniform.distinct_total:,.1f} uniform; busiest EP rank "
                         f"{load.assignments_max:,.1f} token-expert pairs against {uniform.assignments_max:,.1f}")
    if sc.redundant_experts and plan.ep <= 1:
        notes.append(f"--redundant-experts {sc.redundant_experts} changes nothing in {plan.layout}: replicas serve "
                     "expert-parallel layouts (force one with --ep, or --dp-attention --tp N)")
    drops: dict[str, float] = {}
    if sc.capacity_factor is not None and spec.is_moe:
        drops = {"decode": drop_fraction(spec.num_experts, spec.experts_per_token, sc.batch, sc.capacity_factor, probs),
                 "prefill": drop_fraction(spec.num_experts, spec.experts_per_token, min(sc.chunk_tokens, prompt),
                                          sc.capacity_factor, probs)}
        notes.append(f"capacity factor {sc.capacity_factor:g}: {drops['decode']:.2%} of token-expert pairs over "
                     f"budget per decode step, {drops['prefill']:.2%} per prefill chunk (dropped or rerouted); "
                     "vLLM/SGLang inference drop none")
    if sweep:
        layout = layout_of(plan)
        dense = dense_counterpart(spec) if spec.is_moe else None
        # The dense counterpart has no experts to spread: the same GPUs per stage run it tensor-parallel.
        dense_layout = layout.model_copy(update={"tp": layout.gpus_per_stage, "ep": 1, "dp_attention": False})
        batches = sorted(set(SWEEP_BATCHES) | ({plan.max_batch} if plan.max_batch else set()))
        fade = None
        for b in batches:
            cost = step_cost(spec, scheme, layout, gpus, tokens_per_seq=1, batch=b, context=sc.context,
                             kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency, engine=plan.engine,
                             probs=probs, redundant=redundant)
            row: dict[str, float | int | str] = dict(
                batch=b, fits="yes" if plan.max_batch and b <= plan.max_batch else "no",
                bytes_per_step=round(cost.bytes), bound=cost.bound, tpot_s=cost.seconds,
                decode_tok_per_s=1 / cost.seconds, decode_tok_per_s_total=b / cost.seconds)
            if dense is not None:
                dense_cost = step_cost(dense, scheme, dense_layout, gpus, tokens_per_seq=1, batch=b,
                                       context=sc.context, kv_dtype=sc.kv_dtype, nodes=nodes, efficiency=efficiency,
                                       engine=plan.engine)
                advantage = dense_cost.seconds / cost.seconds
                if fade is None and advantage < 1.25:
                    fade = b
                row.update(distinct_experts=round(cost.distinct_experts, 2), dense_tpot_s=dense_cost.seconds,
                           moe_advantage=round(advantage, 2))
            if hourly is not None:
                row["usd_per_million_output_tokens"] = per_million(hourly, b / cost.seconds)
            rows.append(row)
        if plan.max_batch:
            notes.append(f"largest batch that fits at {sc.context:,} tokens: {plan.max_batch:,} (rows marked "
                         "'no' would not fit)")
        if dense is not None:
            notes.append("dense counterpart: the same total parameters as one dense FFN per layer, every weight "
                         "read and computed, the same KV cache; "
                         + (f"the MoE's advantage fades (<1.25x) at batch {fade}" if fade
                            else "the MoE keeps a >1.25x advantage across the sweep"))
    return PerfResult(
        model=spec.name, gpus=gpus_label or ",".join(g.name for g in gpus), quant=scheme.name, layout=plan.layout,
        batch=sc.batch, context=sc.context, prompt=prompt, decode_tok_per_s=sp.decode_tok_per_s,
        decode_tok_per_s_total=sp.decode_tok_per_s_total, prefill_tok_per_s=sp.prefill_tok_per_s, ttft_s=sp.ttft_s,
        tpot_s=sp.tpot_s, bound=sp.bound, tpot_s_low=sp.tpot_s_low, tpot_s_high=sp.tpot_s_high,
        ttft_s_low=sp.ttft_s_low, ttft_s_high=sp.ttft_s_high, decode_tok_per_s_low=sp.decode_tok_per_s_low,
        decode_tok_per_s_high=sp.decode_tok_per_s_high, decode_tok_per_s_total_low=sp.decode_tok_per_s_total_low,
        decode_tok_per_s_total_high=sp.decode_tok_per_s_total_high, band_regime=sp.band_regime, engine=sp.engine,
        usd_per_hour=sp.usd_per_hour, usd_per_million_output_tokens=sp.usd_per_million_output_tokens,
        usd_per_million_input_tokens=sp.usd_per_million_input_tokens, max_batch=plan.max_batch,
        routing=routing.label if routing is not None else "uniform",
        busiest_rank_experts=load.distinct_max if load is not None else 0.0,
        busiest_rank_pairs=load.assignments_max if load is not None else 0.0,
        busiest_rank_a2a_bytes=dec.a2a_bytes_busiest,
        drop_fraction_decode=drops.get("decode"), drop_fraction_prefill=drops.get("prefill"),
        decode_bytes_per_step=dec.bytes, decode_distinct_experts=dec.distinct_experts, comm_s_per_step=dec.comm_s,
        efficiency=eff, sweep=rows, notes=notes,
    )  # fmt: skip


class LayerPrediction(Record):
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
    """The CPU as a 'device' for bench predictions (moeplan.hardware.host_cpu)."""
    from moeplan.hardware import host_cpu

    return host_cpu()
