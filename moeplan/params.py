"""Parameter counting by component, total and active.

Method: count every weight tensor the transformers modeling file of each family creates (the same
bucket split torchtitan uses: embedding, attention, dense, router, shared, routed). Active follows
the convention Mixtral/Qwen/DBRX/OLMoE/Llama 4 publish: what one token touches, input embedding and
lm_head included, top-k routed experts plus every shared one. DeepSeek and gpt-oss publish active
without the input embedding; that figure is `active_params_excl_input_embedding`.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any


from moeplan.record import Record
from moeplan.spec import Gemma4VisionSpec, LayerSpec, ModelSpec, QwenVisionSpec, SiglipVisionSpec

# Component names, in display order. Every other module refers to these strings.
EMBEDDING = "embedding"
ATTENTION = "attention"
MAMBA = "mamba"
DENSE_FFN = "dense_ffn"
DENSE_MLP = "dense_mlp"  # Gemma 4: the dense MLP beside the experts in every MoE layer
ROUTER = "router"
SHARED_EXPERTS = "shared_experts"
ROUTED_EXPERTS = "routed_experts"
HYPER_CONNECTIONS = "hyper_connections"  # DeepSeek-V4 mHC mixing weights
PER_LAYER_EMBEDDING = "per_layer_embedding"  # Gemma 3n/4 per-layer inputs
NORMS = "norms"
LM_HEAD = "lm_head"
VISION = "vision"
COMPONENTS = (
    EMBEDDING, PER_LAYER_EMBEDDING, ATTENTION, MAMBA, DENSE_FFN, DENSE_MLP, ROUTER, SHARED_EXPERTS, ROUTED_EXPERTS,
    HYPER_CONNECTIONS, NORMS, LM_HEAD, VISION,
)  # fmt: skip


class Component(Record):
    name: str
    total: int
    active: int


class ParamCount(Record):
    """`model_dump()` of this is exactly `moeplan params --json`."""

    model: str
    hub_id: str | None
    total_params: int
    active_params: int
    active_params_excl_input_embedding: int
    mtp_params: int
    mtp_params_stored: int
    components: list[Component]
    conventions: dict[str, str]

    def component(self, name: str) -> Component:
        for comp in self.components:
            if comp.name == name:
                return comp
        return Component(name=name, total=0, active=0)


CONVENTIONS = {
    "total_params": "every weight of the main model incl. input embedding, lm_head (unless tied) "
    "and any vision tower; MTP layers excluded",
    "active_params": "what one text token touches: input embedding + lm_head + attention + dense "
    "+ router + shared experts + top-k routed experts + norms (Mixtral/Qwen/DBRX/Llama 4 convention)",
    "active_params_excl_input_embedding": "active_params less the input embedding (DeepSeek-V3 and "
    "gpt-oss convention)",
    "mtp_params": "multi-token-prediction layers, unique weights (without their copies of the "
    "embedding and lm_head)",
    "mtp_params_stored": "MTP layers as the checkpoint stores them, with embedding and head copies",
}


# Figures derived from one spec, kept while the spec lives. A ModelSpec is frozen, so what is derived
# from it stays true. Keyed by identity: a ModelSpec holds dicts (no hash), and comparing two compares
# every layer, which is what this saves.
_DERIVED: dict[int, tuple[weakref.ref[ModelSpec], dict[Any, Any]]] = {}


def derived(spec: ModelSpec) -> dict[Any, Any]:
    """A scratch dict for figures derived from `spec`, dropped when the spec is."""
    key = id(spec)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is spec:
        return hit[1]

    def drop(ref: weakref.ref[ModelSpec], key: int = key) -> None:
        if _DERIVED.get(key, (None,))[0] is ref:
            del _DERIVED[key]

    memo: dict[Any, Any] = {}
    _DERIVED[key] = (weakref.ref(spec, drop), memo)
    return memo


def layer_group_ids(spec: ModelSpec) -> dict[int, int]:
    """id(layer) -> the index of its kind, for each layer of spec.layers; equal layers share a kind."""
    memo = derived(spec)
    ids = memo.get("layer_group_ids")
    if ids is None:
        first: dict[LayerSpec, int] = {}
        ids = memo["layer_group_ids"] = {id(layer): first.setdefault(layer, len(first)) for layer in spec.layers}
    return ids


def layer_groups(spec: ModelSpec, layers: Iterable[LayerSpec] | None = None) -> list[tuple[LayerSpec, int]]:
    """`Counter(layers).items()` (all of spec.layers by default): each distinct layer with how often it
    occurs, in order of first occurrence, the first occurrence standing for its kind. Counter hashes
    and compares every pydantic LayerSpec on every call, and a fit asks hundreds of times, so layers of
    spec.layers are told apart once per spec (layer_group_ids) and a call counts small integers."""
    chosen: Sequence[LayerSpec] = spec.layers if layers is None else (
        layers if isinstance(layers, (list, tuple)) else list(layers))
    ids = layer_group_ids(spec)
    counts: dict[int, list[Any]] = {}
    for layer in chosen:
        kind = ids.get(id(layer))
        if kind is None:  # a layer from outside spec.layers (an MTP layer, a test's list): Counter's way
            return list(Counter(chosen).items())
        entry = counts.get(kind)
        if entry is None:
            counts[kind] = [layer, 1]
        else:
            entry[1] += 1
    return [(layer, times) for layer, times in counts.values()]


def is_moe(spec: ModelSpec) -> bool:
    """spec.is_moe, once per spec: the property counts MoE layers on every call, and activation_bytes
    and step_cost ask it hundreds of times per fit."""
    memo = derived(spec)
    if "is_moe" not in memo:
        memo["is_moe"] = spec.is_moe
    return memo["is_moe"]


def norm_params(spec: ModelSpec, width: int) -> int:
    """RMSNorm and bias-free LayerNorm hold a weight; LayerNorm also a bias."""
    return 2 * width if spec.norm == "layernorm" else width


def attention_params(spec: ModelSpec, layer: LayerSpec | None = None) -> int:
    """One attention block of `layer` (a full-attention layer if None): projections plus its internal
    norms, sinks, biases, compressor and indexer."""
    layer = layer or LayerSpec()
    if layer.mixer == "linear":
        return linear_attention_params(spec)
    if spec.attention == "compressed":
        return compressed_attention_params(spec, layer)
    h = spec.hidden_size
    if spec.attention == "mla" and spec.mla is not None:
        # DeepSeek-V2/V3 modeling: q_a_proj, q_a_layernorm, q_b_proj (or q_proj), kv_a_proj_with_mqa,
        # kv_a_layernorm, kv_b_proj, o_proj.
        m = spec.mla
        q_out = spec.num_attention_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * q_out if m.q_lora_rank else h * q_out
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * spec.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)
        o = spec.num_attention_heads * m.v_head_dim * h
        return q + kv + o + (dsa_indexer_params(spec) if layer.indexer else 0)
    hd = layer.head_dim or spec.head_dim
    kv_heads = layer.kv_heads or spec.num_kv_heads
    q_out = spec.num_attention_heads * hd * (2 if spec.attn_output_gate else 1)
    # K and V projections: none on a KV-shared layer, K alone where K = V (Gemma 4 attention_k_eq_v).
    kv_tensors = 0 if layer.kv_shared else (1 if layer.k_eq_v else 2)
    kv_out = kv_heads * hd
    n = h * (q_out + kv_tensors * kv_out) + spec.num_attention_heads * hd * h
    if spec.qkv_bias:
        n += q_out + kv_tensors * kv_out
    if spec.o_bias:
        n += h
    if spec.qk_norm == "per_head":
        n += hd + (hd if kv_tensors else 0)
    elif spec.qk_norm == "full":
        n += spec.num_attention_heads * hd + (kv_out if kv_tensors else 0)
    if spec.attention_sinks:
        n += spec.num_attention_heads
    return n


def dsa_indexer_params(spec: ModelSpec) -> int:
    """DeepSeek-V3.2 / GLM-5 DSA indexer (transformers modeling_glm_moe_dsa.GlmMoeDsaIndexer): wq_b from
    the q latent, wk (one key of head_dim), its LayerNorm with bias, and weights_proj (one weight per head)."""
    ix = spec.indexer
    assert ix is not None and spec.mla is not None
    q_in = spec.mla.q_lora_rank or spec.hidden_size
    return q_in * ix.n_heads * ix.head_dim + spec.hidden_size * ix.head_dim + 2 * ix.head_dim + spec.hidden_size * ix.n_heads


def compressed_attention_params(spec: ModelSpec, layer: LayerSpec) -> int:
    """DeepSeek-V4 attention (transformers modeling_deepseek_v4): q_a_proj + q_a_norm, q_b_proj, kv_proj
    (one shared KV head) + kv_norm, grouped o_a_proj (heads x head_dim -> o_groups x o_lora_rank, per
    group), o_b_proj, one sink per head; a compressed layer adds its compressor (kv_proj, gate_proj,
    position_bias, kv_norm) and a CSA layer its lightning indexer."""
    c = spec.compressed
    assert c is not None
    h, heads, d = spec.hidden_size, spec.num_attention_heads, spec.head_dim
    n = heads + h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * d + h * d + d
    n += heads * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * h
    if layer.mixer == "compressed" and layer.compress_ratio:
        r = layer.compress_ratio
        # NOTE: CSA compressors pool overlapping windows: kv/gate project to 2 x head_dim (Ca, Cb halves).
        width = (2 if layer.indexer else 1) * d
        n += r * width + 2 * h * width + d
        if layer.indexer:
            ix = spec.indexer
            assert ix is not None
            iw = 2 * ix.head_dim  # the indexer's compressor overlaps too
            n += r * iw + 2 * h * iw + ix.head_dim + c.q_lora_rank * ix.n_heads * ix.head_dim + h * ix.n_heads
    return n


def linear_attention_params(spec: ModelSpec) -> int:
    """Gated DeltaNet (transformers modeling_qwen3_next.Qwen3NextGatedDeltaNet; Qwen3.5 splits the same
    in_proj_qkvz / in_proj_ba into four): q, k, v, z and b, a projections, a depthwise conv (no bias)
    over q, k and v, dt_bias and A_log per v head, a gated RMSNorm over value_head_dim, out_proj."""
    la = spec.linear
    assert la is not None
    h = spec.hidden_size
    v_dim = la.num_value_heads * la.value_head_dim
    n = h * (la.conv_dim + v_dim + 2 * la.num_value_heads)  # in_proj q, k, v (conv_dim), z, b and a
    n += la.conv_dim * la.conv_kernel  # conv1d, groups = channels
    n += 2 * la.num_value_heads + la.value_head_dim  # dt_bias, A_log, norm
    return n + v_dim * h  # out_proj


def mamba_params(spec: ModelSpec) -> int:
    """Jamba's Mamba mixer (transformers modeling_jamba.JambaMambaMixer)."""
    m = spec.mamba
    assert m is not None
    h, d_inner = spec.hidden_size, m.expand * spec.hidden_size
    n = h * 2 * d_inner  # in_proj: H -> 2*d_inner (x and z)
    n += d_inner * m.d_conv + (d_inner if m.conv_bias else 0)  # depthwise conv1d
    n += d_inner * (m.dt_rank + 2 * m.d_state)  # x_proj, no bias
    n += m.dt_rank * d_inner + d_inner  # dt_proj with bias
    n += d_inner * m.d_state + d_inner  # A_log, D
    n += d_inner * h  # out_proj
    if m.proj_bias:
        n += 2 * d_inner + h
    if m.inner_layernorms:
        n += m.dt_rank + 2 * m.d_state
    return n


def gated_ffn_params(hidden: int, inter: int) -> int:
    """SwiGLU: gate, up and down projections."""
    return 3 * hidden * inter


def expert_params(spec: ModelSpec) -> int:
    """One routed expert; gpt-oss adds biases on gate_up (2I) and down (H)."""
    n = gated_ffn_params(spec.hidden_size, spec.expert_intermediate_size)
    if spec.expert_bias:
        n += 2 * spec.expert_intermediate_size + spec.hidden_size
    return n


def router_params(spec: ModelSpec, layer: LayerSpec | None = None) -> int:
    """The gate (H x E) with its biases; stored correction biases count (DeepSeek-V3 noaux_tc), except
    on DeepSeek-V4's hash-routed layers, whose gate has none."""
    n = spec.hidden_size * spec.num_experts
    if spec.router_bias:
        n += spec.num_experts
    if spec.router_correction_bias and not (layer is not None and layer.hash_routed):
        n += spec.num_experts
    if spec.router_scale:
        n += spec.hidden_size + spec.num_experts  # Gemma 4 router.scale and router.per_expert_scale
    if spec.shared_expert_gate:
        # Qwen2-MoE / Qwen3-Next shared_expert_gate: Linear(H, 1, bias=False). A gate, so it is
        # counted (and kept in 16-bit) with the router, as the counted truth by parameter name does.
        n += spec.hidden_size
    return n


def shared_params(spec: ModelSpec) -> int:
    if not spec.shared_expert_intermediate_size:
        return 0
    return gated_ffn_params(spec.hidden_size, spec.shared_expert_intermediate_size)


def vision_params(spec: ModelSpec) -> int:
    """The vision tower a multimodal wrapper loads beside the text model."""
    v = spec.vision
    if v is None:
        return 0
    if isinstance(v, QwenVisionSpec):
        return _qwen_vision_params(v)
    if isinstance(v, Gemma4VisionSpec):
        return _gemma4_vision_params(v, spec.hidden_size)
    if isinstance(v, SiglipVisionSpec):
        return _siglip_vision_params(v)
    # Llama 4 vision encoder + pixel-shuffle MLP + projector (transformers modeling_llama4).
    d, i = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    n = v.num_channels * v.patch_size**2 * d  # unfold patch embedding, no bias
    n += d + (patches + 1) * d  # class embedding, positional embedding
    n += 2 * 2 * d  # layernorm_pre, layernorm_post
    per_layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 2 * 2 * d
    n += v.num_layers * per_layer
    shuffled = int(d / v.pixel_shuffle_ratio**2)
    n += shuffled * v.projector_input_dim + v.projector_input_dim * v.projector_output_dim
    n += v.vision_output_dim * spec.hidden_size  # multi_modal_projector, no bias
    return n


def _siglip_vision_params(v: SiglipVisionSpec) -> int:
    """SigLIP (transformers modeling_siglip): a patch conv with bias, one learned position per patch,
    encoder blocks of two LayerNorms, q/k/v/o with biases and a 2-layer MLP with biases, a post
    LayerNorm, and the attention-pooling head when used (a probe, nn.MultiheadAttention's packed
    in-projection and out-projection, a LayerNorm and an MLP); then Gemma 3's projector (an RMSNorm of
    the vision width and a vision x text matrix)."""
    d, i = v.hidden_size, v.intermediate_size
    n = v.num_channels * v.patch_size**2 * d + d + (v.image_size // v.patch_size) ** 2 * d
    mlp = (d * i + i) + (i * d + d)
    n += v.num_layers * (2 * 2 * d + 4 * (d * d + d) + mlp) + 2 * d
    if v.use_head:
        n += d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + mlp
    if v.projector_output_dim:
        n += d + d * v.projector_output_dim
    return n


def _qwen_vision_params(v: QwenVisionSpec) -> int:
    """Qwen3-VL / Qwen3.5 vision (transformers modeling_qwen3_vl): Conv3d patch embed with bias, learned
    positions, blocks of LayerNorm, fused qkv and proj with biases and a 2-layer MLP with biases; the
    merger (LayerNorm over d, then (d m^2 -> d m^2 -> out)); each deepstack merger the same with its
    norm after the shuffle (d m^2 wide)."""
    d, i = v.hidden_size, v.intermediate_size
    n = d * v.in_channels * v.temporal_patch_size * v.patch_size**2 + d
    n += v.num_position_embeddings * d
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (i * d + i) + (d * i + d)
    n += v.depth * block
    wide = d * v.spatial_merge_size**2
    mlp = wide * wide + wide + v.out_hidden_size * wide + v.out_hidden_size
    n += 2 * d + mlp
    return n + v.deepstack_layers * (2 * wide + mlp)


def _gemma4_vision_params(v: Gemma4VisionSpec, text_hidden: int) -> int:
    """Gemma 4 vision (transformers modeling_gemma4.Gemma4VisionModel): a 2-axis position table,
    a patch input projection, blocks of q/k/v/o without bias, per-head q/k norms, a gated MLP and four
    norms; embed_vision projects into the text model."""
    d = v.hidden_size
    n = 2 * v.position_embedding_size * d + 3 * v.patch_size**2 * d
    attn = d * v.num_heads * v.head_dim * 2 + d * v.num_kv_heads * v.head_dim * 2 + 2 * v.head_dim
    n += v.num_layers * (attn + 3 * d * v.intermediate_size + 4 * d)
    return n + text_hidden * d


def hyper_connection_params(spec: ModelSpec) -> int:
    """One DeepSeek-V4 mHC mixer (transformers DeepseekV4HyperConnection): fn ((2+m)m x mH), base
    ((2+m)m) and three scales, for m = hc_mult residual streams; each layer has one before attention and
    one before the FFN."""
    m = spec.hc_mult
    if m <= 1:
        return 0
    mix = (2 + m) * m
    return mix * m * spec.hidden_size + mix + 3


def hyper_head_params(spec: ModelSpec) -> int:
    """The mHC head that folds the m streams into one before the final norm (DeepseekV4HyperHead)."""
    m = spec.hc_mult
    return m * m * spec.hidden_size + m + 1 if m > 1 else 0


def layer_params(spec: ModelSpec, layer: LayerSpec) -> dict[str, tuple[int, int]]:
    """(total, active) per component for one decoder layer."""
    out: dict[str, tuple[int, int]] = {}
    mixer = mamba_params(spec) if layer.mixer == "mamba" else attention_params(spec, layer)
    out[MAMBA if layer.mixer == "mamba" else ATTENTION] = (mixer, mixer)
    if layer.ffn == "dense":
        dense = gated_ffn_params(spec.hidden_size, layer.dense_intermediate_size or spec.dense_intermediate_size)
        out[DENSE_FFN] = (dense, dense)
    else:
        router = router_params(spec, layer)
        out[ROUTER] = (router, router)
        shared = shared_params(spec)
        out[SHARED_EXPERTS] = (shared, shared)
        one = expert_params(spec)
        out[ROUTED_EXPERTS] = (spec.num_experts * one, spec.experts_per_token * one)
        if spec.moe_dense_intermediate_size:
            width = layer.dense_intermediate_size or spec.moe_dense_intermediate_size
            beside = gated_ffn_params(spec.hidden_size, width)
            out[DENSE_MLP] = (beside, beside)
    if spec.hc_mult > 1:
        hc = 2 * hyper_connection_params(spec)
        out[HYPER_CONNECTIONS] = (hc, hc)
    if spec.per_layer_input_size:
        # Gemma 4 per_layer_input_gate (H -> P) and per_layer_projection (P -> H).
        ple = 2 * spec.hidden_size * spec.per_layer_input_size
        out[PER_LAYER_EMBEDDING] = (ple, ple)
    norms = spec.norms_per_layer * norm_params(spec, spec.hidden_size)
    out[NORMS] = (norms, norms)
    return out


def per_layer_embedding_params(spec: ModelSpec) -> int:
    """Gemma 3n/4 per-layer embeddings: the table (vocab x layers x P), the model projection
    (H -> layers x P) and its norm (P) (transformers Gemma4TextModel)."""
    p = spec.per_layer_input_size
    if not p:
        return 0
    n = spec.num_layers
    return spec.per_layer_input_vocab * n * p + spec.hidden_size * n * p + p


def mtp_layer_params(spec: ModelSpec) -> int:
    """DeepSeek-V3 MTP module (tech report section 2.2): enorm, hnorm, eh_proj (2H -> H), one MoE
    decoder layer and the shared head's norm. Its embedding and head are shared with the main model.
    DeepSeek-V4's adds its hyper-connection head; Qwen3.5's (fc, two pre-fc norms, norm) has the same count."""
    h = spec.hidden_size
    block = sum(t for t, _ in layer_params(spec, spec.mtp_layer_spec).values())
    return 3 * norm_params(spec, h) + 2 * h * h + block + hyper_head_params(spec)


def count_params(spec: ModelSpec) -> ParamCount:
    totals = dict.fromkeys(COMPONENTS, 0)
    actives = dict.fromkeys(COMPONENTS, 0)
    # Layers repeat: count each distinct layer once and multiply.
    for layer, times in layer_groups(spec):
        for name, (total, active) in layer_params(spec, layer).items():
            totals[name] += times * total
            actives[name] += times * active
    emb = spec.vocab_size * spec.hidden_size
    totals[EMBEDDING] = actives[EMBEDDING] = emb
    totals[PER_LAYER_EMBEDDING] += per_layer_embedding_params(spec)
    actives[PER_LAYER_EMBEDDING] += per_layer_embedding_params(spec)
    totals[HYPER_CONNECTIONS] += hyper_head_params(spec)
    actives[HYPER_CONNECTIONS] += hyper_head_params(spec)
    head = 0 if spec.tie_word_embeddings else emb + (spec.vocab_size if spec.lm_head_bias else 0)
    totals[LM_HEAD] = actives[LM_HEAD] = head
    final_norm = norm_params(spec, spec.hidden_size)
    totals[NORMS] += final_norm
    actives[NORMS] += final_norm
    totals[VISION] = vision_params(spec)  # image tokens only: not in a text token's active path
    components = [
        Component(name=name, total=totals[name], active=actives[name]) for name in COMPONENTS if totals[name]
    ]
    total = sum(totals.values())
    active = sum(actives.values())
    mtp = spec.mtp_layers * mtp_layer_params(spec)
    mtp_copies = spec.mtp_layers * 2 * emb if mtp else 0
    return ParamCount(
        model=spec.name,
        hub_id=spec.hub_id,
        total_params=total,
        active_params=active,
        active_params_excl_input_embedding=active - emb,
        mtp_params=mtp,
        mtp_params_stored=mtp + mtp_copies,
        components=components,
        conventions=CONVENTIONS,
    )


def fmt_billions(n: int | float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 or n == 0 else f"{n / 1e6:,.1f}M"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0

