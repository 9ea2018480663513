"""perf: distinct experts, the physical bound, the sweep and the CLI."""

import json

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.hardware import CATALOG, parse_gpus
from moeplan.layout import Layout
from moeplan.params import EMBEDDING, count_params
from moeplan.perf import distinct_experts, distinct_experts_per_rank, step_cost
from moeplan.quant import get_scheme
from moeplan.sources import bundled_cards

runner = CliRunner()


def test_distinct_experts_small_and_large_batches():
    assert distinct_experts(8, 2, 1) == pytest.approx(2)  # batch 1 touches exactly k
    assert distinct_experts(256, 8, 1) == pytest.approx(8)
    assert distinct_experts(256, 8, 4) == pytest.approx(256 * (1 - (1 - 8 / 256) ** 4))  # < 32: overlaps
    assert distinct_experts(256, 8, 4) < 32
    assert distinct_experts(128, 8, 4096) == pytest.approx(128, rel=1e-6)  # saturates at E
    assert distinct_experts(8, 2, 16) > distinct_experts(8, 2, 4) > distinct_experts(8, 2, 1)


def test_distinct_experts_per_ep_rank():
    e, k, b, ep = 256, 8, 16, 8
    per = [distinct_experts_per_rank(e, k, b, ep, r) for r in range(ep)]
    assert sum(per) == pytest.approx(distinct_experts(e, k, b))
    # uneven: 10 experts over 4 ranks -> 3,3,2,2
    uneven = [distinct_experts_per_rank(10, 2, 1000, 4, r) for r in range(4)]
    assert uneven == pytest.approx([3, 3, 2, 2], rel=1e-6)


@pytest.mark.parametrize("card", bundled_cards(), ids=lambda c: c.name)
def test_batch1_decode_never_beats_bandwidth(card):
    spec = card.spec()
    scheme = get_scheme("bf16")
    # Bytes one token must read: every active weight but the embedding lookup (one row).
    count = count_params(spec)
    active = count.active_params - count.component(EMBEDDING).active
    min_bytes = active * 2
    layout = Layout(tp=1, ep=1, pp=1, stage_layers=(spec.num_layers,))
    for gpu in CATALOG:
        cost = step_cost(spec, scheme, layout, (gpu,), tokens_per_seq=1, batch=1, context=1)
        assert 1 / cost.seconds <= gpu.hbm_gb_per_s * 1e9 / min_bytes, gpu.name


def test_perf_cli_json_and_sweep():
    res = runner.invoke(app, ["perf", "qwen3-30b-a3b", "--gpus", "1xH100", "--sweep", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for key in ("decode_tok_per_s", "decode_tok_per_s_total", "prefill_tok_per_s", "ttft_s", "tpot_s"):
        assert data[key] > 0
    rows = data["sweep"]
    assert [r["batch"] for r in rows][:3] == [1, 4, 16]
    assert {"batch", "distinct_experts", "bytes_per_step", "bound"} <= rows[0].keys()
    assert rows[0]["distinct_experts"] == pytest.approx(8)
    assert rows[-1]["distinct_experts"] > rows[0]["distinct_experts"]
    assert rows[-1]["bytes_per_step"] > rows[0]["bytes_per_step"]
    assert all(r["bound"] in ("memory", "compute") for r in rows)


def test_fit_shows_speed_columns():
    res = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2xH100"])
    assert res.exit_code == 0
    assert "tok/s" in res.output


# ------------------------------------------------------------------------------------------------
# Issue 13: the busiest EP rank, measured collectives, engine overhead, layouts and ranking
# ------------------------------------------------------------------------------------------------


def _simulate(num_experts, top_k, tokens, ranks, batches, seed):
    """A direct simulation, written apart from moeplan.routing: per batch, each token picks top_k
    distinct experts uniformly; experts sit on ranks in contiguous blocks."""
    import random

    rnd = random.Random(seed)
    owner = []
    for r in range(ranks):
        owner += [r] * (num_experts // ranks + (1 if r < num_experts % ranks else 0))
    tot = [0.0, 0.0, 0.0]
    for _ in range(batches):
        distinct, pairs, recv = [set() for _ in range(ranks)], [0] * ranks, [0] * ranks
        for _ in range(tokens):
            hit = set()
            for e in rnd.sample(range(num_experts), top_k):
                distinct[owner[e]].add(e)
                pairs[owner[e]] += 1
                hit.add(owner[e])
            for r in hit:
                recv[r] += 1
        tot[0] += max(len(d) for d in distinct)
        tot[1] += max(pairs)
        tot[2] += max(recv)
    return [t / batches for t in tot]


@pytest.mark.parametrize(("e", "k", "t", "r"), [(8, 2, 1, 8), (256, 8, 1, 8), (256, 8, 8, 8), (128, 8, 64, 4),
                                                (256, 8, 512, 8), (8, 2, 200, 2)])
def test_busiest_rank_matches_a_direct_simulation(e, k, t, r):
    from moeplan.routing import rank_load

    load = rank_load(e, k, t, r)
    sim = _simulate(e, k, t, r, batches=300 if t < 100 else 60, seed=7)
    assert load.distinct_max == pytest.approx(sim[0], rel=0.05)
    assert load.assignments_max == pytest.approx(sim[1], rel=0.05)
    assert load.tokens_in_max == pytest.approx(sim[2], rel=0.05)
    # The figures: at batch 1 over 8 ranks Mixtral's busiest rank holds 1 expert, not 0.25,
    # and DeepSeek-V3's (256 experts, top-8) about 2.5, not 1.
    if (e, k, t, r) == (8, 2, 1, 8):
        assert load.distinct_max == pytest.approx(1.0) and load.distinct_mean == pytest.approx(0.25)
    if (e, k, t, r) == (256, 8, 1, 8):
        assert 2.3 < load.distinct_max < 2.7 and load.distinct_mean == pytest.approx(1.0)


@pytest.mark.parametrize(("e", "k", "t"), [(8, 2, 1), (8, 2, 18), (9, 2, 5), (60, 4, 18), (128, 8, 5), (16, 1, 32)])
def test_two_ranks_exact_figures_match_the_sampler_and_a_simulation(e, k, t):
    """Two ranks under uniform routing are computed exactly (routing._two_ranks_uniform); the sampler
    that other rank counts use, and a direct simulation, must agree with it within sampling noise."""
    from moeplan import routing

    load = routing.rank_load(e, k, t, 2)
    owner = [r for r, rng in enumerate(routing.blocks(e, 2)) for _ in rng]
    sampled = routing._sampled_max_uniform(e, k, t, owner, 2)
    sim = _simulate(e, k, t, 2, batches=400, seed=11)
    exact = (load.distinct_max, load.assignments_max, load.tokens_in_max)
    assert exact == pytest.approx(sampled, rel=0.04)
    assert exact == pytest.approx(sim, rel=0.04)
    if (e, k, t) == (8, 2, 1):  # both picks on one rank of four with P = 2 C(4,2) / C(8,2) = 3/7
        assert load.distinct_max == pytest.approx(1 + 3 / 7, abs=1e-12) and load.tokens_in_max == 1.0


def test_collectives_are_the_measured_figures():
    from moeplan.comm import LINKS, allreduce_s, alltoall_s

    h100 = LINKS["NVLink4"]
    # [aic] H100: vLLM custom all-reduce under graphs 4.7 us at 512 B on TP8; NCCL 15.6 us.
    assert allreduce_s(512, 8, h100) == pytest.approx(4.7e-6, rel=0.1)
    assert allreduce_s(512, 8, h100, custom=False) == pytest.approx(15.6e-6, rel=0.05)
    # ~15 us at 1 MiB (two-shot), NCCL's bus bandwidth at 256 MB: 1,092 us measured.
    assert allreduce_s(2**20, 8, h100) == pytest.approx(15.0e-6, rel=0.25)
    assert allreduce_s(256e6, 8, h100) == pytest.approx(1092e-6, rel=0.15)
    # Custom all-reduce stops at two PCIe GPUs (vLLM), so 8 PCIe GPUs pay NCCL's 24.6 us floor.
    assert allreduce_s(512, 8, LINKS["PCIe5"]) == pytest.approx(24.6e-6, rel=0.05)
    # DeepEP low-latency EP16 dispatch, 128 tokens x top-8 x 7168 fp8 per rank: 102-118 us published.
    assert 90e-6 < alltoall_s(128 * 8 * 7168, 16, 8, h100) < 130e-6


def test_engine_overhead_with_and_without_cuda_graphs():
    from moeplan.engines import overhead

    graphs, eager = overhead("sglang", True), overhead("sglang", False)
    # SGLang#1401: Llama-3-8B bs1 7.06 ms with graphs, 9.28 ms without, over 32 layers.
    assert (eager.layer_s - graphs.layer_s) * 32 == pytest.approx(9.28e-3 - 7.06e-3, rel=0.01)
    assert overhead("llama.cpp", False).layer_s - overhead("llama.cpp", True).layer_s == pytest.approx(27e-6)
    assert overhead("pytorch", False).layer_s > 10 * graphs.layer_s
    spec = bundled_cards()[0].spec()
    h100 = next(g for g in CATALOG if g.name == "H100")
    layout = Layout(tp=1, ep=1, pp=1, stage_layers=(spec.num_layers,))
    args = dict(tokens_per_seq=1, batch=1, context=512)
    fast = step_cost(spec, get_scheme("bf16"), layout, (h100,), engine="vllm", **args)
    slow = step_cost(spec, get_scheme("bf16"), layout, (h100,), engine="vllm", cuda_graphs=False, **args)
    assert slow.seconds - fast.seconds == pytest.approx(spec.num_layers * 69e-6, rel=1e-6)


@pytest.mark.parametrize(("model", "gpus", "quant"), [("mixtral-8x7b", "8xH100", "bf16"),
                                                      ("qwen3-30b-a3b", "8xH100", "bf16"),
                                                      ("gpt-oss-120b", "8xH100", "mxfp4"),
                                                      ("deepseek-v3", "8xH200", "fp8")])
def test_batch1_picks_tensor_parallel_and_dp_ep_is_slower(model, gpus, quant):
    picked = json.loads(runner.invoke(app, ["perf", model, "--gpus", gpus, "--quant", quant, "--json"]).stdout)
    assert picked["layout"].startswith("tp") and picked["layout"].endswith("pp1"), picked["layout"]
    assert any("ranked for latency" in n for n in picked.get("notes", [])) or picked["batch"] == 1
    forced = json.loads(runner.invoke(app, ["perf", model, "--gpus", gpus, "--quant", quant, "--tp", "8", "--ep",
                                            "8", "--dp-attention", "--json"]).stdout)
    assert forced["layout"] == "dp8 ep8 pp1"
    assert forced["tpot_s"] > picked["tpot_s"]


def test_many_sequences_over_nodes_still_pick_dp_attention_and_ep():
    out = json.loads(runner.invoke(app, ["perf", "deepseek-v3", "--gpus", "8xH100", "--nodes", "4", "--quant", "fp8",
                                         "--batch", "4096", "--context", "2048", "--json"]).stdout)
    assert out["layout"].startswith("dp32 ep32")


@pytest.mark.parametrize(("args", "needle"), [
    (["--tp", "3", "--gpus", "3xH100"], "does not divide mixtral-8x7b's 32 attention heads"),
    (["--tp", "4", "--gpus", "8xH100"], "--tp 4 x --pp 1 = 4 GPUs, but --gpus gives 8"),
    (["--tp", "8", "--ep", "4", "--gpus", "8xH100"], "--ep 4 with --tp 8"),
    (["--pp", "3", "--gpus", "8xH100"], "--pp 3 does not divide the 8 GPUs"),
    (["--ep", "16", "--dp-attention", "--gpus", "16xH100"], "exceeds mixtral-8x7b's 8 experts"),
    (["--prefer", "fast", "--gpus", "8xH100"], "--prefer must be one of latency, throughput, memory"),
])
def test_bad_forced_layouts_are_one_line_exit_2(args, needle):
    for command in ("perf", "fit"):
        res = runner.invoke(app, [command, "mixtral-8x7b", *args])
        assert res.exit_code == 2, res.output
        assert needle in res.output and "Traceback" not in res.output


def test_plans_name_their_engine_and_gguf_runs_only_layer_splits():
    res = json.loads(runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2xRTX4090", "--json"]).stdout)
    for plan in res["plans"]:
        if plan["quant"].startswith("q"):
            assert plan["engine"] == "llama.cpp" and plan["tp"] == plan["ep"] == 1
        else:
            assert plan["engine"] in ("vllm", "sglang")
    bad = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2xRTX4090", "--quant", "q4_k_m", "--tp", "2"])
    assert bad.exit_code == 2 and "llama.cpp" in bad.output


def test_every_speed_figure_carries_its_band():
    out = json.loads(runner.invoke(app, ["perf", "qwen3-30b-a3b", "--gpus", "1xH100", "--json"]).stdout)
    for key in ("tpot_s", "ttft_s", "decode_tok_per_s", "decode_tok_per_s_total"):
        assert out[f"{key}_low"] < out[key] < out[f"{key}_high"], key
    assert out["band_regime"] and out["engine"] == "vllm"


def test_prefer_changes_the_ranking():
    base = ["fit", "qwen3-30b-a3b", "--gpus", "8xH100", "--quant", "bf16", "--batch", "64", "--json"]
    thr = json.loads(runner.invoke(app, [*base]).stdout)
    assert any("ranked for throughput" in n for n in thr["notes"])
    lat = json.loads(runner.invoke(app, [*base, "--prefer", "latency"]).stdout)
    mem = json.loads(runner.invoke(app, [*base, "--prefer", "memory"]).stdout)
    assert lat["best"]["speed"]["tpot_s"] <= thr["best"]["speed"]["tpot_s"]
    assert thr["best"]["speed"]["capacity_tok_per_s"] >= lat["best"]["speed"]["capacity_tok_per_s"]

    def free(plan):
        return min(r["free_bytes"] / r["budget_bytes"] for r in plan["per_gpu"])

    assert free(mem["best"]) >= free(lat["best"])


def test_a_spec_can_force_its_layout(tmp_path):
    spec = tmp_path / "deploy.yaml"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 8xH100\nserving: {context: 4096, batch: 1}\n"
                    "layout: {tp: 8, ep: 8}\n")
    res = runner.invoke(app, ["check", str(spec), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["plan"]["layout"] == "tp8 ep8 pp1"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 8xH100\nserving: {context: 4096, batch: 1}\n"
                    "layout: {tp: 3}\n")
    res = runner.invoke(app, ["check", str(spec)])
    assert res.exit_code == 2 and "layout" in res.output


def test_a_decode_batch_is_many_sequences_of_one_token():
    """Decode attention at batch B is B sequences each reading the whole context, not one sequence of
    B consecutive positions (which a causal count would halve): for a dense model every FLOP of a
    decode step scales with the batch."""
    from moeplan.sources import resolve

    spec = resolve("llama-2-70b")
    layout = Layout(tp=1, ep=1, pp=1, dp_attention=False, stage_layers=(spec.num_layers,))
    gpus, _ = parse_gpus("1xH100")

    def flops(batch):
        return step_cost(spec, get_scheme("bf16"), layout, gpus, tokens_per_seq=1, batch=batch,
                         context=8192).flops

    assert flops(64) == pytest.approx(64 * flops(1), rel=1e-9)


def test_llamacpp_per_layer_cost_is_fitted_per_backend():
    # moeplan.engines.LLAMACPP_LAYER_S: fitted with llama.cpp's efficiency on dense llama-bench rows of
    # two model sizes (XiongjieDai, May 2024; docs/validation.md). Metal encodes every kernel per token,
    # so Apple's per-layer cost is higher than CUDA's, where graphs replay them.
    from moeplan.engines import LLAMACPP_LAYER_S, overhead

    apple, nvidia = overhead("llama.cpp", True, vendor="apple"), overhead("llama.cpp", True, vendor="nvidia")
    assert (apple.layer_s, nvidia.layer_s) == (LLAMACPP_LAYER_S["apple"], LLAMACPP_LAYER_S["nvidia"])
    assert apple.layer_s > 2 * nvidia.layer_s
    assert overhead("llama.cpp", True, vendor="amd").layer_s == nvidia.layer_s
    assert overhead("llama.cpp", False, vendor="nvidia").layer_s - nvidia.layer_s == pytest.approx(27e-6)
    assert overhead("llama.cpp", False, vendor="apple").layer_s == apple.layer_s  # no CUDA graphs on Metal


def test_llamacpp_fit_reproduces_the_two_model_sizes():
    # The published Llama-3 8B / 70B Q4_K_M tg512 rows on an M2 Ultra (78.81 and 12.48 tok/s,
    # XiongjieDai README, May 2024): one (efficiency, per-layer cost) pair predicts both within 15%.
    from typer.testing import CliRunner

    from moeplan.cli import app

    for model, published in (("llama-3.1-8b", 78.81), ("llama-3.1-70b", 12.48)):
        out = CliRunner().invoke(app, ["perf", model, "--gpus", "1xM2-Ultra", "--quant", "q4_k_m", "--context", "256",
                                       "--prompt", "1", "--json"])
        assert out.exit_code == 0, out.output
        rate = json.loads(out.output)["decode_tok_per_s"]
        assert 0.85 < rate / published < 1.15, (model, rate)


def test_serving_per_layer_cost_is_fitted_for_nvidia_only():
    # moeplan.engines.SERVING_LAYER_S: vLLM's and SGLang's per-layer cost under CUDA graphs, fitted with
    # their efficiency on the InferenceX H200 and sgl-cookbook B200 rows (docs/validation.md step 6);
    # ROCm engines keep the 30 us floor their own efficiency (0.26) was fitted with.
    from moeplan.engines import SERVING_LAYER_S, overhead

    for engine in ("vllm", "sglang"):
        nvidia = overhead(engine, True, vendor="nvidia")
        assert nvidia.layer_s == SERVING_LAYER_S["nvidia"] > 30e-6
        assert overhead(engine, True, vendor="amd").layer_s == pytest.approx(30e-6)
        assert overhead(engine, False, vendor="nvidia").layer_s - nvidia.layer_s == pytest.approx(69e-6)  # SGLang#1401
    assert overhead("llama.cpp", True, vendor="nvidia").layer_s != SERVING_LAYER_S["nvidia"]  # its own fit
