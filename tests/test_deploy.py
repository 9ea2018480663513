"""Issue 8: deployment specs checked in CI, and the engine command that runs the plan.

Speed comes from a fixed fake ranker so these tests pin deploy.py's logic, not the roofline; one
test runs the examples through the real moeplan.perf and the CLI."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from moeplan import deploy
from moeplan.deploy import (
    ENGINE_ENV, ENGINE_FLAGS, ENGINE_PROGRAM, KV_CACHE_CHOICES, CheckResult, DeploySpec, Serving, SpecError, check,
    check_path, emit, emit_for_fit, launch, load_spec, render_github, render_markdown, schema, summary_rows,
)  # fmt: skip
from moeplan.errors import MoeplanError
from moeplan.hardware import Gpu, parse_gpus
from moeplan.layout import Layout, Scenario
from moeplan.plan import Plan, Speed, evaluate, fit, plans_for_quant
from moeplan.quant import QuantScheme, get_scheme
from moeplan.sources import resolve
from moeplan.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PASS, NOFIT, SLOW, INVALID = (EXAMPLES / n for n in (
    "mixtral-2x4090-pass.yaml", "deepseek-v3-8xh100-fail.yaml", "qwen3-latency-fail.yaml", "invalid.yaml"))  # fmt: skip
VALID_EXAMPLES = (PASS, NOFIT, SLOW)
FAKE_TPOT_S = 0.02


def fake_rank(spec: ModelSpec, scheme: QuantScheme, plan: Plan, gpus: tuple[Gpu, ...], sc: Scenario) -> Plan:
    """A fixed speed: 50 tok/s per sequence (20 ms TPOT), 5,000 tok/s prefill, 0.2 s TTFT."""
    speed = Speed(decode_tok_per_s=1 / FAKE_TPOT_S, decode_tok_per_s_total=sc.batch / FAKE_TPOT_S,
                  prefill_tok_per_s=5000.0, ttft_s=0.2, tpot_s=FAKE_TPOT_S, bound="memory")  # fmt: skip
    return plan.model_copy(update={"speed": speed})


def line_of(path: Path, key: str) -> int:
    """1-based line where `key:` first appears (ignoring indentation)."""
    for i, text in enumerate(path.read_text().splitlines(), start=1):
        if text.strip().startswith(f"{key}:"):
            return i
    raise AssertionError(f"{key} not in {path}")


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """\
model: mixtral-8x7b
engine: {engine}
gpus: {gpus}
{extra}serving:
  context: {context}
  batch: {batch}
  kv_dtype: {kv}
  mem_fraction: {frac}
"""


def spec_text(engine: str = "vllm", gpus: str = "2xH100", extra: str = "", context: int = 8192, batch: int = 4,
              kv: str = "bf16", frac: float = 0.9) -> str:  # fmt: skip
    return BASE.format(engine=engine, gpus=gpus, extra=extra, context=context, batch=batch, kv=kv, frac=frac)


# ------------------------------------------------------------------------------------------------
# Examples: exit codes and reasons
# ------------------------------------------------------------------------------------------------


def test_passing_example_exits_0() -> None:
    result = check_path(PASS, rank=fake_rank)
    assert result.exit_code == 0, [f.message for f in result.findings]
    assert result.passed and result.fits and result.errors == []
    assert {f.target for f in result.findings} >= {"fits", "min_decode_tok_per_s", "max_ttft_s"}
    assert result.command is not None and result.command.startswith("llama-server ")


def test_example_that_does_not_fit_exits_1_with_the_overflow() -> None:
    result = check_path(NOFIT, rank=fake_rank)
    assert result.exit_code == 1
    assert not result.fits and result.plan is None and result.command is None
    (miss,) = [f for f in result.findings if not f.passed]
    assert miss.target == "fits"
    assert miss.predicted is not None and miss.limit is not None and miss.gap is not None
    assert miss.predicted > miss.limit
    assert miss.gap == pytest.approx(miss.predicted - miss.limit)
    assert "does not fit" in miss.message and "over by" in miss.message
    assert miss.line == line_of(NOFIT, "gpus")


def test_example_that_misses_latency_exits_1_naming_target_prediction_and_gap() -> None:
    result = check_path(SLOW, rank=fake_rank)
    assert result.exit_code == 1 and result.fits
    tpot = next(f for f in result.findings if f.target == "max_tpot_s")
    assert not tpot.passed
    assert tpot.predicted == pytest.approx(FAKE_TPOT_S)
    assert tpot.limit == 0.002
    assert tpot.gap == pytest.approx(FAKE_TPOT_S - 0.002)
    assert tpot.line == line_of(SLOW, "max_tpot_s")
    assert "max_tpot_s" in tpot.message and "0.02" in tpot.message and "over by 0.018" in tpot.message
    assert result.command is not None  # it fits, so it still gets a launch command


def test_invalid_example_exits_2_naming_each_field_with_its_line() -> None:
    result = check_path(INVALID, rank=fake_rank)
    assert result.exit_code == 2 and not result.passed
    got = {p.field: p.line for p in result.errors}
    assert got == {
        "engine": line_of(INVALID, "engine"),
        "gpus": line_of(INVALID, "gpus"),
        "serving.batch": line_of(INVALID, "batch"),
        "targets.max_tpot_ms": line_of(INVALID, "max_tpot_ms"),
    }
    typo = next(p for p in result.errors if p.field == "targets.max_tpot_ms")
    assert "did you mean 'max_tpot_s'" in typo.message


def test_load_spec_raises_one_line_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(INVALID)
    err = info.value
    assert isinstance(err, MoeplanError) and err.exit_code == 2
    text = str(err)
    assert "\n" not in text and text.startswith(str(INVALID))
    assert "4 problems" in text and f"line {line_of(INVALID, 'engine')}: engine:" in text
    assert "RTX4099" in text


@pytest.mark.parametrize("path", VALID_EXAMPLES, ids=lambda p: p.name)
def test_valid_examples_load(path: Path) -> None:
    spec = load_spec(path)
    assert spec.path == str(path)
    assert spec.line_of("serving.context") == line_of(path, "context")


# ------------------------------------------------------------------------------------------------
# JSON Schema
# ------------------------------------------------------------------------------------------------


def test_schema_validates_examples_and_rejects_the_invalid_one() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    body = schema()
    assert body["$schema"].endswith("2020-12/schema") and body["title"] == "moeplan deployment spec"
    validator = jsonschema.Draft202012Validator(body)
    validator.check_schema(body)
    for path in VALID_EXAMPLES:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert errors == [], (path, [e.message for e in errors])
    bad = list(validator.iter_errors(yaml.safe_load(INVALID.read_text())))
    text = " ".join(e.message for e in bad)
    assert "tgi" in text and "lots" in text and "max_tpot_ms" in text


def test_schema_forbids_unknown_keys_everywhere() -> None:
    body = schema()
    assert body["additionalProperties"] is False
    for name in ("Serving", "Targets"):
        assert body["$defs"][name]["additionalProperties"] is False


# ------------------------------------------------------------------------------------------------
# load_spec errors
# ------------------------------------------------------------------------------------------------


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model: mixtral-8x7b\nengine: vllm\ngpus: [2xH100\nserving: {}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)
    assert info.value.problems[0].line is not None and info.value.problems[0].line >= 3


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    path = write(tmp_path, "model: mixtral-8x7b\nengine: vllm\ngpus: 2xH100\nserving:\n  batch: 1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert problem.field == "serving.context" and problem.line == 4 and "missing" in problem.message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, spec_text() + "engine: sglang\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [(p.field, p.line) for p in info.value.problems] == [("engine", len(path.read_text().splitlines()))]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="YAML mapping"):
        load_spec(write(tmp_path, "- model: mixtral-8x7b\n"))


@pytest.mark.parametrize(
    ("engine", "extra", "kv", "field", "needle"),
    [
        ("llama.cpp", "", "fp8", "serving.kv_dtype", "no 'fp8' KV cache"),
        ("vllm", "", "q8_0", "serving.kv_dtype", "no 'q8_0' KV cache"),
        ("vllm", "quant: q4_k_m\n", "bf16", "quant", "does not run on vllm"),
        ("sglang", "quant: q4_k_m\n", "bf16", "quant", "does not run on sglang"),
        ("llama.cpp", "quant: awq\n", "bf16", "quant", "does not run on llama.cpp"),
        ("llama.cpp", "nodes: 2\n", "bf16", "nodes", "one host"),
        ("vllm", "quant: nosuch\n", "bf16", "quant", "unknown quantization"),
    ],
)
def test_what_the_engine_cannot_do_is_an_error_on_its_line(
    tmp_path: Path, engine: str, extra: str, kv: str, field: str, needle: str
) -> None:
    path = write(tmp_path, spec_text(engine=engine, extra=extra, kv=kv))
    result = check_path(path, rank=fake_rank)
    assert result.exit_code == 2
    (problem,) = result.errors
    assert problem.field == field and needle in problem.message
    assert problem.line == line_of(path, field.split(".")[-1])


def test_out_of_range_serving_values_are_reported_on_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, spec_text(context=10**9, batch=0, frac=1.5))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    got = {p.field: p.line for p in info.value.problems}
    assert got == {f"serving.{k}": line_of(path, k) for k in ("context", "batch", "mem_fraction")}


def test_unknown_model_is_bad_input_blamed_on_model(tmp_path: Path) -> None:
    path = write(tmp_path, spec_text().replace("mixtral-8x7b", "no-such-model"))
    result = check_path(path, rank=fake_rank)
    assert result.exit_code == 2
    assert result.errors[0].field == "model" and result.errors[0].line == 1
    assert "unknown model" in result.errors[0].message


# ------------------------------------------------------------------------------------------------
# check: plan choice per engine, targets
# ------------------------------------------------------------------------------------------------


def test_engine_filters_quant_when_none_given(tmp_path: Path) -> None:
    for engine, allowed in (("vllm", lambda s: not s.gguf), ("llama.cpp", lambda s: "llamacpp" in s.engines)):
        result = check(load_spec(write(tmp_path, spec_text(engine=engine, gpus="2xRTX4090"))), rank=fake_rank)
        assert result.plan is not None, result.findings
        assert allowed(get_scheme(result.plan.quant)), (engine, result.plan.quant)


def test_llamacpp_gets_a_layer_split_even_when_fit_prefers_tensor_parallel(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, spec_text(engine="llama.cpp", gpus="2xRTX4090", extra="quant: q4_k_m\n")))
    best = fit(resolve("mixtral-8x7b"), parse_gpus("2xRTX4090")[0], context=8192, batch=4, quant="q4_k_m",
               rank=fake_rank).best  # fmt: skip
    assert best is not None
    result = check(spec, rank=fake_rank)
    assert result.plan is not None and (result.plan.tp, result.plan.ep, result.plan.pp) == (1, 1, 2)
    assert "--tensor-split" in shlex.split(result.command or "")


def test_llamacpp_offload_plan_from_cpu_mem(tmp_path: Path) -> None:
    extra = "quant: q4_k_m\n"
    text = spec_text(engine="llama.cpp", gpus="1xRTX4090", extra=extra, batch=1) + "  cpu_mem_gb: 64\n"
    result = check(load_spec(write(tmp_path, text)), rank=fake_rank)
    assert result.exit_code == 0, [f.message for f in result.findings]
    assert result.plan is not None and result.plan.offload is not None
    argv = shlex.split(result.command or "")
    assert argv[argv.index("--n-cpu-moe") + 1] == str(max(result.plan.offload.offloaded_layer_ids) + 1)


def test_free_memory_target_needs_no_speed_model(tmp_path: Path) -> None:
    text = spec_text() + "targets:\n  min_free_gib_per_gpu: 1000\n  max_tpot_s: 1\n"
    result = check(load_spec(write(tmp_path, text)), rank=lambda m, s, p, g, sc: p)  # no speed attached
    free = next(f for f in result.findings if f.target == "min_free_gib_per_gpu")
    assert not free.passed and free.predicted is not None and free.gap == pytest.approx(free.predicted - 1000)
    tpot = next(f for f in result.findings if f.target == "max_tpot_s")
    assert not tpot.passed and tpot.predicted is None and "not predicted" in tpot.message


def test_context_beyond_the_model_limit_is_a_miss_and_the_command_is_capped(tmp_path: Path) -> None:
    result = check(load_spec(write(tmp_path, spec_text(context=65536, batch=1))), rank=fake_rank)  # Mixtral: 32,768
    assert result.exit_code == 1
    miss = next(f for f in result.findings if f.target == "serving.context")
    assert miss.predicted == 32768 and miss.limit == 65536 and miss.line == line_of(tmp_path / "spec.yaml", "context")
    argv = shlex.split(result.command or "")
    assert int(argv[argv.index("--max-model-len") + 1]) == 32768


def test_check_command_uses_the_spec_memory_fraction_and_hub_id(tmp_path: Path) -> None:
    result = check(load_spec(write(tmp_path, spec_text(frac=0.85))), rank=fake_rank)
    argv = shlex.split(result.command or "")
    assert argv[2] == "mistralai/Mixtral-8x7B-v0.1"
    assert float(argv[argv.index("--gpu-memory-utilization") + 1]) == 0.85


def test_result_json_has_exit_code_and_round_trips() -> None:
    result = check_path(SLOW, rank=fake_rank)
    data = json.loads(json.dumps(result.model_dump()))
    assert data["exit_code"] == 1 and data["findings"][0]["target"] == "fits"
    assert CheckResult.model_validate({k: v for k, v in data.items() if k != "exit_code"}).exit_code == 1


# ------------------------------------------------------------------------------------------------
# Launch commands: only documented flags, never more than the plan fits
# ------------------------------------------------------------------------------------------------


def flags(command: str, engine: str) -> tuple[dict[str, str], list[str]]:
    """(env assignments before the program, every token after the program that starts with '-')."""
    tokens = shlex.split(command)
    env = {}
    while tokens and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    program = ENGINE_PROGRAM[engine]
    assert tuple(tokens[: len(program)]) == program, tokens
    return env, [t for t in tokens[len(program):] if t.startswith("-")]


def value(command: str, flag: str) -> str:
    tokens = shlex.split(command)
    return tokens[tokens.index(flag) + 1]


def mixtral_plans(gpus: str = "8xH100", quant: str = "bf16", batch: int = 1) -> list[Plan]:
    """Every layout that fits, unranked (fit's own candidates)."""
    spec = resolve("mixtral-8x7b")
    gpu_list, _ = parse_gpus(gpus)
    sc = Scenario(context=8192, batch=batch)
    return [p for p in plans_for_quant(spec, get_scheme(quant).for_model(spec), gpu_list, 1, sc) if p.fits]


def offload_plans() -> list[tuple[str, Plan]]:
    out = []
    cases = (("mixtral-8x7b", "1xRTX4090", "q4_k_m", 64), ("deepseek-v3", "2xRTX4090", "q2_k", 512))
    for model, gpus, quant, ram in cases:
        res = fit(resolve(model), parse_gpus(gpus)[0], context=8192, batch=1, quant=quant, cpu_mem_bytes=ram * 10**9)
        assert res.best is not None and res.best.offload is not None
        out.append((model, res.best))
    return out


def all_layouts() -> list[Plan]:
    plans = mixtral_plans() + mixtral_plans("1xH100,1xA100-40GB")
    kinds = {(p.tp > 1, p.ep > 1, p.dp_attention, p.pp > 1, len(set(p.stage_layers)) > 1) for p in plans}
    # tensor, expert, DP-attention, pipeline and uneven-stage plans are all here
    assert any(k[0] and not k[1] for k in kinds) and any(k[1] and not k[2] for k in kinds)
    assert any(k[2] for k in kinds) and any(k[3] for k in kinds) and any(k[4] for k in kinds)
    return plans


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
@pytest.mark.parametrize("kv", ["bf16", "fp8", "fp8_e5m2"])
def test_every_emitted_flag_is_documented_gpu_engines(engine: str, kv: str) -> None:
    spec = resolve("mixtral-8x7b")
    for plan in all_layouts():
        for nodes in (1, 2):
            command = emit(engine, spec, plan, Serving(context=8192, batch=16, kv_dtype=kv), nodes=nodes)
            env, used = flags(command, engine)
            assert set(used) <= set(ENGINE_FLAGS[engine]), (plan.layout, set(used) - set(ENGINE_FLAGS[engine]))
            assert set(env) <= set(ENGINE_ENV[engine])
            assert value(command, "--kv-cache-dtype") in KV_CACHE_CHOICES[engine]


@pytest.mark.parametrize("kv", ["bf16", "fp16", "q8_0", "q4_0"])
def test_every_emitted_flag_is_documented_llamacpp(kv: str) -> None:
    plans = [("mixtral-8x7b", p) for p in mixtral_plans("2xRTX4090", "q4_k_m") if p.tp == p.ep == 1]
    assert plans, "a layer-split plan must fit"
    for model, plan in plans + offload_plans():
        command = emit("llama.cpp", resolve(model), plan, Serving(context=8192, batch=1, kv_dtype=kv))
        env, used = flags(command, "llama.cpp")
        assert env == {} and set(used) <= set(ENGINE_FLAGS["llama.cpp"]), set(used) - set(ENGINE_FLAGS["llama.cpp"])
        assert value(command, "-ctk") in KV_CACHE_CHOICES["llama.cpp"]
        assert value(command, "-fa") == "on"


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp"])
@pytest.mark.parametrize("context", [1024, 8192, 10**6])
def test_command_never_asks_for_more_context_or_sequences_than_the_plan(engine: str, context: int) -> None:
    spec = resolve("mixtral-8x7b")
    plans = [p for p in mixtral_plans("2xRTX4090", "q4_k_m" if engine == "llama.cpp" else "int4")
             if engine != "llama.cpp" or p.tp == p.ep == 1]  # fmt: skip
    for plan in plans:
        serving = Serving(context=context, batch=65536, mem_fraction=0.87)
        command = emit(engine, spec, plan, serving)
        if engine == "vllm":
            ctx, seqs = int(value(command, "--max-model-len")), int(value(command, "--max-num-seqs"))
            dp = int(value(command, "--data-parallel-size")) if "--data-parallel-size" in command else 1
            assert float(value(command, "--gpu-memory-utilization")) == 0.87
            seqs *= dp
        elif engine == "sglang":
            ctx, seqs = int(value(command, "--context-length")), int(value(command, "--max-running-requests"))
            assert float(value(command, "--mem-fraction-static")) == 0.87
        else:
            seqs = int(value(command, "-np"))
            ctx = int(value(command, "-c")) // seqs  # -c is shared by the slots
        assert ctx == min(context, plan.max_context) <= plan.max_context
        assert seqs <= plan.max_batch + (plan.ep - 1 if plan.dp_attention else 0)  # DP ranks round up


def test_layout_flags_per_engine() -> None:
    spec = resolve("mixtral-8x7b")
    serving = Serving(context=4096, batch=16)
    by_label = {p.layout: p for p in mixtral_plans()}
    tp_ep, dp, pp = by_label["tp8 ep8 pp1"], by_label["dp8 ep8 pp1"], by_label["tp2 ep1 pp4"]
    vllm_dp = emit("vllm", spec, dp, serving)
    assert value(vllm_dp, "--tensor-parallel-size") == "1" and value(vllm_dp, "--data-parallel-size") == "8"
    assert "--enable-expert-parallel" in vllm_dp and value(vllm_dp, "--max-num-seqs") == "2"  # 16 over 8 ranks
    vllm_ep = emit("vllm", spec, tp_ep, serving)
    assert "--enable-expert-parallel" in vllm_ep and "--data-parallel-size" not in vllm_ep
    sgl_dp = emit("sglang", spec, dp, serving)
    assert "--enable-dp-attention" in sgl_dp and value(sgl_dp, "--dp-size") == "8" and value(sgl_dp, "--tp-size") == "8"
    for engine, var in (("vllm", "VLLM_PP_LAYER_PARTITION"), ("sglang", "SGLANG_PP_LAYER_PARTITION")):
        env, _ = flags(emit(engine, spec, pp, serving), engine)
        assert env == {var: "8,8,8,8"}


def test_uneven_stages_are_passed_to_the_engine() -> None:
    uneven = [p for p in mixtral_plans("1xH100,1xA100-40GB") if len(set(p.stage_layers)) > 1]
    assert uneven
    env, _ = flags(emit("vllm", resolve("mixtral-8x7b"), uneven[0], Serving(context=4096, batch=1)), "vllm")
    assert env["VLLM_PP_LAYER_PARTITION"] == ",".join(map(str, uneven[0].stage_layers))


def test_sglang_multi_node_flags() -> None:
    run = launch("sglang", resolve("mixtral-8x7b"), mixtral_plans()[0], Serving(context=4096, batch=1), nodes=2)
    assert value(run.command, "--nnodes") == "2" and value(run.command, "--node-rank") == "0"
    assert value(run.command, "--dist-init-addr") == "${HEAD_IP}:50000"  # left for the shell to expand
    assert any("--node-rank" in n for n in run.notes)


def test_quantization_flag_only_when_the_engine_must_quantize() -> None:
    mixtral, deepseek = resolve("mixtral-8x7b"), resolve("deepseek-v3")
    serving = Serving(context=4096, batch=1)
    fp8 = mixtral_plans("2xH100", "fp8")[0]
    assert value(emit("vllm", mixtral, fp8, serving), "--quantization") == "fp8"  # bf16 checkpoint, online fp8
    assert value(emit("sglang", mixtral, fp8, serving), "--quantization") == "fp8"
    ds = fit(deepseek, parse_gpus("8xH200")[0], context=4096, quant="fp8-block").best
    assert ds is not None and "--quantization" not in emit("vllm", deepseek, ds, serving)  # shipped in fp8
    int4 = mixtral_plans("2xRTX4090", "int4")[0]
    run = launch("vllm", mixtral, int4, serving)
    assert "--quantization" not in run.argv and any("checkpoint already quantized" in n for n in run.notes)
    assert "--quantization" not in emit("vllm", mixtral, mixtral_plans("2xH100")[0], serving)  # bf16 as shipped


def test_llamacpp_command_shape() -> None:
    plan = next(p for p in mixtral_plans("2xRTX4090", "q4_k_m") if p.tp == p.ep == 1)
    command = emit("llama.cpp", resolve("mixtral-8x7b"), plan, Serving(context=4096, batch=3, kv_dtype="q8_0"))
    assert command.startswith("llama-server -m Mixtral-8x7B-v0.1-Q4_K_M.gguf -ngl 999 ")
    assert value(command, "-c") == str(4096 * 3) and value(command, "-np") == "3"
    assert value(command, "-ctk") == value(command, "-ctv") == "q8_0"
    assert value(command, "--tensor-split") == ",".join(map(str, plan.stage_layers))


def test_launch_refuses_what_the_engine_cannot_run() -> None:
    spec = resolve("mixtral-8x7b")
    # fit no longer offers GGUF under TP (llama.cpp splits by layers), so the guard is fed one by hand.
    assert not [p for p in mixtral_plans("2xRTX4090", "q4_k_m") if p.tp == 2]
    tp = evaluate(spec, get_scheme("q4_k_m").for_model(spec), Layout(tp=2, ep=1, pp=1, stage_layers=(32,)),
                  parse_gpus("2xRTX4090")[0], Scenario(context=8192, batch=1))
    with pytest.raises(MoeplanError, match="llama.cpp cannot run layout"):
        launch("llama.cpp", spec, tp, Serving(context=4096, batch=1))
    with pytest.raises(MoeplanError, match="does not load 'q4_k_m'"):
        launch("vllm", spec, tp, Serving(context=4096, batch=1))
    model, offload = offload_plans()[0]
    with pytest.raises(MoeplanError, match="vllm cannot run layout"):
        launch("vllm", resolve(model), offload, Serving(context=4096, batch=1))
    with pytest.raises(MoeplanError, match="no 'q8_0' KV cache"):
        launch("sglang", spec, mixtral_plans("2xH100")[0], Serving(context=4096, batch=1, kv_dtype="q8_0"))


def test_emit_for_fit_picks_a_plan_the_engine_runs() -> None:
    spec = resolve("mixtral-8x7b")
    res = fit(spec, parse_gpus("2xRTX4090")[0], context=4096, batch=2, quant="q4_k_m", rank=fake_rank)
    command = emit_for_fit("llamacpp", spec, res)
    assert command is not None and command.startswith("llama-server ") and "\n# " in command
    gpus = parse_gpus("2xRTX4090")[0]
    tp_winner = fit(spec, gpus, context=4096, quant=None, rank=fake_rank)
    assert tp_winner.best is not None and tp_winner.best.engine == "vllm"
    # GGUF quants are planned over layer splits only, so the shortlist holds one llama.cpp runs, with or
    # without the GPUs to re-plan.
    for replanned in (emit_for_fit("llamacpp", spec, tp_winner), emit_for_fit("llamacpp", spec, tp_winner, gpus,
                                                                               fake_rank)):
        assert replanned is not None and replanned.startswith("llama-server ") and "--tensor-split" in replanned
        assert "not the best plan overall" in replanned
    nothing = fit(resolve("deepseek-v3"), parse_gpus("1xRTX4090")[0], quant="fp8-block")
    assert emit_for_fit("vllm", resolve("deepseek-v3"), nothing) is None


# ------------------------------------------------------------------------------------------------
# Renderers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results() -> list[CheckResult]:
    return [check_path(p, rank=fake_rank) for p in (PASS, NOFIT, SLOW, INVALID)]


def test_summary_rows_are_plain_data(results: list[CheckResult]) -> None:
    rows = summary_rows(results)
    assert [r["result"] for r in rows] == ["pass", "fail", "fail", "invalid"]
    assert all(tuple(r) == deploy.SUMMARY_COLUMNS for r in rows)
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert rows[1]["reason"] == "missed: does not fit"
    assert rows[2]["reason"] == "missed: min_decode_tok_per_s, max_tpot_s"
    assert rows[3]["reason"].startswith(f"invalid: engine (line {line_of(INVALID, 'engine')})")
    details = deploy.detail_lines(results[2])
    assert details == [f"{SLOW}:{f.line} {f.message}" for f in results[2].findings if not f.passed]


def test_markdown_summary(results: list[CheckResult]) -> None:
    md = render_markdown(results)
    assert md.startswith("## moeplan check: 1 pass, 2 fail, 1 invalid")
    assert "| result | spec |" in md and md.count("\n| ") >= 5
    assert "```bash\nllama-server " in md and "does not fit" in md and "max_tpot_s" in md
    assert f"line {line_of(INVALID, 'engine')}: `engine`" in md


def test_github_annotations(results: list[CheckResult]) -> None:
    out = render_github(results).splitlines()
    assert f"::notice file={PASS},line=1,title=moeplan%3A mixtral-home passes::" in out[0]
    tpot = next(line for line in out if "title=moeplan%3A max_tpot_s" in line)
    assert tpot.startswith(f"::error file={SLOW},line={line_of(SLOW, 'max_tpot_s')},")
    assert "%25" in tpot  # the percentage sign is escaped
    assert any(line.startswith(f"::error file={NOFIT},line={line_of(NOFIT, 'gpus')},") for line in out)
    invalid = [line for line in out if f"file={INVALID}" in line]
    assert len(invalid) == 4 and all("::error " in line for line in invalid)
    assert deploy.exit_code(results) == 2 and deploy.exit_code(results[:3]) == 1 and deploy.exit_code(results[:1]) == 0


# ------------------------------------------------------------------------------------------------
# With the real speed model, and through the CLI
# ------------------------------------------------------------------------------------------------


def test_examples_with_the_real_speed_model() -> None:
    pytest.importorskip("moeplan.perf")
    assert [check_path(p).exit_code for p in (PASS, NOFIT, SLOW, INVALID)] == [0, 1, 1, 2]
    slow = check_path(SLOW)
    assert not next(f for f in slow.findings if f.target == "max_tpot_s").passed


def _cli_check() -> object:
    from moeplan.cli import app

    return app


@pytest.mark.parametrize(("path", "code"), [(PASS, 0), (NOFIT, 1), (SLOW, 1), (INVALID, 2)], ids=lambda x: str(x))
def test_cli_check_exit_codes(path: Path, code: int) -> None:
    from typer.testing import CliRunner

    app = _cli_check()
    result = CliRunner().invoke(app, ["check", str(path), "--format", "github"])  # type: ignore[arg-type]
    assert result.exit_code == code, result.output
    assert ("::error" in result.stdout) == (code != 0)


def test_cli_check_json_and_markdown() -> None:
    from typer.testing import CliRunner

    app = _cli_check()
    result = CliRunner().invoke(app, ["check", str(PASS), str(SLOW), "--format", "json"])  # type: ignore[arg-type]
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert [d["exit_code"] for d in data] == [0, 1]
    md = CliRunner().invoke(app, ["check", str(PASS), "--format", "markdown"])  # type: ignore[arg-type]
    assert md.exit_code == 0 and md.stdout.startswith("## moeplan check")


def test_spec_model_is_frozen() -> None:
    spec = load_spec(PASS)
    with pytest.raises(Exception):
        spec.engine = "vllm"  # type: ignore[misc]
    assert isinstance(spec, DeploySpec)


def test_cli_schema_validates_the_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from typer.testing import CliRunner

    app = _cli_check()
    for args in (["schema"], ["check", "--schema"]):
        result = CliRunner().invoke(app, args)  # type: ignore[arg-type]
        assert result.exit_code == 0, result.output
        schema = json.loads(result.stdout)
        for path in (PASS, NOFIT, SLOW):
            jsonschema.validate(yaml.safe_load(path.read_text()), schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(INVALID.read_text()), schema)


@pytest.mark.parametrize("args", [["check"], ["check", str(PASS), "--format", "xml"]], ids=["no spec", "bad format"])
def test_cli_check_bad_usage_is_exit_2(args: list[str]) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli_check(), args)  # type: ignore[arg-type]
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_cli_check_table_names_the_missed_target() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli_check(), ["check", str(SLOW), str(PASS)])  # type: ignore[arg-type]
    assert result.exit_code == 1
    assert "max_tpot_s: predicted" in result.stdout
    assert "llama-server" in result.stdout  # the passing spec's launch command


@pytest.mark.parametrize(("engine", "program"), [("vllm", "vllm serve"), ("sglang", "python -m sglang.launch_server"),
                                                 ("llamacpp", "llama-server")])  # fmt: skip
def test_cli_fit_emit(engine: str, program: str) -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(_cli_check(), ["fit", "mixtral-8x7b", "--gpus", "2xRTX4090", "--emit", engine, "--json"])
    assert result.exit_code == 0, result.output
    command = json.loads(result.stdout)["command"]
    assert command.startswith(program)
    args = shlex.split(command.splitlines()[0])[len(program.split()):]
    flags = [t for t in args if t.startswith("-")]
    documented = ENGINE_FLAGS["llama.cpp" if engine == "llamacpp" else engine]
    assert set(flags) <= set(documented), set(flags) - set(documented)


def test_cli_check_table_prints_brackets_in_paths_as_text(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    spec = tmp_path / "d[x]" / "deploy[prod].yaml"
    spec.parent.mkdir()
    spec.write_text(PASS.read_text())
    result = CliRunner().invoke(_cli_check(), ["check", str(spec)])
    assert result.exit_code == 0, result.output
    assert "deploy[prod].yaml" in result.stdout and f"{spec}: pass" in result.stdout


def test_example_workflow_runs_moeplan_check() -> None:
    workflow = yaml.safe_load((REPO / "examples" / "github-workflow.yml").read_text())
    runs = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any("moeplan check" in r and "--format github" in r for r in runs)
    assert any("moeplan check" in r and "--format markdown" in r for r in runs)
    assert any("pip install" in r for r in runs)
