"""The typed, frozen model spec every other module consumes, and the one reader of HF config keys.

A ModelSpec says only what decides parameters, memory and compute. It is built once at the edge
(from a card or a config.json) and never mutated.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from moeplan.errors import ConfigError

Mixer = Literal["full", "sliding", "chunked", "mamba"]
Ffn = Literal["dense", "moe"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerSpec(_Frozen):
    """One decoder layer: its token mixer (attention kind or Mamba) and its FFN kind."""

    mixer: Mixer = "full"
    # Sliding-window or chunk size in tokens: the KV this layer keeps is capped at it.
    window: PositiveInt | None = None
    ffn: Ffn = "moe"


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


class VisionSpec(_Frozen):
    """Llama 4's vision encoder, pixel-shuffle adapter and projector (transformers modeling_llama4)."""

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


class StoredCheckpoint(_Frozen):
    """What a checkpoint's safetensors headers say it stores (filled by moeplan.hub)."""

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
    attention: Literal["gqa", "mla"] = "gqa"
    mla: MLASpec | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    # per_head: RMSNorm over head_dim (Qwen3, GLM-4.5); full: over the projected q and k (OLMoE);
    # l2: weightless L2 norm (Llama 4).
    qk_norm: Literal["none", "per_head", "full", "l2"] = "none"
    attention_sinks: bool = False  # gpt-oss: one learned logit per head

    norm: Literal["rms", "layernorm", "layernorm_nobias"] = "rms"
    norms_per_layer: PositiveInt = 2  # Grok-1 has four

    layers: tuple[LayerSpec, ...] = Field(min_length=1)

    # FFN and MoE
    dense_intermediate_size: int = Field(0, ge=0)
    num_experts: int = Field(0, ge=0)
    experts_per_token: int = Field(0, ge=0)
    expert_intermediate_size: int = Field(0, ge=0)
    num_shared_experts: int = Field(0, ge=0)
    shared_expert_intermediate_size: int = Field(0, ge=0)  # total width of all shared experts
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(H -> 1) gate on the shared expert
    router_bias: bool = False
    router_correction_bias: bool = False  # DeepSeek-V3 noaux_tc e_score_correction_bias
    expert_bias: bool = False  # gpt-oss experts carry biases
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    mtp_layers: int = Field(0, ge=0)
    mamba: MambaSpec | None = None
    vision: VisionSpec | None = None

    dtype: str = "bfloat16"
    # The checkpoint's quantization_config as shipped (DeepSeek fp8 blocks, gpt-oss mxfp4, ...).
    quantization_config: dict[str, Any] | None = None
    # Set only for specs read from the Hub: what the safetensors headers say is stored.
    checkpoint: StoredCheckpoint | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
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
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if any(layer.mixer == "mamba" for layer in self.layers) and self.mamba is None:
            raise ValueError("mamba layers need the mamba sizes")
        return self

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
    def checkpoint_quant(self) -> str | None:
        """The quantization method the checkpoint ships in ('fp8', 'mxfp4', 'gptq', ...), if any."""
        if not self.quantization_config:
            return None
        method = self.quantization_config.get("quant_method")
        return str(method).lower() if method else None


# ----------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelSpec. The one place that knows HF key names and their aliases.
# ----------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "deepseek_v2", "deepseek_v3", "kimi_k2",
    "olmoe", "dbrx", "phimoe", "gpt_oss", "llama4", "glm4_moe", "granitemoe", "granitemoeshared",
    "hunyuan_v1_moe", "jamba",
)  # fmt: skip


class _Cfg:
    """Looks up config keys with aliases and records what was missing, for one clear error."""

    def __init__(self, raw: dict[str, Any], label: str) -> None:
        self.raw = raw
        self.label = label

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            node: Any = self.raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                return node
        return default

    def which(self, *keys: str) -> str:
        """The alias this config actually uses (for error messages), else the first."""
        return next((k for k in keys if self.get(k) is not None), keys[0])

    def need(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise _Missing(keys[0])
        return value


class _Missing(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _is_whole(value: Any) -> bool:
    """An int, or a float with no fraction; not a bool, NaN or infinity (json reads Infinity, 1e400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or (math.isfinite(value) and value == int(value))


def _positive_int(value: Any, key: str, label: str) -> int:
    return _whole(value, key, label, 1)


def _whole(value: Any, key: str, label: str, minimum: int) -> int:
    """A count or size read from a config (experts, top-k, first dense layers, widths): a whole
    number >= minimum; a missing/null value is the caller's default."""
    if not _is_whole(value):
        raise ConfigError(f"{label}: '{key}' must be a whole number, got {value!r}")
    if value < minimum:
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        raise ConfigError(f"{label}: '{key}' must be {bound}, got {value!r}; fix the config")
    return int(value)


def spec_from_config(
    raw: dict[str, Any],
    *,
    name: str,
    hub_id: str | None = None,
    source: str | None = None,
) -> ModelSpec:
    """Read a Hugging Face config.json (already parsed) into a ModelSpec.

    Raises ConfigError naming the missing or bad keys. `auto_map` and any remote code are ignored:
    only the JSON values are read.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: config.json must be a JSON object, got {type(raw).__name__}")
    label = f"config for {name}"
    model_type = str(raw.get("model_type") or "").lower()
    vision: VisionSpec | None = None
    if model_type == "llama4" and isinstance(raw.get("text_config"), dict):
        # NOTE: Llama 4 wraps the text model in a multimodal config; engines load the vision tower too.
        vision = _llama4_vision(raw.get("vision_config"), raw["text_config"], label)
        text = dict(raw["text_config"])
        text.setdefault("torch_dtype", raw.get("torch_dtype"))
        text.setdefault("quantization_config", raw.get("quantization_config"))
        raw = text
    cfg = _Cfg(raw, label)
    try:
        fields = _read_common(cfg, model_type)
    except (ValueError, TypeError) as exc:
        # pydantic's ValidationError is a ValueError; int() of a string or list raises either.
        detail = first_error(exc) if isinstance(exc, ValueError) else str(exc)
        raise ConfigError(f"{label}: {detail}; fix the config") from None
    except _Missing as missing:
        needed = _missing_keys(cfg, model_type)
        keys = ", ".join(needed) if needed else missing.key
        raise ConfigError(
            f"{label}: missing {keys} (model_type {model_type or 'unset'!r}); "
            "add them to the config or write a model card"
        ) from None
    fields["vision"] = vision
    try:
        return ModelSpec(name=name, hub_id=hub_id, source=source, model_type=model_type or "custom", **fields)
    except ValueError as exc:
        raise ConfigError(f"{label}: {first_error(exc)}") from None


def first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{loc}: {msg}" if loc else msg
    return str(exc)


_COMMON_REQUIRED = {
    "hidden_size": ("hidden_size", "d_model", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layers", "num_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_heads", "n_head"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "ffn_config.moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_top_k", "moe_topk", "ffn_config.moe_top_k")


def _missing_keys(cfg: _Cfg, model_type: str) -> list[str]:
    missing = [names[0] for names in _COMMON_REQUIRED.values() if cfg.get(*names) is None]
    if cfg.get(*_EXPERT_KEYS) is None and model_type not in ("jamba",):
        missing.append("num_local_experts (or num_experts / n_routed_experts)")
    if cfg.get(*_TOPK_KEYS) is None:
        missing.append("num_experts_per_tok")
    if cfg.get("moe_intermediate_size", "intermediate_size", "ffn_config.ffn_hidden_size") is None:
        missing.append("intermediate_size (or moe_intermediate_size)")
    return missing


def _scalar(value: Any) -> Any:
    """Hunyuan writes some per-layer values as lists of equal entries; take the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _read_common(cfg: _Cfg, model_type: str) -> dict[str, Any]:
    label = cfg.label

    def pint(*keys: str) -> int:
        return _positive_int(_scalar(cfg.need(*keys)), keys[0], label)

    hidden = pint(*_COMMON_REQUIRED["hidden_size"])
    n_layers = pint(*_COMMON_REQUIRED["num_hidden_layers"])
    heads = pint(*_COMMON_REQUIRED["num_attention_heads"])
    vocab = pint(*_COMMON_REQUIRED["vocab_size"])
    kv_heads = _positive_int(
        cfg.get("num_key_value_heads", "attn_config.kv_n_heads", "multi_query_group_num", default=heads),
        "num_key_value_heads",
        label,
    )
    # NOTE: Qwen3 and gpt-oss set head_dim apart from hidden/heads; only derive when absent.
    head_dim_raw = cfg.get("head_dim", "attention_head_dim")
    head_dim = _positive_int(head_dim_raw, "head_dim", label) if head_dim_raw else hidden // heads

    f: dict[str, Any] = dict(
        hidden_size=hidden,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default=False)),
        max_position_embeddings=cfg.get("max_position_embeddings", "max_seq_len"),
        dtype=str(cfg.get("torch_dtype", "dtype", default="bfloat16")),
        quantization_config=cfg.get("quantization_config"),
    )
    qc = f["quantization_config"]
    if qc is not None and not isinstance(qc, dict):
        raise ConfigError(f"{label}: 'quantization_config' must be an object, got {qc!r}")

    is_jamba = model_type == "jamba"
    n_experts = _whole(_scalar(cfg.get(*_EXPERT_KEYS, default=0)) or 0, cfg.which(*_EXPERT_KEYS), label, 0)
    if is_jamba and n_experts == 0:
        n_experts = 16  # transformers JambaConfig default
    topk = _whole(_scalar(cfg.need(*_TOPK_KEYS)), cfg.which(*_TOPK_KEYS), label, 1)
    attn_bias = bool(cfg.get("attention_bias", default=False))

    # Expert FFN width. NOTE: Mixtral-style configs reuse intermediate_size for the experts.
    expert_inter_key = ("moe_intermediate_size", "ffn_config.ffn_hidden_size", "intermediate_size")
    expert_inter = _positive_int(_scalar(cfg.need(*expert_inter_key)), "moe_intermediate_size", label)
    dense_inter = int(_scalar(cfg.get("intermediate_size", default=0)) or 0)

    f.update(
        num_experts=n_experts,
        experts_per_token=topk,
        expert_intermediate_size=expert_inter,
        dense_intermediate_size=dense_inter,
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", default=True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", default=1.0)),
    )

    # Per-layer FFN kinds: first-k-dense (DeepSeek, GLM), a MoE step (Qwen, Llama 4), mlp_only_layers.
    first_dense = _whole(cfg.get("first_k_dense_replace", default=0) or 0, "first_k_dense_replace", label, 0)
    step_keys = ("decoder_sparse_step", "moe_layer_freq", "interleave_moe_layer_step")
    step = _whole(cfg.get(*step_keys, default=1) or 1, cfg.which(*step_keys), label, 1)
    mlp_only = set(cfg.get("mlp_only_layers", default=[]) or [])
    moe_layers_list = cfg.get("moe_layers")

    def ffn_kind(i: int) -> Ffn:
        if i < first_dense or i in mlp_only:
            return "dense"
        if moe_layers_list is not None:
            return "moe" if i in set(moe_layers_list) else "dense"
        if model_type == "llama4":
            # transformers Llama4TextConfig: moe_layers = range(step - 1, L, step)
            return "moe" if (i + 1) % step == 0 else "dense"
        if model_type in ("deepseek", "deepseek_v2", "deepseek_v3", "kimi_k2"):
            return "moe" if i % step == 0 else "dense"
        return "moe" if (i + 1) % step == 0 else "dense"  # Qwen2/3-MoE decoder_sparse_step

    mixers: list[tuple[Mixer, int | None]] = [("full", None)] * n_layers
    window = cfg.get("sliding_window")
    use_sliding = cfg.get("use_sliding_window", default=True)
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        # gpt-oss: explicit per-layer attention kinds.
        mixers = [("sliding", int(window)) if t == "sliding_attention" else ("full", None) for t in layer_types]
    elif window and use_sliding and model_type not in ("qwen2_moe", "qwen3_moe"):
        # Mixtral/Phi-3.5-MoE style: one window on every layer (Qwen's max_window_layers logic is
        # only active when use_sliding_window is true).
        mixers = [("sliding", int(window))] * n_layers
    if model_type == "llama4":
        chunk = cfg.get("attention_chunk_size")
        no_rope = cfg.get("no_rope_layers")
        interval = int(cfg.get("no_rope_layer_interval", default=4))
        if not isinstance(no_rope, list) or len(no_rope) != n_layers:
            # transformers Llama4TextConfig: every 4th layer is NoPE with global attention.
            no_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
        if chunk:
            mixers = [("chunked", int(chunk)) if use_rope else ("full", None) for use_rope in no_rope]

    ffns = [ffn_kind(i) for i in range(n_layers)]
    if is_jamba:
        a_period = int(cfg.get("attn_layer_period", default=8))
        a_offset = int(cfg.get("attn_layer_offset", default=4))
        e_period = int(cfg.get("expert_layer_period", default=2))
        e_offset = int(cfg.get("expert_layer_offset", default=1))
        mixers = [("full", None) if i % a_period == a_offset else ("mamba", None) for i in range(n_layers)]
        ffns = ["moe" if i % e_period == e_offset else "dense" for i in range(n_layers)]
        f["expert_intermediate_size"] = dense_inter
        f["mamba"] = MambaSpec(
            d_state=int(cfg.get("mamba_d_state", default=16)),
            d_conv=int(cfg.get("mamba_d_conv", default=4)),
            expand=int(cfg.get("mamba_expand", default=2)),
            dt_rank=int(cfg.get("mamba_dt_rank", default=math.ceil(hidden / 16))),
            conv_bias=bool(cfg.get("mamba_conv_bias", default=True)),
            proj_bias=bool(cfg.get("mamba_proj_bias", default=False)),
        )
    if n_experts == 0:
        ffns = ["dense"] * n_layers
    f["layers"] = tuple(LayerSpec(mixer=m, window=w, ffn=x) for (m, w), x in zip(mixers, ffns))

    _family(cfg, model_type, f)
    return f


def _family(cfg: _Cfg, model_type: str, f: dict[str, Any]) -> None:
    """What each family adds on top of the common keys. Sources: transformers modeling_<type>.py."""
    get = cfg.get
    if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2") or get("kv_lora_rank"):
        f["attention"] = "mla"
        f["mla"] = MLASpec(
            q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=cfg.need("kv_lora_rank"),
            qk_nope_head_dim=cfg.need("qk_nope_head_dim"),
            qk_rope_head_dim=cfg.need("qk_rope_head_dim"),
            v_head_dim=cfg.need("v_head_dim"),
        )
        f["head_dim"] = f["mla"].qk_nope_head_dim + f["mla"].qk_rope_head_dim
    if model_type in ("deepseek", "deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe"):
        n_shared = int(get("n_shared_experts", default=0) or 0)
        f["num_shared_experts"] = n_shared
        f["shared_expert_intermediate_size"] = n_shared * f["expert_intermediate_size"]
        f["o_bias"] = False
        f["router_scoring"] = str(get("scoring_func", default="softmax"))
        f["router_correction_bias"] = get("topk_method") == "noaux_tc" or model_type == "glm4_moe"
        f["mtp_layers"] = int(get("num_nextn_predict_layers", default=0) or 0)
        if model_type == "glm4_moe":
            f["router_scoring"] = "sigmoid"
            f["qk_norm"] = "per_head" if get("use_qk_norm", default=False) else "none"
    elif model_type == "qwen2_moe":
        width = int(get("shared_expert_intermediate_size", default=0) or 0)
        f.update(num_shared_experts=1 if width else 0, shared_expert_intermediate_size=width)
        f.update(shared_expert_gate=bool(width), qkv_bias=True, o_bias=False)
    elif model_type == "qwen3_moe":
        f.update(qk_norm="per_head", o_bias=False)
    elif model_type == "olmoe":
        f.update(qk_norm="full", expert_intermediate_size=f["dense_intermediate_size"])
    elif model_type == "dbrx":
        f.update(norm="layernorm_nobias", tie_word_embeddings=False)
    elif model_type == "phimoe":
        f.update(norm="layernorm", lm_head_bias=bool(get("lm_head_bias", default=False)))
    elif model_type == "gpt_oss":
        f.update(attention_sinks=True, router_bias=True, expert_bias=True)
    elif model_type == "llama4":
        f["qk_norm"] = "l2" if get("use_qk_norm", default=False) else "none"
        f["num_shared_experts"] = 1
        f["shared_expert_intermediate_size"] = f["expert_intermediate_size"]
        f["dense_intermediate_size"] = int(get("intermediate_size_mlp", default=f["dense_intermediate_size"]))
        f["router_scoring"] = "sigmoid"
    elif model_type in ("granitemoe", "granitemoeshared"):
        f["expert_intermediate_size"] = int(cfg.need("intermediate_size"))
        width = int(get("shared_intermediate_size", default=0) or 0)
        f.update(num_shared_experts=1 if width else 0, shared_expert_intermediate_size=width)
    elif model_type in ("hunyuan_v1_moe", "hunyuan"):
        n_shared = int(_scalar(get("num_shared_expert", default=0)) or 0)
        f.update(num_shared_experts=n_shared, qk_norm="per_head" if get("use_qk_norm") else "none")
        f["shared_expert_intermediate_size"] = n_shared * f["expert_intermediate_size"]
        f["o_bias"] = False
    elif model_type == "grok-1":
        f["norms_per_layer"] = 4
    elif model_type in ("mixtral",):
        pass


def _llama4_vision(vc: Any, text: dict[str, Any], label: str) -> VisionSpec | None:
    if not isinstance(vc, dict):
        return None
    try:
        return VisionSpec(
            hidden_size=vc["hidden_size"],
            intermediate_size=vc["intermediate_size"],
            num_layers=vc["num_hidden_layers"],
            patch_size=vc["patch_size"],
            image_size=vc["image_size"],
            num_channels=vc.get("num_channels", 3),
            pixel_shuffle_ratio=vc.get("pixel_shuffle_ratio", 0.5),
            projector_input_dim=vc["projector_input_dim"],
            projector_output_dim=vc["projector_output_dim"],
            vision_output_dim=vc["vision_output_dim"],
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{label}: vision_config is incomplete ({exc}); fix the config") from None
