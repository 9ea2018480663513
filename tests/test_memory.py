"""Issue 3: weights, KV cache, activations and overhead; quantization schemes; published checkpoint sizes.

Counted figures come from tests/fixtures/reference/moe_models.yaml (a copy of the project's reference
file). Published checkpoint sizes are quoted with their source next to each number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from moeplan import sources
from moeplan.cli import app
from moeplan.errors import MoeplanError, QuantError
from moeplan.memory import (
    MAX_CONTEXT,
    activation_bytes,
    kv_bytes_per_token,
    kv_cache_bytes,
    mamba_state_bytes,
    memory_report,
    overhead_bytes,
    weight_bytes,
)
from moeplan.kv_cache import cache_bytes
from moeplan.params import ATTENTION, EMBEDDING, LM_HEAD, ROUTED_EXPERTS, ROUTER, SHARED_EXPERTS, count_params
from moeplan.quant import get_scheme, native_scheme
from moeplan.spec import ModelSpec, spec_from_config

REFERENCE: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parent / "fixtures" / "reference" / "moe_models.yaml").read_text()
)
REF = {model["id"]: model for model in REFERENCE}
GiB = 2**30
GB = 1e9


def card(name: str) -> ModelSpec:
    return sources.resolve(name)


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", [m for m in REF if "safetensors_total_size_bytes" in REF[m]])
def test_bf16_weights_equal_safetensors_total_size(model_id: str) -> None:
    """Mixtral-8x7B: 46,702,792,704 params x 2 bytes = 93,405,585,408 = the index total_size."""
    spec = spec_from_config(REF[model_id]["config"], name=model_id)
    assert weight_bytes(spec, get_scheme("bf16")).total == REF[model_id]["safetensors_total_size_bytes"]


def test_mixtral_bf16_weights_exact() -> None:
    weights = weight_bytes(card("mixtral-8x7b"), get_scheme("bf16"))
    assert weights.total == 93_405_585_408
    assert sum(weights.by_component.values()) == weights.total


def test_weights_by_component_follow_scheme_bits() -> None:
    spec = card("mixtral-8x7b")
    count = count_params(spec)
    weights = weight_bytes(spec, get_scheme("int4"))
    experts = count.component(ROUTED_EXPERTS).total
    assert weights.by_component[ROUTED_EXPERTS] == math.ceil(experts * (4 + 20 / 128) / 8)
    # Embeddings, lm_head and router stay 16-bit under int4 (AutoAWQ/AutoGPTQ quantize Linear layers only).
    for name in (EMBEDDING, LM_HEAD, ROUTER):
        assert weights.by_component[name] == 2 * count.component(name).total


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------

# Reference key for the bf16 KV bytes per token over all layers (as if no window capped them).
_KV_KEYS = ("all_layers_full", "full_attention_all_layers", "mla_compressed_cache")
_NAIVE_KEY = "naive_expanded_kv_cache (HF eager caches full per-head K and V)"


@pytest.mark.parametrize("model_id", list(REF))
def test_kv_bytes_per_token_bf16_match_reference(model_id: str) -> None:
    kv = REF[model_id]["derived_by_counting"]["kv_cache_bytes_per_token_bf16"]
    expected = next(kv[k] for k in _KV_KEYS if k in kv)
    spec = spec_from_config(REF[model_id]["config"], name=model_id)
    assert kv_bytes_per_token(spec, "bf16") == expected
    if _NAIVE_KEY in kv:
        assert kv_bytes_per_token(spec, "bf16", mla_naive=True) == kv[_NAIVE_KEY]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mixtral-8x7b", 131_072),  # 32 layers x 2 x 8 kv heads x 128 x 2 B
        ("qwen3-30b-a3b", 98_304),  # 48 x 2 x 4 x 128 (head_dim 128, not 2048/32 = 64) x 2 B
        ("deepseek-v3", 70_272),  # MLA latent: 61 x (512 + 64) x 2 B
        ("deepseek-v2", 69_120),  # 60 x (512 + 64) x 2 B
    ],
)
def test_kv_bytes_per_token_named_models(name: str, expected: int) -> None:
    assert kv_bytes_per_token(card(name), "bf16") == expected


def test_deepseek_v3_naive_mla_cache() -> None:
    # HF eager caches per-head K (128 nope + 64 rope) and V (128): 61 x 128 x 320 x 2 B.
    assert kv_bytes_per_token(card("deepseek-v3"), "bf16", mla_naive=True) == 4_997_120 == 61 * 128 * 320 * 2


def test_gpt_oss_20b_sliding_layers_keep_their_window() -> None:
    spec = card("gpt-oss-20b")
    per_layer_token = 2 * 8 * 64 * 2  # K and V, 8 kv heads, head_dim 64, bf16
    assert (spec.num_kv_heads, spec.head_dim) == (8, 64)
    sliding = [layer for layer in spec.layers if layer.mixer == "sliding"]
    assert len(sliding) == 12 and all(layer.window == 128 for layer in sliding)
    assert len(spec.layers) == 24
    assert kv_cache_bytes(spec, 8192) == (12 * 8192 + 12 * 128) * per_layer_token
    # Below the window every layer holds the whole context.
    assert kv_cache_bytes(spec, 100) == 24 * 100 * per_layer_token
    assert kv_cache_bytes(spec, 8192, batch=3) == 3 * kv_cache_bytes(spec, 8192)


def test_llama4_chunked_layers_capped_at_chunk() -> None:
    spec = card("llama-4-scout")
    per_layer_token = 2 * 8 * 128 * 2
    chunked = [layer for layer in spec.layers if layer.mixer == "chunked"]
    assert len(chunked) == 36 and all(layer.window == 8192 for layer in chunked)
    # Every 4th layer is NoPE with global attention.
    assert [layer.mixer for layer in spec.layers[:4]] == ["chunked", "chunked", "chunked", "full"]
    assert kv_cache_bytes(spec, 100_000) == (12 * 100_000 + 36 * 8192) * per_layer_token
    assert kv_cache_bytes(spec, 4096) == 48 * 4096 * per_layer_token


def test_jamba_mamba_state_independent_of_context() -> None:
    spec = card("jamba-v0.1")
    mamba_layers = sum(layer.mixer == "mamba" for layer in spec.layers)
    assert mamba_layers == 28
    # Per Mamba layer: conv state d_inner x d_conv + SSM state d_inner x d_state, bf16;
    # d_inner = 2 x 4096 (transformers JambaMambaMixer).
    assert mamba_state_bytes(spec) == 8192 * (4 + 16) * 2
    per_attn_layer_token = 2 * 8 * 128 * 2
    for context in (1, 1000, 100_000):
        assert kv_cache_bytes(spec, context) == 4 * context * per_attn_layer_token + 28 * mamba_state_bytes(spec)
    grow = kv_cache_bytes(spec, 2000) - kv_cache_bytes(spec, 1000)
    assert grow == 4 * 1000 * per_attn_layer_token


@pytest.mark.parametrize("name", [c.name for c in sources.bundled_cards()])
def test_fp8_kv_is_half_of_bf16(name: str) -> None:
    spec = card(name)
    assert 2 * kv_bytes_per_token(spec, "fp8") == kv_bytes_per_token(spec, "bf16")
    # KV rows halve; fixed per-sequence state (Mamba, Gated DeltaNet, V4 compressors) keeps its own dtype.
    fp8, bf16 = cache_bytes(spec, 10_000, kv_dtype="fp8"), cache_bytes(spec, 10_000, kv_dtype="bf16")
    assert 2 * fp8.kv == pytest.approx(bf16.kv, abs=2) and fp8.state == bf16.state
    if spec.mamba is None and spec.linear is None and spec.attention != "compressed":
        assert 2 * kv_cache_bytes(spec, 10_000, kv_dtype="fp8") == kv_cache_bytes(spec, 10_000, kv_dtype="bf16")


@pytest.mark.parametrize(
    ("name", "per_mtp_layer_token"),
    [("deepseek-v3", (512 + 64) * 2), ("glm-4.5", 2 * 8 * 128 * 2)],  # MLA latent; GQA 8 kv heads x 128
)
def test_mtp_layers_add_kv_when_included(name: str, per_mtp_layer_token: int) -> None:
    spec = card(name)
    assert spec.mtp_layers == 1
    base = kv_bytes_per_token(spec, "bf16")
    assert kv_bytes_per_token(spec, "bf16", include_mtp=True) == base + per_mtp_layer_token
    context = 5000
    with_mtp = kv_cache_bytes(spec, context, include_mtp=True)
    assert with_mtp == kv_cache_bytes(spec, context) + context * per_mtp_layer_token


def test_mtp_memory_report_loads_mtp_weights_and_kv() -> None:
    spec = card("deepseek-v3")
    scheme = native_scheme(spec)
    off = memory_report(spec, scheme, context=4096)
    on = memory_report(spec, scheme, context=4096, mtp=True)
    assert "mtp" not in off.weights and "mtp" in on.weights
    assert on.weights_bytes == off.weights_bytes + on.weights["mtp"]
    assert on.kv_bytes_per_token == 70_272 + 1_152
    assert on.kv_cache_bytes == off.kv_cache_bytes + 4096 * 1_152
    assert on.mtp_kv_included and not off.mtp_kv_included
    # The MTP layer's embedding and head copies stay bf16 in DeepSeek's fp8 checkpoint (vLLM loads
    # them): 2 x vocab 129,280 x hidden 7,168 x 2 bytes = 3.707 GB beyond the fp8 layer itself.
    unique = count_params(spec).mtp_params
    copies = 2 * 129_280 * 7_168 * 2
    assert on.weights["mtp"] - copies == pytest.approx(unique * (8 + 32 / 128**2) / 8, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Quantization schemes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "scheme"),
    [
        ("deepseek-v3", "fp8-block"),  # quantization_config fp8 with weight_block_size [128, 128]
        ("kimi-k2", "fp8-block"),
        ("gpt-oss-20b", "mxfp4"),
        ("gpt-oss-120b", "mxfp4"),
        ("mixtral-8x7b", "bf16"),
        ("qwen3-30b-a3b", "bf16"),
    ],
)
def test_native_scheme(name: str, scheme: str) -> None:
    assert native_scheme(card(name)).name == scheme


ACCEPTED = [
    "bf16", "fp16", "fp32", "fp8", "int8", "int4", "awq", "gptq", "nf4", "mxfp4", "nvfp4", "q4_k_m", "q8_0",
    "int4-g64", "experts=int4,rest=bf16", "BF16", " q4_k_m ", "bfloat16",
]  # fmt: skip


@pytest.mark.parametrize("text", ACCEPTED)
def test_get_scheme_accepts(text: str) -> None:
    scheme = get_scheme(text)
    assert 1 <= scheme.bits <= 32


@pytest.mark.parametrize(
    "text",
    ["", "int3", "q4_k_x", "int4-g100", "experts=int4,rest=", "experts=int4,rest=q4_k_m", "foo=bar", "bf16,int4",
     "experts=int4=bf16"],
)  # fmt: skip
def test_get_scheme_rejects_nonsense(text: str) -> None:
    with pytest.raises(QuantError):
        get_scheme(text)


def test_int4_bits_include_group_scales_and_zeros() -> None:
    # AutoGPTQ layout: an fp16 scale and a packed 4-bit zero per group of 128.
    assert get_scheme("int4").bits == 4 + 20 / 128 == 4.15625
    assert get_scheme("int4-g64").bits == 4 + 20 / 64


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("q8_0", 34 * 8 / 32),  # llama.cpp block_q8_0: 34 bytes per 32 weights
        ("mxfp4", 4 + 8 / 32),  # OCP MX v1.0: one E8M0 scale per 32
        ("nvfp4", 4 + 8 / 16),  # one fp8 scale per 16
        ("nf4", 4 + 32 / 64),  # fp32 absmax per 64 (QLoRA)
        ("fp8-block", 8 + 32 / (128 * 128)),  # fp32 scale_inv per 128x128 block
    ],
)
def test_scheme_bits_per_weight(text: str, bits: float) -> None:
    assert get_scheme(text).bits == pytest.approx(bits)


def test_mixed_scheme_quantizes_experts_only() -> None:
    mixed = get_scheme("experts=int4,rest=bf16")
    assert mixed.bits_for(ROUTED_EXPERTS) == mixed.bits_for(SHARED_EXPERTS) == 4 + 20 / 128
    assert mixed.bits_for(ATTENTION) == mixed.bits_for(EMBEDDING) == 16


def test_kv_dtype_must_suit_the_engine() -> None:
    spec = card("mixtral-8x7b")
    memory_report(spec, get_scheme("q4_k_m"), context=1024, kv_dtype="q8_0")  # llama.cpp cache type: fine
    memory_report(spec, get_scheme("bf16"), context=1024, kv_dtype="fp8")  # vLLM fp8 cache: fine


# ------------------------------------------------------------------------------------------------
# Published checkpoint sizes (docs/research/quant_sizes.md collects the sources)
#
# Tolerances, relative to the published size in GB (1e9 bytes, as Hugging Face prints it):
# - 1% for single-format checkpoints (AWQ/GPTQ group 128, Q8_0, Q6_K, Q4_0, MXFP4, FP8, BF16): the bits
#   of every tensor are fixed by the format, so what is left is the HF page rounding each shard to three
#   significant digits (<0.3% of the total here), a few MB of GGUF metadata (tokenizer) and, for Q4_0,
#   Mixtral's attn_k/attn_v kept in Q8_0 (llama.cpp's n_expert == 8 rule, ~0.5%).
# - 2% for llama.cpp mixtures (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, IQ4_XS): moeplan applies llama-quant.cpp's
#   per-tensor rules by layer share, but cannot see imatrix-driven choices or per-file overrides, and
#   Hugging Face repos were made with different llama.cpp builds (noted per source below).
# ------------------------------------------------------------------------------------------------

TENSORBLOCK = "huggingface.co/tensorblock/Mixtral-8x7B-v0.1-GGUF README (llama.cpp b4242)"
BARTOWSKI_8X22B = "huggingface.co/bartowski/Mixtral-8x22B-v0.1-GGUF (llama.cpp b2636)"
BARTOWSKI_QWEN3 = "huggingface.co/bartowski/Qwen_Qwen3-30B-A3B-GGUF (llama.cpp b5200)"
MRADERMACHER_QWEN3 = "huggingface.co/mradermacher/Qwen3-30B-A3B-abliterated-GGUF (static quants)"

PUBLISHED_SIZES = [
    # int4 AWQ, group 128, router kept in fp16 (quant_config modules_to_not_convert ["gate"]).
    pytest.param("mixtral-8x7b", "awq", 24.65, 0.01,
                 id="mixtral-8x7b-awq: TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ 9.97+9.98+4.7 GB"),
    pytest.param("mixtral-8x7b", "fp8", 46.96, 0.01,
                 id="mixtral-8x7b-fp8: soprasteria/Mixtral-8x7B-Instruct-v0.1-FP8 10 shards"),
    # Q8_0 49.626 GB (tensorblock); TheBloke's legacy README lists 49.62 GB.
    pytest.param("mixtral-8x7b", "q8_0", 49.626, 0.01, id=f"mixtral-8x7b-q8_0: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q6_k", 38.381, 0.01, id=f"mixtral-8x7b-q6_k: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q4_0", 26.444, 0.01, id=f"mixtral-8x7b-q4_0: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q5_k_m", 33.230, 0.02, id=f"mixtral-8x7b-q5_k_m: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q4_k_m", 28.448, 0.02, id=f"mixtral-8x7b-q4_k_m: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q3_k_m", 22.546, 0.02, id=f"mixtral-8x7b-q3_k_m: {TENSORBLOCK}"),
    pytest.param("mixtral-8x7b", "q2_k", 17.311, 0.02, id=f"mixtral-8x7b-q2_k: {TENSORBLOCK}"),
    pytest.param("mixtral-8x22b", "q5_k_m", 99.96, 0.02, id=f"mixtral-8x22b-q5_k_m: {BARTOWSKI_8X22B}"),
    pytest.param("mixtral-8x22b", "q4_k_m", 85.58, 0.02, id=f"mixtral-8x22b-q4_k_m: {BARTOWSKI_8X22B}"),
    pytest.param("mixtral-8x22b", "q3_k_m", 67.78, 0.02, id=f"mixtral-8x22b-q3_k_m: {BARTOWSKI_8X22B}"),
    pytest.param("mixtral-8x22b", "q2_k", 52.10, 0.02, id=f"mixtral-8x22b-q2_k: {BARTOWSKI_8X22B}"),
    pytest.param("qwen3-30b-a3b", "bf16", 61.10, 0.01, id=f"qwen3-30b-a3b-bf16: {BARTOWSKI_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q8_0", 32.48, 0.01, id=f"qwen3-30b-a3b-q8_0: {BARTOWSKI_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q6_k", 25.10, 0.01, id=f"qwen3-30b-a3b-q6_k: {BARTOWSKI_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q5_k_m", 21.74, 0.02, id=f"qwen3-30b-a3b-q5_k_m: {BARTOWSKI_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q4_k_m", 18.7, 0.02, id=f"qwen3-30b-a3b-q4_k_m: {MRADERMACHER_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q3_k_m", 14.8, 0.02, id=f"qwen3-30b-a3b-q3_k_m: {MRADERMACHER_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "q2_k", 11.4, 0.02, id=f"qwen3-30b-a3b-q2_k: {MRADERMACHER_QWEN3}"),
    pytest.param("qwen3-30b-a3b", "iq4_xs", 16.7, 0.02, id=f"qwen3-30b-a3b-iq4_xs: {MRADERMACHER_QWEN3}"),
    pytest.param("mixtral-8x7b", "iq4_xs", 25.4, 0.02,
                 id="mixtral-8x7b-iq4_xs: mradermacher/Mixtral-8x7B-v0.1-GGUF (static quants)"),
    # gpt-oss ships MXFP4 experts; attention, embeddings and router in bf16.
    pytest.param("gpt-oss-20b", None, 13.76, 0.01,
                 id="gpt-oss-20b-native: openai/gpt-oss-20b tree 4.79+4.8+4.17 GB"),
    pytest.param("gpt-oss-120b", None, 65.3, 0.01,
                 id="gpt-oss-120b-native: the-qa-company/gpt-oss-120b HF-format files 65.3 GB"),
    # NOTE: DevQuasar's Q8_0 re-quantizes the MXFP4 experts to Q8_0; other gpt-oss GGUFs keep them MXFP4.
    pytest.param("gpt-oss-20b", "q8_0", 22.3, 0.01, id="gpt-oss-20b-q8_0: DevQuasar/openai.gpt-oss-20b-GGUF"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "quant", "published_gb", "tolerance"), PUBLISHED_SIZES)
def test_weights_match_published_checkpoint_size(name: str, quant: str | None, published_gb: float,
                                                 tolerance: float) -> None:  # fmt: skip
    spec = card(name)
    scheme = get_scheme(quant) if quant else native_scheme(spec)
    computed_gb = weight_bytes(spec, scheme).total / GB
    error = computed_gb / published_gb - 1
    assert abs(error) <= tolerance, f"{name} {scheme.name}: {computed_gb:.3f} GB vs {published_gb} GB ({error:+.1%})"


# ------------------------------------------------------------------------------------------------
# Activations and overhead, against measurements in the project's hardware_and_engines reference
# ------------------------------------------------------------------------------------------------

# hardware_and_engines.md section 2, [llmd] (llm-d/llm-d-benchmark empirical-vllm-memory-results.md):
# vLLM on an H100 measured 7.38 GiB peak activations for gpt-oss-20b/120b (MoE); non-torch memory
# 0.13 GiB at TP1 vs 0.55 GiB at TP2; 78.57 of 79.18 GiB free at startup.
LLMD_GPT_OSS_ACTIVATION_GIB = 7.38
LLMD_NON_TORCH_TP1_GIB, LLMD_NON_TORCH_TP2_GIB = 0.13, 0.55
LLMD_FREE_AT_START_GIB, LLMD_TOTAL_GIB = 78.57, 79.18


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_activation_peak_matches_vllm_measurement(name: str) -> None:
    measured = LLMD_GPT_OSS_ACTIVATION_GIB * GiB
    assert activation_bytes(card(name), 8192) == pytest.approx(measured, rel=0.01)


def test_overhead_matches_measurements() -> None:
    context = overhead_bytes(1, cuda_graphs=False)
    assert context / GiB == pytest.approx(LLMD_TOTAL_GIB - LLMD_FREE_AT_START_GIB, abs=0.02)
    nccl = overhead_bytes(2) - overhead_bytes(1)
    assert nccl / GiB == pytest.approx(LLMD_NON_TORCH_TP2_GIB - LLMD_NON_TORCH_TP1_GIB, abs=0.01)
    assert overhead_bytes(1) > overhead_bytes(1, cuda_graphs=False)


def test_activations_grow_with_chunk() -> None:
    spec = card("mixtral-8x7b")
    assert activation_bytes(spec, 2048) < activation_bytes(spec, 4096) < activation_bytes(spec, 8192)


# ------------------------------------------------------------------------------------------------
# memory_report
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quant", "kwargs"),
    [
        ("mixtral-8x7b", "bf16", {"context": 32_768}),
        ("gpt-oss-20b", "mxfp4", {"context": 131_072, "batch": 4}),
        ("deepseek-v3", "fp8-block", {"context": 8192, "kv_dtype": "fp8", "mtp": True}),
        ("jamba-v0.1", "int4", {"context": 200_000}),
        ("qwen3-30b-a3b", "q4_k_m", {"context": 40_000, "kv_dtype": "q8_0"}),
    ],
)
def test_memory_report_total_is_the_sum(name: str, quant: str, kwargs: dict[str, Any]) -> None:
    spec = card(name)
    rep = memory_report(spec, get_scheme(quant), **kwargs)
    assert rep.total_bytes == rep.weights_bytes + rep.kv_cache_bytes + rep.activation_bytes + rep.overhead_bytes
    assert rep.weights_bytes == sum(rep.weights.values())
    mla_naive = kwargs.get("mla_naive", False)
    kv_kwargs = {"kv_dtype": kwargs.get("kv_dtype", "bf16"), "include_mtp": kwargs.get("mtp", False)}
    assert rep.kv_cache_bytes == kv_cache_bytes(spec, kwargs["context"], kwargs.get("batch", 1), mla_naive=mla_naive,
                                                **kv_kwargs)  # fmt: skip


def test_memory_report_mixtral_bf16() -> None:
    rep = memory_report(card("mixtral-8x7b"), get_scheme("bf16"), context=8192)
    assert rep.weights_bytes == 93_405_585_408
    assert rep.kv_bytes_per_token == 131_072
    assert rep.kv_cache_bytes == 8192 * 131_072
    assert rep.chunk_tokens == 8192


def test_memory_report_windows_beyond() -> None:
    rep = memory_report(card("gpt-oss-20b"), get_scheme("mxfp4"), context=8192)
    assert rep.kv_bytes_per_token == 24 * 2048
    assert rep.kv_bytes_per_token_beyond_windows == 12 * 2048  # only the full-attention layers keep growing
    assert any("window" in note for note in rep.notes)


BAD_REPORTS = [
    pytest.param({"context": 0}, MoeplanError, "--context", id="context=0"),
    pytest.param({"context": MAX_CONTEXT + 1}, MoeplanError, "--context", id="context>max"),
    pytest.param({"context": 1024, "batch": 0}, MoeplanError, "--batch", id="batch=0"),
    pytest.param({"context": 1024, "kv_dtype": "q4"}, QuantError, "llama.cpp", id="q4-kv-with-bf16"),
    pytest.param({"context": 1024, "kv_dtype": "float7"}, QuantError, "KV cache dtype", id="unknown-kv-dtype"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_REPORTS)
def test_memory_report_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        memory_report(card("mixtral-8x7b"), get_scheme("bf16"), **kwargs)


def test_fp8_kv_with_gguf_rejected() -> None:
    with pytest.raises(QuantError, match="no fp8 KV cache"):
        memory_report(card("mixtral-8x7b"), get_scheme("q4_k_m"), context=1024, kv_dtype="fp8")


def test_max_context_accepted() -> None:
    rep = memory_report(card("mixtral-8x7b"), get_scheme("bf16"), context=MAX_CONTEXT)
    assert rep.kv_cache_bytes == MAX_CONTEXT * 131_072


# ------------------------------------------------------------------------------------------------
# `moeplan memory`
# ------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_memory_json() -> None:
    result = runner.invoke(app, ["memory", "mixtral-8x7b", "--quant", "bf16", "--context", "8192", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["weights_bytes"] == 93_405_585_408
    assert data["total_bytes"] == (
        data["weights_bytes"] + data["kv_cache_bytes"] + data["activation_bytes"] + data["overhead_bytes"]
    )


def test_cli_memory_defaults_to_native_scheme() -> None:
    result = runner.invoke(app, ["memory", "gpt-oss-20b", "--json"])
    assert result.exit_code == 0, result.output
    assert '"quant": "mxfp4"' in result.stdout


def test_cli_memory_table() -> None:
    result = runner.invoke(app, ["memory", "mixtral-8x7b", "-q", "bf16", "-c", "8192"])
    assert result.exit_code == 0, result.output
    assert "93,405,585,408" in result.stdout
    assert "GiB" in result.stdout and "GB" in result.stdout


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--context", "0"], "--context must be between 1 and"),
        (["--context", str(MAX_CONTEXT + 1)], "--context must be between 1 and"),
        (["--quant", "int3"], "unknown quantization 'int3'"),
        (["--kv-dtype", "q4"], "llama.cpp cache type"),
        (["--quant", "q4_k_m", "--kv-dtype", "fp8"], "no fp8 KV cache"),
        (["--batch", "0"], "--batch must be between"),
    ],
)
def test_cli_memory_bad_input_exit_2_one_line(args: list[str], text: str) -> None:
    result = runner.invoke(app, ["memory", "mixtral-8x7b", *args])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and text in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
