"""What a model needs in memory, per component, before it is split across GPUs.

weights      count_params totals x bits per weight of the scheme (quant.py)
KV cache     per token per attention layer: 2 x kv_heads x head_dim x bytes (GQA);
             (kv_lora_rank + qk_rope_head_dim) x bytes for MLA, the latent vLLM and SGLang cache
             (DeepSeek-V2 paper section 2.1.2); sliding/chunked layers capped at their window;
             Mamba layers hold a fixed state per sequence instead.
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

from pydantic import BaseModel, ConfigDict

from moeplan.errors import MoeplanError
from moeplan.params import EMBEDDING, LM_HEAD, count_params
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


class Weights(BaseModel):
    model_config = ConfigDict(frozen=True)
    quant: str
    by_component: dict[str, int]
    total: int


def weight_bytes(spec: ModelSpec, scheme: QuantScheme) -> Weights:
    """Bytes per component; each component rounded up to whole bytes."""
    count = count_params(spec)
    scheme = scheme.for_model(spec)
    parts = {c.name: math.ceil(c.total * scheme.bits_for(c.name) / 8) for c in count.components}
    return Weights(quant=scheme.name, by_component=parts, total=sum(parts.values()))


def mamba_state_bytes(spec: ModelSpec, dtype_bytes: float = 2.0) -> int:
    """Per sequence per Mamba layer: conv state (d_inner x d_conv) + SSM state (d_inner x d_state)."""
    m = spec.mamba
    if m is None:
        return 0
    d_inner = m.expand * spec.hidden_size
    return math.ceil(d_inner * (m.d_conv + m.d_state) * dtype_bytes)


def kv_bytes_per_layer_token(spec: ModelSpec, kv_bytes: float, *, mla_naive: bool = False) -> float:
    if spec.attention == "mla" and spec.mla is not None:
        m = spec.mla
        if mla_naive:  # HF eager caches full per-head K (nope+rope) and V
            return spec.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * kv_bytes
        return (m.kv_lora_rank + m.qk_rope_head_dim) * kv_bytes
    return 2 * spec.num_kv_heads * spec.head_dim * kv_bytes


def _attention_layers(spec: ModelSpec, include_mtp: bool) -> list[LayerSpec]:
    layers = [layer for layer in spec.layers if layer.mixer != "mamba"]
    if include_mtp:
        layers += [LayerSpec(mixer="full")] * spec.mtp_layers
    return layers


def kv_bytes_per_token(
    spec: ModelSpec, kv_dtype: str = "bf16", *, mla_naive: bool = False, include_mtp: bool = False
) -> int:
    """Per token of context over all attention layers, as if no window capped them."""
    per = kv_bytes_per_layer_token(spec, kv_dtype_bytes(kv_dtype), mla_naive=mla_naive)
    return math.ceil(per * len(_attention_layers(spec, include_mtp)))


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
    """KV for `batch` sequences of `context` tokens: window layers keep at most their window,
    Mamba layers their fixed state. `layers` restricts to a subset (one pipeline stage)."""
    kvb = kv_dtype_bytes(kv_dtype)
    per = kv_bytes_per_layer_token(spec, kvb, mla_naive=mla_naive)
    chosen = layers if layers is not None else list(spec.layers)
    if include_mtp and layers is None:
        chosen = chosen + [LayerSpec(mixer="full")] * spec.mtp_layers
    tokens = 0
    mamba = 0
    for layer in chosen:
        if layer.mixer == "mamba":
            mamba += 1
        else:
            tokens += min(context, layer.window) if layer.window else context
    return math.ceil(batch * (tokens * per + mamba * mamba_state_bytes(spec)))


def activation_bytes(
    spec: ModelSpec, tokens: int, dtype_bytes: float = 2.0, *, tp: int = 1, per_layer: bool = False,
    logits: bool = True,
) -> int:
    """Peak activation memory of a prefill chunk of `tokens` tokens on one GPU.

    per_layer=True: one decoder layer's working set without the logits (what `bench` measures)."""
    if spec.is_moe:
        coeff = _MOE_ACT_COEFF.get(tp, 13 if tp > 8 else 17)
    else:
        coeff = _DENSE_ACT_COEFF
    hidden = 2 * tokens * spec.hidden_size * coeff * dtype_bytes / 2
    if per_layer or not logits:
        return math.ceil(hidden)
    logits = tokens * spec.vocab_size * 4  # fp32 logits, full vocab on every rank
    return math.ceil(hidden + logits)


def overhead_bytes(num_gpus: int, *, cuda_graphs: bool = True) -> int:
    """Per GPU: CUDA context, CUDA graphs, and NCCL buffers when GPUs talk."""
    return CUDA_CONTEXT_BYTES + (CUDA_GRAPH_BYTES if cuda_graphs else 0) + (NCCL_BYTES if num_gpus > 1 else 0)


class MemoryReport(BaseModel):
    """`model_dump()` is exactly `moeplan memory --json`."""

    model_config = ConfigDict(frozen=True)
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
    kv_cache_bytes: int
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
    grow_layers = [layer for layer in spec.layers if layer.mixer != "mamba" and layer.window is None]
    per_layer = kv_bytes_per_layer_token(spec, kv_dtype_bytes(kv_dtype), mla_naive=mla_naive)
    kv_beyond = math.ceil(per_layer * (len(grow_layers) + (spec.mtp_layers if mtp else 0)))
    kv = kv_cache_bytes(spec, context, batch, kv_dtype, mla_naive=mla_naive, include_mtp=mtp)
    act = activation_bytes(spec, chunk)
    over = overhead_bytes(1)
    notes = []
    if any(layer.window for layer in spec.layers):
        notes.append("sliding-window/chunked layers hold at most their window of KV")
    if spec.mamba is not None:
        notes.append("Mamba layers hold a fixed state per sequence instead of KV")
    if spec.attention == "mla":
        notes.append("MLA: the latent cache (kv_lora_rank + qk_rope_head_dim) as vLLM and SGLang store it"
                     + ("; --mla-naive: expanded per-head K and V" if mla_naive else ""))
    if spec.mtp_layers and not mtp:
        notes.append(f"{spec.mtp_layers} MTP layer(s) not loaded; --mtp counts them for speculative decoding")
    if mtp and spec.mtp_layers:
        # The MTP layer's own weights at the scheme's bits, plus its embedding and head copies at the
        # embedding/lm_head bits (bf16 in DeepSeek's fp8 checkpoint): vLLM's DeepSeekMTP loads those
        # copies (deepseek_mtp.py); SGLang's NextN shares the main model's, so this is the upper figure.
        count = count_params(spec)
        copy = (count.mtp_params_stored - count.mtp_params) // 2
        mtp_w = (math.ceil(count.mtp_params * scheme.bits / 8) + math.ceil(copy * scheme.bits_for(EMBEDDING) / 8)
                 + math.ceil(copy * scheme.bits_for(LM_HEAD) / 8))
        weights = Weights(quant=weights.quant, by_component={**weights.by_component, "mtp": mtp_w},
                          total=weights.total + mtp_w)
    return MemoryReport(
        model=spec.name, quant=scheme.name, quant_description=scheme.description, context=context, batch=batch,
        kv_dtype=kv_dtype, chunk_tokens=chunk, weights_bytes=weights.total, weights=weights.by_component,
        kv_bytes_per_token=kv_full, kv_bytes_per_token_beyond_windows=kv_beyond, kv_cache_bytes=kv,
        activation_bytes=act, overhead_bytes=over, total_bytes=weights.total + kv + act + over,
        mtp_kv_included=mtp, notes=notes,
    )  # fmt: skip
