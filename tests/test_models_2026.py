"""Issue 12: the MoE models of 2026 (DeepSeek-V4, Gemma 4, Qwen3.5/3.6, Qwen3-Next, GLM-5, MiniMax-M2).

Facts: tests/fixtures/reference/moe_models_2026.yaml, a verbatim copy of the shared reference: each
model's config.json and its counted truth (transformers 5.23.0's own model class on the meta device,
every tensor grouped by component) and its KV cache and fixed state per sequence, each with how it
was derived. Other facts below name their source beside them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from moeplan import sources
from moeplan.cli import app
from moeplan.errors import ConfigError
from moeplan.kv_cache import bytes_per_token, cache_bytes
from moeplan.memory import memory_report, weight_bytes
from moeplan.params import VISION, count_params
from moeplan.plan import fit
from moeplan.quant import get_scheme, native_scheme
from moeplan.spec import ModelSpec, spec_from_config
from moeplan.hardware import parse_gpus

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "moe_models_2026.yaml"
REF: dict[str, dict[str, Any]] = {m["id"]: m for m in yaml.safe_load(FIXTURE.read_text())}
runner = CliRunner()


def from_config(model_id: str) -> ModelSpec:
    return spec_from_config(copy.deepcopy(REF[model_id]["config"]), name=model_id, hub_id=model_id)


def card(name: str) -> ModelSpec:
    found = sources.find_card(name)
    assert found is not None, name
    return found.spec()


# ------------------------------------------------------------------------------------------------
# Parameters: total within 0.1%, active within 0.5%, each component as the reference names it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", list(REF))
def test_counts_match_counted_truth(model_id: str) -> None:
    truth = REF[model_id]["counted_truth"]
    count = count_params(from_config(model_id))
    text_total = count.total_params - count.component(VISION).total  # the truth counts the text model
    assert text_total == pytest.approx(truth["total_params"], rel=1e-3)
    assert count.active_params == pytest.approx(truth["active_params"], rel=5e-3)
    assert count.active_params_excl_input_embedding == pytest.approx(
        truth["active_params_excl_input_embedding"], rel=5e-3)
    for name, expected in truth["components"].items():
        assert count.component(name).total == pytest.approx(expected, rel=1e-3), name
    # In fact every figure is exact: these are counts, not estimates.
    assert text_total == truth["total_params"]
    assert count.active_params == truth["active_params"]
    if "vision_tower_params" in truth and isinstance(truth["vision_tower_params"], int):
        assert count.component(VISION).total == truth["vision_tower_params"]
    if "mtp" in truth:
        assert count.mtp_params == truth["mtp"]["params_estimate"]


@pytest.mark.parametrize("model_id", list(REF))
def test_params_table_names_every_component(model_id: str) -> None:
    spec = from_config(model_id)
    path = Path(pytest.importorskip("tempfile").mkdtemp()) / "config.json"
    path.write_text(json.dumps(REF[model_id]["config"]))
    result = runner.invoke(app, ["params", str(path)])
    assert result.exit_code == 0, result.output
    for name in REF[model_id]["counted_truth"]["components"]:
        assert name in result.output
    assert spec.num_layers == REF[model_id]["config"].get("num_hidden_layers",
                                                        REF[model_id]["config"].get("text_config", {}).get(
                                                            "num_hidden_layers"))


def test_cards_read_like_their_configs() -> None:
    """The bundled cards hold the same configs (Gemma 4's card carries the full vision_config, which
    the reference's copy cut to its model_type, so only its text model is compared)."""
    pairs = {"deepseek-v4-pro": "deepseek-ai/DeepSeek-V4-Pro", "qwen3.6-35b-a3b": "Qwen/Qwen3.6-35B-A3B",
             "qwen3-next-80b-a3b": "Qwen/Qwen3-Next-80B-A3B-Instruct", "gemma-4-26b-a4b": "google/gemma-4-26B-A4B-it"}
    for name, model_id in pairs.items():
        a, b = count_params(card(name)), count_params(from_config(model_id))
        assert a.total_params - a.component(VISION).total == b.total_params - b.component(VISION).total
        assert a.active_params == b.active_params


def test_gemma4_vision_tower_from_the_card() -> None:
    # HF page of google/gemma-4-26B-A4B-it: 25.81B with the vision encoder (~0.55B by the card).
    count = count_params(card("gemma-4-26b-a4b"))
    assert count.total_params == pytest.approx(25.81e9, rel=1e-3)
    assert 0.5e9 < count.component(VISION).total < 0.6e9
    assert from_config("google/gemma-4-26B-A4B-it").notes  # the cut vision_config is said, not guessed


# ------------------------------------------------------------------------------------------------
# KV cache and fixed state: memory --context 32768 --json kv_cache_bytes within 3%
# ------------------------------------------------------------------------------------------------


def _expected_cache(model_id: str, context: int) -> float:
    """KV + fixed state for one bf16 sequence, from the reference's own per-model figures."""
    kv = REF[model_id]["kv_cache"]
    if "recurrent_state_per_sequence" in kv:  # Gated DeltaNet: full layers grow, linear ones are fixed
        return kv["kv_bytes_per_token_bf16"] * context + kv["recurrent_state_per_sequence"]["bytes_conv_bf16_ssm_fp32"]
    if "fixed_bytes_per_sequence" in kv:  # DeepSeek-V4: compressed rows grow, windows and compressors fixed
        return kv["kv_bytes_per_token_bf16"] * context + kv["fixed_bytes_per_sequence"]["total"]
    d = kv["detail"]  # Gemma 4: sliding layers capped at their window, global layers grow
    return d["sliding_cap_bytes_per_sequence"] + d["long_context_growth_bytes_per_token (past window)"] * context


@pytest.mark.parametrize("model_id", list(REF))
def test_memory_json_kv_cache_at_32k(model_id: str, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(REF[model_id]["config"]))
    result = runner.invoke(app, ["memory", str(path), "--context", "32768", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kv_cache_bytes"] == pytest.approx(_expected_cache(model_id, 32768), rel=0.03)
    assert data["kv_cache_bytes"] == data["kv_grows_bytes"] + data["kv_window_bytes"] + data["state_bytes"]


def test_deepseek_v4_cache_terms_exact() -> None:
    spec = from_config("deepseek-ai/DeepSeek-V4-Pro")
    kv = REF["deepseek-ai/DeepSeek-V4-Pro"]["kv_cache"]
    assert bytes_per_token(spec, "bf16", beyond_windows=True) == kv["kv_bytes_per_token_bf16"]  # 9,848
    c = cache_bytes(spec, 32768)
    fixed = kv["fixed_bytes_per_sequence"]
    assert c.window == fixed["swa_window_cache_bf16"]
    assert c.state == fixed["total"] - fixed["swa_window_cache_bf16"]
    assert c.by_term["indexer keys (1/4)"] == 32768 * (
        kv["kv_bytes_per_token_bf16"] - kv["kv_bytes_per_token_bf16_excl_indexer_keys"])


def test_linear_attention_state_is_fixed_and_fp32() -> None:
    for model_id in ("Qwen/Qwen3.6-35B-A3B", "Qwen/Qwen3-Next-80B-A3B-Instruct"):
        spec = from_config(model_id)
        state = REF[model_id]["kv_cache"]["recurrent_state_per_sequence"]
        short, long = cache_bytes(spec, 1000), cache_bytes(spec, 100_000)
        assert short.state == long.state == state["bytes_conv_bf16_ssm_fp32"]
        # Only the full-attention layers (1 in 4) grow: the old reading treated all layers as full.
        assert bytes_per_token(spec) == REF[model_id]["kv_cache"]["kv_bytes_per_token_bf16"]
        layers = REF[model_id]["kv_cache"]["layer_mix"]
        assert layers["full_attention"] * 4 == layers["full_attention"] + layers["gated_deltanet"]


def test_gemma4_long_context_growth_is_global_layers_only() -> None:
    spec = card("gemma-4-26b-a4b")
    detail = REF["google/gemma-4-26B-A4B-it"]["kv_cache"]["detail"]
    grow = cache_bytes(spec, 200_000).total - cache_bytes(spec, 100_000).total
    assert grow == 100_000 * detail["long_context_growth_bytes_per_token (past window)"]
    assert bytes_per_token(spec, beyond_windows=True) == detail["full_bytes_per_token_k_eq_v (one tensor)"]
    # The engines keep K and V apart on those layers (see kv_cache.layer_terms): twice the growth.
    assert bytes_per_token(spec, beyond_windows=True, engine=True) == detail["full_bytes_per_token_if_K_and_V_stored"]
    rep = memory_report(spec, get_scheme("bf16"), context=32768)
    assert rep.kv_bytes_per_token_beyond_windows == 10_240
    assert any("K=V" in n for n in rep.notes)


def test_fixed_state_has_its_own_memory_line() -> None:
    result = runner.invoke(app, ["memory", "qwen3.6-35b-a3b", "--context", "32768"])
    assert result.exit_code == 0, result.output
    assert "fixed state (64,389,120 B/sequence)" in result.output
    assert "linear-attention recurrent state" in result.output


# ------------------------------------------------------------------------------------------------
# Weights as shipped, and fit
# ------------------------------------------------------------------------------------------------


def test_deepseek_v4_pro_as_shipped_is_the_fp4_expert_checkpoint() -> None:
    spec = card("deepseek-v4-pro")
    scheme = native_scheme(spec)
    assert scheme.name == "fp4-experts"
    total = weight_bytes(spec, scheme).total
    # Reference: routed experts 1,547.4B x 0.53125 B (FP4 two per byte + a ue8m0 scale per 32) = 822.05 GB,
    # the whole checkpoint estimated at ~864 GB with its MTP layer.
    assert weight_bytes(spec, scheme).by_component["routed_experts"] == pytest.approx(822.05e9, rel=1e-4)
    assert 800e9 < total < 900e9
    # --quant applies on top as for any model.
    assert weight_bytes(spec, get_scheme("bf16")).total == pytest.approx(2 * 1_572_997_201_763, rel=1e-6)


def test_deepseek_v4_pro_does_not_fit_8xh100_as_shipped() -> None:
    spec = card("deepseek-v4-pro")
    gpus, _ = parse_gpus("8xH100")
    shipped = fit(spec, gpus, quant="fp4-experts")
    assert not shipped.fits
    full = fit(spec, gpus)
    verdict = next(v for v in full.verdicts if v.quant == "fp4-experts")
    assert not verdict.fits
    result = runner.invoke(app, ["fit", "deepseek-v4-pro", "--gpus", "8xH100", "--quant", "fp4-experts"])
    assert result.exit_code == 1, result.output


def test_qwen36_at_4bit_fits_one_rtx4090_with_its_largest_context() -> None:
    result = runner.invoke(app, ["fit", "qwen3.6-35b-a3b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--json"])
    assert result.exit_code == 0, result.output
    best = json.loads(result.output)["best"]
    assert best["fits"] and best["quant"] == "q4_k_m"
    assert 16_384 < best["max_context"] < 262_144
    text = runner.invoke(app, ["fit", "qwen3.6-35b-a3b", "--gpus", "1xRTX4090", "--quant", "q4_k_m"]).output
    assert f"up to {best['max_context']:,} tokens" in text


def test_gguf_size_matches_a_published_file() -> None:
    # ggml-org/Qwen3.6-35B-A3B-GGUF Qwen3.6-35B-A3B-Q4_K_M.gguf: 21,166,757,888 bytes (as listed by a
    # public download manifest); GGUF holds the text model only (the vision tower is the mmproj file).
    spec = card("qwen3.6-35b-a3b")
    assert weight_bytes(spec, get_scheme("q4_k_m")).total == pytest.approx(21_166_757_888, rel=0.01)


def test_fixed_state_limits_the_batch() -> None:
    spec = card("qwen3-next-80b-a3b")
    gpus, _ = parse_gpus("1xH100")
    plan = fit(spec, gpus, quant="int4", context=1024).best
    assert plan is not None and plan.fits
    row = plan.per_gpu[0]
    per_seq = cache_bytes(spec, 1024, engine=True).total
    assert per_seq > 1024 * 24_576  # the fixed state is part of each sequence's cost
    assert plan.max_batch * per_seq <= row.budget_bytes - row.weights_bytes


def test_layout_splits_new_caches_by_heads() -> None:
    from moeplan.layout import Layout, stage_kv_bytes

    v4 = card("deepseek-v4-flash")
    one = Layout(tp=1, ep=1, pp=1, stage_layers=(v4.num_layers,))
    eight = one.model_copy(update={"tp": 8})
    # One shared KV head: every TP rank keeps the whole compressed cache (vLLM replicates it).
    assert stage_kv_bytes(v4, eight, 0, 32768, 1, "bf16") == stage_kv_bytes(v4, one, 0, 32768, 1, "bf16")
    qn = card("qwen3-next-80b-a3b")
    one = Layout(tp=1, ep=1, pp=1, stage_layers=(qn.num_layers,))
    two = one.model_copy(update={"tp": 2})
    # GQA KV (2 heads) and the DeltaNet state (16 k / 32 v heads) both halve at TP2.
    assert stage_kv_bytes(qn, two, 0, 32768, 1, "bf16") * 2 == pytest.approx(
        stage_kv_bytes(qn, one, 0, 32768, 1, "bf16"), abs=4)


def test_models_lists_the_2026_cards() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("deepseek-v4-pro", "deepseek-v4-flash", "gemma-4-26b-a4b", "qwen3.6-35b-a3b", "qwen3.5-397b-a17b",
                 "qwen3-next-80b-a3b", "glm-5", "minimax-m2"):
        assert name in result.output


@pytest.mark.parametrize(
    ("name", "total_b", "active_b"),
    [
        # Published totals (model cards, as the cards cite them); active in the vendor's convention.
        ("deepseek-v4-flash", 284, 13),
        ("qwen3.5-397b-a17b", 397, 17),
        ("glm-5", 744, 40),
        ("minimax-m2", 230, 10),
    ],
)
def test_sibling_releases_near_their_published_sizes(name: str, total_b: float, active_b: float) -> None:
    count = count_params(card(name))
    assert count.total_params / 1e9 == pytest.approx(total_b, rel=0.01)
    assert count.active_params_excl_input_embedding / 1e9 == pytest.approx(active_b, rel=0.06)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ------------------------------------------------------------------------------------------------


def _bad(mutate: Any, model_id: str) -> dict[str, Any]:
    cfg = copy.deepcopy(REF[model_id]["config"])
    mutate(cfg)
    return cfg


def _drop_text(cfg: dict[str, Any]) -> None:
    del cfg["text_config"]


def _short_layer_types(cfg: dict[str, Any]) -> None:
    cfg["text_config"]["layer_types"] = cfg["text_config"]["layer_types"][:-3]


def _unknown_kind(cfg: dict[str, Any]) -> None:
    cfg["text_config"]["layer_types"][2] = "mystery_attention"


def _short_ratios(cfg: dict[str, Any]) -> None:
    cfg["compress_ratios"] = cfg["compress_ratios"][:40]


def _odd_ratio(cfg: dict[str, Any]) -> None:
    cfg["compress_ratios"][5] = 7


def _ratio_scalar(cfg: dict[str, Any]) -> None:
    cfg["compress_ratios"] = 4


def _too_many_hash_layers(cfg: dict[str, Any]) -> None:
    cfg["num_hash_layers"] = 100


def _unknown_expert_dtype(cfg: dict[str, Any]) -> None:
    cfg["expert_dtype"] = "fp3"


BAD = [
    pytest.param(_bad(_drop_text, "google/gemma-4-26B-A4B-it"), "text_config", id="wrapper-without-text"),
    pytest.param(_bad(_drop_text, "Qwen/Qwen3.6-35B-A3B"), "text_config", id="qwen-wrapper-without-text"),
    pytest.param(_bad(_short_layer_types, "Qwen/Qwen3.6-35B-A3B"), "layer_types has 37 entries", id="layer-types-len"),
    pytest.param(_bad(_unknown_kind, "google/gemma-4-26B-A4B-it"), "unknown layer kind 'mystery_attention'",
                 id="unknown-kind"),
    pytest.param(_bad(_short_ratios, "deepseek-ai/DeepSeek-V4-Pro"), "compress_ratios has 40 entries",
                 id="compress-ratios-len"),
    pytest.param(_bad(_odd_ratio, "deepseek-ai/DeepSeek-V4-Pro"), "compress_ratios[5] is 7", id="compress-ratio-7"),
    pytest.param(_bad(_ratio_scalar, "deepseek-ai/DeepSeek-V4-Pro"), "compress_ratios must be a list",
                 id="compress-ratios-scalar"),
    pytest.param(_bad(_too_many_hash_layers, "deepseek-ai/DeepSeek-V4-Pro"), "num_hash_layers is 100, more than the 61",
                 id="hash-layers-beyond-the-model"),
    pytest.param(_bad(_unknown_expert_dtype, "deepseek-ai/DeepSeek-V4-Pro"), "expert_dtype 'fp3' is not one",
                 id="unknown-expert-dtype"),
]


@pytest.mark.parametrize(("config", "needle"), BAD)
def test_bad_2026_configs_are_one_line_exit_2(config: dict[str, Any], needle: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        spec_from_config(config, name="bad")
    assert needle in str(err.value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = runner.invoke(app, ["params", str(path)])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


# google/gemma-3-27b-it config.json (the Hub, its keys that size the model). 27,432,406,640 is what
# transformers 5.23's Gemma3ForConditionalGeneration holds for it on the meta device, 423,060,336 of
# them the SigLIP tower and the multimodal projector (counted here on 2026-12-03).
GEMMA3_27B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "torch_dtype": "bfloat16",
    "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
                    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
                    "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024, "vocab_size": 262208, "max_position_embeddings": 131072},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_gemma3_counts_its_siglip_tower_and_projector() -> None:
    count = count_params(spec_from_config(GEMMA3_27B, name="gemma-3-27b"))
    assert count.total_params == 27_432_406_640
    assert count.component("vision").total == 423_060_336
    bare = copy.deepcopy(GEMMA3_27B)
    bare["vision_config"] = {"model_type": "siglip_vision_model"}  # sizes cut: nothing to count, and said
    spec = spec_from_config(bare, name="gemma-3-27b")
    assert count_params(spec).total_params == 27_432_406_640 - 423_060_336
    assert spec.notes == ("vision tower not counted: vision_config (siglip_vision_model) gives no sizes",)


# Qwen/Qwen3-VL-30B-A3B-Instruct's config.json (the Hub; the keys that size it). 31,070,754,032 is what
# transformers 5.23's Qwen3VLMoeForConditionalGeneration holds for it on the meta device (counted here
# on 2026-12-03); the text model's attention is Qwen3's, with per-head q/k norms.
QWEN3_VL_30B: dict[str, Any] = {'architectures': ['Qwen3VLMoeForConditionalGeneration'],
 'model_type': 'qwen3_vl_moe',
 'image_token_id': 151655,
 'video_token_id': 151656,
 'vision_start_token_id': 151652,
 'vision_end_token_id': 151653,
 'tie_word_embeddings': False,
 'text_config': {'model_type': 'qwen3_vl_moe_text',
                 'hidden_size': 2048,
                 'num_hidden_layers': 48,
                 'num_attention_heads': 32,
                 'num_key_value_heads': 4,
                 'head_dim': 128,
                 'moe_intermediate_size': 768,
                 'num_experts': 128,
                 'num_experts_per_tok': 8,
                 'vocab_size': 151936,
                 'intermediate_size': 6144,
                 'decoder_sparse_step': 1,
                 'mlp_only_layers': [],
                 'rms_norm_eps': 1e-06,
                 'max_position_embeddings': 262144,
                 'tie_word_embeddings': False,
                 'hidden_act': 'silu',
                 'rope_theta': 5000000,
                 'rope_scaling': {'mrope_interleaved': True,
                                  'mrope_section': [24, 20, 20],
                                  'rope_type': 'default'},
                 'attention_bias': False,
                 'norm_topk_prob': True},
 'vision_config': {'model_type': 'qwen3_vl_moe',
                   'depth': 27,
                   'hidden_size': 1152,
                   'intermediate_size': 4304,
                   'num_heads': 16,
                   'out_hidden_size': 2048,
                   'patch_size': 16,
                   'spatial_merge_size': 2,
                   'temporal_patch_size': 2,
                   'deepstack_visual_indexes': [8, 16, 24],
                   'num_position_embeddings': 2304,
                   'in_channels': 3,
                   'hidden_act': 'gelu_pytorch_tanh'}}


def test_qwen3_vl_moe_wrapper_counts_like_transformers() -> None:
    assert count_params(spec_from_config(QWEN3_VL_30B, name="qwen3-vl-30b-a3b")).total_params == 31_070_754_032
