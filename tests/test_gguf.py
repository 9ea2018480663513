"""A GGUF file as MODEL: the header is read (metadata and tensor infos), never the tensor data.

Files are written in tmp_path with gguf.GGUFWriter, in llama.cpp's tensor names and ggml shapes
(ggml order: shape[0] is the row). Most are written header-first and then extended to their full
size without writing the data (a sparse file), so that real geometries (Qwen3-30B-A3B, DeepSeek-V3)
are read at their true sizes in milliseconds. Hostile headers are written byte by byte.
"""

from __future__ import annotations

import json
import shlex
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from moeplan.cli import app  # noqa: E402
from moeplan.gguf_file import FILE_SCHEME, file_scheme, read_header, spec_from_gguf  # noqa: E402
from moeplan.memory import memory_report, weight_bytes  # noqa: E402
from moeplan.params import count_params  # noqa: E402
from moeplan.quant import get_scheme, native_scheme  # noqa: E402
from moeplan.sources import find_card  # noqa: E402

T = gguf.GGMLQuantizationType
runner = CliRunner()

Tensor = tuple[str, tuple[int, ...], Any]  # (name, ggml shape, ggml type)


def nbytes(shape: tuple[int, ...], t: Any) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * size


def _pad(n: int, align: int = 32) -> int:
    return -(-n // align) * align


def write_gguf(path: Path, arch: str, kv: dict[str, Any], tensors: list[Tensor], *, data: bool = False,
               split_max_tensors: int = 0, big_endian: bool = False) -> list[Path]:
    """Write a GGUF with GGUFWriter. data=False writes the header and extends each file to its full
    size without writing tensor data (what a reader that never reads the data cannot tell apart)."""
    order = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors, endianess=order)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, shape, t in tensors:
        if data:
            block, size = gguf.GGML_QUANT_SIZES[t]
            if t == T.F32:
                w.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))
            else:
                rows = tuple(reversed(shape[1:])) + (shape[0] // block * size,)
                w.add_tensor(name, np.zeros(rows, dtype=np.uint8), raw_dtype=t)
        else:
            w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes(shape, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if data:
        w.write_tensors_to_file()
    else:
        w.write_ti_data_to_file()
        assert w.fout is not None
        for fout, part in zip(w.fout, w.tensors):
            fout.truncate(_pad(fout.tell()) + sum(_pad(ti.nbytes) for ti in part.values()))
    names = w.format_shard_names(Path(path))
    w.close()
    return names


# ----------------------------------------------------------------------------------------------
# Model skeletons in llama.cpp's tensor names (src/llama-model.cpp create_tensor shapes)
# ----------------------------------------------------------------------------------------------


def _common(arch: str, *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, ctx: int = 4096,
            **extra: Any) -> dict[str, Any]:
    kv = {f"{arch}.block_count": layers, f"{arch}.embedding_length": hidden, f"{arch}.attention.head_count": heads,
          f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.context_length": ctx,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 10000.0}
    kv.update({f"{arch}.{k}": v for k, v in extra.items()})
    return kv


def _embed(hidden: int, vocab: int, q: Any, out: Any, tied: bool = False) -> list[Tensor]:
    ts = [("token_embd.weight", (hidden, vocab), q), ("output_norm.weight", (hidden,), T.F32)]
    return ts if tied else [*ts, ("output.weight", (hidden, vocab), out)]


def _gqa(i: int, hidden: int, heads: int, kv_heads: int, hd: int, q: Any, v: Any, bias: bool = False) -> list[Tensor]:
    b = f"blk.{i}."
    ts = [(b + "attn_norm.weight", (hidden,), T.F32), (b + "attn_q.weight", (hidden, heads * hd), q),
          (b + "attn_k.weight", (hidden, kv_heads * hd), q), (b + "attn_v.weight", (hidden, kv_heads * hd), v),
          (b + "attn_output.weight", (heads * hd, hidden), q)]
    if bias:
        ts += [(b + "attn_q.bias", (heads * hd,), T.F32), (b + "attn_k.bias", (kv_heads * hd,), T.F32),
               (b + "attn_v.bias", (kv_heads * hd,), T.F32)]
    return ts


def _experts(i: int, hidden: int, inter: int, n: int, q: Any, down: Any) -> list[Tensor]:
    b = f"blk.{i}."
    return [(b + "ffn_norm.weight", (hidden,), T.F32), (b + "ffn_gate_inp.weight", (hidden, n), T.F32),
            (b + "ffn_gate_exps.weight", (hidden, inter, n), q), (b + "ffn_up_exps.weight", (hidden, inter, n), q),
            (b + "ffn_down_exps.weight", (inter, hidden, n), down)]


def mixtral(layers: int = 2, hidden: int = 256, inter: int = 256, experts: int = 8, vocab: int = 512,
            heads: int = 4, kv_heads: int = 2, q: Any = T.Q4_K) -> tuple[str, dict[str, Any], list[Tensor]]:
    """Mixtral as llama.cpp stores it: arch llama with expert_count (Q4_K_M-like types)."""
    hd = hidden // heads
    kv = _common("llama", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                 feed_forward_length=inter, expert_count=experts, expert_used_count=2, **{"rope.dimension_count": hd})
    kv["general.file_type"] = 15  # MOSTLY_Q4_K_M
    kv["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(vocab)]
    ts = _embed(hidden, vocab, q, T.Q6_K)
    for i in range(layers):
        ts += _gqa(i, hidden, heads, kv_heads, hd, q, T.Q6_K) + _experts(i, hidden, inter, experts, q, T.Q6_K)
    return "llama", kv, ts


def mixtral_per_expert() -> tuple[str, dict[str, Any], list[Tensor]]:
    """Mixtral as llama.cpp converted it before 2024: one tensor per expert (blk.N.ffn_gate.E.weight)."""
    arch, kv, ts = mixtral()
    out: list[Tensor] = []
    for name, shape, t in ts:
        if "_exps." in name:
            *rows, n = shape
            out += [(name.replace("_exps.", f".{e}."), tuple(rows), t) for e in range(n)]
        else:
            out.append((name, shape, t))
    return arch, kv, out


def llama_dense(layers: int = 2, hidden: int = 256, inter: int = 512, vocab: int = 512) -> tuple[str, dict, list]:
    kv = _common("llama", layers=layers, hidden=hidden, heads=4, kv_heads=4, vocab=vocab, feed_forward_length=inter)
    ts = _embed(hidden, vocab, T.Q8_0, T.Q8_0, tied=True)
    for i in range(layers):
        b = f"blk.{i}."
        ts += _gqa(i, hidden, 4, 4, 64, T.Q8_0, T.Q8_0) + [
            (b + "ffn_norm.weight", (hidden,), T.F32), (b + "ffn_gate.weight", (hidden, inter), T.Q8_0),
            (b + "ffn_up.weight", (hidden, inter), T.Q8_0), (b + "ffn_down.weight", (inter, hidden), T.Q8_0)]
    return "llama", kv, ts + [("rope_freqs.weight", (32,), T.F32)]


def qwen3moe(layers: int = 2, hidden: int = 256, inter: int = 256, experts: int = 16, vocab: int = 512,
             heads: int = 4, kv_heads: int = 2, hd: int = 128, used: int = 2,
             q: Any = T.Q4_K) -> tuple[str, dict, list]:
    kv = _common("qwen3moe", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                 expert_count=experts, expert_used_count=used, expert_feed_forward_length=inter,
                 feed_forward_length=4 * hidden, **{"attention.key_length": hd, "attention.value_length": hd})
    ts = _embed(hidden, vocab, q, T.Q6_K)
    for i in range(layers):
        b = f"blk.{i}."
        ts += _gqa(i, hidden, heads, kv_heads, hd, q, T.Q6_K) + _experts(i, hidden, inter, experts, q, T.Q6_K)
        ts += [(b + "attn_q_norm.weight", (hd,), T.F32), (b + "attn_k_norm.weight", (hd,), T.F32)]
    return "qwen3moe", kv, ts


def qwen2moe(layers: int = 2, hidden: int = 256, inter: int = 256, shared: int = 512, experts: int = 8,
             vocab: int = 512) -> tuple[str, dict, list]:
    kv = _common("qwen2moe", layers=layers, hidden=hidden, heads=4, kv_heads=4, vocab=vocab, expert_count=experts,
                 expert_used_count=2, expert_feed_forward_length=inter, expert_shared_feed_forward_length=shared,
                 feed_forward_length=1024)
    ts = _embed(hidden, vocab, T.Q8_0, T.Q8_0)
    for i in range(layers):
        b = f"blk.{i}."
        ts += _gqa(i, hidden, 4, 4, 64, T.Q8_0, T.Q8_0, bias=True) + _experts(i, hidden, inter, experts, T.Q8_0,
                                                                              T.Q8_0)
        ts += [(b + "ffn_gate_inp_shexp.weight", (hidden,), T.F32), (b + "ffn_gate_shexp.weight", (hidden, shared),
               T.Q8_0), (b + "ffn_up_shexp.weight", (hidden, shared), T.Q8_0),
               (b + "ffn_down_shexp.weight", (shared, hidden), T.Q8_0)]
    return "qwen2moe", kv, ts


def deepseek2(layers: int = 3, hidden: int = 256, inter: int = 256, dense: int = 512, experts: int = 8,
              vocab: int = 512, heads: int = 4, q_lora: int | None = 256, kv_lora: int = 256, nope: int = 128,
              rope: int = 64, v: int = 64, shared: int = 1, lead: int = 1, legacy: bool = False, used: int = 2,
              q: Any = T.Q4_K) -> tuple[str, dict, list]:
    """DeepSeek-V3 as llama.cpp stores it (arch deepseek2), the MLA keys in the 2025 layout unless legacy."""
    extra: dict[str, Any] = {"expert_count": experts, "expert_used_count": used, "expert_feed_forward_length": inter,
                             "expert_shared_count": shared, "leading_dense_block_count": lead,
                             "feed_forward_length": dense, "expert_weights_scale": 2.5, "expert_weights_norm": True,
                             "expert_gating_func": 2, "rope.dimension_count": rope,
                             "attention.kv_lora_rank": kv_lora}
    if q_lora:
        extra["attention.q_lora_rank"] = q_lora
    if legacy:
        extra.update({"attention.key_length": nope + rope, "attention.value_length": v})
    else:
        extra.update({"attention.key_length": kv_lora + rope, "attention.value_length": kv_lora,
                      "attention.key_length_mla": nope + rope, "attention.value_length_mla": v})
    kv = _common("deepseek2", layers=layers, hidden=hidden, heads=heads, kv_heads=1 if not legacy else heads,
                 vocab=vocab, **extra)
    ts = _embed(hidden, vocab, q, T.Q6_K)
    for i in range(layers):
        b = f"blk.{i}."
        ts += [(b + "attn_norm.weight", (hidden,), T.F32)]
        if q_lora:
            ts += [(b + "attn_q_a.weight", (hidden, q_lora), q), (b + "attn_q_a_norm.weight", (q_lora,), T.F32),
                   (b + "attn_q_b.weight", (q_lora, heads * (nope + rope)), q)]
        else:
            ts += [(b + "attn_q.weight", (hidden, heads * (nope + rope)), q)]
        ts += [(b + "attn_kv_a_mqa.weight", (hidden, kv_lora + rope), q),
               (b + "attn_kv_a_norm.weight", (kv_lora,), T.F32)]
        if legacy:
            ts += [(b + "attn_kv_b.weight", (kv_lora, heads * (nope + v)), q)]
        else:  # k_b / v_b: kv_b split per head (convert_hf_to_gguf DeepseekV2Model)
            ts += [(b + "attn_k_b.weight", (nope, kv_lora, heads), T.Q8_0),
                   (b + "attn_v_b.weight", (kv_lora, v, heads), q)]
        ts += [(b + "attn_output.weight", (heads * v, hidden), q), (b + "ffn_norm.weight", (hidden,), T.F32)]
        if i < lead:
            ts += [(b + "ffn_gate.weight", (hidden, dense), q), (b + "ffn_up.weight", (hidden, dense), q),
                   (b + "ffn_down.weight", (dense, hidden), T.Q6_K)]
        else:
            ts += [t for t in _experts(i, hidden, inter, experts, q, T.Q6_K) if "ffn_norm" not in t[0]]
            ts += [(b + "exp_probs_b.bias", (experts,), T.F32),
                   (b + "ffn_gate_shexp.weight", (hidden, shared * inter), q),
                   (b + "ffn_up_shexp.weight", (hidden, shared * inter), q),
                   (b + "ffn_down_shexp.weight", (shared * inter, hidden), T.Q6_K)]
    return "deepseek2", kv, ts


def gpt_oss(layers: int = 2, hidden: int = 256, inter: int = 256, experts: int = 8, vocab: int = 512,
            heads: int = 8, kv_heads: int = 2, hd: int = 64) -> tuple[str, dict, list]:
    """gpt-oss as llama.cpp stores it (arch gpt-oss): MXFP4 experts with biases, sinks, Q8_0 elsewhere."""
    kv = _common("gpt-oss", layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                 expert_count=experts, expert_used_count=4, expert_feed_forward_length=inter,
                 feed_forward_length=inter, **{"attention.key_length": hd, "attention.value_length": hd,
                                               "attention.sliding_window": 128})
    kv["general.file_type"] = 38  # MOSTLY_MXFP4_MOE
    ts = _embed(hidden, vocab, T.Q8_0, T.Q8_0)
    for i in range(layers):
        b = f"blk.{i}."
        ts += _gqa(i, hidden, heads, kv_heads, hd, T.Q8_0, T.Q8_0, bias=True)
        ts += [(b + "attn_output.bias", (hidden,), T.F32), (b + "attn_sinks.weight", (heads,), T.F32),
               (b + "post_attention_norm.weight", (hidden,), T.F32), (b + "ffn_gate_inp.weight", (hidden, experts),
               T.F32), (b + "ffn_gate_inp.bias", (experts,), T.F32),
               (b + "ffn_gate_exps.weight", (hidden, inter, experts), T.MXFP4),
               (b + "ffn_up_exps.weight", (hidden, inter, experts), T.MXFP4),
               (b + "ffn_down_exps.weight", (inter, hidden, experts), T.MXFP4),
               (b + "ffn_gate_exps.bias", (inter, experts), T.F32), (b + "ffn_up_exps.bias", (inter, experts), T.F32),
               (b + "ffn_down_exps.bias", (hidden, experts), T.F32)]
    return "gpt-oss", kv, ts


def _write(tmp_path: Path, model: tuple[str, dict, list], name: str = "model.gguf", **kw: Any) -> Path:
    arch, kv, ts = model
    path = tmp_path / name
    write_gguf(path, arch, kv, ts, **kw)
    return path


def _cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def _json(*args: str) -> dict[str, Any]:
    res = _cli(*args, "--json")
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout)


def _weights_bytes(ts: list[Tensor]) -> int:
    return sum(nbytes(s, t) for name, s, t in ts if name != "rope_freqs.weight")


# ----------------------------------------------------------------------------------------------
# What is read
# ----------------------------------------------------------------------------------------------


def test_params_are_the_files_tensors(tmp_path: Path) -> None:
    arch, kv, ts = model = mixtral()
    path = _write(tmp_path, model, data=True)  # real tensor data, written by GGUFWriter.write_tensors_to_file
    out = _json("params", str(path))
    elements = sum(int(np.prod(s)) for _, s, _ in ts)
    assert out["total_params"] == elements
    stored = out["checkpoint"]
    assert stored["stored_params"] == elements and stored["difference"] == 0
    assert stored["stored_bytes"] == sum(nbytes(s, t) for _, s, t in ts) == _weights_bytes(ts)
    assert set(stored["stored_params_by_dtype"]) == {"Q4_K", "Q6_K", "F32"}
    assert any("match the count" in line for line in stored["explanation"])
    # Mixtral: 2 of 8 experts active.
    routed = next(c for c in out["components"] if c["name"] == "routed_experts")
    assert routed["active"] * 4 == routed["total"]


def test_params_table_names_the_file_types(tmp_path: Path) -> None:
    path = _write(tmp_path, mixtral())
    res = _cli("params", str(path))
    assert res.exit_code == 0, res.output
    assert "GGUF Q4_K_M" in res.stdout and "Q4_K" in res.stdout and "Q6_K" in res.stdout


@pytest.mark.parametrize("build", [mixtral, mixtral_per_expert, llama_dense, qwen3moe, qwen2moe, deepseek2,
                                   gpt_oss, lambda: deepseek2(legacy=True), lambda: deepseek2(q_lora=None, lead=0)],
                         ids=["mixtral", "mixtral-per-expert", "llama", "qwen3moe", "qwen2moe", "deepseek2",
                              "gpt-oss", "deepseek2-legacy-mla", "deepseek2-lite"])
def test_each_architecture_counts_its_tensors(tmp_path: Path, build: Any) -> None:
    """The spec read from the metadata counts exactly the tensors, component by component; the file
    scheme gives back the file's bytes per component."""
    model = build()
    spec = spec_from_gguf(_write(tmp_path, model))
    count = count_params(spec)
    stored = spec.quantization_config["component_elements"]
    assert {c.name: c.total for c in count.components} == {k: v for k, v in stored.items() if k != "not_weights"}
    w = weight_bytes(spec, file_scheme(spec))
    assert w.by_component == {k: v for k, v in spec.quantization_config["component_bytes"].items()
                              if k != "not_weights"}
    assert w.total == _weights_bytes(model[2])


def test_architecture_details(tmp_path: Path) -> None:
    ds = spec_from_gguf(_write(tmp_path, deepseek2(), "ds.gguf"))
    assert ds.model_type == "deepseek_v3" and ds.attention == "mla" and ds.router_correction_bias
    assert ds.mla.qk_nope_head_dim == 128 and ds.mla.v_head_dim == 64 and ds.mla.kv_lora_rank == 256
    assert [layer.ffn for layer in ds.layers] == ["dense", "moe", "moe"] and ds.routed_scaling_factor == 2.5
    oss = spec_from_gguf(_write(tmp_path, gpt_oss(), "oss.gguf"))
    assert [(layer.mixer, layer.window) for layer in oss.layers] == [("sliding", 128), ("full", None)]
    assert oss.attention_sinks and oss.expert_bias and oss.router_bias
    q3 = spec_from_gguf(_write(tmp_path, qwen3moe(), "q3.gguf"))
    assert q3.head_dim == 128 and q3.qk_norm == "per_head" and q3.num_kv_heads == 2
    dense = spec_from_gguf(_write(tmp_path, llama_dense(), "dense.gguf"))
    assert not dense.is_moe and dense.tie_word_embeddings
    assert any("rope_freqs" in note for note in dense.checkpoint.notes)


@pytest.mark.parametrize(("card", "model"), [
    ("qwen3-30b-a3b", lambda: qwen3moe(layers=48, hidden=2048, inter=768, experts=128, vocab=151936, heads=32,
                                       kv_heads=4, used=8)),
    ("mixtral-8x7b", lambda: mixtral(layers=32, hidden=4096, inter=14336, vocab=32000, heads=32, kv_heads=8)),
    ("deepseek-v3", lambda: deepseek2(layers=61, hidden=7168, inter=2048, dense=18432, experts=256, vocab=129280,
                                      heads=128, q_lora=1536, kv_lora=512, v=128, lead=3, used=8)),
])
def test_real_geometries_match_the_bundled_cards(tmp_path: Path, card: str, model: Any) -> None:
    """A GGUF of the card's true sizes (sparse: the header, then the file extended to its size) counts
    what the card counts from config.json."""
    try:
        path = _write(tmp_path, model())
    except OSError as exc:  # a filesystem without sparse files
        pytest.skip(f"cannot write a sparse file here: {exc}")
    spec, expected = spec_from_gguf(path), count_params(find_card(card).spec())
    got = count_params(spec)
    assert (got.total_params, got.active_params) == (expected.total_params, expected.active_params)
    assert spec.checkpoint.total_params == got.total_params


# ----------------------------------------------------------------------------------------------
# memory and fit use the file's sizes
# ----------------------------------------------------------------------------------------------


def test_memory_uses_the_files_sizes(tmp_path: Path) -> None:
    arch, kv, ts = model = mixtral()
    path = _write(tmp_path, model)
    spec = spec_from_gguf(path)
    out = _json("memory", str(path))
    assert out["quant"] == FILE_SCHEME == native_scheme(spec).name  # the file's own types, not built-in Q4_K_M
    assert out["weights_bytes"] == _weights_bytes(ts)
    assert out["weights_bytes"] != weight_bytes(spec, get_scheme("q4_k_m")).total
    # The pure core with the file's own scheme: weights are the file's bytes, KV from the metadata.
    rep = memory_report(spec, file_scheme(spec), context=4096)
    assert rep.weights_bytes == _weights_bytes(ts)
    assert rep.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2  # layers x (K, V) x kv heads x head_dim x bf16


def test_fit_plans_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, mixtral())
    res = _cli("fit", str(path), "--gpus", "1x24GB")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("FITS")
    out = _json("fit", str(path), "--gpus", "1x24GB")
    assert out["fits"] is True and out["best"]["quant"] == FILE_SCHEME


def test_emit_serves_the_file_given(tmp_path: Path) -> None:
    path = _write(tmp_path, mixtral(), name="my model.gguf")
    res = _cli("fit", str(path), "--gpus", "1x24GB", "--emit", "llamacpp")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if x.startswith("llama-server"))
    argv = shlex.split(line)
    assert argv[argv.index("-m") + 1] == str(path)  # the file itself, quoted (the name has a space)
    assert "download or convert" not in res.stdout


def test_split_model_reads_every_part(tmp_path: Path) -> None:
    arch, kv, ts = mixtral()
    parts = write_gguf(tmp_path / "Mix-Q4_K_M.gguf", arch, kv, ts, split_max_tensors=12)
    assert len(parts) > 1 and parts[0].name.endswith("-00001-of-%05d.gguf" % len(parts))
    header = read_header(parts[0])
    assert header.num_files == len(parts) and len(header.tensors) == len(ts)
    out = _json("params", str(parts[0]))
    assert out["checkpoint"]["num_files"] == len(parts) and out["checkpoint"]["difference"] == 0
    res = _cli("params", str(parts[1]))
    assert res.exit_code == 2 and "give the first part" in res.stderr
    parts[-1].unlink()
    res = _cli("params", str(parts[0]))
    assert res.exit_code == 2 and "is missing" in res.stderr


def test_big_endian_file(tmp_path: Path) -> None:
    """gguf.md: a v3 file may be big-endian throughout (s390x builds)."""
    arch, kv, ts = model = mixtral()
    out = _json("params", str(_write(tmp_path, model, big_endian=True)))
    assert out["total_params"] == sum(int(np.prod(s)) for _, s, _ in ts) == out["checkpoint"]["stored_params"]


def test_import_moeplan_cli_imports_neither_numpy_nor_gguf() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import moeplan.cli"], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    modules = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "moeplan.cli" in modules
    assert not {m for m in modules if m.split(".")[0] in ("numpy", "gguf")}


# ----------------------------------------------------------------------------------------------
# Hostile files: one line on stderr, exit 2, no traceback, quickly
# ----------------------------------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _header(n_tensors: int, kvs: list[bytes], infos: bytes = b"", tail: bytes = b"", version: int = 3,
            magic: bytes = b"GGUF", n_kv: int | None = None) -> bytes:
    """Header bytes, padded to the default alignment (32) before `tail` (the tensor data)."""
    raw = magic + struct.pack("<IQQ", version, n_tensors, len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + infos
    return raw + b"\0" * (_pad(len(raw)) - len(raw)) + tail


_ARCH = _kv("general.architecture", 8, _s("llama"))


def _info(name: str, dims: tuple[int, ...], type_id: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id,
                                                                                                       offset)


HOSTILE: dict[str, bytes] = {
    "bad magic": _header(0, [_ARCH], magic=b"GGML"),
    "zip file": b"PK\x03\x04" + b"\0" * 60,
    "empty": b"",
    "version 1": _header(0, [_ARCH], version=1),
    "version 99": _header(0, [_ARCH], version=99),
    "tensor count 2^60": _header(2**60, [_ARCH]),
    "kv count 2^63": _header(0, [_ARCH], n_kv=2**63),
    "kv count past the end": _header(0, [_ARCH], n_kv=50),
    "key length 2^60": _header(0, [struct.pack("<Q", 2**60) + b"general.architecture"]),
    "string length 2^60": _header(0, [_kv("general.architecture", 8, struct.pack("<Q", 2**60) + b"llama")]),
    "array length 2^60": _header(0, [_ARCH, _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**60))]),
    "array of u8 2^40": _header(0, [_ARCH, _kv("x.y", 9, struct.pack("<IQ", 0, 2**40))]),
    "array nested 100 deep": _header(0, [_ARCH, _kv("x.y", 9, struct.pack("<IQ", 9, 1) * 100)]),
    "non-UTF-8 key": _header(0, [_kv(b"general.\xff\xfe", 4, struct.pack("<I", 1))]),
    "non-UTF-8 tensor name": _header(1, [_ARCH], _s(b"\xff\xfe") + struct.pack("<IQIQ", 1, 32, 0, 0)),
    "duplicate key": _header(0, [_ARCH, _ARCH]),
    "unknown value type": _header(0, [_ARCH, _kv("x.y", 77, b"\0" * 8)]),
    "bool of 7": _header(0, [_ARCH, _kv("x.y", 7, b"\x07")]),
    "truncated in a key": _header(0, [_ARCH])[:30],
    "truncated tensor infos": b"GGUF" + struct.pack("<IQQ", 3, 2, 1) + _ARCH + _info("a", (32,)) + _s("b") + b"\1",
    "tensor data past the end": _header(1, [_ARCH], _info("token_embd.weight", (32, 8)), b"\0" * 64),
    "offset 2^60": _header(1, [_ARCH], _info("token_embd.weight", (32,), 0, 2**60), b"\0" * 64),
    "unknown ggml type": _header(1, [_ARCH], _info("token_embd.weight", (32,), 4), b"\0" * 256),
    "row not a block multiple": _header(1, [_ARCH], _info("token_embd.weight", (33,), 12), b"\0" * 256),
    "zero dimensions": _header(1, [_ARCH], _s("a") + struct.pack("<IIQ", 0, 0, 0), b"\0" * 64),
    "nine dimensions": _header(1, [_ARCH], _info("a", (1,) * 9), b"\0" * 64),
    "split into 5000 parts": _header(0, [_ARCH, _kv("split.count", 2, struct.pack("<H", 5000))]),
    "alignment 3": _header(0, [_ARCH, _kv("general.alignment", 4, struct.pack("<I", 3))]),
    "no tensors": _header(0, [_ARCH, _kv("llama.block_count", 4, struct.pack("<I", 2))]),
    "block count 2^31": _header(1, [_ARCH, _kv("llama.block_count", 4, struct.pack("<I", 2**31))],
                                _info("blk.0.attn_norm.weight", (32,)), b"\0" * 160),
    "block count past the tensors": _header(1, [_ARCH, _kv("llama.block_count", 4, struct.pack("<I", 500))],
                                            _info("blk.0.attn_norm.weight", (32,)), b"\0" * 160),
    "unknown architecture": _header(1, [_kv("general.architecture", 8, _s("mamba"))],
                                    _info("token_embd.weight", (32,)), b"\0" * 160),
}


def _refused(path: str, must: str = "") -> str:
    start = time.monotonic()
    res = _cli("memory", path)
    assert time.monotonic() - start < 10
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert must in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_header_is_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[case])
    _refused(str(path), str(path))


def test_hostile_messages_say_what_is_wrong(tmp_path: Path) -> None:
    def line(case: str) -> str:
        path = tmp_path / f"{case.replace(' ', '_')}.gguf"
        path.write_bytes(HOSTILE[case])
        return _refused(str(path))

    assert "not a GGUF file" in line("bad magic")
    assert "limit is 100,000" in line("tensor count 2^60")
    assert "only" in line("string length 2^60") and "bytes follow" in line("string length 2^60")
    assert "not UTF-8" in line("non-UTF-8 key")
    assert "'mamba' is not one moeplan reads" in line("unknown architecture")
    assert "have no tensors" in line("block count past the tensors")
    assert "truncated" in line("truncated in a key")


def test_vocabulary_walk_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplan import gguf_file

    arch, kv, ts = mixtral()
    path = _write(tmp_path, (arch, {**kv, "tokenizer.ggml.merges": [f"a{i} b{i}" for i in range(600)]}, ts))
    monkeypatch.setattr(gguf_file, "MAX_WALKED", 1000)  # 512 tokens + 600 merges
    assert "more than 1,000 strings" in _refused(str(path))


def test_truncated_real_file(tmp_path: Path) -> None:
    path = _write(tmp_path, mixtral(), data=True)
    raw = path.read_bytes()
    for cut in (len(raw) // 2, 200, 23):
        path.write_bytes(raw[:cut])
        _refused(str(path))


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)  # opening it for reading without O_NONBLOCK would wait for a writer forever
    elif kind == "dev-zero":
        if not os.path.exists("/dev/zero"):
            pytest.skip("no /dev/zero")
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    assert "not a GGUF file" in _refused(str(path))


def test_huge_vocabulary_is_read_quickly(tmp_path: Path) -> None:
    """A 262k-token vocabulary with scores and merges (Gemma 3's size): walked, not materialised."""
    arch, kv, ts = mixtral()
    n = 262_144
    kv = {**kv, "tokenizer.ggml.tokens": [f"tok{i}" for i in range(n)], "tokenizer.ggml.scores": [0.0] * n,
          "tokenizer.ggml.merges": [f"a{i} b{i}" for i in range(n)]}
    path = tmp_path / "vocab.gguf"
    write_gguf(path, arch, kv, ts)
    start = time.monotonic()
    header = read_header(path)
    assert time.monotonic() - start < 3
    assert header.metadata["tokenizer.ggml.tokens"].length == n
