"""perf: distinct experts, the physical bound, the sweep and the CLI."""

import json

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.hardware import CATALOG
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
