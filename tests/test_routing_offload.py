"""Issue 15: skewed routing, capacity factor, EPLB redundant experts, and offload with an expert cache.

Facts: LRU expert-cache hit rates of Mixtral-8x7B with 1-4 cached experts per layer, 0.17 / 0.34 /
0.46 / 0.59, from the mixtral-offloading benchmark logs (h39s/mlsys fork of dvmazur/mixtral-offloading,
arXiv:2312.17238's setup, ~2,800 tokens per run); the per-expert reuse of consecutive tokens, 0.34,
is the 2-slot figure (with top-2 routing that cache holds exactly the previous token's experts).
"""

from __future__ import annotations

import json
import math
import random

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.hardware import parse_gpus
from moeplan.layout import Layout
from moeplan.offload import hit_rate
from moeplan.perf import step_cost
from moeplan.quant import get_scheme
from moeplan.routing import (
    blocks, drop_fraction, expert_capacity, parse_routing, pick_probs, rank_load, systematic_pick, zipf_shares,
)
from moeplan.sources import resolve

runner = CliRunner()


def _simulate(num_experts, top_k, tokens, ranks, shares, batches, seed=3):
    """Direct simulation written apart from moeplan.routing's expectations: tokens draw k distinct
    experts with inclusion probabilities k x share (systematic sampling over a shuffled order)."""
    rnd = random.Random(seed)
    q = pick_probs(shares, num_experts, top_k)
    owner = [r for r, rng in enumerate(blocks(num_experts, ranks)) for _ in rng]
    busiest, distinct = 0.0, 0.0
    for _ in range(batches):
        pairs = [0] * ranks
        seen = set()
        for _ in range(tokens):
            for e in systematic_pick(q, rnd):
                pairs[owner[e]] += 1
                seen.add(e)
        busiest += max(pairs)
        distinct += len(seen)
    return busiest / batches, distinct / batches


@pytest.mark.parametrize(("e", "k", "t", "r", "s"), [(128, 8, 64, 8, 1.0), (256, 8, 512, 8, 0.8), (8, 2, 256, 8, 0.5)])
def test_busiest_rank_under_zipf_matches_a_simulation(e, k, t, r, s):
    shares = zipf_shares(e, s)
    load = rank_load(e, k, t, r, shares)
    sim_busiest, sim_distinct = _simulate(e, k, t, r, shares, batches=150)
    assert load.assignments_max == pytest.approx(sim_busiest, rel=0.05)
    assert load.distinct_total == pytest.approx(sim_distinct, rel=0.05)


def test_drop_fraction_matches_a_simulation():
    e, k, t, c = 64, 4, 512, 1.25
    shares = zipf_shares(e, 0.8)
    q = pick_probs(shares, e, k)
    cap = expert_capacity(c, t, e, k)
    rnd = random.Random(11)
    dropped = 0
    batches = 200
    for _ in range(batches):
        loads = [0] * e
        for _ in range(t):
            for x in systematic_pick(q, rnd):
                loads[x] += 1
        dropped += sum(max(0, n - cap) for n in loads)
    assert drop_fraction(e, k, t, c, shares) == pytest.approx(dropped / (batches * t * k), rel=0.05)
    assert drop_fraction(e, k, t, 1.25) < drop_fraction(e, k, t, 1.25, shares)  # skew drops more


def test_skew_touches_fewer_experts_than_uniform():
    for s in (0.5, 1.0, 1.5):
        assert rank_load(128, 8, 32, 8, zipf_shares(128, s)).distinct_total < rank_load(128, 8, 32, 8).distinct_total


def test_ep_step_grows_with_skew_and_shrinks_with_redundant_experts():
    spec = resolve("deepseek-v3")
    scheme = get_scheme("fp8-block")
    gpus, _ = parse_gpus("8xH200")
    layout = Layout(tp=1, ep=8, pp=1, dp_attention=True, stage_layers=(61,))

    def prefill(shares, redundant=0):
        return step_cost(spec, scheme, layout, gpus, tokens_per_seq=4096, batch=8, context=4096, probs=shares,
                         redundant=redundant).seconds

    uniform, mild, strong = prefill(None), prefill(zipf_shares(256, 0.6)), prefill(zipf_shares(256, 1.2))
    assert uniform < mild < strong
    assert prefill(zipf_shares(256, 1.2), 32) < strong
    # Replicas cost memory: ceil((256 + 32) / 8) = 36 experts on each GPU instead of 32.
    base = json.loads(runner.invoke(app, ["fit", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8",
                                          "--dp-attention", "--json"]).stdout)["best"]
    more = json.loads(runner.invoke(app, ["fit", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8",
                                          "--dp-attention", "--redundant-experts", "32", "--json"]).stdout)["best"]
    assert base["per_gpu"][0]["local_experts"] == 32 and more["per_gpu"][0]["local_experts"] == 36
    extra = more["per_gpu"][0]["weights"]["routed_experts"] - base["per_gpu"][0]["weights"]["routed_experts"]
    assert extra == pytest.approx(base["per_gpu"][0]["weights"]["routed_experts"] * 4 / 32, rel=1e-3)


def test_capacity_factor_reserves_dispatch_buffers():
    args = ["fit", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8", "--dp-attention", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)["best"]["per_gpu"][0]
    capped = json.loads(runner.invoke(app, [*args, "--capacity-factor", "1.25"]).stdout)
    row = capped["best"]["per_gpu"][0]
    # 32 local experts x ceil(1.25 x 1024 chunk tokens (8192 / 8 DP ranks... the chunk) x 8 / 256) rows x 7168 x 2 B x 2
    assert row["activation_bytes"] > plain["activation_bytes"]
    assert any("drop no tokens" in n for n in capped["notes"])
    perf = json.loads(runner.invoke(app, ["perf", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8",
                                          "--dp-attention", "--capacity-factor", "1.0", "--routing", "zipf:1.0",
                                          "--json"]).stdout)
    assert 0 <= perf["drop_fraction_decode"] <= 1 and perf["drop_fraction_prefill"] > 0


def test_hit_rate_reproduces_the_mixtral_offloading_logs():
    measured = {1: 0.17, 2: 0.34, 3: 0.46, 4: 0.59}
    for slots, want in measured.items():
        assert hit_rate(8, 2, slots, 0.34) == pytest.approx(want, abs=0.04), slots
    assert hit_rate(8, 2, 0, 0.34) == 0 and hit_rate(8, 2, 8, 0.34) == 1


def _offload(*extra: str) -> dict:
    res = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB",
                              "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_mixtral_offload_on_one_4090_with_mean_and_p99():
    data = _offload()
    assert data["fits"] == "offload"  # never false: it runs
    speed, off = data["best"]["speed"], data["best"]["offload"]
    assert off["tier"] == "ram" and off["cpu_moe_layers"] > 0
    assert speed["tpot_s"] > 0 and speed["offload_p99_tpot_s"] >= speed["tpot_s"]
    assert speed["cache_p99_tpot_s"] >= speed["cache_tpot_s"] > 0
    # Smaller caches and less locality: both mean and p99 get worse.
    by_slots = [_offload("--expert-cache", str(n))["best"]["speed"] for n in (4, 2, 1)]
    assert by_slots[0]["cache_tpot_s"] < by_slots[1]["cache_tpot_s"] < by_slots[2]["cache_tpot_s"]
    assert by_slots[0]["cache_p99_tpot_s"] < by_slots[1]["cache_p99_tpot_s"] <= by_slots[2]["cache_p99_tpot_s"]
    by_locality = [_offload("--expert-cache", "3", "--locality", str(x))["best"]["speed"] for x in (0.6, 0.34, 0.25)]
    assert by_locality[0]["cache_tpot_s"] < by_locality[1]["cache_tpot_s"] < by_locality[2]["cache_tpot_s"]
    assert by_locality[0]["cache_p99_tpot_s"] < by_locality[2]["cache_p99_tpot_s"]
    # Slower RAM, slower tokens.
    assert _offload("--cpu-bw", "ddr4")["best"]["speed"]["tpot_s"] > speed["tpot_s"]


def test_experts_beyond_ram_are_read_from_disk():
    res = runner.invoke(app, ["fit", "deepseek-v3", "--gpus", "2xRTX4090", "--quant", "q2_k", "--cpu-mem", "64GB",
                              "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == 0 and data["fits"] == "offload"
    off = data["best"]["offload"]
    assert off["tier"] == "disk" and 0 < off["ram_share"] < 1
    assert any("read from disk" in n for n in data["notes"])


def test_gpt_oss_offload_defaults_to_mxfp4_experts():
    res = runner.invoke(app, ["fit", "gpt-oss-120b", "--gpus", "1xRTX4090", "--cpu-mem", "128GB", "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == 0 and data["fits"] == "offload"
    best = data["best"]
    assert best["quant"] == "mxfp4_moe"
    # About 43 GiB of experts in RAM by the issue's reckoning, far below q8_0's 98 GiB.
    assert 30 * 2**30 < best["offload"]["cpu_bytes"] < 50 * 2**30
    others = [p["quant"] for p in data["plans"] if p.get("offload")]
    assert others[0] == "mxfp4_moe" and len(others) > 1  # each offload-capable type is offered
    emit = runner.invoke(app, ["fit", "gpt-oss-120b", "--gpus", "1xRTX4090", "--cpu-mem", "128GB", "--emit",
                               "llamacpp"])
    assert emit.exit_code == 0
    assert "gpt-oss-120b-MXFP4_MOE.gguf" in emit.output and "--n-cpu-moe" in emit.output and "-ot '" in emit.output


def test_routing_files(tmp_path):
    good = tmp_path / "experts.json"
    good.write_text(json.dumps({"layers": [[10, 5, 1, 1, 1, 1, 0, 1]] * 32}))
    r = parse_routing(str(good), 8, 32)
    assert r.label == str(good) and math.isclose(sum(r.mean()), 1.0)
    csv = tmp_path / "experts.csv"
    csv.write_text("e0,e1,e2,e3,e4,e5,e6,e7\n" + "\n".join(["4,3,2,1,1,1,1,1"] * 32) + "\n")
    assert parse_routing(str(csv), 8, 32).layer(3) is not None
    out = json.loads(runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "8xH100", "--tp", "8", "--ep", "8",
                                         "--batch", "16", "--routing", str(good), "--json"]).stdout)
    assert out["routing"] == str(good)


@pytest.mark.parametrize(("content", "needle"), [
    (json.dumps([[1, 2, 3]]), "has 3 expert frequencies, the model has 8"),
    (json.dumps([[1, -2, 3, 1, 1, 1, 1, 1]]), "negative"),
    (json.dumps([[1] * 8] * 5), "5 layers of frequencies for 32 MoE layers"),
    ("not,a,number\n1,x,2\n", "line 2 is not comma-separated numbers"),
    ("1,1,1,1,1,1,1,1\nSECRET=hunter2\n", "line 2 is not comma-separated numbers"),
])
def test_bad_routing_files_exit_2(tmp_path, content, needle):
    path = tmp_path / "bad.json" if content.startswith("[") else tmp_path / "bad.csv"
    path.write_text(content)
    res = runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "8xH100", "--routing", str(path)])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output
    assert "hunter2" not in res.output  # a file's lines are named by number, never echoed


@pytest.mark.parametrize(("args", "needle"), [
    (["--capacity-factor", "0"], "--capacity-factor must be above 0"),
    (["--capacity-factor", "-1"], "--capacity-factor must be above 0"),
    (["--redundant-experts", "99"], "more replicas than mixtral-8x7b's 8 experts"),
    (["--routing", "zipf:abc"], "zipf:S"),
    (["--routing", "zipf:-1"], "between 0 and 10"),
])
def test_bad_expert_options_exit_2(args, needle):
    for command in ("perf", "fit"):
        res = runner.invoke(app, [command, "mixtral-8x7b", "--gpus", "8xH100", *args])
        assert res.exit_code == 2 and needle in res.output, res.output


@pytest.mark.parametrize(("args", "needle"), [
    (["--expert-cache", "9"], "--expert-cache 9"),
    (["--locality", "1.5"], "--locality must be between 0 and 1"),
    (["--cpu-bw", "fast"], "--cpu-bw 'fast'"),
    (["--disk-bw", "0"], "--disk-bw must be between"),
])
def test_bad_offload_options_exit_2(args, needle):
    res = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB",
                              *args])
    assert res.exit_code == 2 and needle in res.output, res.output


# ------------------------------------------------------------------------------------------------
# check: the same options in a deployment spec
# ------------------------------------------------------------------------------------------------

SPEC = """\
model: mixtral-8x7b
engine: {engine}
gpus: {gpus}
serving:
  context: 8192
  batch: {batch}
{serving}targets:
  max_tpot_s: 10
"""


def _check(tmp_path, serving, engine="vllm", gpus="8xH100", batch=64, extra=""):
    path = tmp_path / "deploy.yaml"
    path.write_text(SPEC.format(engine=engine, gpus=gpus, batch=batch, serving=serving) + extra)
    res = runner.invoke(app, ["check", str(path), "--json"])
    return res, (json.loads(res.stdout) if res.stdout.strip().startswith(("{", "[")) else None)


def _tpot(data):
    result = data[0] if isinstance(data, list) else data
    return next(f for f in result["findings"] if f["target"] == "max_tpot_s")["predicted"], result


DSV3 = """\
model: deepseek-v3
engine: sglang
quant: fp8
gpus: 8xH200
layout:
  tp: 8
  dp_attention: true
serving:
  context: 8192
  batch: 8
{serving}targets:
  max_ttft_s: 100
  prompt_tokens: 4096
"""


def test_check_reads_routing_and_redundant_experts_beside_the_spec(tmp_path):
    shares = zipf_shares(256, 1.2)
    (tmp_path / "hot.json").write_text(json.dumps({"layers": [shares] * 58}))

    def ttft(serving):
        path = tmp_path / "deploy.yaml"
        path.write_text(DSV3.format(serving=serving))
        res = runner.invoke(app, ["check", str(path), "--json"])
        assert res.exit_code == 0, res.output
        result = json.loads(res.stdout)[0]
        return next(f for f in result["findings"] if f["target"] == "max_ttft_s")["predicted"], result

    uniform, skewed = ttft("")[0], ttft("  routing: hot.json\n")[0]  # relative: read beside the spec
    assert skewed > uniform
    balanced, result = ttft("  routing: hot.json\n  redundant_experts: 32\n")
    assert balanced < skewed
    assert "--enable-eplb" in result["command"] and "--ep-num-redundant-experts 32" in result["command"]
    assert result["plan"]["per_gpu"][0]["local_experts"] == 36  # (256 + 32) / 8 replicas' memory


@pytest.mark.parametrize(("serving", "field", "needle"), [
    ("  routing: zipf:-3\n", "serving.routing", "between 0 and 10"),
    ("  routing: missing.csv\n", "serving.routing", "missing.csv"),
    ("  capacity_factor: 0\n", "serving.capacity_factor", "greater than 0"),
    ("  redundant_experts: 99\n", "serving.redundant_experts", "more replicas"),
    ("  cpu_bw: fast\n", "serving.cpu_bw", "fast"),
])
def test_check_bad_expert_fields_exit_2_on_their_line(tmp_path, serving, field, needle):
    path = tmp_path / "deploy.yaml"
    path.write_text(SPEC.format(engine="vllm", gpus="8xH100", batch=8, serving=serving))
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 2 and needle in res.output and field in res.output, res.output
    assert "Traceback" not in res.output


def test_check_offload_spec_with_ram_bandwidth(tmp_path):
    serving = "  cpu_mem_gb: 64\n"
    res, ddr5 = _check(tmp_path, serving, engine="llama.cpp", gpus="1xRTX4090", batch=1, extra="quant: q4_k_m\n")
    assert res.exit_code == 0, res.output
    res, ddr4 = _check(tmp_path, serving + "  cpu_bw: ddr4\n", engine="llama.cpp", gpus="1xRTX4090", batch=1,
                       extra="quant: q4_k_m\n")
    assert res.exit_code == 0, res.output
    assert _tpot(ddr4)[0] > _tpot(ddr5)[0]
    assert _tpot(ddr5)[1]["fits"] == "offload"  # one word, as fit's JSON


def test_check_accepts_gpt_oss_mxfp4_offload(tmp_path):
    path = tmp_path / "oss.yaml"
    path.write_text("model: gpt-oss-120b\nengine: llama.cpp\nquant: mxfp4_moe\ngpus: 1xRTX4090\nserving:\n"
                    "  context: 8192\n  batch: 1\n  cpu_mem_gb: 128\n")
    res = runner.invoke(app, ["check", str(path), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)[0]
    assert result["fits"] == "offload" and result["plan"]["quant"] == "mxfp4_moe"
    assert "MXFP4_MOE.gguf" in result["command"] and "--n-cpu-moe" in result["command"]


def test_hit_rate_edges():
    # A cache holding every expert hits whatever the locality; with no cache nothing hits.
    assert hit_rate(8, 2, 8, 0.0) == 1.0 == hit_rate(8, 2, 9, 0.1)
    assert hit_rate(8, 2, 0, 0.9) == 0.0
    # Below the independent reuse (k/E = 0.25), a cache of k slots hits exactly `locality` under uniform
    # routing, and the penalty fades as the cache grows.
    assert hit_rate(8, 2, 2, 0.1) == pytest.approx(0.1, abs=0.01)
    assert hit_rate(8, 2, 2, 0.1) < hit_rate(8, 2, 5, 0.1) < hit_rate(8, 2, 7, 0.1) < 1.0


def test_skewed_routing_does_not_lower_the_default_cache_hit_rate():
    # Without --locality, a skewed router's own independent reuse is the floor: skew only helps a cache.
    base = ["fit", "mixtral-8x7b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB", "--json"]
    rates = [json.loads(runner.invoke(app, [*base, *extra]).stdout)["best"]["speed"]["cache_hit_rate"]
             for extra in ([], ["--routing", "zipf:1.0"], ["--routing", "zipf:1.5"])]
    assert rates[0] <= rates[1] <= rates[2]


def test_every_catalog_link_has_a_collective_model():
    from moeplan.comm import link_for
    from moeplan.hardware import CATALOG

    assert all(link_for(g.link) is not None for g in CATALOG if not g.unified_memory)


def test_offload_decode_follows_the_ram_bandwidth_and_batch_one_stays_on_the_cpu():
    base = ["fit", "qwen3-30b-a3b", "--gpus", "1xRTX2080", "--quant", "q4_k_m", "--cpu-mem", "62GB", "--json"]
    tpot = {bw: json.loads(runner.invoke(app, [*base, "--cpu-bw", bw]).stdout)["best"]["speed"]["tpot_s"]
            for bw in ("40", "80", "160")}
    # CPU-bound at batch 1 (llama.cpp offloads ops to the GPU only from 32 tokens): more RAM bandwidth, faster,
    # even where PCIe 3.0 (12.5 GB/s) would be slower still.
    assert tpot["40"] > tpot["80"] > tpot["160"]


def test_more_replicas_than_the_gpus_hold_is_bad_input(tmp_path):
    base = ["deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8", "--dp-attention"]
    # 96 replicas: ceil((256 + 96) / 8) = 44 expert slots per GPU, 12 more than 32, fit beside the model; 104
    # would need 13 more, which they do not hold.
    assert runner.invoke(app, ["fit", *base, "--redundant-experts", "96"]).exit_code == 0
    for command in ("fit", "perf"):
        res = runner.invoke(app, [command, *base, "--redundant-experts", "104"])
        assert res.exit_code == 2, res.output
        assert "cannot hold that many replicas" in res.output and "use at most 96" in res.output
    spec = tmp_path / "eplb.yaml"
    spec.write_text("model: deepseek-v3\nengine: sglang\nquant: fp8\ngpus: 8xH200\nlayout: {tp: 8, dp_attention: true}"
                    "\nserving:\n  context: 4096\n  batch: 1\n  redundant_experts: 104\n")
    (entry,) = json.loads(runner.invoke(app, ["check", str(spec), "--format", "json"]).stdout)
    assert entry["exit_code"] == 2 and entry["errors"][0]["field"] == "serving.redundant_experts"
    assert entry["errors"][0]["line"] == 9
    tp = runner.invoke(app, ["perf", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8",
                             "--redundant-experts", "16"])
    assert tp.exit_code == 0 and "changes nothing in tp8" in " ".join(tp.output.split())


def test_busiest_rank_all_to_all_bytes_grow_with_skew():
    base = ["perf", "deepseek-v3", "--gpus", "8xH200", "--quant", "fp8", "--tp", "8", "--dp-attention", "--batch",
            "256", "--json"]
    uniform = json.loads(runner.invoke(app, base).stdout)
    skewed = json.loads(runner.invoke(app, [*base, "--routing", "zipf:1.2"]).stdout)
    # DeepEP low-latency decode: one copy per (token, expert) each way, fp8 dispatch (1 + 4/128 bytes per
    # value) and bf16 combine, at the busiest rank's pairs (or its own tokens' k copies when more).
    pairs = max(uniform["busiest_rank_pairs"], 256 / 8 * 8)
    assert uniform["busiest_rank_a2a_bytes"] == pytest.approx(pairs * 7168 * (1 + 4 / 128 + 2), rel=1e-9)
    assert skewed["busiest_rank_a2a_bytes"] > 1.2 * uniform["busiest_rank_a2a_bytes"]


def test_plain_mxfp4_offloads_as_mxfp4_moe(tmp_path):
    res = json.loads(runner.invoke(app, ["fit", "gpt-oss-120b", "--gpus", "1xRTX4090", "--cpu-mem", "128GB",
                                         "--quant", "mxfp4", "--json"]).stdout)
    assert res["fits"] == "offload" and res["best"]["quant"] == "mxfp4_moe"
    assert any("offloads as mxfp4_moe" in n for n in res["notes"])
    spec = tmp_path / "gpt-oss.yaml"
    spec.write_text("model: gpt-oss-120b\nengine: llamacpp\nquant: mxfp4\ngpus: 1xRTX4090\n"
                    "serving: {context: 4096, batch: 1, cpu_mem_gb: 128}\n")
    (entry,) = json.loads(runner.invoke(app, ["check", str(spec), "--format", "json"]).stdout)
    assert entry["exit_code"] == 0 and entry["fits"] == "offload" and entry["engine"] == "llama.cpp"
    assert "MXFP4_MOE" in entry["command"]


def test_check_tries_smaller_precisions_before_refusing_replicas(tmp_path):
    spec = tmp_path / "replicas.yaml"
    spec.write_text("model: qwen3-30b-a3b\nengine: sglang\ngpus: 2xL40S\nlayout: {tp: 2, ep: 2}\n"
                    "serving: {context: 4096, batch: 8, redundant_experts: 128}\n")
    (entry,) = json.loads(runner.invoke(app, ["check", str(spec), "--format", "json"]).stdout)
    fit = json.loads(runner.invoke(app, ["fit", "qwen3-30b-a3b", "--gpus", "2xL40S", "--tp", "2", "--ep", "2",
                                         "--redundant-experts", "128", "--json"]).stdout)
    # bf16 cannot hold 128 replicas beside the model; fp8 can: check finds it as fit does.
    assert fit["fits"] is True and entry["exit_code"] == 0 and entry["plan"]["quant"] == fit["best"]["quant"]


def test_the_cheapest_note_counts_the_offload_plan_checked(tmp_path):
    spec = tmp_path / "offload.yaml"
    spec.write_text("model: mixtral-8x22b\nengine: llamacpp\ngpus: 1xRTX4090\nprice: 0.5\n"
                    "serving: {context: 4096, batch: 1, cpu_mem_gb: 128}\ntargets: {min_decode_tok_per_s: 1}\n")
    (entry,) = json.loads(runner.invoke(app, ["check", str(spec), "--format", "json"]).stdout)
    assert entry["exit_code"] == 0 and entry["fits"] == "offload"
    cheap = entry["cheapest_meeting_targets"]
    assert cheap is not None and cheap["usd_per_million_output_tokens"] <= \
        entry["plan"]["speed"]["usd_per_million_output_tokens"]  # fmt: skip


def test_the_locality_printed_is_the_one_the_hit_rate_used():
    base = ["fit", "mixtral-8x7b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB"]
    skewed = json.loads(runner.invoke(app, [*base, "--routing", "zipf:1.5", "--json"]).stdout)["best"]["speed"]
    plain = json.loads(runner.invoke(app, [*base, "--json"]).stdout)["best"]["speed"]
    assert plain["cache_locality"] == pytest.approx(0.34)
    assert skewed["cache_locality"] > 0.34  # skewed routing reuses experts more by chance alone
    text = runner.invoke(app, [*base, "--routing", "zipf:1.5"]).output
    assert f"locality {skewed['cache_locality']:.2g}" in " ".join(text.split())
