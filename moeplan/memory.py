"""What a model needs in memory, per component, before it is split across GPUs.

weights      count_params totals x bits per weight of the scheme (quant.py)
KV cache     what each layer keeps per sequence as a function of context: moeplan.kv_cache's
             ledger (GQA, MLA, DSA and compressed rows, windows, and the fixed state of linear
             attention, Mamba and compressors).
activations  a prefill chunk's peak: the fp32 logits of the chunk plus 2 x tokens x hidden x c, with
             c the MoE coefficient aiconfigurator fits for SGLang (28/17/13/13 at TP 1/2/4/8). On
             llm-d's H100 measurements of vLLM's profile run (8192-token chunk) this gives 7.37 GiB
             for gpt-oss-20b against 7.38 measured.
overhead     CUDA context ~0.6 GiB (vLLM saw 78.57 of 79.18 GiB free at start, llm-d); CUDA graphs up
             to ~1 GiB (llm-d measured -0.45..+1.03); NCCL buffers 0.42 GiB when GPUs > 1 (llm-d:
             non-torch memory 0.13 GiB at TP1 vs 0.55 at TP2; aiconfigurator: 342-392 MB).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


from moeplan.record import Record
from moeplan.errors import MoeplanError
from moeplan.params import EMBEDDING, LM_HEAD, ROUTED_EXPERTS, count_params, is_moe, layer_params
from moeplan.kv_cache import CacheBytes, bytes_per_token, cache_bytes, layer_terms
from moeplan.quant import QuantScheme, kv_dtype_bytes
from moeplan.spec import LayerSpec, ModelSpec

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
CUDA_GRAPH_BYTES = int(1.0 * GiB)
NCCL_BYTES = int(0.42 * GiB)
DEFAULT_CHUNK_TOKENS = 8192  # vLLM's max_num_batched_tokens for online serving on large GPUs
DEFAULT_MEM_FRACTION = 0.90  # vLLM gpu_memory_utilization default through v0.19 ([aic])
MAX_CONTEXT = 16 * 2**20  # a sane upper bound for --context (16M tokens)
_MOE_ACT_COEFF = {1: 28, 2: 17, 4: 13, 8: 13}  # [aic] SGLang MoE activation coefficients by TP
_DENSE_ACT_COEFF = 14  # llm-d Llama-8B: 4.76 GiB peak less its logits


class Weights(Record):
    quant: str
    by_component: dict[str, int]
    total: int


def weight_bytes(spec: ModelSpec, scheme: QuantScheme) -> Weights:
    """Bytes per component; each component rounded up to whole bytes."""
    count = count_params(spec)
    scheme = scheme.for_model(spec)
    parts = {c.name: math.ceil(c.total * scheme.bits_for(c.name) / 8) for c in count.components
             if scheme.bits_for(c.name)}
    return Weights(quant=scheme.name, by_component=parts, total=sum(parts.values()))


def mamba_state_bytes(spec: ModelSpec) -> int:
    """Per sequence per Mamba layer: conv state (d_inner x d_conv) + SSM state (d_inner x d_state)."""
    if spec.mamba is None:
        return 0
    return math.ceil(sum(t.bytes(1, 2.0) for t in layer_terms(spec, LayerSpec(mixer="mamba"))))


def kv_bytes_per_token(
    spec: ModelSpec, kv_dtype: str = "bf16", *, mla_naive: bool = False, include_mtp: bool = False
) -> int:
    """Per token of context over all layers, as if no window capped them (kv_cache.bytes_per_token)."""
    return math.ceil(bytes_per_token(spec, kv_dtype, mla_naive=mla_naive, include_mtp=include_mtp))


def kv_cache_bytes(
    spec: ModelSpec,
    context: int,
    batch: int = 1,
    kv_dtype: str = "bf16",
    *,
    mla_naive: bool = False,
    include_mtp: bool = False,
    layers: list[LayerSpec] | None = None,
) -> int:
    """KV and fixed state for `batch` sequences of `context` tokens (kv_cache.cache_bytes): window layers
    keep at most their window, linear-attention and Mamba layers their fixed state. `layers` restricts
    to a subset (one pipeline stage)."""
    return cache_bytes(spec, context, batch, kv_dtype, layers=layers, include_mtp=include_mtp and layers is None,
                       mla_naive=mla_naive).total


def activation_bytes(
    spec: ModelSpec, tokens: int, dtype_bytes: float = 2.0, *, tp: int = 1, per_layer: bool = False,
    logits: bool = True,
) -> int:
    """Peak activation memory of a prefill chunk of `tokens` tokens on one GPU.

    per_layer=True: one decoder layer's working set without the logits (what `bench` measures)."""
    if is_moe(spec):
        coeff = _MOE_ACT_COEFF.get(tp, 13 if tp > 8 else 17)
    else:
        coeff = _DENSE_ACT_COEFF
    hidden = 2 * tokens * spec.hidden_size * coeff * dtype_bytes / 2
    if spec.hc_mult > 1:
        # DeepSeek-V4 mHC carries hc_mult residual streams of H ([B, S, N, D] in transformers
        # DeepseekV4HyperConnection): the extra streams in and out of the layer.
        hidden += 2 * (spec.hc_mult - 1) * tokens * spec.hidden_size * dtype_bytes
    if per_layer or not logits:
        return math.ceil(hidden)
    logits = tokens * spec.vocab_size * 4  # fp32 logits, full vocab on every rank
    return math.ceil(hidden + logits)


def overhead_bytes(num_gpus: int, *, cuda_graphs: bool = True) -> int:
    """Per GPU: CUDA context, CUDA graphs, and NCCL buffers when GPUs talk."""
    return CUDA_CONTEXT_BYTES + (CUDA_GRAPH_BYTES if cuda_graphs else 0) + (NCCL_BYTES if num_gpus > 1 else 0)


class MemoryReport(Record):
    """`model_dump()` is exactly `moeplan memory --json`."""

    model: str
    quant: str
    quant_description: str
    context: int
    batch: int
    kv_dtype: str
    chunk_tokens: int
    weights_bytes: int
    weights: dict[str, int]
    kv_bytes_per_token: int
    kv_bytes_per_token_beyond_windows: int
    # KV rows (growing and windowed) plus the fixed per-sequence state: everything the cache holds.
    kv_cache_bytes: int
    kv_grows_bytes: int = 0  # rows that grow with context
    kv_window_bytes: int = 0  # rows capped at a sliding window or chunk
    state_bytes: int = 0  # fixed per-sequence state (linear attention, Mamba, compressors), x batch
    state_bytes_per_sequence: int = 0
    cache_by_term: dict[str, int] = {}
    # The cache as vLLM/SGLang/llama.cpp allocate it, where that differs (Gemma 4 K=V layers).
    kv_cache_bytes_engines: int = 0
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    mtp_kv_included: bool
    notes: list[str]


def check_context(context: int, batch: int) -> None:
    if context < 1 or context > MAX_CONTEXT:
        raise MoeplanError(f"--context must be between 1 and {MAX_CONTEXT:,} tokens, got {context}")
    if batch < 1 or batch > 65536:
        raise MoeplanError(f"--batch must be between 1 and 65,536, got {batch}")


def memory_report(
    spec: ModelSpec,
    scheme: QuantScheme,
    *,
    context: int,
    batch: int = 1,
    kv_dtype: str = "bf16",
    mla_naive: bool = False,
    mtp: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> MemoryReport:
    check_context(context, batch)
    kv_dtype_bytes(kv_dtype, scheme)  # refuses a KV dtype the scheme's engines cannot use
    weights = weight_bytes(spec, scheme)
    chunk = min(chunk_tokens, context * batch)
    kv_full = kv_bytes_per_token(spec, kv_dtype, mla_naive=mla_naive, include_mtp=mtp)
    kv_beyond = math.ceil(bytes_per_token(spec, kv_dtype, beyond_windows=True, mla_naive=mla_naive, include_mtp=mtp))
    cache = cache_bytes(spec, context, batch, kv_dtype, mla_naive=mla_naive, include_mtp=mtp)
    engines = cache_bytes(spec, context, batch, kv_dtype, mla_naive=mla_naive, include_mtp=mtp, engine=True)
    kv = cache.total
    act = activation_bytes(spec, chunk)
    over = overhead_bytes(1)
    notes = cache_notes(spec, cache, engines, batch)
    if spec.attention == "mla":
        notes.append("MLA: the latent cache (kv_lora_rank + qk_rope_head_dim) as vLLM and SGLang store it"
                     + ("; --mla-naive: expanded per-head K and V" if mla_naive else ""))
    hash_b = hash_table_bytes(spec, spec.layers)
    if hash_b:
        weights = Weights(quant=weights.quant, by_component={**weights.by_component, "hash_routing_tables": hash_b},
                          total=weights.total + hash_b)
    if spec.mtp_layers and not mtp:
        notes.append(f"{spec.mtp_layers} MTP layer(s) not loaded; --mtp counts them for speculative decoding")
    if mtp and spec.mtp_layers:
        # The MTP layer's own weights at the scheme's bits, plus its embedding and head copies at the
        # embedding/lm_head bits (bf16 in DeepSeek's fp8 checkpoint): vLLM's DeepSeekMTP loads those
        # copies (deepseek_mtp.py); SGLang's NextN shares the main model's, so this is the upper figure.
        count = count_params(spec)
        copy = (count.mtp_params_stored - count.mtp_params) // 2
        scheme = scheme.for_model(spec)
        # Its routed experts at the experts' bits (DeepSeek-V4 ships the MTP experts in FP4 like the main
        # ones), the rest of the layer at the scheme's base bits.
        routed = spec.mtp_layers * layer_params(spec, spec.mtp_layer_spec).get(ROUTED_EXPERTS, (0, 0))[0]
        mtp_w = math.ceil(routed * scheme.expert_bits / 8) + math.ceil((count.mtp_params - routed) * scheme.bits / 8)
        mtp_w += math.ceil(copy * scheme.bits_for(EMBEDDING) / 8) + math.ceil(copy * scheme.bits_for(LM_HEAD) / 8)
        weights = Weights(quant=weights.quant, by_component={**weights.by_component, "mtp": mtp_w},
                          total=weights.total + mtp_w)
    return MemoryReport(
        model=spec.name, quant=scheme.name, quant_description=scheme.description, context=context, batch=batch,
        kv_dtype=kv_dtype, chunk_tokens=chunk, weights_bytes=weights.total, weights=weights.by_component,
        kv_bytes_per_token=kv_full, kv_bytes_per_token_beyond_windows=kv_beyond, kv_cache_bytes=kv,
        kv_grows_bytes=cache.grows, kv_window_bytes=cache.window, state_bytes=cache.state,
        state_bytes_per_sequence=cache.state // batch, cache_by_term=cache.by_term, kv_cache_bytes_engines=engines.total,
        activation_bytes=act, overhead_bytes=over, total_bytes=weights.total + kv + act + over,
        mtp_kv_included=mtp, notes=notes,
    )  # fmt: skip


def hash_table_bytes(spec: ModelSpec, layers: Iterable[LayerSpec]) -> int:
    """DeepSeek-V4's hash-routed layers store a token -> experts table (tid2eid, vocab x top_k; an
    int64 buffer in transformers modeling_deepseek_v4), loaded with the weights but not a parameter."""
    return sum(spec.vocab_size * spec.experts_per_token * 8 for layer in layers if layer.hash_routed)


def cache_notes(spec: ModelSpec, cache: CacheBytes, engines: CacheBytes, batch: int) -> list[str]:
    """What the cache figures mean for this model's layer kinds, said once."""
    notes = []
    kinds = {layer.mixer for layer in spec.layers}
    if any(layer.window for layer in spec.layers if layer.mixer in ("sliding", "chunked")):
        notes.append("sliding-window/chunked layers hold at most their window of KV (vLLM's hybrid allocator also "
                     "reserves a prefill chunk beyond it per running request)")
    if "mamba" in kinds:
        notes.append("Mamba layers hold a fixed state per sequence instead of KV")
    if "linear" in kinds and spec.linear is not None:
        la = spec.linear
        dtype = {4.0: "fp32", 2.0: "bf16"}.get(la.ssm_state_bytes, f"{la.ssm_state_bytes:g}-byte")
        who = ("; vLLM keeps Qwen3-Next's in bf16 unless --mamba-ssm-cache-dtype float32, SGLang in fp32"
                   if spec.model_type == "qwen3_next" else "")
        notes.append(
            f"linear-attention (Gated DeltaNet) layers hold a fixed conv + recurrent state per sequence, "
            f"{cache.state // batch / 2**20:,.1f} MiB, the recurrent state in {dtype}{who}")
    if "compressed" in kinds:
        notes.append("DeepSeek-V4: compressed KV rows grow with context (1 per compress ratio tokens, plus indexer "
                     "keys on CSA layers); the sliding-window branch and the fp32 compressor windows are fixed per "
                     "sequence (vLLM's fp8_ds_mla rows are 584 B for 512 values)")
    if spec.indexer is not None and spec.attention == "mla":
        notes.append(f"DSA indexer: one {spec.indexer.head_dim}-value key per token on indexer layers (vLLM stores "
                     "fp8 + scale, 132 B); attention reads the top-"
                     f"{spec.indexer.topk:,} rows")
    if engines.total != cache.total:
        notes.append(
            f"K=V layers counted as one tensor, as the model defines them; vLLM, SGLang, llama.cpp and HF all cache "
            f"K and V apart (K normed and roped, V normed), {engines.total / 1e9:,.2f} GB here: plans use that")
    if any(layer.kv_shared for layer in spec.layers):
        notes.append("KV-shared layers reuse an earlier layer's cache and hold none")
    return notes
