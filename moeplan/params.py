"""Parameter counting by component, total and active.

Method: count every weight tensor the transformers modeling file of each family creates (the same
bucket split torchtitan uses: embedding, attention, dense, router, shared, routed). Active follows
the convention Mixtral/Qwen/DBRX/OLMoE/Llama 4 publish: what one token touches, input embedding and
lm_head included, top-k routed experts plus every shared one. DeepSeek and gpt-oss publish active
without the input embedding; that figure is `active_params_excl_input_embedding`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from moeplan.spec import LayerSpec, ModelSpec

# Component names, in display order. Every other module refers to these strings.
EMBEDDING = "embedding"
ATTENTION = "attention"
MAMBA = "mamba"
DENSE_FFN = "dense_ffn"
ROUTER = "router"
SHARED_EXPERTS = "shared_experts"
ROUTED_EXPERTS = "routed_experts"
NORMS = "norms"
LM_HEAD = "lm_head"
VISION = "vision"
COMPONENTS = (EMBEDDING, ATTENTION, MAMBA, DENSE_FFN, ROUTER, SHARED_EXPERTS, ROUTED_EXPERTS, NORMS, LM_HEAD, VISION)


class Component(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    total: int
    active: int


class ParamCount(BaseModel):
    """`model_dump()` of this is exactly `moeplan params --json`."""

    model_config = ConfigDict(frozen=True)
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


def norm_params(spec: ModelSpec, width: int) -> int:
    """RMSNorm and bias-free LayerNorm hold a weight; LayerNorm also a bias."""
    return 2 * width if spec.norm == "layernorm" else width


def attention_params(spec: ModelSpec) -> int:
    """One attention block, projections plus its internal norms, sinks and biases."""
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
        return q + kv + o
    q_out = spec.num_attention_heads * spec.head_dim
    kv_out = spec.num_kv_heads * spec.head_dim
    n = h * (q_out + 2 * kv_out) + q_out * h
    if spec.qkv_bias:
        n += q_out + 2 * kv_out
    if spec.o_bias:
        n += h
    if spec.qk_norm == "per_head":
        n += 2 * spec.head_dim
    elif spec.qk_norm == "full":
        n += q_out + kv_out
    if spec.attention_sinks:
        n += spec.num_attention_heads
    return n


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


def router_params(spec: ModelSpec) -> int:
    n = spec.hidden_size * spec.num_experts
    if spec.router_bias:
        n += spec.num_experts
    if spec.router_correction_bias:
        n += spec.num_experts
    return n


def shared_params(spec: ModelSpec) -> int:
    if not spec.shared_expert_intermediate_size:
        return 0
    n = gated_ffn_params(spec.hidden_size, spec.shared_expert_intermediate_size)
    if spec.shared_expert_gate:
        n += spec.hidden_size  # Qwen2-MoE shared_expert_gate: Linear(H, 1, bias=False)
    return n


def vision_params(spec: ModelSpec) -> int:
    """Llama 4 vision encoder + pixel-shuffle MLP + projector (transformers modeling_llama4)."""
    v = spec.vision
    if v is None:
        return 0
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


def layer_params(spec: ModelSpec, layer: LayerSpec) -> dict[str, tuple[int, int]]:
    """(total, active) per component for one decoder layer."""
    out: dict[str, tuple[int, int]] = {}
    mixer = mamba_params(spec) if layer.mixer == "mamba" else attention_params(spec)
    out[MAMBA if layer.mixer == "mamba" else ATTENTION] = (mixer, mixer)
    if layer.ffn == "dense":
        dense = gated_ffn_params(spec.hidden_size, spec.dense_intermediate_size)
        out[DENSE_FFN] = (dense, dense)
    else:
        out[ROUTER] = (router_params(spec), router_params(spec))
        shared = shared_params(spec)
        out[SHARED_EXPERTS] = (shared, shared)
        one = expert_params(spec)
        out[ROUTED_EXPERTS] = (spec.num_experts * one, spec.experts_per_token * one)
    norms = spec.norms_per_layer * norm_params(spec, spec.hidden_size)
    out[NORMS] = (norms, norms)
    return out


def mtp_layer_params(spec: ModelSpec) -> int:
    """DeepSeek-V3 MTP module (tech report section 2.2): enorm, hnorm, eh_proj (2H -> H), one MoE
    decoder layer and the shared head's norm. Its embedding and head are shared with the main model."""
    h = spec.hidden_size
    layer = LayerSpec(mixer="full", ffn="moe" if spec.is_moe else "dense")
    block = sum(t for t, _ in layer_params(spec, layer).values())
    return 3 * norm_params(spec, h) + 2 * h * h + block


def count_params(spec: ModelSpec) -> ParamCount:
    totals = dict.fromkeys(COMPONENTS, 0)
    actives = dict.fromkeys(COMPONENTS, 0)
    # Layers repeat: count each distinct layer once and multiply.
    for layer in set(spec.layers):
        times = spec.layers.count(layer)
        for name, (total, active) in layer_params(spec, layer).items():
            totals[name] += times * total
            actives[name] += times * active
    emb = spec.vocab_size * spec.hidden_size
    totals[EMBEDDING] = actives[EMBEDDING] = emb
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

