"""fit: per-GPU verdicts, layouts, largest context/batch, expert offload, the --gpus grammar."""

import json

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.errors import GpuSpecError
from moeplan.hardware import parse_gpus
from moeplan.perf import rank_plan
from moeplan.plan import fit
from moeplan.sources import resolve

runner = CliRunner()


def run(spec_name: str, gpus: str, **kw):
    gpu_list, nodes = parse_gpus(gpus, kw.pop("nodes", 1))
    return fit(resolve(spec_name), gpu_list, nodes=nodes, rank=rank_plan, **kw)


def test_mixtral_2x24gb_fits_4bit_and_says_why_bf16_fp8_do_not():
    res = run("mixtral-8x7b", "2x24GB")
    assert res.fits and res.best is not None
    assert res.best.quant in ("int4", "q4_k_m", "awq", "gptq")
    by = {v.quant: v for v in res.verdicts}
    for q in ("bf16", "fp8"):
        assert not by[q].fits
        assert "over by" in by[q].reason and "GiB" in by[q].reason


def test_mixtral_bf16_exit_1_and_json_keys():
    bad = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--quant", "bf16"])
    assert bad.exit_code == 1, bad.output
    assert "DOES NOT FIT" in bad.output
    ok = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--json"])
    assert ok.exit_code == 0
    data = json.loads(ok.stdout)
    assert {"fits", "best", "plans"} <= data.keys()
    plan = data["plans"][0]
    assert {"quant", "tp", "ep", "pp", "per_gpu", "max_context", "max_batch", "offload"} <= plan.keys()
    assert {"name", "capacity_bytes", "used_bytes", "weights_bytes", "kv_bytes"} <= plan["per_gpu"][0].keys()


def test_deepseek_v3_fp8_fits_8xh200_not_8xh100_bf16():
    assert run("deepseek-v3", "8xH200").best.quant == "fp8-block"
    assert not run("deepseek-v3", "8xH100", quant="bf16").fits


def test_deepseek_v3_2x24gb_offload_plan_with_cpu_mem():
    res = run("deepseek-v3", "2x24GB")
    assert not res.fits and res.best is None
    res = run("deepseek-v3", "2x24GB", cpu_mem_bytes=768 * 10**9)
    assert res.fits == "offload"  # issue 15: it runs with offload, so the verdict is not false
    off = res.best.offload
    assert off is not None and 0 < off.cpu_moe_layers <= off.moe_layers == 58
    assert off.cpu_bytes <= off.cpu_budget_bytes
    assert all(row.used_bytes <= row.budget_bytes for row in res.best.per_gpu)
    cli = runner.invoke(app, ["fit", "deepseek-v3", "--gpus", "2x24GB", "--cpu-mem", "768GB"])
    assert cli.exit_code == 0 and "expert offload" in cli.output.lower()


def test_mixed_cards_even_split_overflows_smaller_uneven_pipeline_fits():
    # fp8 Mixtral is ~47 GB: the A100 80GB + RTX 4090 hold it together, but an even split
    # puts ~23.5 GB on the 4090, over its budget.
    res = run("mixtral-8x7b", "1xA100-80GB,1xRTX4090", quant="fp8")
    assert res.fits and res.best.pp == 2
    assert res.best.stage_layers[0] > res.best.stage_layers[1]
    from moeplan.layout import Layout, Scenario
    from moeplan.plan import evaluate
    from moeplan.quant import get_scheme

    gpus, _ = parse_gpus("1xA100-80GB,1xRTX4090")
    even = evaluate(resolve("mixtral-8x7b"), get_scheme("fp8"), Layout(tp=1, ep=1, pp=2, stage_layers=(16, 16)),
                    gpus, Scenario(context=4096, batch=1))
    assert not even.fits and "RTX4090" in even.overflow
    assert sum(g.usable_bytes for g in gpus) * 0.9 > sum(r.used_bytes for r in even.per_gpu)  # pooled would "fit"


def test_qwen3_30b_on_4090_at_4bit_fits_with_largest_context():
    res = run("qwen3-30b-a3b", "1xRTX4090", quant="q4_k_m")
    assert res.fits
    assert 4096 < res.best.max_context < 40960
    tighter = run("qwen3-30b-a3b", "1xRTX4090", quant="q4_k_m", context=res.best.max_context)
    assert tighter.fits
    assert not run("qwen3-30b-a3b", "1xRTX4090", quant="q4_k_m", context=res.best.max_context + 64).fits


@pytest.mark.parametrize("text,count,name", [
    ("2x24GB", 2, "24GB"), ("4x80GiB", 4, "80GiB"), ("8xH100", 8, "H100"), ("2xRTX4090", 2, "RTX4090"),
    (" 2 x rtx4090 ", 2, "RTX4090"), ("1xA100-80GB,1xRTX4090", 2, "A100-80GB"), ("H200", 1, "H200"),
])
def test_gpus_grammar(text, count, name):
    gpus, nodes = parse_gpus(text)
    assert len(gpus) == count and gpus[0].name == name and nodes == 1


def test_nodes_multiply():
    gpus, nodes = parse_gpus("8xH100", nodes=2)
    assert len(gpus) == 16 and nodes == 2
    gpus, nodes = parse_gpus("2x(8xH100)")
    assert len(gpus) == 16 and nodes == 2


@pytest.mark.parametrize("bad", ["", "2x", "0xH100", "3xFOO", "2x-5GB", "x24GB,", "24TB"])
def test_bad_gpus(bad):
    with pytest.raises(GpuSpecError):
        parse_gpus(bad)
    res = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", bad])
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.output and "e.g. 2x24GB" in err[0]


def test_kv_dtype_rules_out_the_engines_that_lack_it_without_quant():
    # fp8 KV exists in vLLM/SGLang, not llama.cpp; q8_0 KV only in llama.cpp (see quant.kv_dtype_bytes).
    fp8 = run("mixtral-8x7b", "2x24GB", kv_dtype="fp8")
    assert fp8.fits and not fp8.best.quant.startswith("q")
    assert not any(v.quant.startswith("q") for v in fp8.verdicts)
    assert any("llama.cpp has no fp8 KV cache" in n for n in fp8.notes)
    q8 = run("mixtral-8x7b", "2x24GB", kv_dtype="q8_0")
    assert q8.fits and q8.best.quant.startswith("q")
    assert any("vLLM/SGLang has no q8_0 KV cache" in n for n in q8.notes)
    # Asking for both explicitly is still bad input.
    bad = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--quant", "q4_k_m", "--kv-dtype", "fp8"])
    assert bad.exit_code == 2 and "no fp8 KV cache" in bad.output


def test_fit_and_perf_say_when_a_saved_calibration_is_used(monkeypatch, tmp_path):
    from moeplan.calibration import save_calibration

    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))
    args = ["mixtral-8x7b", "--gpus", "2xH100", "--quant", "bf16", "--json"]
    before = json.loads(runner.invoke(app, ["fit", *args]).stdout)
    assert any("default efficiencies" in n for n in before["notes"])
    save_calibration("H100", "bf16", 0.26, 0.30, "moeplan bench mixtral-8x7b on H100 (test)")
    after = json.loads(runner.invoke(app, ["fit", *args]).stdout)
    note = next(n for n in after["notes"] if n.startswith("speed on H100"))
    assert "your calibration" in note and "memory 0.26, compute 0.30" in note and str(tmp_path) in note
    # Half the default bandwidth efficiency (0.52 -> 0.26): a memory-bound decode step takes longer.
    assert after["best"]["speed"]["tpot_s"] > before["best"]["speed"]["tpot_s"] * 1.5
    perf = json.loads(runner.invoke(app, ["perf", *args]).stdout)
    assert any("calibration from moeplan bench" in n for n in perf["notes"])


def test_fit_speed_over_several_nodes_matches_perf():
    # fit ranks layouts with the node count, so its speed is perf's (EP all-to-all over the network).
    args = ["deepseek-v3", "--gpus", "8xH100", "--nodes", "4", "--quant", "fp8", "--batch", "512", "--context",
            "2048", "--json"]  # fmt: skip
    fitted = json.loads(runner.invoke(app, ["fit", *args]).stdout)["best"]
    perf = json.loads(runner.invoke(app, ["perf", *args, "--prompt", "1024"]).stdout)
    assert fitted["layout"] == perf["layout"] and fitted["ep"] > 8
    assert fitted["speed"]["tpot_s"] == pytest.approx(perf["tpot_s"], rel=1e-9)
    one_node = fit(resolve("deepseek-v3"), parse_gpus("8xH100", 4)[0], nodes=4, quant="fp8", batch=512, context=2048,
                   rank=rank_plan).best  # fmt: skip
    assert one_node.speed.tpot_s < fitted["speed"]["tpot_s"]  # as if all 32 GPUs shared NVLink


def _bisect(lo, hi, ok):
    """The search fit used before its secant search: plain bisection for the largest ok x."""
    if hi < lo or not ok(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_the_secant_search_finds_what_bisection_finds_in_fewer_probes():
    import random

    from moeplan.plan import _max_search

    rnd = random.Random(5)
    probes = []
    for _ in range(3000):
        hi = rnd.choice([1, 2, 3, 100, 32768, 65536, 10**6])
        a, c = rnd.uniform(-1e9, 5e10), rnd.choice([0.0, rnd.uniform(1e3, 1e7)])
        knee, jump = rnd.randint(1, hi), rnd.choice([0.0, 1e8, 1e12])
        flat = rnd.randint(1, hi)

        def spare(x, a=a, c=c, knee=knee, jump=jump, flat=flat):  # non-increasing: a line, a step, a plateau
            probes[-1] += 1
            return a - c * min(x, flat) - (jump if x > knee else 0.0)

        probes.append(0)
        got = _max_search(1, hi, spare)
        secant_probes = probes.pop()
        probes.append(0)  # the bisection's own calls are counted apart and dropped
        assert got == _bisect(1, hi, lambda x: spare(x) >= 0), (hi, a, c, knee, jump, flat)
        probes[-1] = secant_probes
    assert sum(probes) / len(probes) < 8  # bisection needs ~17 probes for 65,536


@pytest.mark.parametrize("gpus", ["2x24GB", "8xH100", "1xRTX4090,1xRTX3090"])
def test_largest_context_and_batch_are_bisections_answers_on_every_card(gpus):
    """Every bundled card's plans: fit's max_context and max_batch equal plain bisection over the same
    memory check (kv and activations grow with context and batch, with steps at windows and chunks)."""
    from moeplan import plan as P
    from moeplan.layout import Scenario
    from moeplan.sources import bundled_cards

    gpu_list, _ = parse_gpus(gpus, 1)
    for card in bundled_cards():
        spec = card.spec()
        res = P.fit(spec, gpu_list, context=8192, batch=4)
        sc = Scenario(context=8192, batch=4, kv_dtype="bf16", mem_fraction=0.90)
        for plan in res.plans:
            if not plan.fits or plan.offload is not None:
                continue
            scheme = P.get_scheme(plan.quant).for_model(spec)
            if scheme.gguf:
                sc_q = sc.model_copy(update={"chunk_tokens": P.LLAMACPP_UBATCH, "cuda_graphs": False})
            else:
                sc_q = sc
            layout = P.layout_of(plan)
            spare = P._rows_slack(spec, layout, P.gpu_rows(spec, scheme, layout, gpu_list, sc_q), sc_q)
            limit = P.context_limit(spec)
            assert plan.max_context == _bisect(1, limit, lambda c: spare(c, 4) >= 0), (card.name, plan.layout)
            assert plan.max_batch == _bisect(1, 65536, lambda b: spare(8192, b) >= 0), (card.name, plan.layout)
