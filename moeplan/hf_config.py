"""Hugging Face config.json -> ModelSpec: the one place that knows HF key names and their aliases.

Split from moeplan.spec (the spec classes) so that a start-up that reads no config (`fit CARD`, from
the precompiled card index) does not load it; moeplan.spec forwards these names, so
`from moeplan.spec import spec_from_config` still works.
"""

from __future__ import annotations

import math
from typing import Any

from moeplan.errors import ConfigError
from moeplan.spec import (
    MAX_EXPERTS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, CompressedAttnSpec, Ffn, Gemma4VisionSpec,
    IndexerSpec, LayerSpec, LinearAttnSpec, MambaSpec, Mixer, MLASpec, ModelSpec, QwenVisionSpec, SiglipVisionSpec,
    VisionSpec,
)

SUPPORTED_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "deepseek_v2", "deepseek_v3", "kimi_k2",
    "olmoe", "dbrx", "phimoe", "gpt_oss", "llama4", "glm4_moe", "granitemoe", "granitemoeshared",
    "hunyuan_v1_moe", "jamba", "qwen3_next", "qwen3_5_moe", "gemma4", "deepseek_v4", "deepseek_v32",
    "glm_moe_dsa", "minimax_m2",
)  # fmt: skip
# Mixture-of-experts types: a config of one of these without its expert keys is incomplete, not dense.
MOE_MODEL_TYPES = tuple(t for t in SUPPORTED_MODEL_TYPES if t != "gemma4") + ("hunyuan", "grok-1", "minimax")
# Dense types read by the common keys (and any unknown type whose config names no experts).
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gemma4")
# Multimodal wrappers whose text model sits in text_config (transformers *ForConditionalGeneration).
WRAPPER_MODEL_TYPES = (
    "llama4", "qwen3_5_moe", "qwen3_5", "qwen3_vl", "qwen3_vl_moe", "gemma4", "gemma3", "mistral3",
    "llava", "glm4v_moe",
)  # fmt: skip

# ----------------------------------------------------------------------------------------------
# What each config key may hold: the one check every value passes before anything reads it. A
# config is user input (a file, a card, a Hub download): a key holding the wrong kind of value is
# refused with its name rather than coerced (int("64"), bool("false") is True) or left to overflow
# later (10**19 experts, 1e300 layers). Bounds are far above any real model, low enough that the
# arithmetic and the fit search stay finite and fast.
# ----------------------------------------------------------------------------------------------


_BOOL_KEYS = frozenset({
    "attention_bias", "attention_k_eq_v", "attn_output_gate", "enable_moe_block", "lm_head_bias",
    "mamba_conv_bias", "mamba_proj_bias", "norm_topk_prob", "tie_word_embeddings", "use_double_wide_mlp",
    "use_qk_norm", "use_routing_bias", "use_sliding_window", "mlp_bias",
})  # fmt: skip
_FLOAT_KEYS: dict[str, tuple[float, float]] = {
    "routed_scaling_factor": (0.0, 1e6), "pixel_shuffle_ratio": (1e-3, 1.0),
}
_LAYER_COUNT_KEYS = frozenset({
    "num_hidden_layers", "n_layers", "num_layers", "depth", "num_nextn_predict_layers", "mtp_num_hidden_layers",
    "num_mtp_modules", "first_k_dense_replace", "num_kv_shared_layers", "num_hash_layers", "attn_layer_offset",
    "attn_layer_period", "expert_layer_offset", "expert_layer_period", "full_attention_interval",
    "no_rope_layer_interval", "sliding_window_pattern", "decoder_sparse_step", "moe_layer_freq",
    "index_topk_freq", "index_skip_topk_offset",
})  # fmt: skip
_EXPERT_COUNT_KEYS = frozenset({
    "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts_per_tok",
    "experts_per_token", "moe_top_k", "moe_topk", "top_k_experts", "n_shared_experts", "num_shared_expert",
    "num_shared_experts", "n_group", "topk_group",
})  # fmt: skip
_POSITION_KEYS = frozenset({
    "max_position_embeddings", "max_seq_len", "sliding_window", "attention_chunk_size", "index_topk",
    "original_max_position_embeddings", "num_position_embeddings",
})  # fmt: skip
_WIDTH_KEYS = frozenset({
    "hidden_size", "d_model", "intermediate_size", "moe_intermediate_size", "ffn_hidden_size", "ffn_dim",
    "n_inner", "intermediate_size_mlp", "shared_expert_intermediate_size", "shared_intermediate_size",
    "dense_intermediate_size", "num_attention_heads", "n_heads", "num_heads", "num_key_value_heads",
    "kv_n_heads", "multi_query_group_num", "num_global_key_value_heads", "head_dim", "attention_head_dim",
    "global_head_dim", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "o_groups", "o_lora_rank", "hc_mult", "index_n_heads", "index_head_dim", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_value_head_dim",
    "mamba_d_conv", "mamba_d_state", "mamba_dt_rank", "mamba_expand", "hidden_size_per_layer_input",
    "compress_rate_csa", "compress_rate_hca", "compressed_sparse_attention", "heavily_compressed_attention",
    "patch_size", "image_size", "num_channels", "in_channels", "out_hidden_size", "temporal_patch_size",
    "spatial_merge_size", "position_embedding_size", "projector_input_dim", "projector_output_dim",
    "vision_output_dim",
})  # fmt: skip
_INT_KEY_MAX: dict[str, int] = {
    **{k: MAX_LAYERS for k in _LAYER_COUNT_KEYS}, **{k: MAX_EXPERTS for k in _EXPERT_COUNT_KEYS},
    **{k: MAX_POSITIONS for k in _POSITION_KEYS}, **{k: MAX_WIDTH for k in _WIDTH_KEYS},
    "vocab_size": MAX_VOCAB, "vocab_size_per_layer_input": MAX_VOCAB,
}
# Lists of layer indexes or per-layer values: each entry a whole number, at most MAX_LAYERS entries.
_LAYER_LIST_KEYS = frozenset({"mlp_only_layers", "moe_layers", "no_rope_layers", "compress_ratios",
                              "deepstack_visual_indexes", "layer_types", "mlp_layer_types", "indexer_types",
                              "index_topk_pattern"})
_MAX_CONFIG_NODES = 100_000


def check_config_values(raw: Any, label: str) -> None:
    """Refuse any value of a known key that is not what the key holds, and any number anywhere that
    no config has (non-finite, or with more digits than any size). Walks text_config/vision_config
    and every other nested mapping; iterative, so nesting cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", raw)]
    seen = 0
    while stack:
        key, value = stack.pop()
        seen += 1
        if seen > _MAX_CONFIG_NODES:
            raise ConfigError(f"{label}: more than {_MAX_CONFIG_NODES:,} values; not a model config")
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
            continue
        if isinstance(value, list):
            if name in _LAYER_LIST_KEYS and len(value) > 4 * MAX_LAYERS:
                raise ConfigError(f"{label}: '{key}' has {len(value):,} entries; at most {4 * MAX_LAYERS:,}")
            if name in _INT_KEY_MAX:  # Hunyuan writes per-layer lists of one value
                stack.extend((key, v) for v in value)
            else:
                stack.extend((f"{key}[]", v) for v in value)
            continue
        if value is None:
            continue
        if name not in _INT_KEY_MAX:
            _check_number(value, key, label)
        if name in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise ConfigError(f"{label}: '{key}' must be true or false, got {value!r}; fix the config")
        elif name in _FLOAT_KEYS:
            lo, hi = _FLOAT_KEYS[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"{label}: '{key}' must be a number from {lo:g} to {hi:g}, got {value!r}")
        elif name in _INT_KEY_MAX:
            if name == "sliding_window" and value is False:
                continue  # some configs write false for "no window"
            _whole(value, key, label, 0, _INT_KEY_MAX[name])
        elif name.endswith("[]") and name[:-2] in _LAYER_LIST_KEYS and not isinstance(value, str):
            _whole(value, key, label, 0, MAX_POSITIONS)


def _check_number(value: Any, key: str, label: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{label}: '{key}' is {value!r}; a config holds finite numbers only")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        raise ConfigError(f"{label}: '{key}' is a {len(str(abs(value))):,}-digit number, beyond any size a model has")


class _Cfg:
    """Looks up config keys with aliases and records what was missing, for one clear error."""

    def __init__(self, raw: dict[str, Any], label: str) -> None:
        self.raw = raw
        self.label = label

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            node: Any = self.raw
            parts = key.split(".")
            for depth, part in enumerate(parts):
                if node is not None and not isinstance(node, dict):  # dbrx attn_config: [1]
                    raise ConfigError(f"{self.label}: '{'.'.join(parts[:depth])}' must be an object (it holds "
                                      f"{key}), got {type(node).__name__}; fix the config")
                if node is None or part not in node:
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


def _whole(value: Any, key: str, label: str, minimum: int, maximum: int | None = None) -> int:
    """A count or size read from a config (experts, top-k, first dense layers, widths): a whole
    number >= minimum and <= maximum (the key's bound in _INT_KEY_MAX by default); a missing/null
    value is the caller's default."""
    if not _is_whole(value):
        raise ConfigError(f"{label}: '{key}' must be a whole number, got {value!r:.40}")
    if value < minimum:
        bound = "positive" if minimum == 1 else f"at least {minimum}"
        raise ConfigError(f"{label}: '{key}' must be {bound}, got {value!r}; fix the config")
    top = maximum if maximum is not None else _INT_KEY_MAX.get(key.rsplit(".", 1)[-1], MAX_POSITIONS)
    if value > top:
        raise ConfigError(f"{label}: '{key}' is {int(value):,}; moeplan reads at most {top:,} (no model has more)")
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
    check_config_values(raw, label)
    model_type = str(raw.get("model_type") or "").lower()
    cfg = _Cfg(raw, label)
    try:
        text, family, vision, notes = _unwrap(raw, model_type, label)
        cfg = _Cfg(text, label)
        fields = _read_common(cfg, family)
    except (ValueError, TypeError, ArithmeticError) as exc:
        # pydantic's ValidationError is a ValueError; int() of a string or list raises either; a
        # zero where a divisor goes (a head count of 0 in a vision_config) is an ArithmeticError.
        detail = first_error(exc) if isinstance(exc, ValueError) else str(exc)
        raise ConfigError(f"{label}: {detail}; fix the config") from None
    except _Missing as missing:
        needed = _missing_keys(cfg, family)
        keys = ", ".join(needed) if needed else missing.key
        raise ConfigError(
            f"{label}: missing {keys} (model_type {model_type or 'unset'!r}); "
            "add them to the config or write a model card"
        ) from None
    fields["vision"] = vision
    fields["notes"] = tuple(notes) + tuple(fields.get("notes", ()))
    try:
        return ModelSpec(name=name, hub_id=hub_id, source=source, model_type=model_type or "custom", **fields)
    except ValueError as exc:
        raise ConfigError(f"{label}: {first_error(exc)}") from None


def _unwrap(
    raw: dict[str, Any], model_type: str, label: str
) -> tuple[dict[str, Any], str, VisionSpec | QwenVisionSpec | Gemma4VisionSpec | None, list[str]]:
    """A multimodal wrapper's text model, its family name and its vision tower.

    NOTE: Llama 4, Qwen3.5/3.6 and Gemma 4 ship *ForConditionalGeneration configs whose text model
    sits in text_config; engines load the vision tower beside it, so it is counted as its own
    component. The family is the text model's type without its `_text` suffix."""
    text_config = raw.get("text_config")
    if text_config is None:
        arch = " ".join(str(a) for a in raw.get("architectures") or [] if isinstance(a, str))
        if "hidden_size" not in raw and (model_type in WRAPPER_MODEL_TYPES or "ForConditionalGeneration" in arch):
            raise ConfigError(
                f"{label}: a multimodal wrapper (model_type {model_type!r}) without a text_config; "
                "give the config.json that holds text_config, or the text model's own config"
            )
        return raw, model_type.removesuffix("_text"), None, []
    if not isinstance(text_config, dict):
        raise ConfigError(f"{label}: 'text_config' must be an object, got {text_config!r}; fix the config")
    text = dict(text_config)
    # The wrapper holds what the text model inherits: dtype, the checkpoint's quantization, tying.
    for key in ("torch_dtype", "dtype", "quantization_config", "tie_word_embeddings"):
        if text.get(key) is None and raw.get(key) is not None:
            text[key] = raw[key]
    inner = str(text.get("model_type") or model_type).lower()
    family = inner.removesuffix("_text") or model_type
    notes: list[str] = []
    vc = raw.get("vision_config")
    vision: VisionSpec | QwenVisionSpec | Gemma4VisionSpec | SiglipVisionSpec | None = None
    if family == "llama4" or model_type == "llama4":
        family = "llama4"
        vision = _llama4_vision(vc, text, label)
    elif isinstance(vc, dict):
        vision = _wrapped_vision(vc, family, text, label)
        if vision is None:
            notes.append(f"vision tower not counted: vision_config ({vc.get('model_type', 'unknown')}) gives no sizes")
    return text, family, vision, notes


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
_TOPK_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_top_k", "moe_topk", "top_k_experts",
              "ffn_config.moe_top_k")


def _missing_keys(cfg: _Cfg, model_type: str) -> list[str]:
    missing = [names[0] for names in _COMMON_REQUIRED.values() if cfg.get(*names) is None]
    moe = model_type in MOE_MODEL_TYPES or cfg.get(*_EXPERT_KEYS) is not None
    if moe and cfg.get(*_EXPERT_KEYS) is None and model_type not in ("jamba",):
        missing.append("num_local_experts (or num_experts / n_routed_experts)")
    if moe and cfg.get(*_TOPK_KEYS) is None:
        missing.append("num_experts_per_tok")
    if cfg.get("moe_intermediate_size", "intermediate_size", "ffn_config.ffn_hidden_size") is None:
        missing.append("intermediate_size (or moe_intermediate_size)")
    return missing


def _scalar(value: Any) -> Any:
    """Hunyuan writes some per-layer values as lists of equal entries; take the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


# layer_types entries -> (mixer, extra LayerSpec fields). Sources: transformers configuration_<type>.py.
_LAYER_KINDS: dict[str, tuple[Mixer, dict[str, Any]]] = {
    "full_attention": ("full", {}),
    "sliding_attention": ("sliding", {}),
    "chunked_attention": ("chunked", {}),
    "linear_attention": ("linear", {}),  # Gated DeltaNet (qwen3_next, qwen3_5_moe)
    "indexed_attention": ("full", {"indexer": True}),  # GLM-5 DSA
    "compressed_sparse_attention": ("compressed", {"indexer": True}),  # DeepSeek-V4 CSA
    "heavily_compressed_attention": ("compressed", {}),  # DeepSeek-V4 HCA
}


def _read_common(cfg: _Cfg, model_type: str) -> dict[str, Any]:
    label = cfg.label

    def pint(*keys: str) -> int:  # model sizes: one number each (Hunyuan's lists are per-layer FFN values)
        return _positive_int(cfg.need(*keys), keys[0], label)

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
    if model_type == "gemma4" and not cfg.get("enable_moe_block", default=False):
        n_experts = 0  # Gemma 4 dense sizes (E2B, E4B, 31B): no expert block
    # A dense model: a dense type, or any type that is not a known MoE and names no experts at all.
    dense = n_experts == 0 and not is_jamba and (
        model_type in DENSE_MODEL_TYPES or (model_type not in MOE_MODEL_TYPES and cfg.get(*_TOPK_KEYS) is None))
    attn_bias = bool(cfg.get("attention_bias", default=False))
    dense_inter = int(_scalar(cfg.get("intermediate_size", default=0)) or 0)
    if dense:  # (dense implies no experts were named)
        topk, expert_inter = 0, 0
        dense_inter = _positive_int(_scalar(cfg.need("intermediate_size", "ffn_dim", "n_inner")), "intermediate_size",
                                    label)
    else:  # experts named, or a MoE type whose expert keys are missing (cfg.need says which)
        topk = _whole(_scalar(cfg.need(*_TOPK_KEYS)), cfg.which(*_TOPK_KEYS), label, 1)
        # Expert FFN width. NOTE: Mixtral-style configs reuse intermediate_size for the experts.
        expert_inter_key = ("moe_intermediate_size", "ffn_config.ffn_hidden_size", "intermediate_size")
        expert_inter = _positive_int(_scalar(cfg.need(*expert_inter_key)), "moe_intermediate_size", label)

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
    raw_step = cfg.get(*step_keys)  # 0 is an error, not "every layer" (it divides layer indices)
    step = 1 if raw_step is None else _whole(raw_step, cfg.which(*step_keys), label, 1)
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

    mixers: list[tuple[Mixer, int | None, dict[str, Any]]] = [("full", None, {})] * n_layers
    window = _window(cfg.get("sliding_window"), label)
    use_sliding = _flag(cfg.get("use_sliding_window", default=True), "use_sliding_window", label)
    layer_types = _layer_types(cfg, model_type, n_layers, label)
    if layer_types is not None:
        mixers = []
        for i, kind in enumerate(layer_types):
            mixer, extra = _LAYER_KINDS[kind]
            if mixer == "sliding" and window is None:
                raise ConfigError(f"{label}: layer_types[{i}] is {kind!r} but the config has no sliding_window")
            mixers.append((mixer, window if mixer in ("sliding", "compressed") else None, dict(extra)))
    elif window and use_sliding and model_type not in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe"):
        # Mixtral/Phi-3.5-MoE style: one window on every layer (Qwen's max_window_layers logic is
        # only active when use_sliding_window is true).
        mixers = [("sliding", window, {})] * n_layers
    if model_type == "llama4":
        chunk = cfg.get("attention_chunk_size")
        no_rope = cfg.get("no_rope_layers")
        interval = _positive_int(cfg.get("no_rope_layer_interval", default=4), "no_rope_layer_interval", label)
        if not isinstance(no_rope, list) or len(no_rope) != n_layers:
            # transformers Llama4TextConfig: every 4th layer is NoPE with global attention.
            no_rope = [int((i + 1) % interval != 0) for i in range(n_layers)]
        if chunk:
            chunk = _positive_int(chunk, "attention_chunk_size", label)
            mixers = [("chunked", chunk, {}) if use_rope else ("full", None, {}) for use_rope in no_rope]

    ffns = [ffn_kind(i) for i in range(n_layers)]
    if is_jamba:
        a_period = _positive_int(cfg.get("attn_layer_period", default=8), "attn_layer_period", label)
        a_offset = _whole(cfg.get("attn_layer_offset", default=4), "attn_layer_offset", label, 0)
        e_period = _positive_int(cfg.get("expert_layer_period", default=2), "expert_layer_period", label)
        e_offset = _whole(cfg.get("expert_layer_offset", default=1), "expert_layer_offset", label, 0)
        mixers = [("full", None, {}) if i % a_period == a_offset else ("mamba", None, {}) for i in range(n_layers)]
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
    f["layers"] = [dict(mixer=m, window=w, ffn=x, **extra) for (m, w, extra), x in zip(mixers, ffns)]

    _family(cfg, model_type, f)
    f["layers"] = tuple(LayerSpec(**layer) for layer in f["layers"])
    return f


def _window(value: Any, label: str) -> int | None:
    if value is None or value is False:
        return None
    return _positive_int(value, "sliding_window", label)


def _flag(value: Any, key: str, label: str) -> bool:
    """A JSON boolean; a string such as "false" is refused rather than read as true."""
    if isinstance(value, bool):
        return value
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise ConfigError(f"{label}: '{key}' must be true or false, got {value!r}; fix the config")


def _layer_types(cfg: _Cfg, model_type: str, n_layers: int, label: str) -> list[str] | None:
    """The per-layer attention kinds: `layer_types`, else the family's schedule key, else None."""
    raw = cfg.get("layer_types")
    mtp = int(cfg.get("num_nextn_predict_layers", default=0) or 0) if model_type == "deepseek_v4" else 0
    if raw is None and model_type == "deepseek_v4" and cfg.get("compress_ratios") is not None:
        raw = _compress_ratio_types(cfg, n_layers + mtp, label)
    if raw is None and model_type in ("qwen3_next", "qwen3_5_moe", "qwen3_5"):
        # transformers Qwen3NextConfig: layer i is full attention iff (i + 1) % interval == 0.
        interval = _positive_int(cfg.get("full_attention_interval", default=4), "full_attention_interval", label)
        raw = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if raw is None and model_type == "deepseek_v4":
        # transformers DeepseekV4Config default: two HCA layers, then CSA/HCA interleaved.
        raw = ["heavily_compressed_attention"] * min(n_layers, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(n_layers - 2)]
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise ConfigError(f"{label}: 'layer_types' must be a list of names, got {raw!r}; fix the config")
    # DeepSeek-V4 lists its MTP layer after the decoder layers (transformers keeps the first n).
    if len(raw) not in (n_layers, n_layers + mtp):
        raise ConfigError(
            f"{label}: layer_types has {len(raw)} entries for {n_layers} layers"
            + (f" (+{mtp} MTP)" if mtp else "") + "; fix the config"
        )
    for i, kind in enumerate(raw):
        if kind not in _LAYER_KINDS:
            raise ConfigError(
                f"{label}: unknown layer kind {kind!r} at layer_types[{i}]; moeplan knows "
                f"{', '.join(_LAYER_KINDS)}"
            )
    return raw[:n_layers] if len(raw) > n_layers else raw


# expert_dtype values moeplan sizes: FP4 experts (DeepSeek-V4's e2m1 with a ue8m0 scale per 32, as
# quant.py's fp4-experts), or FP8 like the rest of the checkpoint.
EXPERT_DTYPES = ("fp4", "mxfp4", "fp8")


def _compress_ratio_types(cfg: _Cfg, expected: int, label: str) -> list[str]:
    """DeepSeek-V4's legacy compress_ratios (0: sliding only, else the CSA or HCA rate) as layer kinds."""
    ratios = cfg.get("compress_ratios")
    n = int(cfg.get("num_hidden_layers") or 0)
    if not isinstance(ratios, list):
        raise ConfigError(f"{label}: compress_ratios must be a list with one rate per layer ({n}, or {expected} "
                          f"with the MTP layer), got {type(ratios).__name__} {ratios!r}; fix the config")
    if len(ratios) not in (n, expected):
        raise ConfigError(
            f"{label}: compress_ratios has {len(ratios)} entries for {n} layers (+{expected - n} MTP); fix the config"
        )
    rates = cfg.get("compress_rates") or {}
    csa = _positive_int(rates.get("compressed_sparse_attention", cfg.get("compress_rate_csa", default=4)),
                        "compress_rate_csa", label)
    hca = _positive_int(rates.get("heavily_compressed_attention", cfg.get("compress_rate_hca", default=128)),
                        "compress_rate_hca", label)
    names = {0: "sliding_attention", csa: "compressed_sparse_attention", hca: "heavily_compressed_attention"}
    out = []
    for i, r in enumerate(ratios):
        if not _is_whole(r) or int(r) not in names:
            raise ConfigError(
                f"{label}: compress_ratios[{i}] is {r!r}; DeepSeek-V4 layers take 0 (sliding only), "
                f"{csa} (CSA) or {hca} (HCA)"
            )
        out.append(names[int(r)])
    return out


def _family(cfg: _Cfg, model_type: str, f: dict[str, Any]) -> None:
    """What each family adds on top of the common keys. Sources: transformers modeling_<type>.py."""
    get = cfg.get
    label = cfg.label
    if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa") or (
            get("kv_lora_rank") and model_type != "deepseek_v4"):
        f["attention"] = "mla"
        f["mla"] = MLASpec(
            q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=cfg.need("kv_lora_rank"),
            qk_nope_head_dim=cfg.need("qk_nope_head_dim"),
            qk_rope_head_dim=cfg.need("qk_rope_head_dim"),
            v_head_dim=cfg.need("v_head_dim"),
        )
        f["head_dim"] = f["mla"].qk_nope_head_dim + f["mla"].qk_rope_head_dim
    if model_type in ("deepseek_v32", "glm_moe_dsa"):
        _dsa_indexer(cfg, f)
    if model_type in ("deepseek", "deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe", "deepseek_v32", "glm_moe_dsa",
                      "deepseek_v4"):
        n_shared = int(get("n_shared_experts", default=0) or 0)
        f["num_shared_experts"] = n_shared
        f["shared_expert_intermediate_size"] = n_shared * f["expert_intermediate_size"]
        f["o_bias"] = False
        f["router_scoring"] = str(get("scoring_func", default="softmax"))
        # transformers' DeepSeek-V3.2 and GLM routers always store e_score_correction_bias.
        f["router_correction_bias"] = get("topk_method") == "noaux_tc" or model_type in (
            "glm4_moe", "glm_moe_dsa", "deepseek_v32")
        f["mtp_layers"] = int(get("num_nextn_predict_layers", default=0) or 0)
        if model_type in ("glm4_moe", "glm_moe_dsa"):
            f["router_scoring"] = "sigmoid"
        if model_type == "glm4_moe":
            f["qk_norm"] = "per_head" if get("use_qk_norm", default=False) else "none"
        if model_type == "deepseek_v4":
            _deepseek_v4(cfg, f)
    elif model_type == "qwen2_moe":
        width = int(get("shared_expert_intermediate_size", default=0) or 0)
        f.update(num_shared_experts=1 if width else 0, shared_expert_intermediate_size=width)
        f.update(shared_expert_gate=bool(width), qkv_bias=True, o_bias=False)
    elif model_type in ("qwen3_moe", "qwen3", "qwen3_vl_moe", "qwen3_vl"):  # Qwen3-VL text: Qwen3's attention
        f.update(qk_norm="per_head", o_bias=False)
    elif model_type == "qwen2":
        f.update(qkv_bias=True, o_bias=False)
    elif model_type in ("gemma", "gemma2", "gemma3"):
        _gemma_dense(cfg, f, model_type)
    elif model_type in ("qwen3_next", "qwen3_5_moe", "qwen3_5"):
        _qwen3_next(cfg, f, model_type)
    elif model_type == "gemma4":
        _gemma4(cfg, f)
    elif model_type == "minimax_m2":
        # transformers MiniMaxM2: q_norm/k_norm over all heads (qk_norm_type per_layer), sigmoid router
        # with e_score_correction_bias (use_routing_bias); MTP modules apart.
        full = get("use_qk_norm", default=True) and get("qk_norm_type", default="per_layer") == "per_layer"
        f.update(qk_norm="full" if full else "per_head", router_scoring="sigmoid",
                 router_correction_bias=bool(get("use_routing_bias", default=True)), o_bias=False)
        f["mtp_layers"] = _whole(get("num_mtp_modules", default=0) or 0, "num_mtp_modules", label, 0)
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
    # MTP under the newer keys (Qwen3.5/3.6 mtp_num_hidden_layers; GLM-5 num_nextn_predict_layers).
    if not f.get("mtp_layers"):
        mtp = get("mtp_num_hidden_layers", "num_nextn_predict_layers", default=0) or 0
        f["mtp_layers"] = _whole(mtp, cfg.which("mtp_num_hidden_layers", "num_nextn_predict_layers"), label, 0)


def _dsa_indexer(cfg: _Cfg, f: dict[str, Any]) -> None:
    """DeepSeek-V3.2 / GLM-5 DSA: an indexer (wq_b, wk, k LayerNorm, weights_proj) on each layer whose
    indexer_types entry is "full"; "shared" layers reuse the previous top-k (transformers glm_moe_dsa)."""
    label = cfg.label
    f["indexer"] = IndexerSpec(
        n_heads=_positive_int(cfg.need("index_n_heads"), "index_n_heads", label),
        head_dim=_positive_int(cfg.need("index_head_dim"), "index_head_dim", label),
        topk=_positive_int(cfg.need("index_topk"), "index_topk", label),
    )
    n = len(f["layers"])
    kinds = cfg.get("indexer_types")
    if kinds is None:
        pattern = cfg.get("index_topk_pattern")
        if isinstance(pattern, str):
            kinds = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
        else:
            freq = max(int(cfg.get("index_topk_freq", default=1) or 1), 1)
            offset = int(cfg.get("index_skip_topk_offset", default=2) or 0)
            kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in ("full", "shared") for k in kinds):
        raise ConfigError(f"{label}: indexer_types must list 'full' or 'shared' for each of the {n} layers")
    for layer, kind in zip(f["layers"], kinds):
        layer["indexer"] = kind == "full"


def _deepseek_v4(cfg: _Cfg, f: dict[str, Any]) -> None:
    """DeepSeek-V4 (transformers modeling_deepseek_v4; DeepSeek-V4 tech report section 2): compressed
    MQA, hash-routed first layers, hyper-connections and FP4 experts."""
    label = cfg.label
    get = cfg.get
    f["attention"] = "compressed"
    f["attention_sinks"] = True
    f["num_kv_heads"] = 1  # shared-KV MQA
    f["compressed"] = CompressedAttnSpec(
        q_lora_rank=_positive_int(cfg.need("q_lora_rank"), "q_lora_rank", label),
        o_groups=_positive_int(cfg.need("o_groups"), "o_groups", label),
        o_lora_rank=_positive_int(cfg.need("o_lora_rank"), "o_lora_rank", label),
        qk_rope_head_dim=_positive_int(get("qk_rope_head_dim", default=64), "qk_rope_head_dim", label),
    )
    if f["num_attention_heads"] % f["compressed"].o_groups:
        raise ConfigError(f"{label}: num_attention_heads ({f['num_attention_heads']}) must be a multiple of "
                          f"o_groups ({f['compressed'].o_groups})")
    if any(layer.get("indexer") for layer in f["layers"]):
        f["indexer"] = IndexerSpec(
            n_heads=_positive_int(cfg.need("index_n_heads"), "index_n_heads", label),
            head_dim=_positive_int(cfg.need("index_head_dim"), "index_head_dim", label),
            topk=_positive_int(cfg.need("index_topk"), "index_topk", label),
        )
    rates = get("compress_rates") or {}
    csa = int(rates.get("compressed_sparse_attention", get("compress_rate_csa", default=4)))
    hca = int(rates.get("heavily_compressed_attention", get("compress_rate_hca", default=128)))
    window = f["layers"][0]["window"] if f["layers"] else None
    if window is None:
        window = _positive_int(cfg.need("sliding_window"), "sliding_window", label)
    for layer in f["layers"]:
        layer["window"] = window
        if layer["mixer"] == "compressed":
            layer["compress_ratio"] = csa if layer.get("indexer") else hca
    n_hash = get("num_hash_layers")
    mlp_types = get("mlp_layer_types")
    if isinstance(mlp_types, list):
        if len(mlp_types) < len(f["layers"]) or any(t not in ("hash_moe", "moe") for t in mlp_types):
            raise ConfigError(f"{label}: mlp_layer_types must list 'hash_moe' or 'moe' for every layer")
        hashed = [t == "hash_moe" for t in mlp_types[: len(f["layers"])]]
    else:
        k = _whole(3 if n_hash is None else n_hash, "num_hash_layers", label, 0)  # transformers default 3
        if k > len(f["layers"]):
            raise ConfigError(f"{label}: num_hash_layers is {k}, more than the {len(f['layers'])} decoder layers; "
                              "fix the config")
        hashed = [i < k for i in range(len(f["layers"]))]
    for layer, h in zip(f["layers"], hashed):
        layer["hash_routed"] = h
    f["hc_mult"] = _positive_int(get("hc_mult", default=1), "hc_mult", label)
    expert_dtype = get("expert_dtype", "quantization_config.expert_dtype")
    f["expert_dtype"] = str(expert_dtype).lower() if expert_dtype else None
    if f["expert_dtype"] not in (None, *EXPERT_DTYPES):
        raise ConfigError(f"{label}: expert_dtype {str(expert_dtype)[:40]!r} is not one moeplan sizes (it knows "
                          f"{', '.join(EXPERT_DTYPES)}); fix the config or pass --quant")
    # The MTP layer: compress_ratios' entry after the decoder layers (0: sliding only, as Pro ships it).
    ratios = get("compress_ratios")
    extra = ratios[len(f["layers"])] if isinstance(ratios, list) and len(ratios) > len(f["layers"]) else 0
    f["mtp_layer"] = LayerSpec(mixer="sliding" if not extra else "compressed", window=window,
                               compress_ratio=extra or None, indexer=extra == csa, ffn="moe")
    # noaux_tc's correction bias sits on the top-k routers only; the hash layers' gate has none.
    f["router_correction_bias"] = get("topk_method", default="noaux_tc") == "noaux_tc"


def _qwen3_next(cfg: _Cfg, f: dict[str, Any], model_type: str) -> None:
    """Qwen3-Next / Qwen3.5 / Qwen3.6 (transformers modeling_qwen3_next, modeling_qwen3_5_moe): Gated
    DeltaNet linear attention on 3 of 4 layers, gated full attention with per-head q/k norms on the
    rest, and a shared expert behind a sigmoid gate."""
    label = cfg.label
    get = cfg.get
    f["linear"] = LinearAttnSpec(
        num_key_heads=_positive_int(cfg.need("linear_num_key_heads"), "linear_num_key_heads", label),
        num_value_heads=_positive_int(cfg.need("linear_num_value_heads"), "linear_num_value_heads", label),
        key_head_dim=_positive_int(cfg.need("linear_key_head_dim"), "linear_key_head_dim", label),
        value_head_dim=_positive_int(cfg.need("linear_value_head_dim"), "linear_value_head_dim", label),
        conv_kernel=_positive_int(get("linear_conv_kernel_dim", default=4), "linear_conv_kernel_dim", label),
        ssm_state_bytes=_dtype_bytes(get("mamba_ssm_dtype", default="float32"), "mamba_ssm_dtype", label),
        conv_state_bytes=_dtype_bytes(get("torch_dtype", "dtype", default="bfloat16"), "dtype", label),
    )
    # NOTE: Qwen3-Next configs carry no attn_output_gate key; its attention always gates (q_proj 2x).
    gate = get("attn_output_gate", default=True)
    f["attn_output_gate"] = _flag(gate, "attn_output_gate", label)
    width = _whole(get("shared_expert_intermediate_size", default=0) or 0, "shared_expert_intermediate_size",
                   label, 0)
    f.update(num_shared_experts=1 if width else 0, shared_expert_intermediate_size=width,
             shared_expert_gate=bool(width), qk_norm="per_head", o_bias=False)
    if model_type == "qwen3_next" and get("num_nextn_predict_layers", "mtp_num_hidden_layers") is None:
        # NOTE: Qwen3-Next checkpoints ship one MTP layer (mtp.* tensors; vLLM's qwen3_next_mtp) that
        # the config does not name.
        f["mtp_layers"] = 1


def _dtype_bytes(value: Any, key: str, label: str) -> float:
    sizes = {"float32": 4.0, "fp32": 4.0, "float": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
             "half": 2.0}
    key_name = str(value).replace("torch.", "").lower()
    if key_name not in sizes:
        raise ConfigError(f"{label}: '{key}' {value!r} is not a dtype moeplan knows (float32, bfloat16, float16)")
    return sizes[key_name]


def _gemma_dense(cfg: _Cfg, f: dict[str, Any], model_type: str) -> None:
    """Gemma 1/2/3 text models (transformers modeling_gemma*): tied embeddings; Gemma 2 and 3 add pre-
    and post-feedforward norms (four per layer) and alternate sliding and global layers when the config
    has no layer_types (Gemma 2: every other layer, transformers Gemma2Config; Gemma 3: five of six,
    sliding_window_pattern); Gemma 3 has per-head q/k norms."""
    get = cfg.get
    f["tie_word_embeddings"] = bool(get("tie_word_embeddings", default=True))
    if model_type == "gemma":
        return
    f["norms_per_layer"] = 4
    if model_type == "gemma3":
        f["qk_norm"] = "per_head"
    window = _window(get("sliding_window"), cfg.label)
    if window and get("layer_types") is None:
        period = 2 if model_type == "gemma2" else _positive_int(get("sliding_window_pattern", default=6),
                                                                 "sliding_window_pattern", cfg.label)
        for i, layer in enumerate(f["layers"]):
            sliding = (i + 1) % period != 0
            layer.update(mixer="sliding" if sliding else "full", window=window if sliding else None)


def _gemma4(cfg: _Cfg, f: dict[str, Any]) -> None:
    """Gemma 4 (transformers modeling_gemma4.Gemma4TextModel): per-head q/k norms, global layers with
    their own KV heads and head_dim (K = V under attention_k_eq_v), KV-shared tail layers, per-layer
    embeddings, and in the MoE sizes a dense MLP beside 128 experts with a scaled router."""
    label = cfg.label
    get = cfg.get
    f.update(qk_norm="per_head", o_bias=False, router_scoring="softmax")
    k_eq_v = _flag(get("attention_k_eq_v", default=False), "attention_k_eq_v", label)
    global_dim = _positive_int(get("global_head_dim", default=512), "global_head_dim", label)
    global_kv = get("num_global_key_value_heads")
    global_kv = _positive_int(global_kv, "num_global_key_value_heads", label) if global_kv and k_eq_v else None
    n = len(f["layers"])
    shared = _whole(get("num_kv_shared_layers", default=0) or 0, "num_kv_shared_layers", label, 0)
    if shared >= n:
        raise ConfigError(f"{label}: num_kv_shared_layers ({shared}) must be below num_hidden_layers ({n})")
    wide = _flag(get("use_double_wide_mlp", default=False), "use_double_wide_mlp", label)
    for i, layer in enumerate(f["layers"]):
        if layer["mixer"] == "full":
            # transformers Gemma4TextConfig per_layer_config: full layers take global_head_dim, and
            # num_global_key_value_heads when attention_k_eq_v is set.
            layer.update(head_dim=global_dim, kv_heads=global_kv, k_eq_v=k_eq_v)
        if i >= n - shared:
            layer["kv_shared"] = True
            if wide and f["dense_intermediate_size"]:
                layer["dense_intermediate_size"] = 2 * f["dense_intermediate_size"]
    ple = _whole(get("hidden_size_per_layer_input", default=0) or 0, "hidden_size_per_layer_input", label, 0)
    if ple:
        f["per_layer_input_size"] = ple
        f["per_layer_input_vocab"] = _positive_int(get("vocab_size_per_layer_input", default=f["vocab_size"]),
                                                   "vocab_size_per_layer_input", label)
    # input, post-attention, pre- and post-feedforward norms; the MoE block adds three more, per-layer
    # inputs one (post_per_layer_input_norm).
    f["norms_per_layer"] = 4 + (3 if f["num_experts"] else 0) + (1 if ple else 0)
    if f["num_experts"]:
        f["moe_dense_intermediate_size"] = f["dense_intermediate_size"]
        f["router_scale"] = True
    f["tie_word_embeddings"] = bool(get("tie_word_embeddings", default=True))


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


def _wrapped_vision(
    vc: dict[str, Any], family: str, text: dict[str, Any], label: str
) -> QwenVisionSpec | Gemma4VisionSpec | SiglipVisionSpec | None:
    """The vision tower of a Qwen3.5/3.6/Qwen3-VL, Gemma 3 or Gemma 4 wrapper; None when the config gives no
    sizes (a vision_config cut to its model_type says nothing to count)."""
    try:
        if "depth" in vc and family.startswith(("qwen3_5", "qwen3_vl")):
            return QwenVisionSpec(
                depth=vc["depth"], hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                patch_size=vc["patch_size"], temporal_patch_size=vc.get("temporal_patch_size", 2),
                in_channels=vc.get("in_channels", 3), spatial_merge_size=vc.get("spatial_merge_size", 2),
                out_hidden_size=vc.get("out_hidden_size", text.get("hidden_size")),
                num_position_embeddings=vc.get("num_position_embeddings", 0),
                deepstack_layers=len(vc.get("deepstack_visual_indexes") or []),
            )  # fmt: skip
        if family == "gemma3" and vc.get("model_type", "siglip_vision_model") == "siglip_vision_model" and (
                "hidden_size" in vc or "num_hidden_layers" in vc):
            d = SiglipVisionSpec()
            return SiglipVisionSpec(
                hidden_size=vc.get("hidden_size", d.hidden_size), intermediate_size=vc.get("intermediate_size",
                d.intermediate_size), num_layers=vc.get("num_hidden_layers", d.num_layers),
                num_channels=vc.get("num_channels", d.num_channels), image_size=vc.get("image_size", d.image_size),
                patch_size=vc.get("patch_size", d.patch_size),
                use_head=_flag(vc.get("vision_use_head", True), "vision_config.vision_use_head", label),
                projector_output_dim=text.get("hidden_size", 0),
            )  # fmt: skip
        if family == "gemma4" and "hidden_size" in vc:
            heads = vc.get("num_attention_heads", 12)
            return Gemma4VisionSpec(
                hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                num_layers=vc["num_hidden_layers"], num_heads=heads, num_kv_heads=vc.get("num_key_value_heads", heads),
                head_dim=vc.get("head_dim", vc["hidden_size"] // heads), patch_size=vc.get("patch_size", 16),
                position_embedding_size=vc.get("position_embedding_size", 10 * 1024),
            )  # fmt: skip
    except (KeyError, ValueError, TypeError, ArithmeticError) as exc:
        detail = first_error(exc) if hasattr(exc, "errors") else str(exc)
        raise ConfigError(f"{label}: vision_config is incomplete or invalid ({detail}); fix the config") from None
    return None
