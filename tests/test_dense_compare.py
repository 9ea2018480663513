"""Issue 16: dense models everywhere, `moeplan compare`, cost per million tokens, an honest sweep and plots.

Facts: Llama-2-70B's 68,976,648,192 parameters are its config counted tensor by tensor (the issue's
figure; transformers' LlamaForCausalLM on the meta device gives the same, tests/test_transformers_meta.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeplan.cli import app
from moeplan.params import DENSE_FFN, ROUTED_EXPERTS, count_params
from moeplan.sources import resolve

runner = CliRunner()


def run_json(*args: str) -> dict:
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout)


def test_llama2_70b_counted_exactly_and_dense():
    count = count_params(resolve("llama-2-70b"))
    assert count.total_params == 68_976_648_192 == count.active_params
    assert count.component(ROUTED_EXPERTS).total == 0 and count.component(DENSE_FFN).total > 0
    assert not resolve("llama-2-70b").is_moe


def test_llama2_70b_fp16_needs_two_a100s():
    one = runner.invoke(app, ["fit", "llama-2-70b", "--gpus", "1xA100-80GB", "--quant", "fp16"])
    assert one.exit_code == 1 and "DOES NOT FIT" in one.output
    two = run_json("fit", "llama-2-70b", "--gpus", "2xA100-80GB", "--quant", "fp16")
    assert two["fits"] and two["best"]["ep"] == 1


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "qwen3-32b", "mistral-7b", "llama-2-70b"])
def test_dense_cards_through_every_command(name, tmp_path):
    assert runner.invoke(app, ["params", name]).exit_code == 0
    assert runner.invoke(app, ["memory", name, "--context", "8192"]).exit_code == 0
    res = run_json("fit", name, "--gpus", "8xH100")
    assert res["fits"] and all(p["ep"] == 1 and not p["dp_attention"] for p in res["plans"])
    perf = run_json("perf", name, "--gpus", "8xH100", "--sweep")
    assert perf["tpot_s"] > 0 and "moe_advantage" not in perf["sweep"][0]
    emit = runner.invoke(app, ["fit", name, "--gpus", "8xH100", "--emit", "vllm"])
    assert emit.exit_code == 0 and "vllm serve" in emit.output
    spec = tmp_path / "deploy.yaml"
    spec.write_text(f"model: {name}\nengine: vllm\ngpus: 8xH100\nserving: {{context: 4096, batch: 8}}\n")
    assert runner.invoke(app, ["check", str(spec)]).exit_code == 0


def test_mixtral_against_llama2_70b_on_two_a100s():
    res = run_json("compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB")
    mix, llama = res["rows"]
    assert mix["fits"] and llama["fits"]
    # The figures: about 26 GB of weights per token in bf16 against about 138 GB.
    assert mix["weights_read_per_token_bytes"] == pytest.approx(26e9, rel=0.05)
    assert llama["weights_read_per_token_bytes"] == pytest.approx(138e9, rel=0.02)
    assert mix["tpot_s"] < llama["tpot_s"]
    at_one = llama["tpot_s"] / mix["tpot_s"]
    at_common = mix["tok_per_s_per_user_at_common_batch"] / llama["tok_per_s_per_user_at_common_batch"]
    assert res["common_batch"] > 1 and at_common < at_one  # the ratio narrows at a larger batch
    assert any(v.startswith("latency: mixtral-8x7b decodes") for v in res["verdict"])
    assert any("narrows" in v for v in res["verdict"])
    table = runner.invoke(app, ["compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB"])
    assert table.exit_code == 0 and "weights read per token" in table.output and "narrows" in table.output


def test_usd_per_million_output_tokens_formula():
    price, gpus = 2.49, 8
    res = run_json("perf", "qwen3-30b-a3b", "--gpus", "8xH100", "--batch", "64", "--price", str(price))
    want = price * gpus / (3600 * res["decode_tok_per_s_total"]) * 1e6
    assert res["usd_per_million_output_tokens"] == pytest.approx(want, rel=1e-9)
    assert res["usd_per_hour"] == pytest.approx(price * gpus)
    assert res["usd_per_million_input_tokens"] == pytest.approx(price * gpus / (3600 * res["prefill_tok_per_s"]) * 1e6)
    per_gpu = run_json("perf", "qwen3-30b-a3b", "--gpus", "8xH100", "--batch", "64", "--price", "H100=2.49")
    assert per_gpu["usd_per_million_output_tokens"] == pytest.approx(want, rel=1e-9)
    unpriced = runner.invoke(app, ["perf", "qwen3-30b-a3b", "--gpus", "8xH100"])
    assert "no cost shown: add --price" in unpriced.output and "USD per million" not in unpriced.output


def test_a_spec_with_a_cost_target_passes_and_fails(tmp_path):
    spec = tmp_path / "cost.yaml"
    base = "model: mixtral-8x7b\nengine: vllm\ngpus: 2xA100-80GB\nprice: 1.29\nserving: {context: 4096, batch: 64}\n"
    spec.write_text(base + "targets: {max_usd_per_million_output_tokens: 5.0}\n")
    assert runner.invoke(app, ["check", str(spec)]).exit_code == 0
    spec.write_text(base + "targets: {max_usd_per_million_output_tokens: 0.01}\n")
    res = runner.invoke(app, ["check", str(spec)])
    assert res.exit_code == 1 and "max_usd_per_million_output_tokens" in res.output
    spec.write_text(base.replace("price: 1.29\n", "") + "targets: {max_usd_per_million_output_tokens: 1.0}\n")
    res = runner.invoke(app, ["check", str(spec)])
    assert res.exit_code == 2 and "needs a price" in res.output


def test_sweep_marks_batches_that_do_not_fit():
    res = run_json("perf", "mixtral-8x7b", "--gpus", "2xA100-80GB", "--sweep", "--context", "32768")
    fits = {r["batch"]: r["fits"] for r in res["sweep"]}
    assert fits[1] == "yes" and fits[1024] == "no"
    assert res["max_batch"] in fits and fits[res["max_batch"]] == "yes"
    assert all((b <= res["max_batch"]) == (f == "yes") for b, f in fits.items())
    # The dense counterpart is costed in full: every weight, the same KV, all FLOPs.
    for row in res["sweep"]:
        assert row["dense_tpot_s"] >= row["tpot_s"] * 0.999
    text = runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "2xA100-80GB", "--sweep", "--context", "32768"])
    assert "largest batch that fits" in text.output and "no" in text.output


def test_plots_are_valid_svg_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    svg, png, mem = tmp_path / "sweep.svg", tmp_path / "cmp.png", tmp_path / "mem.svg"
    assert runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "2xA100-80GB", "--plot", str(svg)]).exit_code == 0
    assert ET.parse(svg).getroot().tag.endswith("svg")
    res = runner.invoke(app, ["compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB", "--plot", str(png)])
    assert res.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--plot", str(mem)]).exit_code == 0
    assert ET.parse(mem).getroot().tag.endswith("svg")


@pytest.mark.parametrize(("args", "needle"), [
    (["perf", "mixtral-8x7b", "--gpus", "8xH100", "--price", "0"], "above 0"),
    (["perf", "mixtral-8x7b", "--gpus", "8xH100", "--price=-2"], "above 0"),
    (["fit", "mixtral-8x7b", "--gpus", "8xH100", "--price", "A100-80GB=1.29"], "does not use"),
    (["fit", "mixtral-8x7b", "--gpus", "8xH100", "--price", "H100=abc"], "not a number"),
    (["compare", "mixtral-8x7b", "--gpus", "8xH100"], "at least two models"),
    (["compare", "mixtral-8x7b", "no-such-model", "--gpus", "8xH100"], "unknown model 'no-such-model'"),
    (["perf", "mixtral-8x7b", "--gpus", "8xH100", "--plot", "out.gif"], ".svg or .png"),
])
def test_bad_cost_and_compare_input(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_plot_is_an_optional_extra():
    """The planner never imports matplotlib unless a plot is asked for."""
    import subprocess
    import sys

    code = "import sys, moeplan.cli; from moeplan import perf, compare, report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert Path(__file__).parent.parent.joinpath("pyproject.toml").read_text().count("matplotlib") >= 1


def test_check_names_the_cheapest_configuration_that_meets_the_targets(tmp_path):
    spec = tmp_path / "cheap.yaml"
    base = "model: mixtral-8x7b\nengine: vllm\ngpus: 2xA100-80GB\nprice: 1.29\nserving: {context: 4096, batch: 64}\n"
    spec.write_text(base + "targets: {max_usd_per_million_output_tokens: 5.0, min_decode_tok_per_s: 10}\n")
    res = runner.invoke(app, ["check", str(spec), "--format", "json"])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)
    cheap = entry["cheapest_meeting_targets"]
    checked = entry["plan"]["speed"]["usd_per_million_output_tokens"]
    # A cheaper quantization than the one checked (bf16, the highest precision that fits) meets them too.
    assert entry["plan"]["quant"] == "bf16" and cheap["quant"] != "bf16"
    assert cheap["usd_per_million_output_tokens"] < checked
    assert any(n.startswith("cheapest configuration that meets every target") for n in entry["notes"])
    spec.write_text(base + "targets: {min_decode_tok_per_s: 1000}\n")  # nothing on two A100s decodes that fast
    (entry,) = json.loads(runner.invoke(app, ["check", str(spec), "--format", "json"]).stdout)
    assert entry["cheapest_meeting_targets"] is None
    assert any("meets every target" in n and n.startswith("no ") for n in entry["notes"])


def test_costs_at_the_batch_asked_and_for_input_tokens():
    price = 1.29
    fit = run_json("fit", "mixtral-8x7b", "--gpus", "2xA100-80GB", "--price", str(price), "--batch", "16")
    sp = fit["best"]["speed"]
    assert sp["usd_per_million_output_tokens"] == pytest.approx(
        price * 2 / (3600 * sp["decode_tok_per_s_total"]) * 1e6, rel=1e-9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    table = subprocess.run([sys.executable, "-m", "moeplan", "fit", "mixtral-8x7b", "--gpus", "2xA100-80GB", "--price",
                            str(price), "--batch", "16"], env=env, capture_output=True, text=True, timeout=60)
    row = next(line for line in table.stdout.splitlines() if line.startswith("│ bf16") and "tp2 ep1" in line)
    assert f"{sp['usd_per_million_output_tokens']:,.3f}" in row  # beside tok/s total at batch 16
    assert f"{sp['usd_per_million_output_tokens_at_capacity']:,.3f}" in row  # and at the largest batch
    res = run_json("compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB", "--price", str(price))
    for r in res["rows"]:
        assert 0 < r["usd_per_million_input_tokens"] < r["usd_per_million_output_tokens"]  # prefill is cheaper
