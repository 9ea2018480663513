"""moeplan bench: real torch layers on CPU, tiny sizes (and true sizes on the meta device)."""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any

import pytest
import yaml

torch = pytest.importorskip("torch")

from moeplan.bench import ep as bench_ep  # noqa: E402
from moeplan.bench import harness  # noqa: E402
from moeplan.bench.layers import (  # noqa: E402
    GatedFFN,
    build_layers,
    experts_forward,
    grouped_mm_supported,
    moe_reference,
    param_bytes,
    param_count,
)
from moeplan import calibration  # noqa: E402
from moeplan.bench.run import BenchResult, predicted_param_bytes, run_bench, save_result_calibration  # noqa: E402
from moeplan.errors import BenchUnavailableError, MoeplanError  # noqa: E402
from moeplan.memory import kv_bytes_per_token, kv_cache_bytes  # noqa: E402
from moeplan.params import count_params, layer_params, vision_params  # noqa: E402
from moeplan.sources import find_card  # noqa: E402
from moeplan.spec import LayerSpec, MLASpec, ModelSpec  # noqa: E402

# Tiny GQA model: a full and a sliding layer, per-head q/k norm, 8 experts top-2.
TINY = ModelSpec(
    name="tiny-moe", hidden_size=64, vocab_size=128, num_attention_heads=4, num_kv_heads=2, head_dim=16,
    layers=(LayerSpec(ffn="moe"), LayerSpec(mixer="sliding", window=4, ffn="moe")),
    num_experts=8, experts_per_token=2, expert_intermediate_size=32, qk_norm="per_head",
)  # fmt: skip
# Tiny DeepSeek-V3 shape: MLA, a dense first layer, sigmoid router with correction bias, a shared expert.
TINY_MLA = ModelSpec(
    name="tiny-mla", hidden_size=64, vocab_size=128, num_attention_heads=4, num_kv_heads=4, head_dim=24,
    attention="mla", mla=MLASpec(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16),
    layers=(LayerSpec(ffn="dense"), LayerSpec(ffn="moe")), dense_intermediate_size=96,
    num_experts=8, experts_per_token=2, expert_intermediate_size=32, num_shared_experts=1,
    shared_expert_intermediate_size=32, router_scoring="sigmoid", router_correction_bias=True,
    routed_scaling_factor=2.5,
)  # fmt: skip
# Every optional weight at once: biases, sinks, a gated shared expert, four norms, LayerNorm.
TINY_EXTRAS = TINY.model_copy(
    update=dict(name="tiny-extras", qkv_bias=True, o_bias=True, attention_sinks=True, router_bias=True,
                expert_bias=True, shared_expert_intermediate_size=48, num_shared_experts=1, shared_expert_gate=True,
                norms_per_layer=4, norm="layernorm", qk_norm="full")
)  # fmt: skip
GROUPED = grouped_mm_supported("cpu", None, torch.float32)


def _dtype(name: str) -> Any:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------------
# Parameters: counted == built, to the element
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TINY, TINY_MLA, TINY_EXTRAS], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_measured_param_bytes_equal_predicted(spec: ModelSpec, dtype: str) -> None:
    model = build_layers(spec, 2, dtype, "cpu")
    assert param_bytes(model) == predicted_param_bytes(spec, model.layer_specs, dtype, full=False)
    full = build_layers(spec, dtype=dtype, device="cpu", full=True)
    assert param_bytes(full) == predicted_param_bytes(spec, spec.layers, dtype, full=True)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"])
def test_meta_layer_and_full_counts_match_params(name: str) -> None:
    spec = find_card(name).spec()
    one = build_layers(spec, 1, "bf16", torch.device("meta"))
    counted = sum(total for total, _ in layer_params(spec, spec.layers[one.indices[0]]).values())
    assert spec.layers[one.indices[0]].ffn == "moe"  # DeepSeek-V3's first 3 layers are dense: skipped
    assert param_count(one) == counted
    full = build_layers(spec, dtype="bf16", device=torch.device("meta"), full=True)
    assert param_count(full) == count_params(spec).total_params - vision_params(spec)


def test_mixtral_full_model_on_meta_is_46_7b() -> None:
    full = build_layers(find_card("mixtral-8x7b").spec(), dtype="bf16", device=torch.device("meta"), full=True)
    assert sum(p.numel() for p in full.parameters()) == 46_702_792_704


def test_layers_prefer_moe_and_stay_in_range() -> None:
    spec = find_card("deepseek-v3").spec()
    meta = torch.device("meta")
    assert build_layers(spec, 2, "bf16", meta).indices == [3, 4]
    assert build_layers(spec, 61, "bf16", meta).indices == list(range(61))
    with pytest.raises(MoeplanError, match="between 1 and 61"):
        build_layers(spec, 62, "bf16", meta)


# ----------------------------------------------------------------------------------------------
# The MoE forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_sorted_experts_equal_reference_loop(dtype: str, path: str, tokens: int) -> None:
    if path == "grouped_mm" and not grouped_mm_supported("cpu", None, _dtype(dtype)):
        pytest.skip("torch._grouped_mm has no CPU kernel in this torch")
    block = build_layers(TINY_EXTRAS, 1, dtype, "cpu").moe_blocks()[0]
    torch.nn.init.uniform_(block.experts.gate_up_bias, -0.1, 0.1)
    x = torch.randn(tokens, 64, dtype=_dtype(dtype))
    weights, ids = block.router(x)
    out, counts, ran = experts_forward(x, weights, ids, block.experts, path)
    assert ran == path and int(counts.sum()) == tokens * 2
    torch.testing.assert_close(out, moe_reference(x, weights, ids, block.experts))


def test_default_path_is_grouped_mm_where_supported() -> None:
    model = build_layers(TINY, 1, "fp32", "cpu")
    model(torch.randn(1, 3, 64))
    assert model.moe_blocks()[0].last_path == ("grouped_mm" if GROUPED else "loop")


def test_misaligned_widths_fall_back_to_loop() -> None:
    # (6, 8) x (3, 8, 5) fails with "strides should be multiple of 16 bytes" (reference file, section 5).
    spec = TINY.model_copy(update=dict(expert_intermediate_size=5))
    model = build_layers(spec, 1, "fp32", "cpu")
    model(torch.randn(1, 3, 64))
    assert model.moe_blocks()[0].last_path == "loop"


def test_one_expert_top1_equals_dense_swiglu() -> None:
    spec = TINY.model_copy(update=dict(num_experts=1, experts_per_token=1))
    block = build_layers(spec, 1, "fp32", "cpu").moe_blocks()[0]
    inter = spec.expert_intermediate_size
    dense = GatedFFN(64, inter, torch.device("cpu"), torch.float32)
    gate_up, down = block.experts.gate_up[0], block.experts.down[0]  # (H, 2I), (I, H)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(gate_up[:, :inter].T)
        dense.up_proj.weight.copy_(gate_up[:, inter:].T)
        dense.down_proj.weight.copy_(down.T)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(block(x), dense(x))


# ----------------------------------------------------------------------------------------------
# Attention and caches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TINY, TINY_MLA, TINY_EXTRAS], ids=lambda s: s.name)
def test_decode_on_cache_equals_full_prefill(spec: ModelSpec) -> None:
    """A cached decode step (ring buffer on the sliding layer, absorbed MLA) gives the same hidden
    state as running the whole sequence at once."""
    model = build_layers(spec, 2, "fp32", "cpu")
    x = torch.randn(2, 9, 64)
    with torch.inference_mode():
        whole = model(x)
        caches = model.new_caches(2, 9)
        model(x[:, :8], caches, 0)
        step = model(x[:, 8:], caches, 8)
    torch.testing.assert_close(step[:, 0], whole[:, 8], rtol=1e-4, atol=1e-4)


def test_mla_cache_holds_the_latent_per_token() -> None:
    model = build_layers(TINY_MLA, 2, "bf16", "cpu")
    batch, tokens = 3, 10
    caches = model.new_caches(batch, tokens)
    m = TINY_MLA.mla
    assert m is not None
    per_layer = [c.nbytes // (batch * tokens) for c in caches]
    assert per_layer == [(m.kv_lora_rank + m.qk_rope_head_dim) * 2] * 2
    assert sum(per_layer) == kv_bytes_per_token(TINY_MLA, kv_dtype="bf16")  # the planner's formula


def test_sliding_layer_cache_is_capped_at_its_window() -> None:
    caches = build_layers(TINY, 2, "bf16", "cpu").new_caches(3, 100)
    assert [c.capacity for c in caches] == [100, 4]
    assert sum(c.nbytes for c in caches) == kv_cache_bytes(TINY, 100, 3, "bf16")


# ----------------------------------------------------------------------------------------------
# Expert parallel
# ----------------------------------------------------------------------------------------------


def test_expert_split_is_uneven_when_not_divisible() -> None:
    assert bench_ep.expert_split(8, 3) == [3, 3, 2]
    with pytest.raises(MoeplanError, match="between 1 and num_experts"):
        bench_ep.expert_split(4, 5)


@pytest.mark.parametrize("tokens", [5, 1])  # 1 token: rank 1 routes none of its own
def test_two_rank_gloo_expert_parallel_equals_one_process(tokens: int) -> None:
    spec = TINY_MLA.model_copy(update=dict(num_experts=7))  # 4 + 3 experts
    block = build_layers(spec, 1, "fp32", "cpu").moe_blocks()[0]
    torch.nn.init.uniform_(block.router.e_score_correction_bias, -0.1, 0.1)
    x = torch.randn(tokens, 64)
    with torch.inference_mode():
        expected = block.routed(x)
    result = bench_ep.run_ep(spec, ep=2, x=x, block=block, repeats=1, warmup=0)
    assert result.experts_per_rank == [4, 3]
    assert result.dispatch_s > 0 and result.combine_s > 0
    torch.testing.assert_close(result.output, expected)


# ----------------------------------------------------------------------------------------------
# run_bench: a sweep on real layers, predicted with moeplan.perf.step_cost
# ----------------------------------------------------------------------------------------------

# On CPU torch._grouped_mm always runs ATen's per-expert fallback loop (GroupedMMUtils.h).
CPU_PATH = "grouped_mm/fallback" if GROUPED else "loop"


@pytest.mark.parametrize("spec", [TINY, TINY_MLA], ids=lambda s: s.name)
def test_run_bench_smoke_on_cpu(spec: ModelSpec) -> None:
    steps: list[tuple[str, int, int]] = []
    result = run_bench(spec, device="cpu", dtype="fp32", batch=2, context=32, prompt=16, layers=2, repeats=2,
                       on_step=lambda d, done, total: steps.append((d, done, total)))  # fmt: skip
    assert result.fits and result.oom is None
    assert result.path == CPU_PATH and result.mode == "eager"
    assert result.measured.param_bytes == result.predicted.param_bytes
    assert result.errors["param_bytes"] == 0
    assert result.measured.decode_s and result.measured.prefill_s and result.measured.peak_bytes
    assert result.achieved is not None and result.achieved.decode_gb_per_s > 0
    assert result.copy_gb_per_s and result.copy_gb_per_s > 0
    assert all(1 <= n <= 2 * 2 for n in result.achieved.distinct_experts)  # batch 2 x top-2, of 8
    assert [(p.kind, p.batch, p.tokens) for p in result.points] == [("prefill", 1, 16), ("decode", 2, 1)]
    for p in result.points:
        assert p.min_s <= p.q1_s <= p.measured_s <= p.q3_s <= p.max_s and p.repeats == 2
        assert p.calibrated_s is not None and p.predicted_s > 0
    assert steps[-1][1] == steps[-1][2]  # the progress reaches its total
    dumped = result.model_dump()
    json.dumps(dumped)
    assert set(dumped["predicted"]) == set(dumped["measured"]) == {"param_bytes", "peak_bytes", "decode_s", "prefill_s"}
    assert {"model", "device", "device_name", "path", "mode", "points", "calibration", "dtype", "layers", "errors",
            "achieved", "fits", "routing_check", "copy_gb_per_s"} <= set(dumped)  # fmt: skip


def test_run_bench_full_model_smoke() -> None:
    result = run_bench(TINY, device="cpu", dtype="bf16", full=True, context=8, prompt=8, batch=1, repeats=1)
    assert result.fits and result.layers == [0, 1]
    assert result.measured.param_bytes == (count_params(TINY).total_params) * 2
    # the lm_head is one more roofline term, without a layer overhead
    assert all(len(p.at_peak) == 3 for p in result.points)


def test_out_of_memory_is_a_result_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(harness, "peak_bytes_of", oom)
    result = run_bench(TINY, device="cpu", dtype="fp32", context=8, prompt=8, batch=1, repeats=1)
    assert result.fits is False and "out of memory" in (result.oom or "")
    assert result.measured.param_bytes == result.predicted.param_bytes  # the weights did fit
    assert result.measured.decode_s is None and result.points == []


def test_too_big_for_host_ram_is_not_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    import moeplan.bench.run as bench_run

    monkeypatch.setattr(bench_run, "host_memory_bytes", lambda: (2**30, 1024))
    result = run_bench(TINY, device="cpu", dtype="fp32", context=8, prompt=8, batch=1, repeats=1)
    assert result.fits is False and (result.oom or "").startswith("not tried")


def test_other_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(harness, "peak_bytes_of", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_bench(TINY, device="cpu", dtype="fp32", context=8, prompt=8, batch=1, repeats=1)


def test_without_torch_bench_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(BenchUnavailableError, match="pip install 'moeplan\\[bench\\]'"):
        run_bench(TINY, device="cpu")


def test_bench_result_is_the_json_model() -> None:
    assert {"fits", "errors", "points", "calibration", "mode", "path"} <= set(BenchResult.model_fields)


# ----------------------------------------------------------------------------------------------
# Calibration file
# ----------------------------------------------------------------------------------------------


def test_calibration_path_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path / "cache"))
    assert calibration.calibration_path() == tmp_path / "cache" / "calibration.json"
    monkeypatch.delenv("MOEPLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.calibration_path() == tmp_path / "xdg" / "moeplan" / "calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration.calibration_path() == tmp_path / "home" / ".cache" / "moeplan" / "calibration.json"


def test_calibration_round_trip_and_clipping(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    assert calibration.load_calibration("H100", "bf16") is None
    path = calibration.save_calibration("H100", "bf16", 0.71, 0.55, "test")
    calibration.save_calibration("H100", "fp32", 1.7, 0.01, "test")  # clipped into (0.05, 1.0]
    assert path == tmp_path / "calibration.json"
    got = calibration.load_calibration("H100", "bf16")
    assert got is not None and (got["memory"], got["compute"], got["source"]) == (0.71, 0.55, "test") and got["date"]
    fp32 = calibration.load_calibration("H100", "fp32")
    assert fp32 is not None and (fp32["memory"], fp32["compute"]) == (1.0, 0.05)
    # fp16 and bf16 are one compute class: a bench run in fp16 is what perf reads for a bf16 or fp16 plan.
    calibration.save_calibration("H100", "fp16", 0.6, 0.5, "fp16 run")
    both = calibration.load_calibration("H100", "bf16")
    assert both is not None and both["source"] == "fp16 run" == calibration.load_calibration("H100", "fp16")["source"]
    assert calibration.efficiency(1.0, 4.0) == 0.25
    with pytest.raises(MoeplanError, match="positive"):
        calibration.efficiency(1.0, 0.0)


def test_damaged_calibration_file_is_an_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    (tmp_path / "calibration.json").write_text("{not json", encoding="utf-8")
    assert calibration.load_calibration("H100", "bf16") is None
    calibration.save_calibration("H100", "bf16", 0.5, 0.5, "test")
    assert calibration.load_calibration("H100", "bf16") is not None


def test_bench_result_calibration_is_saved(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    result = run_bench(TINY, device="cpu", dtype="fp32", context=8, prompt=8, batch=1, repeats=1)
    assert result.calibration is not None and result.efficiency is not None
    assert save_result_calibration(result) == tmp_path / "calibration.json"
    saved = calibration.load_calibration(result.gpu, "fp32")
    assert saved is not None and saved["memory"] == result.calibration.memory
    assert saved["layer_s"] == result.calibration.layer_s
    perf = importlib.import_module("moeplan.perf")
    eff = perf.efficiency_for(harness.host_gpu(), "fp32")  # the planner picks the measured terms up
    assert (eff.memory, eff.compute, eff.layer_s) == (result.calibration.memory, result.calibration.compute,
                                                      result.calibration.layer_s)


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------


def test_cli_bench_json_and_save_calibration(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from moeplan.cli import app

    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path / "cache"))
    card = tmp_path / "tiny-moe.yaml"
    card.write_text(yaml.safe_dump({"name": "tiny-moe", "spec": TINY.model_dump(mode="json")}))
    args = ["bench", str(card), "--device", "cpu", "--quant", "fp32", "--batch", "2,4", "--context", "32",
            "--prompt", "16", "--layers", "2", "--repeats", "2"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--json", "--save-calibration"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device"] == "cpu" and data["path"] == CPU_PATH
    assert set(data["predicted"]) == set(data["measured"]) == {"param_bytes", "peak_bytes", "decode_s", "prefill_s"}
    assert data["measured"]["param_bytes"] == data["predicted"]["param_bytes"]
    saved = json.loads((tmp_path / "cache" / "calibration.json").read_text())
    assert list(saved) == [f"{data['gpu']}|fp32"] and "moeplan bench" in saved[f"{data['gpu']}|fp32"]["source"]
    assert [p["batch"] for p in data["points"] if p["kind"] == "decode"] == [2, 4]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "param_bytes" in table.stdout and "measured" in table.stdout
    assert f"MoE kernel path: {CPU_PATH}" in table.stdout and "decode b4" in table.stdout
    assert "calibrated" in table.stdout and "of copy" in table.stdout
    bad = CliRunner().invoke(app, ["bench", str(card), "--device", "tpu"])
    assert bad.exit_code == 2


def test_ep_times_carry_the_communication_model_on_a_gpu() -> None:
    from rich.console import Console

    from moeplan.bench.run import EpTimes, with_comm_model
    from moeplan.bench.table import bench_renderables
    from moeplan.hardware import parse_gpus
    from moeplan.perf import ep_alltoall_seconds

    h100 = parse_gpus("1xH100")[0][0]
    measured = EpTimes(ranks=8, experts_per_rank=[1] * 8, tokens=64, layout_s=1e-4, dispatch_s=1e-4, experts_s=2e-4,
                       combine_s=1e-4, path="grouped_mm", busiest_assignments=5,
                       predicted_busiest_assignments=4.2)  # fmt: skip
    notes: list[str] = []
    got = with_comm_model(measured, TINY, h100, dtype="bf16", batch=8, notes=notes)
    # 8 tokens x top-2 x hidden 64 x 2 bytes per rank, 7/8 of it to peers over NVLink, plus latency.
    want = ep_alltoall_seconds(8 * 2 * 64 * 2, 8, h100)
    assert got.predicted_dispatch_s == got.predicted_combine_s == want
    # NVLink4's measured NCCL all-to-all: a 7.4 us floor and 315 GB/s busBW (moeplan.comm, [aic] H100 data).
    assert want == pytest.approx(7 / 8 * 2048 / 315e9 + 7.4e-6)
    assert notes == []
    cpu = with_comm_model(measured, TINY, harness.device_info(torch.device("cpu"))[1], dtype="bf16", batch=8,
                          notes=notes)  # fmt: skip
    assert cpu.predicted_dispatch_s is None and "measured only" in notes[0]
    result = run_bench(TINY, device="cpu", dtype="fp32", context=8, prompt=8, batch=1, repeats=1)
    console = Console(width=200, record=True)
    for part in bench_renderables(result.model_copy(update={"ep": got})):
        console.print(part)
    text = console.export_text()
    assert "EP dispatch (all-to-all)" in text and "busiest rank's token-expert pairs" in text
