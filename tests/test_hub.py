"""moeplan.hub against a real HTTP server that answers like the Hub (tests/hubserver.py).

moeplan runs in subprocesses: huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported,
so each run gets them through its environment and nothing in this process is patched. A run costs
about a second of imports; the scenarios are independent (each has its own server and cache), so a
module fixture starts them all at once and each test then checks the runs it needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hubserver import (
    FakeRepo,
    HubServer,
    Request,
    closed_endpoint,
    deepseek_v3_tensors,
    env_for,
    gpt_oss_tensors,
    hub_server,
    mixtral_tensors,
    raw_safetensors,
    safetensors_header,
    sharded_repo,
    single_file_repo,
)

ROOT = Path(__file__).resolve().parent.parent
CARDS = ROOT / "model_cards"
TINY_CONFIG = json.loads((Path(__file__).parent / "fixtures" / "hub" / "tiny-mixtral.config.json").read_text())

MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
DEEPSEEK = "deepseek-ai/DeepSeek-V3"
GPT_OSS = "openai/gpt-oss-20b"
# Hub ids no bundled card matches, so moeplan reads them from the Hub without --from-hub.
MIXTRAL_LIKE = "acme/mixtral-shaped"
DEEPSEEK_LIKE = "acme/deepseek-v3-shaped"
MIXTRAL_TOTAL = 46_702_792_704  # Mistral AI: 46.7B; every tensor of the real checkpoint
DEEPSEEK_TOTAL = 671_026_419_200  # DeepSeek-V3 README_WEIGHTS.md: 671B main model


def card_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CARDS / f"{name}.yaml").read_text())["config"]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    requests: list[Request]  # what the fake Hub saw during this run

    def json(self) -> Any:
        return json.loads(self.stdout)


def run(hub: HubServer | None, args: list[str], env: dict[str, str]) -> Run:
    """One moeplan subprocess; `args` follow `python`, e.g. ["-m", "moeplan", "params", ...]."""
    seen = len(hub.log) if hub else 0
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return Run(proc.returncode, proc.stdout, proc.stderr, list(hub.log[seen:]) if hub else [])


def params(model: str, *extra: str) -> list[str]:
    return ["-m", "moeplan", "params", model, "--json", *extra]


def fit_args(model: str, gpus: str) -> list[str]:
    return ["-m", "moeplan", "fit", model, "--gpus", gpus, "--json"]


def assert_one_line_error(result: Run, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr, no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_ok(result: Run) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bars, no warnings
    data: dict[str, Any] = result.json()
    return data


def assert_only_headers_read(requests: list[Request], repo_id: str) -> None:
    """Only this repo's files; safetensors files only by range and never past their header.

    moeplan asks for the first 100,001 bytes (as huggingface_hub does), then for the rest of a longer
    header; a 404 is the probe for model.safetensors in a sharded repo.
    """
    assert requests
    for req in requests:
        assert req.path.startswith(f"/{repo_id}/resolve/"), req
        if req.method == "GET" and req.path.endswith(".safetensors") and req.status != 404:
            end = req.range_end()
            assert end is not None and req.size is not None, req
            assert end <= max(100_000, req.size - 1), req


# ----------------------------------------------------------------------------------------------
# Scenarios: each starts its own server and cache, runs moeplan one or more times, returns the runs.
# ----------------------------------------------------------------------------------------------

Scenario = Callable[[Path], dict[str, Run]]


def scenario_mixtral(tmp: Path) -> dict[str, Run]:
    """Sharded, every tensor; then the same cache with the Hub gone, and with HF_HUB_OFFLINE=1."""
    cfg = card_config("mixtral-8x7b")
    repo = sharded_repo(cfg, mixtral_tensors(cfg), shards=4)
    with hub_server({MIXTRAL: repo, MIXTRAL_LIKE: repo}) as hub:
        fit_run = run(hub, fit_args(MIXTRAL_LIKE, "2xRTX4090"), env_for(hub.endpoint, tmp / "fit"))
        online = run(hub, params(MIXTRAL, "--from-hub"), env_for(hub.endpoint, tmp))
        offline_env = env_for(hub.endpoint, tmp, HF_HUB_OFFLINE="1")
        offline = run(hub, params(MIXTRAL, "--from-hub"), offline_env)
    down = run(None, params(MIXTRAL, "--from-hub"), env_for(closed_endpoint(), tmp))
    return {"online": online, "offline": offline, "down": down, "fit": fit_run}


def scenario_deepseek(tmp: Path) -> dict[str, Run]:
    cfg = card_config("deepseek-v3")
    repo = sharded_repo(cfg, deepseek_v3_tensors(cfg), shards=8)
    with hub_server({DEEPSEEK: repo, DEEPSEEK_LIKE: repo}) as hub:
        return {
            "params": run(hub, params(DEEPSEEK, "--from-hub"), env_for(hub.endpoint, tmp)),
            "fit": run(hub, fit_args(DEEPSEEK_LIKE, "8xH200"), env_for(hub.endpoint, tmp / "fit")),
        }


def _gated() -> FakeRepo:
    return single_file_repo(TINY_CONFIG, mixtral_tensors(TINY_CONFIG), gated=True, tokens=frozenset({"hf_granted"}))


def scenario_gated(tmp: Path) -> dict[str, Run]:
    with hub_server({"org/gated": _gated()}) as hub:
        return {
            "no_token": run(hub, params("org/gated"), env_for(hub.endpoint, tmp)),
        }


def scenario_down(tmp: Path) -> dict[str, Run]:
    return {"cold": run(None, params("org/tiny"), env_for(closed_endpoint(), tmp))}


def _broken(body: bytes, claimed: int | None = None) -> FakeRepo:
    header = raw_safetensors(len(body) if claimed is None else claimed, body)
    return FakeRepo(files={"config.json": json.dumps(TINY_CONFIG).encode(), "model.safetensors": header})


def scenario_huge_header(tmp: Path) -> dict[str, Run]:
    repo = _broken(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 10_000_000_000)
    with hub_server({"org/huge-header": repo}) as hub:
        return {"params": run(hub, params("org/huge-header"), env_for(hub.endpoint, tmp))}


# One subprocess that calls moeplan.hub for many repos and prints what each gave, without a second
# of imports for each: the failures not run through the CLI above (their messages reach the CLI the
# same way, as one MoeplanError), the single-file checkpoint and the cards.
_DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from moeplan.errors import MoeplanError
    from moeplan.hub import card_yaml_from_hub, spec_from_hub
    from moeplan.params import count_params
    results = []
    for what, model, token in json.loads(sys.argv[1]):
        os.environ.pop("HF_TOKEN", None)
        if token:
            os.environ["HF_TOKEN"] = token
        try:
            if what == "card":
                results.append({"ok": True, "card": card_yaml_from_hub(model)})
                continue
            spec = spec_from_hub(model)
            ck = spec.checkpoint
            results.append({"ok": True, "total": count_params(spec).total_params, "checkpoint": ck and ck.model_dump()})
        except MoeplanError as exc:
            results.append({"ok": False, "error": type(exc).__name__, "message": str(exc)})
    print(json.dumps(results))
    """
)

DRIVER_CASES: list[tuple[str, str, str | None]] = [
    ("spec", GPT_OSS, None),
    ("card", MIXTRAL, None),
    ("card", "someone/DeepSeek-V3-Copy", None),
    ("spec", "org/gated", "hf_other"),
    ("spec", "org/gated", "hf_granted"),
    ("spec", "org/private", None),
    ("spec", "org/private", "hf_owner"),
    ("spec", "org/nothing-here", None),
    ("spec", "org/nothing-here", "hf_x"),
    ("spec", "org/tiny@v9", None),
    ("spec", "org/tiny@v1", None),
    ("spec", "org/truncated", None),
    ("spec", "org/not-json-header", None),
    ("spec", "org/malformed-entry", None),
    ("spec", "org/list-header", None),
    ("spec", "org/bad-config", None),
    ("spec", "org/no-config", None),
    ("spec", "org/bin-only", None),
    ("spec", "org/hub-503", None),
    ("spec", "org/x..y", None),
]


def scenario_driver(tmp: Path) -> dict[str, Run]:
    tiny = mixtral_tensors(TINY_CONFIG)
    config = json.dumps(TINY_CONFIG).encode()
    mixtral, gpt_oss = card_config("mixtral-8x7b"), card_config("gpt-oss-20b")
    repos = {
        GPT_OSS: single_file_repo(gpt_oss, gpt_oss_tensors(gpt_oss)),
        MIXTRAL: sharded_repo(mixtral, mixtral_tensors(mixtral), shards=4),
        # DeepSeek-V3's config (it has auto_map) without safetensors: a card from the config alone
        "someone/DeepSeek-V3-Copy": FakeRepo(files={"config.json": json.dumps(card_config("deepseek-v3")).encode()}),
        "org/gated": _gated(),
        "org/private": single_file_repo(TINY_CONFIG, tiny, private=True, tokens=frozenset({"hf_owner"})),
        "org/tiny": sharded_repo(TINY_CONFIG, tiny, shards=2, branches=("main", "v1")),
        # the length prefix promises 5,000 bytes of JSON; the file ends 30 bytes later
        "org/truncated": _broken(b'{"a": {"dtype": "F32", "shape"', 5_000),
        "org/not-json-header": _broken(b"this is not json at all"),
        "org/malformed-entry": _broken(b'{"a": {"dtype": "F32", "shape": 5, "data_offsets": [0, 4]}}'),
        "org/list-header": _broken(b"[1, 2, 3]"),
        "org/bad-config": FakeRepo(files={"config.json": b'{"model_type": "mixtral", "hidden_size": 64,'}),
        "org/no-config": FakeRepo(files={"model.safetensors": safetensors_header(tiny)}),
        "org/bin-only": FakeRepo(files={"config.json": config, "pytorch_model.bin": b"\0" * 64}),
        "org/hub-503": FakeRepo(files={"config.json": config}, status=503),
    }
    with hub_server(repos) as hub:
        return {"driver": run(hub, ["-c", _DRIVER, json.dumps(DRIVER_CASES)], env_for(hub.endpoint, tmp))}


def scenario_no_hub_import(tmp: Path) -> dict[str, Run]:
    """Planning from a bundled card never imports huggingface_hub."""
    code = textwrap.dedent(
        """
        import runpy, sys
        sys.argv = ["moeplan", "params", "mixtral-8x7b", "--json"]
        try:
            runpy.run_module("moeplan", run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, exc.code
        sys.stderr.write("imported huggingface_hub: %s" % ("huggingface_hub" in sys.modules))
        """
    )
    return {"params": run(None, ["-c", code], env_for(closed_endpoint(), tmp))}


SCENARIOS: dict[str, Scenario] = {
    "deepseek": scenario_deepseek,  # the longest first
    "mixtral": scenario_mixtral,
    "driver": scenario_driver,
    "gated": scenario_gated,
    "huge_header": scenario_huge_header,
    "down": scenario_down,
    "no_hub_import": scenario_no_hub_import,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Run] | Exception]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in SCENARIOS}  # mktemp is not thread-safe

    def one(name: str) -> dict[str, Run] | Exception:
        try:
            return SCENARIOS[name](dirs[name])
        except Exception as exc:  # kept for the test that needs this scenario to raise
            return exc

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SCENARIOS, pool.map(one, SCENARIOS), strict=True))


def scenario(runs: dict[str, dict[str, Run] | Exception], name: str) -> dict[str, Run]:
    result = runs[name]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.fixture(scope="module")
def driver(runs: dict[str, dict[str, Run] | Exception]) -> dict[tuple[str, str | None], dict[str, Any]]:
    """(model, token) -> what spec_from_hub gave; ("card:" + model, None) -> card_yaml_from_hub's text."""
    result = scenario(runs, "driver")["driver"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return {
        ((model if what == "spec" else f"card:{model}"), token): outcome
        for (what, model, token), outcome in zip(DRIVER_CASES, result.json(), strict=True)
    }


# ----------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------


def test_mixtral_sharded_stored_equals_counted(runs: dict[str, Any]) -> None:
    result = scenario(runs, "mixtral")["online"]
    data = assert_ok(result)
    assert data["hub_id"] == MIXTRAL
    assert data["total_params"] == MIXTRAL_TOTAL
    ck = data["checkpoint"]
    assert ck["stored_params"] == MIXTRAL_TOTAL
    assert ck["stored_params_by_dtype"] == {"BF16": MIXTRAL_TOTAL}
    assert ck["stored_bytes"] == 2 * MIXTRAL_TOTAL
    assert ck["num_files"] == 4
    assert ck["difference"] == 0
    assert ck["explanation"] == [f"the stored tensors match the count from config.json exactly ({MIXTRAL_TOTAL:,})"]
    assert_only_headers_read(result.requests, MIXTRAL)
    paths = {r.path.rsplit("/", 1)[1] for r in result.requests}
    assert "model.safetensors.index.json" in paths and len([p for p in paths if p.startswith("model-")]) == 4


@pytest.mark.parametrize(("name", "repo_id", "card", "gpus"), [
    ("mixtral", MIXTRAL_LIKE, "mixtral-8x7b", "2xRTX4090"),
    ("deepseek", DEEPSEEK_LIKE, "deepseek-v3", "8xH200"),
])  # fmt: skip
def test_fit_a_hub_repo_plans_like_its_card(runs: dict[str, Any], name: str, repo_id: str, card: str,
                                            gpus: str) -> None:  # fmt: skip
    from moeplan.hardware import parse_gpus
    from moeplan.perf import rank_plan
    from moeplan.plan import fit
    from moeplan.sources import resolve

    result = scenario(runs, name)["fit"]
    data = assert_ok(result)
    assert data["fits"] is True
    assert_only_headers_read(result.requests, repo_id)
    assert any(r.path.endswith("/config.json") for r in result.requests)
    # The same config as the bundled card, so the same verdicts to the byte and the same best plan.
    want = fit(resolve(card), parse_gpus(gpus)[0], rank=rank_plan, gpus_label=gpus).model_dump(mode="json")
    assert data["verdicts"] == want["verdicts"]
    assert (data["best"]["quant"], data["best"]["layout"]) == (want["best"]["quant"], want["best"]["layout"])
    assert data["best"]["per_gpu"] == want["best"]["per_gpu"]
    if name == "deepseek":  # shipped as fp8 blocks: the checkpoint's own format is tried first
        assert data["verdicts"][0]["quant"] == want["verdicts"][0]["quant"] != "bf16"


def test_warm_cache_works_offline_and_with_the_hub_down(runs: dict[str, Any]) -> None:
    mixtral = scenario(runs, "mixtral")
    online = assert_ok(mixtral["online"])
    why = {"offline": "HF_HUB_OFFLINE is set", "down": "cannot reach the Hub at http://127.0.0.1:"}
    for name in ("offline", "down"):  # HF_HUB_OFFLINE=1; then a closed port as endpoint
        data = assert_ok(mixtral[name])
        assert data["total_params"] == online["total_params"]
        # the header summary was cached by commit, and the output says it came from the cache, and why
        note, *explanation = data["checkpoint"].pop("explanation")
        assert explanation == online["checkpoint"]["explanation"]
        assert data["checkpoint"] == {k: v for k, v in online["checkpoint"].items() if k != "explanation"}
        assert note.startswith("safetensors headers from moeplan's cache of commit ") and why[name] in note, note
    assert mixtral["offline"].requests == []


def test_deepseek_v3_fp8_with_mtp_layer(runs: dict[str, Any]) -> None:
    result = scenario(runs, "deepseek")["params"]
    data = assert_ok(result)
    assert data["total_params"] == DEEPSEEK_TOTAL
    ck = data["checkpoint"]
    by_dtype = ck["stored_params_by_dtype"]
    assert set(by_dtype) == {"BF16", "F8_E4M3", "F32"}
    cfg = card_config("deepseek-v3")
    scales = sum(
        -(-shape[0] // 128) * -(-shape[1] // 128)
        for name, (dtype, shape) in deepseek_v3_tensors(cfg).items()
        if dtype == "F8_E4M3"
    )
    # stored = counted + the MTP layer as stored (with its embedding/head copies) + the fp8 block scales
    assert ck["stored_params"] == DEEPSEEK_TOTAL + data["mtp_params_stored"] + scales
    mtp_note, scale_note, summary = ck["explanation"]
    assert mtp_note.startswith("MTP (multi-token prediction) layer 61: ")
    assert f"{data['mtp_params_stored']:,} elements" in mtp_note and "(config:" not in mtp_note
    assert "after the 61 decoder layers" in mtp_note
    assert f"{scales:,} elements" in scale_note and "F32" in scale_note and "_scale_inv" in scale_note
    exact = f"the stored tensors match the count from config.json exactly ({DEEPSEEK_TOTAL:,})"
    assert summary == f"after these adjustments {exact}"
    assert_only_headers_read(result.requests, DEEPSEEK)


def test_gpt_oss_single_file_mxfp4(driver: dict[Any, dict[str, Any]]) -> None:
    outcome = driver[(GPT_OSS, None)]
    ck = outcome["checkpoint"]
    assert ck["num_files"] == 1
    tensors = gpt_oss_tensors(card_config("gpt-oss-20b"))
    blocks = sum(_elements(shape) for name, (_, shape) in tensors.items() if name.endswith("_blocks"))
    scales = sum(_elements(shape) for name, (_, shape) in tensors.items() if name.endswith("_scales"))
    assert ck["params_by_dtype"]["U8"] == blocks + scales
    # unpacked (2 fp4 per byte), less the E8M0 scales, the headers give exactly the count from the config
    assert sum(ck["params_by_dtype"].values()) + blocks - scales == outcome["total"]
    assert any(f"{blocks:,} bytes hold {2 * blocks:,} 4-bit weights" in note for note in ck["notes"])
    assert ck["notes"][-1].startswith("after these adjustments the stored tensors match")


def _elements(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_no_safetensors_still_plans(driver: dict[Any, dict[str, Any]]) -> None:
    outcome = driver[("org/bin-only", None)]
    assert outcome["ok"] and outcome["checkpoint"] is None and outcome["total"] > 0


def test_revision_is_read(driver: dict[Any, dict[str, Any]]) -> None:
    assert driver[("org/tiny@v1", None)]["ok"]
    assert driver[("org/tiny@v1", None)]["checkpoint"]["notes"][-1].startswith("the stored tensors match")


# ----------------------------------------------------------------------------------------------
# Failures: one line, exit 2
# ----------------------------------------------------------------------------------------------


def test_gated_repo_401_403_and_token(runs: dict[str, Any], driver: dict[Any, dict[str, Any]]) -> None:
    gated = scenario(runs, "gated")
    line = assert_one_line_error(gated["no_token"], "org/gated is gated", "HF_TOKEN", "hf auth login")
    assert "401" in line
    assert {r.token for r in gated["no_token"].requests} == {None}
    # a token without access gets 403: the message says where to ask for access
    message = driver[("org/gated", "hf_other")]["message"]
    assert "org/gated is gated" in message and "not been granted access" in message and "/org/gated" in message
    assert driver[("org/gated", "hf_granted")]["ok"]  # HF_TOKEN is sent and honoured


def test_missing_repo(driver: dict[Any, dict[str, Any]]) -> None:
    message = driver[("org/nothing-here", "hf_x")]["message"]
    assert "org/nothing-here does not exist" in message and "404" in message
    # without a token the Hub answers 401 for missing, private and gated alike
    for case in (("org/nothing-here", None), ("org/private", None)):
        assert driver[case]["error"] == "HubError"
        assert "was not found" in driver[case]["message"] and "HF_TOKEN" in driver[case]["message"]
    assert driver[("org/private", "hf_owner")]["ok"]


def test_missing_revision_and_file(driver: dict[Any, dict[str, Any]]) -> None:
    assert "has no revision 'v9'" in driver[("org/tiny@v9", None)]["message"]
    assert "has no config.json" in driver[("org/no-config", None)]["message"]
    assert "not a valid Hub repo id" in driver[("org/x..y", None)]["message"]


def test_hub_down_nothing_cached(runs: dict[str, Any], driver: dict[Any, dict[str, Any]]) -> None:
    line = assert_one_line_error(scenario(runs, "down")["cold"], "cannot reach the Hub", "not in the local cache")
    assert "config.json" in line and "HF_TOKEN" in line
    message = driver[("org/hub-503", None)]["message"]
    assert "cannot reach the Hub" in message and "HTTP 503" in message


def test_header_claiming_10_gb_is_refused_before_reading_it(runs: dict[str, Any]) -> None:
    result = scenario(runs, "huge_header")["params"]
    assert_one_line_error(
        result, "refusing the safetensors header of model.safetensors in org/huge-header", "10000000000"
    )
    ranges = [r.range for r in result.requests if r.path.endswith(".safetensors") and r.method == "GET"]
    assert ranges == ["bytes=0-100000"]  # the first 100 kB only; never the claimed 10 GB


def test_truncated_or_invalid_header_is_refused(driver: dict[Any, dict[str, Any]]) -> None:
    message = driver[("org/truncated", None)]["message"]
    assert message.startswith("refusing the safetensors header of model.safetensors in org/truncated@main")
    assert "not json" in message
    for case in ("org/truncated", "org/not-json-header", "org/malformed-entry", "org/list-header"):
        outcome = driver[(case, None)]
        assert outcome["error"] == "HubError", outcome
        assert outcome["message"].startswith("refusing the safetensors header"), outcome
        assert "\n" not in outcome["message"]


def test_config_that_is_not_json(driver: dict[Any, dict[str, Any]]) -> None:
    outcome = driver[("org/bad-config", None)]
    assert outcome["error"] == "ConfigError"
    assert outcome["message"].startswith("config.json of org/bad-config@main is not valid JSON")


# ----------------------------------------------------------------------------------------------
# Cards and imports
# ----------------------------------------------------------------------------------------------


def _card_roundtrip(text: str, label: str) -> tuple[dict[str, Any], int]:
    from moeplan.params import count_params
    from moeplan.sources import spec_from_card_data

    data = yaml.safe_load(text)
    return data, count_params(spec_from_card_data(data, label=label)).total_params


def test_card_yaml_round_trip(runs: dict[str, Any], driver: dict[Any, dict[str, Any]]) -> None:
    text = driver[(f"card:{MIXTRAL}", None)]["card"]
    data, total = _card_roundtrip(text, "mixtral card")
    assert total == MIXTRAL_TOTAL == assert_ok(scenario(runs, "mixtral")["online"])["total_params"]
    assert data["name"] == "mixtral-8x7b-v0.1" and data["hub_id"] == MIXTRAL and data["aliases"] == []
    assert data["source"].startswith(f"config.json of {MIXTRAL}@main (commit ")
    assert data["config"] == card_config("mixtral-8x7b")
    assert "# safetensors headers: 46,702,792,704 elements stored in 4 file(s)" in text

    data, total = _card_roundtrip(driver[("card:someone/DeepSeek-V3-Copy", None)]["card"], "deepseek card")
    assert total == DEEPSEEK_TOTAL
    assert data["name"] == "deepseek-v3-copy"
    assert "auto_map" not in data["config"]
    assert data["config"] == {k: v for k, v in card_config("deepseek-v3").items() if k != "auto_map"}


def test_cards_never_import_huggingface_hub(runs: dict[str, Any]) -> None:
    assert scenario(runs, "no_hub_import")["params"].stderr.endswith("imported huggingface_hub: False")


# ----------------------------------------------------------------------------------------------
# The header summary, in process (no network)
# ----------------------------------------------------------------------------------------------


def _meta(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    out, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = _elements(shape) * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "U8": 1}[dtype]
        out[name] = (dtype, shape, (offset, offset + size))
        offset += size
    return out


def test_summary_explains_gptq_packing_and_metadata() -> None:
    from moeplan.hub import summarize_headers
    from moeplan.params import count_params
    from moeplan.spec import spec_from_config

    spec = spec_from_config({**TINY_CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4}}, name="t")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    quant_meta = packed = 0
    for name, (dtype, shape) in mixtral_tensors(TINY_CONFIG).items():
        if ".experts." in name:  # GPTQ packs each expert linear: qweight [in/8, out] I32 + metadata
            rows, cols = shape
            base = name.removesuffix(".weight")
            tensors[base + ".qweight"] = ("I32", (cols // 8, rows))
            tensors[base + ".qzeros"] = ("I32", (cols // 128, rows // 8))
            tensors[base + ".scales"] = ("F16", (cols // 128, rows))
            tensors[base + ".g_idx"] = ("I32", (cols,))
            packed += cols // 8 * rows
            quant_meta += cols // 128 * rows // 8 + cols // 128 * rows + cols
        else:
            tensors[name] = (dtype, shape)
    checkpoint = summarize_headers({"model.safetensors": _meta(tensors)}, spec)
    assert checkpoint.total_params == count_params(spec).total_params - 7 * packed + quant_meta
    packed_note, meta_note, summary = checkpoint.notes
    assert f"{packed:,} int32 hold {8 * packed:,} 4-bit weights" in packed_note
    assert f"{quant_meta:,} elements" in meta_note
    assert summary.startswith("after these adjustments the stored tensors match")


def test_summary_reports_what_it_cannot_explain() -> None:
    from moeplan.hub import summarize_headers
    from moeplan.spec import spec_from_config

    spec = spec_from_config(TINY_CONFIG, name="t")
    tensors = dict(mixtral_tensors(TINY_CONFIG))
    del tensors["lm_head.weight"]  # e.g. tied in the checkpoint but not in the config
    tensors["vision_tower.patch_embed.weight"] = ("BF16", (64, 48))
    checkpoint = summarize_headers({"a.safetensors": _meta(tensors)}, spec)
    vision_note, unexplained = checkpoint.notes
    assert "vision tower" in vision_note and "3,072 elements" in vision_note and "not in total_params" in vision_note
    assert unexplained.startswith(f"unexplained: {-1000 * 64:+,} elements")


def test_summary_refuses_malformed_entries() -> None:
    from moeplan.errors import HubError
    from moeplan.hub import summarize_headers
    from moeplan.spec import spec_from_config

    spec = spec_from_config(TINY_CONFIG, name="t")
    for bad in [("F32", (-1,), (0, 4)), ("F32", (2,), (8, 4)), (3, (2,), (0, 8)), ("F32", "2", (0, 8))]:
        with pytest.raises(HubError, match="malformed"):
            summarize_headers({"x.safetensors": {"t": bad}}, spec)


def test_model_ids() -> None:
    from moeplan.errors import HubError
    from moeplan.hub import parse_model_id

    assert parse_model_id("org/name") == ("org/name", "main")
    assert parse_model_id(" org/name@refs/pr/1 ") == ("org/name", "refs/pr/1")
    for bad in ("name", "org/name@", "/name", "org/na me"):
        with pytest.raises(HubError, match="not a Hub id"):
            parse_model_id(bad)
