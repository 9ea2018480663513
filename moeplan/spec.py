"""The typed, frozen model spec every other module consumes.

A ModelSpec says only what decides parameters, memory and compute. It is built once at the edge
(from a card or a config.json) and never mutated. The one reader of HF config keys is moeplan.hf_config
(its names are forwarded from here: `from moeplan.spec import spec_from_config` works).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

# Field, NonNegativeInt and PositiveInt appear only in annotations, read when a class's pydantic twin is
# built (moeplan.record). Importing them is cheap (typer imports pydantic anyway); creating pydantic
# classes is what the twins put off.
from pydantic import Field, NonNegativeInt, PositiveInt

from moeplan.record import Record

Mixer = Literal["full", "sliding", "chunked", "mamba", "linear", "compressed"]
Ffn = Literal["dense", "moe"]


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types a field annotation admits (int, float, bool), through Optional and Annotated."""
    from typing import get_args, get_origin

    if annotation in (int, float, bool):
        return {annotation}
    if get_origin(annotation) is Annotated:
        return _scalar_kinds(get_args(annotation)[0])
    args = get_args(annotation)
    if args and all(a in (int, float, bool, type(None)) or get_origin(a) is Annotated for a in args):
        out: set[type] = set()
        for a in args:
            if a is not type(None):
                out |= _scalar_kinds(a)
        return out
    return set()


def _no_coercion(cls: Any, data: Any) -> Any:
    """pydantic's lax mode turns "64" into 64 and "false" into False; strict mode would also refuse
    the lists YAML gives for tuples. So: refuse strings and bools where a number goes, and anything
    but a bool where a bool goes, before lax mode sees them."""
    if not isinstance(data, dict):
        return data
    for name, field in cls.model_fields.items():
        if name not in data or data[name] is None:
            continue
        value, kinds = data[name], _scalar_kinds(field.annotation)
        if kinds == {bool} and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r:.40}")
        if kinds and kinds <= {int, float} and (isinstance(value, (str, bool))):
            raise ValueError(f"{name} must be a number, got {value!r:.40}")
    return data


def _bounded(self: Any) -> Any:
    """Every whole number at most its bound (_MAX_FIELD, else MAX_WIDTH), but in counted records."""
    if type(self).__record__._counted:
        return self
    for key, value in self.__dict__.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > _MAX_FIELD.get(key, MAX_WIDTH):
            raise ValueError(f"{key} is {value:,}; at most {_MAX_FIELD.get(key, MAX_WIDTH):,} (no model has more)")
    return self


class _Frozen(Record):
    """A spec: user input (a config, a card's `spec:`, a GGUF header), so every instance is validated
    by its pydantic twin (moeplan.record), strictly: "64" is not 64 and "false" is not a bool, no
    infinities or NaN in any float, every whole number bounded (the fit search and the arithmetic stay
    finite). A Record, not a BaseModel, because creating the dozen pydantic classes cost ~12 ms of
    every start-up (issue 17); specs read from the precompiled card index (moeplan.card_index) are
    rebuilt with model_construct, so a plain `fit` never builds a twin."""

    __record_validate__: ClassVar[bool] = True
    __twin_config__: ClassVar[dict[str, Any]] = {"extra": "forbid", "allow_inf_nan": False}
    _counted: ClassVar[bool] = False

    @classmethod
    def __twin_validators__(cls) -> dict[str, Any]:
        from pydantic import model_validator

        return {"_no_coercion": model_validator(mode="before")(classmethod(_no_coercion)),
                "_bounded": model_validator(mode="after")(_bounded)}


class LayerSpec(_Frozen):
    """One decoder layer: its token mixer (attention kind, linear attention or Mamba), its FFN kind,
    and where it differs from the model-wide attention geometry.

    What each mixer keeps per sequence is moeplan.kv_cache's job; this only says what the layer is."""

    mixer: Mixer = "full"
    # Sliding-window or chunk size in tokens: the KV this layer keeps is capped at it. On a
    # compressed layer (DeepSeek-V4) the window of its uncompressed sliding branch.
    window: PositiveInt | None = None
    ffn: Ffn = "moe"
    # NOTE: Gemma 4's global layers use their own KV head count and head_dim
    # (num_global_key_value_heads, global_head_dim); None means the model-wide value.
    kv_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    # Gemma 4 attention_k_eq_v: K is V on this layer (no v_proj); one tensor to cache.
    k_eq_v: bool = False
    # Gemma 3n/4 num_kv_shared_layers: this layer reuses an earlier layer's K/V: no k/v weights, no cache.
    kv_shared: bool = False
    # DeepSeek-V4: one compressed KV row per `compress_ratio` tokens (4: CSA, 128: HCA).
    compress_ratio: PositiveInt | None = None
    # A lightning / DSA indexer on this layer (DeepSeek-V4 CSA layers, DeepSeek-V3.2, GLM-5).
    indexer: bool = False
    # DeepSeek-V4 num_hash_layers: experts chosen by a token-id table, not by the router's top-k.
    hash_routed: bool = False
    # Gemma 4 use_double_wide_mlp: KV-shared layers run a dense MLP twice as wide.
    dense_intermediate_size: PositiveInt | None = None


class MLASpec(_Frozen):
    """Multi-head latent attention (DeepSeek-V2 paper, arXiv:2405.04434, section 2.1)."""

    q_lora_rank: PositiveInt | None  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


class MambaSpec(_Frozen):
    """Mamba-1 mixer sizes as Jamba configures them (transformers modeling_jamba.JambaMambaMixer)."""

    d_state: PositiveInt = 16
    d_conv: PositiveInt = 4
    expand: PositiveInt = 2
    dt_rank: PositiveInt
    conv_bias: bool = True
    proj_bias: bool = False
    # Jamba's dt/B/C RMSNorms inside the mixer.
    inner_layernorms: bool = True


class LinearAttnSpec(_Frozen):
    """Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5/3.6; transformers
    modeling_qwen3_next.Qwen3NextGatedDeltaNet): q/k heads of key_head_dim, v heads of value_head_dim,
    a causal depthwise conv over q, k and v, and a recurrent state per v head."""

    num_key_heads: PositiveInt
    num_value_heads: PositiveInt
    key_head_dim: PositiveInt
    value_head_dim: PositiveInt
    conv_kernel: PositiveInt = 4
    # NOTE: the configs keep the recurrent (SSM) state in fp32 (Qwen3.5/3.6 mamba_ssm_dtype: float32;
    # transformers computes Qwen3-Next's state in fp32 too); the conv state is in the model dtype.
    ssm_state_bytes: float = 4.0
    conv_state_bytes: float = 2.0

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim


class CompressedAttnSpec(_Frozen):
    """DeepSeek-V4 attention (transformers modeling_deepseek_v4.DeepseekV4Attention): shared-KV MQA
    with one KV head of head_dim, low-rank q, a grouped low-rank output projection, one sink logit per
    head, and per layer a compressor that pools every compress_ratio tokens into one KV row (CSA layers
    with overlapping windows and an indexer, HCA layers without)."""

    q_lora_rank: PositiveInt
    o_groups: PositiveInt
    o_lora_rank: PositiveInt
    qk_rope_head_dim: PositiveInt = 64


class IndexerSpec(_Frozen):
    """A sparse-attention indexer: DeepSeek-V3.2 / GLM-5 DSA (one key of head_dim per token, top-k
    selection) and DeepSeek-V4's lightning indexer on CSA layers (keys of compressed rows)."""

    n_heads: PositiveInt
    head_dim: PositiveInt
    topk: PositiveInt


class VisionSpec(_Frozen):
    """Llama 4's vision encoder, pixel-shuffle adapter and projector (transformers modeling_llama4)."""

    kind: Literal["llama4"] = "llama4"
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    patch_size: PositiveInt
    image_size: PositiveInt
    num_channels: PositiveInt = 3
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: PositiveInt
    projector_output_dim: PositiveInt
    vision_output_dim: PositiveInt


class QwenVisionSpec(_Frozen):
    """The Qwen3-VL / Qwen3.5 vision tower (transformers modeling_qwen3_vl.Qwen3VLVisionModel): a 3-D
    patch conv, learned positions, ViT blocks, a 2x2 patch merger and one merger per deepstack layer."""

    kind: Literal["qwen3_vl"] = "qwen3_vl"
    depth: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    patch_size: PositiveInt
    temporal_patch_size: PositiveInt = 2
    in_channels: PositiveInt = 3
    spatial_merge_size: PositiveInt = 2
    out_hidden_size: PositiveInt
    num_position_embeddings: NonNegativeInt = 0
    deepstack_layers: NonNegativeInt = 0


class Gemma4VisionSpec(_Frozen):
    """Gemma 4's vision encoder (transformers modeling_gemma4.Gemma4VisionModel) and its projection
    into the text model (embed_vision)."""

    kind: Literal["gemma4"] = "gemma4"
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    patch_size: PositiveInt
    position_embedding_size: PositiveInt


class SiglipVisionSpec(_Frozen):
    """A SigLIP vision tower (transformers modeling_siglip.SiglipVisionModel) as Gemma 3 loads it, with
    Gemma 3's projector into the text model (Gemma3MultiModalProjector: an RMSNorm over the vision
    width and a bias-free matrix to the text width)."""

    kind: Literal["siglip"] = "siglip"
    hidden_size: PositiveInt = 768  # SiglipVisionConfig defaults
    intermediate_size: PositiveInt = 3072
    num_layers: PositiveInt = 12
    num_channels: PositiveInt = 3
    image_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    use_head: bool = True  # the attention-pooling head; Gemma 3 sets vision_use_head false
    projector_output_dim: NonNegativeInt = 0  # the text width for Gemma 3's projector; 0: no projector


AnyVision = Annotated[VisionSpec | QwenVisionSpec | Gemma4VisionSpec | SiglipVisionSpec, Field(discriminator="kind")]


class StoredCheckpoint(_Frozen):
    """What a checkpoint's safetensors headers say it stores (filled by moeplan.hub)."""

    _counted: ClassVar[bool] = True  # byte and element totals: sums the reader made, not config sizes

    params_by_dtype: dict[str, int]  # safetensors dtype ("BF16", "F8_E4M3", "U8", ...) -> elements
    total_bytes: int  # sum of tensor data bytes over all shards
    num_files: int
    tensor_names_sample: tuple[str, ...] = ()
    # Elements in tensors that the logical count does not include (MTP layers, fp8 scales, ...).
    notes: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(self.params_by_dtype.values())


class ModelSpec(_Frozen):
    name: str
    hub_id: str | None = None
    model_type: str = "custom"
    source: str | None = None

    hidden_size: PositiveInt
    vocab_size: PositiveInt
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    max_position_embeddings: PositiveInt | None = None

    # Attention
    num_attention_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    attention: Literal["gqa", "mla", "compressed"] = "gqa"
    mla: MLASpec | None = None
    compressed: CompressedAttnSpec | None = None
    indexer: IndexerSpec | None = None
    linear: LinearAttnSpec | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    # per_head: RMSNorm over head_dim (Qwen3, GLM-4.5); full: over the projected q and k (OLMoE);
    # l2: weightless L2 norm (Llama 4).
    qk_norm: Literal["none", "per_head", "full", "l2"] = "none"
    attention_sinks: bool = False  # gpt-oss, DeepSeek-V4: one learned logit per head
    # Qwen3-Next / Qwen3.5 attn_output_gate: q_proj also emits a sigmoid gate per head (twice as wide).
    attn_output_gate: bool = False

    norm: Literal["rms", "layernorm", "layernorm_nobias"] = "rms"
    norms_per_layer: PositiveInt = 2  # Grok-1 has four, Gemma 4 MoE seven

    layers: Annotated[tuple[LayerSpec, ...], Field(min_length=1, max_length=1024)]  # MAX_LAYERS

    # FFN and MoE
    dense_intermediate_size: NonNegativeInt = 0
    num_experts: NonNegativeInt = 0
    experts_per_token: NonNegativeInt = 0
    expert_intermediate_size: NonNegativeInt = 0
    num_shared_experts: NonNegativeInt = 0
    shared_expert_intermediate_size: NonNegativeInt = 0  # total width of all shared experts
    shared_expert_gate: bool = False  # Qwen2-MoE / Qwen3-Next: sigmoid(H -> 1) gate on the shared expert
    # Gemma 4: a dense MLP of this width runs beside the experts in every MoE layer, for every token.
    moe_dense_intermediate_size: NonNegativeInt = 0
    router_bias: bool = False
    router_correction_bias: bool = False  # DeepSeek-V3 noaux_tc e_score_correction_bias
    router_scale: bool = False  # Gemma 4: a learned input scale (H) and a scale per expert (E)
    expert_bias: bool = False  # gpt-oss experts carry biases
    router_scoring: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # The dtype the routed experts ship in when it differs from the rest (DeepSeek-V4 expert_dtype: fp4).
    expert_dtype: str | None = None

    # DeepSeek-V4 manifold-constrained hyper-connections: hc_mult residual streams (1: a plain residual).
    hc_mult: PositiveInt = 1
    # Gemma 3n/4 per-layer embeddings: a second table of layers x this width per token.
    per_layer_input_size: NonNegativeInt = 0
    per_layer_input_vocab: NonNegativeInt = 0

    mtp_layers: NonNegativeInt = 0
    # The MTP layer's kind where it differs from a full-attention layer (DeepSeek-V4: sliding only).
    mtp_layer: LayerSpec | None = None
    mamba: MambaSpec | None = None
    vision: AnyVision | None = None

    dtype: str = "bfloat16"
    # The checkpoint's quantization_config as shipped (DeepSeek fp8 blocks, gpt-oss mxfp4, ...).
    quantization_config: dict[str, Any] | None = None
    # Set only for specs read from the Hub: what the safetensors headers say is stored.
    checkpoint: StoredCheckpoint | None = None
    # What the reader could not model or chose to leave out, said once (printed by params/memory).
    notes: tuple[str, ...] = ()

    @classmethod
    def __twin_validators__(cls) -> dict[str, Any]:
        from pydantic import field_validator, model_validator

        return {"_printable": field_validator("name", "model_type", "source", "hub_id", mode="after")(
                    classmethod(_printable)),
                "_check": model_validator(mode="after")(_check_spec)}

    # Derived views, so no caller re-derives them.
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(layer.ffn == "moe" for layer in self.layers)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0

    @property
    def mtp_layer_spec(self) -> LayerSpec:
        """What one MTP layer is: a full-attention decoder layer unless the reader said otherwise."""
        # model_construct: two literal, valid values; validating them would build LayerSpec's pydantic
        # twin in every `fit` of a card read from the precompiled index (issue 17's start-up bound).
        return self.mtp_layer or LayerSpec.model_construct(mixer="full", ffn="moe" if self.is_moe else "dense")

    @property
    def checkpoint_quant(self) -> str | None:
        """The quantization method the checkpoint ships in ('fp8', 'mxfp4', 'gptq', ...), if any."""
        if not self.quantization_config:
            return None
        method = self.quantization_config.get("quant_method")
        return str(method).lower() if method else None


def _printable(cls: Any, value: str | None) -> str | None:
    """Names come from files, folders, cards and the Hub, and every output prints them (tables,
    launch-command comments, CI annotations): control characters are kept as escapes, so a
    newline or a terminal code in a name cannot start a line or drive the terminal."""
    if value is None:
        return None
    from moeplan.escape import printable

    return printable(value)


def _check_spec(self: Any) -> Any:
    """A spec's fields agree with each other (run on ModelSpec's twin after its fields are valid)."""
    has_moe = any(layer.ffn == "moe" for layer in self.layers)
    if has_moe:
        if self.num_experts < 1 or self.experts_per_token < 1 or self.expert_intermediate_size < 1:
            raise ValueError(
                "MoE layers need num_experts, experts_per_token and expert_intermediate_size > 0 "
                f"(got {self.num_experts}, {self.experts_per_token}, {self.expert_intermediate_size})"
            )
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
    if any(layer.ffn == "dense" for layer in self.layers) and self.dense_intermediate_size < 1:
        raise ValueError("dense FFN layers need dense_intermediate_size > 0")
    if self.attention == "mla" and self.mla is None:
        raise ValueError("attention 'mla' needs the mla sizes")
    if self.attention == "compressed" and self.compressed is None:
        raise ValueError("attention 'compressed' needs the compressed sizes")
    for layer in self.layers:
        kv = layer.kv_heads or self.num_kv_heads
        if self.num_attention_heads % kv:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_kv_heads ({kv})"
            )
    kinds = {layer.mixer for layer in self.layers}
    if "mamba" in kinds and self.mamba is None:
        raise ValueError("mamba layers need the mamba sizes")
    if "linear" in kinds and self.linear is None:
        raise ValueError("linear-attention layers need the linear sizes")
    if "compressed" in kinds and (self.compressed is None or any(
            layer.compress_ratio is None for layer in self.layers if layer.mixer == "compressed")):
        raise ValueError("compressed layers need the compressed sizes and a compress_ratio each")
    if any(layer.indexer for layer in self.layers) and self.indexer is None:
        raise ValueError("indexer layers need the indexer sizes")
    return self


# ----------------------------------------------------------------------------------------------
# Bounds on every whole number a spec holds (ModelSpec's twin checks them, and moeplan.hf_config checks
# config values against them before anything reads them): far above any real model, low enough that
# the arithmetic and the fit search stay finite and fast.
# ----------------------------------------------------------------------------------------------

MAX_LAYERS = 1024  # decoder layers; the deepest model here has 126 (Llama 3.1 405B: 126)
MAX_EXPERTS = 65_536  # routed experts per layer; the most here: 384 (Kimi K2)
MAX_VOCAB = 2**24  # the largest vocabulary here: 262,144 (Gemma)
MAX_WIDTH = 2**22  # hidden / FFN / head sizes, head counts, ranks; the widest here: 53,248
MAX_POSITIONS = 2**28  # context-like keys; the longest here: 10,485,760 (Llama 4 Scout)

# ModelSpec fields above MAX_WIDTH's bound.
_MAX_FIELD = {"vocab_size": MAX_VOCAB, "per_layer_input_vocab": MAX_VOCAB, "max_position_embeddings": MAX_POSITIONS,
              "window": MAX_POSITIONS, "num_position_embeddings": MAX_POSITIONS, "topk": MAX_POSITIONS,
              "num_experts": MAX_EXPERTS, "mtp_layers": MAX_LAYERS}


def __getattr__(name: str) -> Any:
    """The Hugging Face config reader (spec_from_config, first_error, the model-type lists, ...) lives in
    moeplan.hf_config, imported the first time one of its names is asked for here: a plain `fit CARD`
    reads no config.json, and loading the reader's code was ~0.5 ms of every start-up (issue 17)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from moeplan import hf_config

    try:
        return getattr(hf_config, name)
    except AttributeError:
        raise AttributeError(f"module 'moeplan.spec' has no attribute {name!r}") from None
