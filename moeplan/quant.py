"""Quantization schemes as data: effective bits per weight (scales and zero points included) and
which components stay in 16-bit.

Bits per weight, with their sources:
- fp8 per-tensor: 8 (+ one fp32 scale per tensor, negligible). fp8 block (DeepSeek-V3
  quantization_config weight_block_size [128, 128]): 8 + 32/(128*128) for the fp32 scale_inv.
- int8 per-channel (W8A8, vLLM compressed-tensors): 8 + 16/4096 for one fp16 scale per row.
- int4 GPTQ/AWQ, group g: 4 + (16 + 4)/g, an fp16 scale and a packed 4-bit zero per group
  (AutoGPTQ qweight/qzeros/scales layout); g = 128 by default.
- bitsandbytes NF4: 4 + 32/64 (fp32 absmax per 64-block, QLoRA paper arXiv:2305.14314); with
  double quantization 4 + 8/64 + 32/(64*256) = 4.127.
- MXFP4 (OCP Microscaling spec v1.0): 4 + 8/32 for one E8M0 scale per 32 values.
- NVFP4 (NVIDIA Blackwell docs): 4 + 8/16 for one fp8 E4M3 scale per 16 values.
- GGUF types: bytes per block / values per block from llama.cpp ggml-common.h block structs,
  e.g. block_q4_K = 144 bytes per 256 weights = 4.5 bpw. The _M/_S mixtures follow
  src/llama-quant.cpp llama_tensor_get_type: attn_v and about half the ffn_down tensors one type up,
  output.weight in Q6_K.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal


from moeplan.record import Record
from moeplan.errors import ConfigError, QuantError
from moeplan.params import (
    ATTENTION, DENSE_FFN, DENSE_MLP, EMBEDDING, HYPER_CONNECTIONS, LM_HEAD, MAMBA, NORMS, PER_LAYER_EMBEDDING,
    ROUTED_EXPERTS, ROUTER, SHARED_EXPERTS, VISION,
)  # fmt: skip
from moeplan.spec import ModelSpec

Compute = Literal["fp32", "bf16", "fp8", "int8", "fp4"]
Engine = Literal["vllm", "sglang", "llamacpp"]

# GGML block sizes: (bytes per block, weights per block). Source: llama.cpp ggml/src/ggml-common.h.
GGML_TYPES: dict[str, tuple[int, int]] = {
    "f32": (4, 1), "f16": (2, 1), "bf16": (2, 1),
    "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32), "q5_0": (22, 32), "q5_1": (24, 32),
    "q2_k": (84, 256), "q3_k": (110, 256), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256),
    "iq1_s": (50, 256), "iq1_m": (56, 256), "iq2_xxs": (66, 256), "iq2_xs": (74, 256), "iq2_s": (82, 256),
    "iq3_xxs": (98, 256), "iq3_s": (110, 256), "iq4_xs": (136, 256), "iq4_nl": (18, 32), "mxfp4": (17, 32),
}  # fmt: skip


def ggml_bpw(type_name: str) -> float:
    size, block = GGML_TYPES[type_name]
    return 8 * size / block


class QuantScheme(Record):

    name: str
    description: str
    bits: float  # effective bits per quantized weight
    # Bits for components that do not take `bits` (16-bit embeddings, routers, ...).
    component_bits: dict[str, float] = {}
    compute: Compute = "bf16"  # the GEMM precision a roofline should use
    gguf: bool = False
    engines: tuple[Engine, ...] = ("vllm", "sglang")
    vllm_quantization: str | None = None  # the value for vLLM's --quantization, when one is needed
    gguf_mix: dict[str, object] | None = None  # llama.cpp per-tensor types, resolved by for_model

    def for_model(self, spec: ModelSpec) -> QuantScheme:
        """Resolve a llama.cpp mixture's per-component bits for this model's shapes."""
        if not self.gguf_mix:
            return self
        if self.gguf_mix.get("file"):
            from moeplan.gguf_file import file_scheme  # a GGUF file's own bytes per component

            return file_scheme(spec)
        return self.model_copy(update={"component_bits": {**self.component_bits, **_gguf_bits(spec, self.gguf_mix)},
                                       "gguf_mix": None})

    def bits_for(self, component: str) -> float:
        return self.component_bits.get(component, self.bits)

    @property
    def expert_bits(self) -> float:
        return self.bits_for(ROUTED_EXPERTS)


# Kept in 16-bit by quantizers (embeddings, router, norms, vision) and the hyper-connection mixers,
# which DeepSeek-V4 ships in fp32.
_KEEP_16 = {EMBEDDING: 16.0, PER_LAYER_EMBEDDING: 16.0, LM_HEAD: 16.0, ROUTER: 16.0, NORMS: 16.0, VISION: 16.0,
            HYPER_CONNECTIONS: 32.0}


# NOTE: a GGUF holds the text model only; llama.cpp loads a vision tower from its own mmproj file,
# and only with --mmproj, so GGUF plans carry no vision weights (VISION: 0 bits).


def _gguf(name: str, desc: str, **mix: object) -> QuantScheme:
    """A llama.cpp mixture; its per-component bits depend on the model (see for_model)."""
    base = str(mix["gate_up"])
    return QuantScheme(
        name=name, description=desc, bits=ggml_bpw(base), gguf=True, engines=("llamacpp",), gguf_mix=mix,
        component_bits={ROUTER: 32.0, NORMS: 32.0, VISION: 0.0, HYPER_CONNECTIONS: 32.0},
    )  # fmt: skip


def use_more_bits_fraction(n_layers: int) -> float:
    """Share of layers llama.cpp gives one type more (llama-quant.cpp use_more_bits):
    the first and last eighth, and every third layer between."""
    if n_layers <= 0:
        return 0.0
    hits = sum(i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2 for i in range(n_layers))
    return hits / n_layers


# When a row is not a multiple of 256, llama.cpp falls back from k-quants (llama-quant.cpp):
# Q2_K/Q3_K/IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0. gpt-oss (hidden 2880) hits this.
_FALLBACK = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}


def _gguf_bits(spec: ModelSpec, mix: dict[str, object]) -> dict[str, float]:
    n = spec.num_layers
    blocky = spec.hidden_size % 256 == 0 and (spec.expert_intermediate_size or 256) % 256 == 0

    def bpw(rule: object) -> float:
        text = str(rule)
        if text.startswith("more:"):  # use_more_bits layers one type up
            _, hi, lo = text.split(":")
            f = use_more_bits_fraction(n)
            return f * bpw(hi) + (1 - f) * bpw(lo)
        # firstN:hi:lo: layers i < n_layer/N one type up. first16: Q3_K_M ffn_down; first8: IQ4_XS
        # ffn_down without imatrix. NOTE: llama.cpp counts over every ffn_down* tensor (dense, _exps,
        # _shexp), so with shared experts or dense layers its n differs from num_layers; checked
        # against published files only for Mixtral and Qwen3 (no shexp).
        if text.startswith("first"):
            head, hi, lo = text.split(":")
            f = (n // int(head.removeprefix("first"))) / n if n else 0.0
            return f * bpw(hi) + (1 - f) * bpw(lo)
        if text.startswith("gqa4:"):
            _, hi, lo = text.split(":")
            return bpw(hi if spec.num_attention_heads // spec.num_kv_heads >= 4 else lo)
        if not blocky and text in _FALLBACK:
            text = _FALLBACK[text]
        return ggml_bpw(text)

    exp8 = spec.num_experts == 8  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    q, k, v, o = bpw(mix["q"]), bpw(mix["k"]), bpw(mix["v"]), bpw(mix["o"])
    if exp8:
        k = v = ggml_bpw("q8_0")
        if mix.get("exp8_o"):
            o = bpw(mix["exp8_o"])
    h = spec.hidden_size
    if spec.attention == "mla" and spec.mla is not None:
        m = spec.mla
        kv_b = m.kv_lora_rank * spec.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim)  # attn_kv_b ~ attn_v
        o_n = spec.num_attention_heads * m.v_head_dim * h
        from moeplan.params import attention_params

        rest = attention_params(spec) - kv_b - o_n
        attn = (rest * q + kv_b * v + o_n * o) / (rest + kv_b + o_n)
    else:
        qn = on = h * spec.num_attention_heads * spec.head_dim
        kn = vn = h * spec.num_kv_heads * spec.head_dim
        attn = (qn * q + kn * k + vn * v + on * o) / (qn + kn + vn + on)
    gate_up, down = bpw(mix["gate_up"]), bpw(mix["down"])
    ffn = (2 * gate_up + down) / 3
    return {
        ATTENTION: attn, MAMBA: gate_up, DENSE_FFN: ffn, DENSE_MLP: ffn, SHARED_EXPERTS: ffn, ROUTED_EXPERTS: ffn,
        EMBEDDING: bpw(mix["embd"]), PER_LAYER_EMBEDDING: bpw(mix["embd"]), LM_HEAD: bpw(mix["out"]),
    }  # fmt: skip


def _gguf_flat(name: str, type_name: str, desc: str, output: str | None = None) -> QuantScheme:
    b = ggml_bpw(type_name)
    return QuantScheme(
        name=name, description=desc, bits=b, gguf=True, engines=("llamacpp",),
        component_bits={LM_HEAD: ggml_bpw(output or type_name), ROUTER: 32.0, NORMS: 32.0, VISION: 0.0,
                        HYPER_CONNECTIONS: 32.0},
    )  # fmt: skip


def int4_group(name: str, group: int, engine_name: str) -> QuantScheme:
    return QuantScheme(
        name=name, description=f"4-bit weights, group {group}, fp16 scales + 4-bit zeros ({engine_name})",
        bits=4 + 20 / group, component_bits=dict(_KEEP_16), compute="bf16",
        vllm_quantization=engine_name if engine_name in ("awq", "gptq") else "gptq",
    )  # fmt: skip


@lru_cache(maxsize=1)
def builtin_schemes() -> dict[str, QuantScheme]:
    s: list[QuantScheme] = [
        QuantScheme(name="fp32", description="32-bit float", bits=32, compute="fp32", engines=("vllm", "sglang")),
        QuantScheme(name="bf16", description="bfloat16", bits=16, engines=("vllm", "sglang", "llamacpp")),
        QuantScheme(name="fp16", description="float16", bits=16, engines=("vllm", "sglang", "llamacpp")),
        # A GGUF file given as MODEL, sized by its own tensor types (moeplan.gguf_file.file_scheme).
        QuantScheme(name="gguf-file", description="a GGUF file's own tensor types", bits=ggml_bpw("q4_k"),
                    gguf=True, engines=("llamacpp",), gguf_mix={"file": True}),
        QuantScheme(name="fp8", description="fp8 e4m3 weights, per-tensor scale; embeddings/lm_head/router bf16",
                    bits=8, component_bits=dict(_KEEP_16), compute="fp8", vllm_quantization="fp8"),
        QuantScheme(name="fp8-block", description="fp8 e4m3 with 128x128 fp32 block scales (DeepSeek-V3)",
                    bits=8 + 32 / (128 * 128), component_bits=dict(_KEEP_16), compute="fp8", vllm_quantization="fp8"),
        QuantScheme(name="int8", description="int8 weights, per-channel fp16 scales (W8A8)",
                    bits=8 + 16 / 4096, component_bits=dict(_KEEP_16), compute="int8"),
        int4_group("int4", 128, "gptq"),
        int4_group("gptq", 128, "gptq"),
        int4_group("awq", 128, "awq"),
        QuantScheme(name="nf4", description="bitsandbytes NF4, 64-blocks with fp32 absmax", bits=4.5,
                    component_bits=dict(_KEEP_16), vllm_quantization="bitsandbytes"),
        QuantScheme(name="nf4-dq", description="bitsandbytes NF4 with double quantization", bits=4 + 8 / 64 + 32 / 64 / 256,
                    component_bits=dict(_KEEP_16), vllm_quantization="bitsandbytes"),
        QuantScheme(name="mxfp4", description="MXFP4 experts (E8M0 scale per 32), everything else bf16 (gpt-oss)",
                    bits=4.25, vllm_quantization="mxfp4",
                    component_bits={**{k: 16.0 for k in (ATTENTION, MAMBA, DENSE_FFN, DENSE_MLP, EMBEDDING,
                                                         PER_LAYER_EMBEDDING, LM_HEAD, ROUTER, NORMS, VISION)},
                                    HYPER_CONNECTIONS: 32.0}),
        # DeepSeek-V4 as shipped (expert_dtype fp4): routed experts FP4 e2m1 with a ue8m0 scale per 32
        # (0.53125 B per weight); everything else quantized in FP8 e4m3 128x128 blocks with ue8m0 scales
        # (config quantization_config scale_fmt ue8m0); embeddings, lm_head, router bf16; mHC fp32.
        QuantScheme(name="fp4-experts", description="FP4 routed experts (ue8m0 scale per 32), FP8 blocks elsewhere "
                    "(DeepSeek-V4 as shipped)", bits=8 + 8 / (128 * 128),
                    component_bits={**_KEEP_16, ROUTED_EXPERTS: 4 + 8 / 32}, compute="fp8"),
        QuantScheme(name="nvfp4", description="NVFP4 (fp8 scale per 16), embeddings/lm_head/router bf16", bits=4.5,
                    component_bits=dict(_KEEP_16), compute="fp4", vllm_quantization="modelopt_fp4"),
        _gguf_flat("q8_0", "q8_0", "GGUF Q8_0 (8.5 bpw)"),
        _gguf_flat("q4_0", "q4_0", "GGUF Q4_0 (4.5 bpw), output Q6_K", output="q6_k"),
        _gguf_flat("q6_k", "q6_k", "GGUF Q6_K (6.56 bpw)"),
        # Per-tensor types from llama.cpp src/llama-quant.cpp llama_tensor_get_type (see docs/research/
        # gguf_types.md): (share, type) pairs for attn_v and ffn_down; exp8 = Mixtral's 8-expert rules.
        _gguf("q5_k_m", "GGUF Q5_K_M mixture", q="q5_k", k="q5_k", v="more:q6_k:q5_k", o="q5_k", gate_up="q5_k",
              down="more:q6_k:q5_k", embd="q5_k", out="q6_k", exp8_o=None),
        _gguf("q4_k_m", "GGUF Q4_K_M mixture", q="q4_k", k="q4_k", v="more:q6_k:q4_k", o="q4_k", gate_up="q4_k",
              down="more:q6_k:q4_k", embd="q4_k", out="q6_k", exp8_o="q5_k"),
        _gguf("q4_k_s", "GGUF Q4_K_S mixture", q="q4_k", k="q4_k", v="q4_k", o="q4_k", gate_up="q4_k",
              down="q4_k", embd="q4_k", out="q6_k", exp8_o="q5_k"),
        _gguf("q3_k_m", "GGUF Q3_K_M mixture", q="q3_k", k="q3_k", v="q4_k", o="q4_k", gate_up="q3_k",
              down="first16:q5_k:q4_k", embd="q3_k", out="q6_k", exp8_o="q5_k"),
        _gguf("q2_k", "GGUF Q2_K mixture", q="q2_k", k="q2_k", v="gqa4:q4_k:q3_k", o="q3_k", gate_up="q2_k",
              down="q3_k", embd="q2_k", out="q6_k", exp8_o="q5_k"),
        # IQ4_XS: attn_v Q5_K when n_gqa >= 4, ffn_down Q5_K in the first n/8 layers (static quants,
        # no imatrix), embeddings stay IQ4_XS, output Q6_K (llama-quant.cpp; gguf_types.md 3.5).
        _gguf("iq4_xs", "GGUF IQ4_XS mixture (static)", q="iq4_xs", k="iq4_xs", v="gqa4:q5_k:iq4_xs", o="iq4_xs",
              gate_up="iq4_xs", down="first8:q5_k:iq4_xs", embd="iq4_xs", out="q6_k", exp8_o="q5_k"),
        # llama.cpp MXFP4_MOE (the gpt-oss GGUFs): routed experts in MXFP4 (block_mxfp4, 17 bytes per 32),
        # every other tensor Q8_0 (llama-quant.cpp: LLAMA_FTYPE_MOSTLY_MXFP4_MOE, default type Q8_0).
        QuantScheme(name="mxfp4_moe", description="GGUF MXFP4_MOE: MXFP4 experts, Q8_0 elsewhere (gpt-oss GGUF)",
                    bits=ggml_bpw("q8_0"), gguf=True, engines=("llamacpp",),
                    component_bits={ROUTED_EXPERTS: ggml_bpw("mxfp4"), ROUTER: 32.0, NORMS: 32.0, VISION: 0.0,
                                    HYPER_CONNECTIONS: 32.0}),
        _gguf_flat("iq3_xxs", "iq3_xxs", "GGUF IQ3_XXS (3.06 bpw)", output="q6_k"),
        _gguf_flat("iq2_xxs", "iq2_xxs", "GGUF IQ2_XXS (2.06 bpw)", output="q6_k"),
        _gguf_flat("iq1_s", "iq1_s", "GGUF IQ1_S (1.56 bpw)", output="q6_k"),
    ]
    return {scheme.name: scheme for scheme in s}


ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "f32": "fp32", "f16": "fp16",
    "fp8_e4m3": "fp8", "e4m3": "fp8", "w8a8": "int8", "int4-gptq": "gptq", "int4-awq": "awq", "bnb-nf4": "nf4",
    "bnb4": "nf4", "fp4": "nvfp4", "mxfp4-experts": "mxfp4", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m",
    "awq_marlin": "awq", "gptq_marlin": "gptq", "compressed-tensors": "int8",
}  # fmt: skip
EXPERT_COMPONENTS = (ROUTED_EXPERTS, SHARED_EXPERTS)
PLAIN_NAMES = ("bf16", "fp16", "fp32", "fp8", "int8", "int4")
# Tried by `fit` from large to small when the user gives no --quant.
LADDER = ("bf16", "fp8", "int8", "q8_0", "int4", "q4_k_m", "q3_k_m", "q2_k")


def known_names() -> list[str]:
    return sorted(builtin_schemes())


def get_scheme(text: str) -> QuantScheme:
    """'int4', 'awq', 'gptq-g64', 'q4_k_m', 'experts=int4,rest=bf16' -> QuantScheme."""
    key = text.strip().lower().replace(" ", "")
    if not key:
        raise QuantError(f"empty --quant; choose one of {', '.join(known_names())}")
    if "=" in key:
        return _mixed(key, text)
    key = ALIASES.get(key, key)
    scheme = builtin_schemes().get(key)
    if scheme is not None:  # no built-in name is a group-size name (int4-g64), so this comes first
        return scheme
    group = re.fullmatch(r"(int4|gptq|awq)[-_:]?g(\d+)", key)
    if group:
        size = int(group.group(2))
        if size not in (32, 64, 128, 256, 512, 1024):
            raise QuantError(f"group size {size} in '{text}' is not one of 32, 64, 128, 256, 512, 1024")
        return int4_group(key, size, "awq" if group.group(1) == "awq" else "gptq")
    raise QuantError(
        f"unknown quantization '{text}'; choose one of {', '.join(known_names())}, int4-g64, "
        "or a mix like experts=int4,rest=bf16"
    )


def _mixed(key: str, text: str) -> QuantScheme:
    parts: dict[str, str] = {}
    for item in key.split(","):
        name, _, value = item.partition("=")
        if name not in ("experts", "rest") or not value or "=" in value:
            raise QuantError(f"cannot read '{text}': write experts=SCHEME,rest=SCHEME (e.g. experts=int4,rest=bf16)")
        if name in parts:  # last-wins would silently plan something else than asked
            raise QuantError(f"'{text}' names {name}= twice; give each of experts= and rest= once")
        parts[name] = value
    experts = get_scheme(parts.get("experts", "bf16"))
    rest = get_scheme(parts.get("rest", "bf16"))
    if experts.gguf != rest.gguf:
        raise QuantError(f"'{text}' mixes GGUF and non-GGUF formats; no engine loads that")
    bits = {c: rest.bits_for(c) for c in (ATTENTION, MAMBA, DENSE_FFN, DENSE_MLP, EMBEDDING, PER_LAYER_EMBEDDING,
                                          LM_HEAD, ROUTER, NORMS, VISION, HYPER_CONNECTIONS)}
    bits.update({c: experts.bits_for(c) for c in EXPERT_COMPONENTS})
    return QuantScheme(
        name=f"experts={experts.name},rest={rest.name}", description=f"experts {experts.name}, rest {rest.name}",
        bits=experts.bits, component_bits=bits, compute=rest.compute, gguf=experts.gguf,
        engines=tuple(e for e in experts.engines if e in rest.engines),
        vllm_quantization=experts.vllm_quantization or rest.vllm_quantization,
    )  # fmt: skip


def native_scheme(spec: ModelSpec) -> QuantScheme:
    """The checkpoint as shipped: its quantization_config, else its torch_dtype."""
    qc = spec.quantization_config or {}
    method = (spec.checkpoint_quant or "").lower()
    if method == "gguf":
        return get_scheme("gguf-file").for_model(spec)
    if spec.expert_dtype in ("fp4", "mxfp4") and method in ("fp8", ""):
        return get_scheme("fp4-experts")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is not None and not (isinstance(block, list) and len(block) == 2 and all(
                type(b) is int and 16 <= b <= 4096 for b in block)):
            raise ConfigError(f"{spec.name}: quantization_config.weight_block_size must be two block sides such as "
                              f"[128, 128], got {str(block)[:40]!r}; fix the config or pass --quant")
        return get_scheme("fp8-block" if block else "fp8")
    if method == "mxfp4":
        return get_scheme("mxfp4")
    if method in ("gptq", "awq"):
        bits, group = qc.get("bits", 4), qc.get("group_size", 128)
        if type(bits) is not int or type(group) is not int or not -1 <= group <= 4096:
            raise ConfigError(f"{spec.name}: {method} quantization_config needs integer bits and group_size (-1 for "
                              f"none), got bits {str(bits)[:20]!r}, group_size {str(group)[:20]!r}; fix the config "
                              "or pass --quant")
        if bits not in (4, 8):  # real 2- and 3-bit GPTQ checkpoints exist; moeplan has no scheme for them
            raise QuantError(f"{spec.name}: {bits}-bit {method} is not a format moeplan sizes (4 and 8 bits are); "
                             "pass --quant int4 for an upper bound, or --quant q3_k_m / q2_k for a GGUF estimate")
        if bits == 4:
            return get_scheme(f"{method}-g{group}" if group > 0 else method)
        return get_scheme("int8")
    if method in ("modelopt", "modelopt_fp4", "nvfp4"):
        return get_scheme("nvfp4")
    if method == "bitsandbytes":  # load_in_8bit: LLM.int8(); else 4-bit (nf4 or fp4, the same size)
        return get_scheme("int8" if qc.get("load_in_8bit") is True else "nf4")
    dtype = spec.dtype.replace("torch.", "").lower()
    return get_scheme(ALIASES.get(dtype, dtype) if ALIASES.get(dtype, dtype) in builtin_schemes() else "bf16")


# KV cache dtypes: bytes per element. q8_0/q4_0 are llama.cpp cache types (block sizes above).
KV_DTYPES: dict[str, float] = {
    "bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0, "int8": 1.0,
    "q8_0": 34 / 32, "q4": 18 / 32, "q4_0": 18 / 32,
}  # fmt: skip
_GGUF_ONLY_KV = ("q8_0", "q4", "q4_0")
_GPU_ENGINE_KV = ("fp8", "fp8_e4m3", "fp8_e5m2", "int8")


def kv_dtype_usable(kv_dtype: str, scheme: QuantScheme) -> bool:
    """Whether an engine that runs `scheme` has this KV cache type (llama.cpp for GGUF, else vLLM/SGLang)."""
    try:
        kv_dtype_bytes(kv_dtype, scheme)
    except QuantError:
        return False
    return True


def kv_dtype_bytes(kv_dtype: str, scheme: QuantScheme | None = None) -> float:
    key = kv_dtype.strip().lower()
    key = {"auto": "bf16", "float16": "fp16", "bfloat16": "bf16"}.get(key, key)
    if key not in KV_DTYPES:
        raise QuantError(f"unknown KV cache dtype '{kv_dtype}'; choose one of {', '.join(KV_DTYPES)}")
    if scheme is not None:
        if key in _GGUF_ONLY_KV and not scheme.gguf:
            raise QuantError(
                f"KV dtype '{kv_dtype}' is a llama.cpp cache type; '{scheme.name}' runs on vLLM/SGLang, "
                "use --kv-dtype fp8 or a GGUF --quant such as q4_k_m"
            )
        if key in _GPU_ENGINE_KV and scheme.gguf:
            raise QuantError(
                f"llama.cpp (GGUF '{scheme.name}') has no {kv_dtype} KV cache; use --kv-dtype q8_0, q4_0 or fp16"
            )
    return KV_DTYPES[key]
