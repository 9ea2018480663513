"""Issue 17: hostile input and faults, one class per section, several cases each.

Every case runs moeplan as a whole process (python -m moeplan) and asserts the README's promise:
exit 2 (130 for Ctrl-C) with one line on stderr, no traceback, within 10 s and 600 MB, and nothing
written outside the places the user named. The Hub cases are in tests/test_hub_hostile.py; GGUF
headers in tests/test_gguf.py.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CARD = yaml.safe_load((ROOT / "model_cards" / "mixtral-8x7b.yaml").read_text())
CONFIG = CARD["config"]
LIMIT_S, LIMIT_MB = 10.0, 600


@dataclass
class Run:
    code: int
    out: str
    err: str
    wall_s: float
    rss_mb: float


# The child reports its own peak memory at exit: VmHWM, which exec resets (ru_maxrss would carry the
# forked pytest's memory over exec, and RUSAGE_CHILDREN the largest child pytest ever ran).
_DRIVER = ("import atexit, sys\n"
           "out = sys.argv.pop(1)\n"
           "def hwm():\n"
           "    kb = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
           "    open(out, 'w').write(kb)\n"
           "atexit.register(hwm)\n"
           "sys.argv[0] = 'moeplan'\n"
           "from moeplan.cli import main\n"
           "main()\n")


def moeplan(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: int | None = None,
            stdout: int | None = subprocess.PIPE) -> Run:
    """One whole moeplan process, with its wall time and peak memory."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", _DRIVER, rss_file.name, *args], cwd=cwd or ROOT,
                              env=env or _env(), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=LIMIT_S * 3)
        wall = time.monotonic() - t
        rss_text = Path(rss_file.name).read_text().strip()
    return Run(proc.returncode, proc.stdout or "", proc.stderr, wall, int(rss_text or 0) / 1024)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MOEPLAN_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), NO_COLOR="1", **extra)
    return env


def bad_input(run: Run, *needles: str) -> None:
    """Exit 2, exactly one line on stderr naming what is wrong, no traceback, in bounds."""
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert run.code == 2, (run.code, run.err[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err[-800:]
    assert "Traceback" not in run.err + run.out and "For further information" not in run.err
    assert run.wall_s < LIMIT_S, run.wall_s
    assert run.rss_mb < LIMIT_MB, run.rss_mb
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write_config(tmp_path: Path, name: str = "config.json", **changes: object) -> Path:
    cfg = {**CONFIG, **changes}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


# ------------------------------------------------------------------------------------------------
# Values the validators let through
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "needle"), [
    ("hidden_size", 10**19, "hidden_size"),
    ("hidden_size", 1e300, "hidden_size"),
    ("num_local_experts", 10**19, "num_local_experts"),
    ("num_hidden_layers", 100_000, "at most 1,024"),
    ("sliding_window", "64", "sliding_window"),
    ("sliding_window", 2.5, "sliding_window"),
    ("max_position_embeddings", True, "max_position_embeddings"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("vocab_size", 0, "vocab_size"),
    ("num_attention_heads", "32", "num_attention_heads"),
])
def test_config_values_are_checked_before_use(tmp_path: Path, key: str, value: object, needle: str) -> None:
    bad_input(moeplan("fit", str(write_config(tmp_path, **{key: value})), "--gpus", "8xH100"), needle)


def test_json_constants_and_giant_numbers_are_refused(tmp_path: Path) -> None:
    base = json.dumps(CONFIG)
    for text, needle in ((base.replace('"sliding_window": null', '"sliding_window": Infinity'), "Infinity"),
                         (base.replace('"hidden_size": 4096', '"hidden_size": 1' + "0" * 5000), "digits"),
                         (base.replace('"hidden_size": 4096', '"hidden_size": 1e400'), "hidden_size")):
        path = tmp_path / "config.json"
        path.write_text(text)
        bad_input(moeplan("params", str(path)), needle)


@pytest.mark.parametrize(("key", "value"), [("attn_layer_period", 0), ("expert_layer_period", 0)])
def test_zero_periods(tmp_path: Path, key: str, value: int) -> None:
    jamba = yaml.safe_load((ROOT / "model_cards" / "jamba-v0.1.yaml").read_text())["config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**jamba, key: value}))
    bad_input(moeplan("params", str(path)), key)


def test_card_spec_values_are_not_coerced(tmp_path: Path) -> None:
    # A card's `spec:` goes to pydantic: "64" is not 64 and "true" is not true there either.
    for field, value in (("hidden_size", "4096"), ("tie_word_embeddings", "false"), ("hidden_size", 10**12)):
        card = {"name": "custom", "spec": {"hidden_size": 4096, "vocab_size": 32000, "num_attention_heads": 32,
                                           "num_kv_heads": 8, "head_dim": 128, "layers": [{"ffn": "dense"}] * 2,
                                           "dense_intermediate_size": 14336, field: value}}
        path = tmp_path / "card.yaml"
        path.write_text(yaml.safe_dump(card))
        bad_input(moeplan("params", str(path)), field)


@pytest.mark.parametrize(("args", "needle"), [
    (["--nodes", "1000000000"], "--nodes"),
    (["--context", "1e400"], "--context"),
    (["--batch", "10000000000000"], "--batch"),
    (["--mem-fraction", "nan"], "--mem-fraction"),
    (["--cpu-mem", "10000000000000000000"], "--cpu-mem"),
    (["--quant", "experts=int4,experts=bf16"], "twice"),
])
def test_flags_are_bounded(args: list[str], needle: str) -> None:
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "2x24GB", *args), needle)


# ------------------------------------------------------------------------------------------------
# Files that are not regular text files
# ------------------------------------------------------------------------------------------------

def test_files_that_are_not_regular_text(tmp_path: Path) -> None:
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps(CONFIG).encode("utf-16"))
    latin = tmp_path / "latin1.json"
    latin.write_bytes(b'{"model_type": "mixtral", "name": "caf\xe9"}')
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: 2 GiB claimed, nothing on disk
        f.truncate(2 * 2**30)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    cases = [(utf16, "UTF-16"), (latin, "not UTF-8"), (nested, "nested"), (huge, "at most"),
             (fifo, "FIFO"), (Path("/dev/zero"), "not a regular file"), (deep_yaml, "nested")]
    for path, needle in cases:
        bad_input(moeplan("params", str(path)), needle)
    bad_input(moeplan("params", "/tmp/" + "x" * 5000 + ".json"), "characters long")


# ------------------------------------------------------------------------------------------------
# YAML alias bombs
# ------------------------------------------------------------------------------------------------

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]) + "\n"


def test_yaml_alias_bombs_are_bounded_before_expansion(tmp_path: Path) -> None:
    card = tmp_path / "bomb.yaml"
    card.write_text(BOMB)
    bad_input(moeplan("params", str(card)), "expands to more than")
    spec = tmp_path / "deploy.yaml"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xH100\nserving: {context: 4096, batch: 1}\n" + BOMB)
    run = moeplan("check", str(spec))
    assert run.code == 2 and "expands to more than" in run.out and run.wall_s < LIMIT_S and run.rss_mb < LIMIT_MB
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [*a]\n")
    run = moeplan("params", str(loop))
    assert run.code == 2 and "Traceback" not in run.err


# ------------------------------------------------------------------------------------------------
# Work that grows without bound
# ------------------------------------------------------------------------------------------------

def test_huge_models_and_clusters_are_refused_with_the_limit(tmp_path: Path) -> None:
    bad_input(moeplan("fit", str(write_config(tmp_path, num_hidden_layers=100_000)), "--gpus", "8xH100"), "1,024")
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "8xH100", "--nodes", "100000"), "--nodes")
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "100000xH100"))


# ------------------------------------------------------------------------------------------------
# Injection into what moeplan prints for machines
# ------------------------------------------------------------------------------------------------

def _card_with_hub_id(tmp_path: Path, hub_id: str) -> Path:
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump({**CARD, "name": "evil", "hub_id": hub_id, "aliases": []}))
    return path


def test_emitted_commands_quote_every_token(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "${PWD:+$(touch pwned)}"  # a config.json path is the model token of its launch
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CARD["config"]))
    evil = str(folder / "config.json")
    for engine in ("vllm", "sglang"):
        run = moeplan("fit", evil, "--gpus", "2xH100", "--emit", engine, cwd=tmp_path)
        assert run.code == 0, run.err
        line = next(x for x in run.out.splitlines() if x.startswith(("vllm ", "python ")))
        assert any(folder.name in token for token in shlex.split(line))  # one token, as written
        subprocess.run(["bash", "-c", f"set -- {line}"], check=True, cwd=tmp_path)  # the shell expands nothing
        assert not marker.exists()


@pytest.mark.parametrize("hub_id", ["${PWD:+$(touch x)}", "--trust-remote-code", "-h", "--model=evil", "org/a;b",
                                    "org/x\n::error::pwned", "org/\u202etxt", "../../etc", 7])
def test_card_hub_ids_that_are_not_hub_ids_are_refused(tmp_path: Path, hub_id: object) -> None:
    card = _card_with_hub_id(tmp_path, hub_id)  # type: ignore[arg-type]
    run = moeplan("fit", str(card), "--gpus", "2xH100", "--emit", "vllm")
    assert not any(line.startswith("::") for line in run.out.splitlines())
    assert run.code == 2 and "hub_id must be a Hub repo id" in run.err and run.out == ""
    assert run.err.count("\n") == 1


def test_spec_file_names_cannot_start_lines(tmp_path: Path) -> None:
    name = "x\n::error file=a,line=1::forged.yaml"
    spec = tmp_path / name
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xH100\nserving: {context: 4096, batch: 1}\n")
    for fmt in ("table", "markdown", "github", "json"):
        run = moeplan("check", str(spec), "--format", fmt)
        assert run.code == 0, run.err
        assert not any(line.lstrip().startswith("::error") for line in run.out.splitlines()), (fmt, run.out)
    markdown = moeplan("check", str(spec), "--format", "markdown").out
    assert "\\n::error" in markdown  # the newline shown as an escape, inside a code span


def test_markdown_escapes_user_text(tmp_path: Path) -> None:
    spec = tmp_path / "deploy`<img src=x>`.yaml"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xH100\nserving: {context: 4096, batch: 1}\n"
                    "name: '<script>alert(1)</script> [link](http://x) | col'\n")
    md = moeplan("check", str(spec), "--format", "markdown").out
    outside_code = re.sub(r"(`+)(.+?)\1", "", md)  # code spans are literal in Markdown
    assert "<script>" not in outside_code and "<img" not in outside_code
    assert "](http://x)" not in outside_code
    assert "``" in md  # the file name with backticks sits in a longer fence


# ------------------------------------------------------------------------------------------------
# User text as rich markup
# ------------------------------------------------------------------------------------------------

def test_user_text_is_never_markup(tmp_path: Path) -> None:
    bad_input(moeplan("fit", "[/]", "--gpus", "2x24GB"), "[/]")
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "[/]"), "[/]")
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "[bold]2x24GB"), "[bold]")
    card = tmp_path / "odd.yaml"
    card.write_text(yaml.safe_dump({**CARD, "name": "[red]x[/]", "aliases": []}))
    run = moeplan("perf", str(card), "--gpus", "2xH100")
    assert run.code == 0 and "[red]x[/]" in run.out, run.err
    spec = tmp_path / "deploy[prod].yaml"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xH100\nserving: {context: 4096, batch: 1}\n")
    run = moeplan("check", str(spec))
    assert run.code == 0 and "deploy[prod].yaml" in run.out


def test_user_text_is_never_an_emoji_code(tmp_path: Path) -> None:
    """rich turns ":smile:" into an emoji unless told not to; moeplan's consoles are told not to."""
    card = tmp_path / "smile.yaml"
    card.write_text(yaml.safe_dump({**CARD, "name": ":smile: model:thumbs_up:", "aliases": []}))
    for args in (("fit", str(card), "--gpus", "2x24GB"), ("params", str(card)), ("memory", str(card))):
        run = moeplan(*args)
        assert run.code == 0 and ":smile: model:thumbs_up:" in run.out and "\N{THUMBS UP SIGN}" not in run.out, args
    bad_input(moeplan("fit", ":smile:", "--gpus", "2x24GB"), ":smile:")


def test_printable_escapes_exactly_the_control_and_format_characters() -> None:
    """printable's fast path (str.isprintable) must give what the per-character rule gives."""
    import unicodedata

    from moeplan.escape import printable

    def slow(text: str) -> str:
        return "".join(ch.encode("unicode_escape").decode("ascii") if ch != " " and
                       unicodedata.category(ch).startswith("C") else ch for ch in text)

    samples = [chr(c) for c in range(0, 0x3000)] + ["\u2028", "\u00a0", "\u200b", "\ufeff", "\U0001f600", "\udcff"]
    for ch in samples:
        for text in (ch, f"a{ch}b", f"plain {ch}"):
            assert printable(text) == slow(text), repr(text)
    assert printable("mixtral-8x7b on 2x24GB") == "mixtral-8x7b on 2x24GB"
    assert printable("a\nb\x1b[31m") == "a\\nb\\x1b[31m"


# ------------------------------------------------------------------------------------------------
# Errors that are not one line, or no line; signals; streams
# ------------------------------------------------------------------------------------------------

def test_columns_zero_still_prints_the_error() -> None:
    bad_input(moeplan("fit", "nope", "--gpus", "2x24GB", env=_env(COLUMNS="0")), "unknown model")


def test_ctrl_c_exits_130_with_a_line(tmp_path: Path) -> None:
    # A Hub that accepts the connection and never answers: moeplan waits in HTTP; Ctrl-C stops it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    env = {k: v for k, v in _env().items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.Popen([sys.executable, "-m", "moeplan", "params", "org/never"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + LIMIT_S
    while not held and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=LIMIT_S)
    server.close()
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines() == ["error: interrupted"] and "Traceback" not in err


def test_a_reader_that_leaves_does_not_change_the_verdict() -> None:
    for args, code in ((["fit", "mixtral-8x7b", "--gpus", "2x24GB"], 0), (["fit", "deepseek-v3", "--gpus", "1x24GB"], 1)):
        proc = subprocess.run(["bash", "-c", "set -o pipefail; " + shlex.join([sys.executable, "-m", "moeplan", *args])
                               + " | head -1 >/dev/null; echo ${PIPESTATUS[0]}"], env=_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=LIMIT_S * 3)
        assert proc.stdout.strip() == str(code), (args, proc.stdout, proc.stderr)
        assert proc.stderr == ""


def test_full_or_closed_stdout() -> None:
    with open("/dev/full", "w") as full:
        bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "2x24GB", stdout=full.fileno()), "No space left")
    proc = subprocess.run(["bash", "-c", shlex.join([sys.executable, "-m", "moeplan", "fit", "mixtral-8x7b", "--gpus",
                                                     "2x24GB"]) + " >&-"], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=LIMIT_S * 3)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: stdout is closed")


def test_card_output_is_atomic(tmp_path: Path) -> None:
    from moeplan.safeio import write_atomic

    target = tmp_path / "card.yaml"
    target.write_text("old\n")

    def fail(f: object) -> None:
        f.write("half")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["card.yaml"]


def test_json_never_holds_infinity() -> None:
    from moeplan.cli import _finite

    assert _finite({"a": float("inf"), "b": [float("nan"), 1.5]}) == {"a": None, "b": [None, 1.5]}


# ------------------------------------------------------------------------------------------------
# A second red-team pass (2026-12-03): the classes it found, each as one line and exit 2
# ------------------------------------------------------------------------------------------------


def test_yaml_nested_past_the_c_parsers_stack_is_refused_not_a_crash(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: x\nconfig: " + "{a: " * 30_000 + "1" + "}" * 30_000 + "\n")
    block = tmp_path / "block.yaml"
    block.write_text("name: x\nconfig:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(3000)) + " " * 3001 + "b: 1\n")
    dashes = tmp_path / "dashes.yaml"
    dashes.write_text("name: x\nconfig: \n" + "- " * 20_000 + "1\n")
    for path in (flow, block, dashes):
        bad_input(moeplan("params", str(path)), "nested more than 64 levels")
    # A quote in a comment or a single-quoted string must not switch the bracket count off, and closers
    # written first (in a comment) must not bank depth for the openers after them.
    for i, lead in enumerate(('name: x  # "\n', "name: 'a\"b'\n", "# " + "]" * 40_000 + "\nname: x\n")):
        tricky = tmp_path / f"tricky{i}.yaml"
        tricky.write_text(lead + "config: " + "[" * 30_000 + "]" * 30_000 + "\n")
        bad_input(moeplan("params", str(tricky)), "nested more than 64 levels")
    spec = tmp_path / "deep.yaml"
    spec.write_text("model: mixtral-8x7b  # \"\nengine: vllm\ngpus: 2xH100\nserving: " + "[" * 30_000
                    + "]" * 30_000 + "\n")
    run = moeplan("check", str(spec))
    assert run.code == 2 and "nested more than 64 levels" in run.out, (run.code, run.err[-300:])


def test_yaml_integers_beyond_pythons_digit_limit(tmp_path: Path) -> None:
    card = tmp_path / "big.yaml"
    card.write_text(yaml.safe_dump({**CARD, "name": "big"}).replace("hidden_size: 4096", "hidden_size: " + "9" * 5000))
    bad_input(moeplan("params", str(card)), "a YAML value cannot be read")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"quantization_config": {"quant_method": "gptq", "bits": "abc", "group_size": 128}}, "needs integer bits"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": [128]}}, "needs integer bits"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 3, "group_size": 128}}, "3-bit gptq is not a format"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [1, 1]}}, "weight_block_size"),
    ({"quantization_config": {"quant_method": "gguf"}}, "only the file carries"),
    ({"quantization_config": {"quant_method": "gguf", "component_bytes": [1, 2]}}, "only the file carries"),
    ({"quantization_config": {"quant_method": "gguf", "component_bytes": {"routed_experts": "big"}}},
     "only the file carries"),
    ({"decoder_sparse_step": 0, "model_type": "qwen3_moe"}, "'decoder_sparse_step' must be positive"),
    ({"num_hidden_layers": [32]}, "'num_hidden_layers' must be a whole number"),
])
def test_config_values_a_validator_let_through(tmp_path: Path, changes: dict[str, object], needle: str) -> None:
    bad_input(moeplan("memory", str(write_config(tmp_path, **changes))), needle)


def test_a_nested_key_under_a_non_object(tmp_path: Path) -> None:
    dbrx = yaml.safe_load((ROOT / "model_cards" / "dbrx.yaml").read_text())["config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**dbrx, "attn_config": [1]}))
    bad_input(moeplan("params", str(path)), "'attn_config' must be an object")


def test_bitsandbytes_8bit_is_sized_as_8_bits(tmp_path: Path) -> None:
    path = write_config(tmp_path, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    run = moeplan("memory", str(path), "--json")
    assert run.code == 0 and json.loads(run.out)["quant"] == "int8"


def test_paths_and_flags_that_used_to_escape(tmp_path: Path) -> None:
    bad_input(moeplan("params", "~nosuchuser_moeplan/config.json"), "names no home directory")
    bad_input(moeplan("params", "a" * 300), "unknown model")
    bad_input(moeplan("params", str(tmp_path / ("b" * 300) / "config.json")), "File name too long")
    bad_input(moeplan("perf", "mixtral-8x7b", "--gpus", "2xH100", "--price", "H100=1,H100=2"), "priced twice")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([[1e308, 1e308] + [1] * 6] * 32))
    bad_input(moeplan("perf", "mixtral-8x7b", "--gpus", "8xH100", "--tp", "8", "--ep", "8", "--routing", str(huge)),
              "span more than 1e300")
    fifo = tmp_path / "plot.svg"
    os.mkfifo(fifo)
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "2xH100", "--plot", str(fifo)), "not a regular file")


def test_error_lines_show_escapes_and_stay_bounded() -> None:
    run = moeplan("params", "mix\x1b[31mtral")
    bad_input(run, "mix\\x1b[31mtral")
    assert "\x1b" not in run.err
    long = moeplan("fit", "mixtral-8x7b", "--gpus", "x" * 100_000)
    bad_input(long, "more characters)")
    assert len(long.err) < 2_200


def test_emit_that_fails_still_prints_the_plan_and_batch_one_warns() -> None:
    run = moeplan("fit", "qwen3-30b-a3b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--emit", "vllm")
    assert run.code == 2 and run.out.startswith("FITS: qwen3-30b-a3b")
    assert run.err.count("\n") == 1 and "--emit vllm: no plan in the shortlist runs on vllm" in run.err
    one = moeplan("fit", "mixtral-8x7b", "--gpus", "2xH100", "--emit", "vllm")
    assert one.code == 0 and "# warning: this server takes one request at a time" in one.out
    many = moeplan("fit", "mixtral-8x7b", "--gpus", "2xH100", "--emit", "vllm", "--batch", "16")
    assert many.code == 0 and "one request at a time" not in many.out


# A third red-team pass (2026-12-03)


def test_names_that_look_like_options_or_hold_newlines_never_reach_output(tmp_path: Path) -> None:
    dash = tmp_path / "dash.yaml"
    dash.write_text(yaml.safe_dump({**{k: v for k, v in CARD.items() if k != "hub_id"}, "name": "--trust-remote-code",
                                    "aliases": []}))
    run = moeplan("fit", str(dash), "--gpus", "2xH100", "--emit", "vllm")
    assert run.code == 2 and "starts with '-'" in run.err and "vllm serve --" not in run.out
    nl = tmp_path / "nl.yaml"
    nl.write_text(yaml.safe_dump({**CARD, "name": "x\n::error title=A::injected", "aliases": []}))
    for args in (["params", str(nl)], ["fit", str(nl), "--gpus", "2xH100"]):
        out = moeplan(*args).out
        assert not any(line.startswith("::") for line in out.splitlines()) and "\x1b" not in out


def test_environment_and_routing_edge_cases_are_one_line(tmp_path: Path) -> None:
    bad_input(moeplan("params", "someorg/x", env={**_env(), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://[::1"}),
              "check HF_ENDPOINT")
    big = tmp_path / "big.csv"
    big.write_text("1," * 8 + "x" * 200_000 + "\n")
    bad_input(moeplan("perf", "mixtral-8x7b", "--gpus", "2xH100", "--routing", str(big)), "cannot be read as CSV")
    cp = moeplan("check", str(ROOT / "examples" / "mixtral-2x4090-pass.yaml"), "--format", "markdown",
                 env=_env(PYTHONIOENCODING="cp1252"))
    assert cp.code == 0 and "Traceback" not in cp.err
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "1xM2-Ultra-192GB", "--emit", "vllm"), "Apple GPUs")
    bad_input(moeplan("fit", "mixtral-8x7b", "--gpus", "2xH100", "--emit", ""), "unknown engine")
