"""What each decoder layer keeps per sequence, as a function of context: the one ledger that memory,
layout, plan and perf sum over.

A layer's cache is a few terms, each `rows x elements` values:
- grows:  one row per token (full attention), or one per `per_tokens` tokens (DeepSeek-V4's
          compressed rows);
- window: rows capped at a sliding window or an attention chunk;
- state:  a fixed buffer per sequence, whatever the context (Gated DeltaNet and Mamba conv and
          recurrent states, DeepSeek-V4's compressor windows), often in its own dtype (fp32).
Each term says how tensor parallelism splits it (by `heads`; one head means every rank keeps it
all) and how many rows a decode step reads (`read_rows`: a sparse top-k reads fewer than it keeps).

Adding an attention kind means adding its terms to `layer_terms` and its score FLOPs to
`attention_flops`, its fields in spec.py and reading it in hf_config.py; nothing else sums tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal


from moeplan.record import Record
from moeplan.params import derived, layer_group_ids, layer_groups
from moeplan.quant import kv_dtype_bytes
from moeplan.spec import LayerSpec, ModelSpec

Kind = Literal["grows", "window", "state"]


class CacheTerm(Record):
    name: str  # what it is, as the memory breakdown prints it
    elements: int  # values per row
    dtype_bytes: float | None = None  # None: the KV cache dtype; else this state's own element size
    per_tokens: int = 1  # one row per this many tokens; 0: a fixed buffer of max_rows rows
    max_rows: int | None = None  # a window cap, or the rows of a fixed buffer
    heads: int = 1  # TP splits the term over this many heads (1: every rank keeps all of it)
    read_rows: int | None = None  # a decode step reads at most this many rows (sparse top-k)
    # What the serving engines allocate per row where it differs from what the model needs (Gemma 4
    # K=V: one tensor by the model, two in vLLM, SGLang, llama.cpp and HF, which norm K and V apart).
    engine_elements: int | None = None

    @property
    def kind(self) -> Kind:
        if self.per_tokens == 0:
            return "state"
        return "window" if self.max_rows else "grows"

    def rows(self, context: int) -> int:
        if self.per_tokens == 0:
            return self.max_rows or 0
        n = context // self.per_tokens if self.per_tokens > 1 else context
        return min(n, self.max_rows) if self.max_rows else n

    def row_bytes(self, kv_bytes: float, engine: bool = False) -> float:
        n = self.engine_elements if engine and self.engine_elements else self.elements
        return n * (self.dtype_bytes if self.dtype_bytes is not None else kv_bytes)

    def share(self, tp: int) -> float:
        """What one of `tp` tensor-parallel ranks keeps: whole heads, at least one."""
        return 1.0 if tp <= 1 or self.heads == 1 else math.ceil(self.heads / tp) / self.heads

    def bytes(self, context: int, kv_bytes: float, tp: int = 1, engine: bool = False) -> float:
        return self.rows(context) * self.row_bytes(kv_bytes, engine) * self.share(tp)


def layer_terms(spec: ModelSpec, layer: LayerSpec, *, mla_naive: bool = False) -> tuple[CacheTerm, ...]:
    """What one sequence keeps in `layer` (see _layer_terms), built once per kind of layer of spec.layers:
    the fit search asks for the same layers' terms for every context and batch it tries."""
    kind = layer_group_ids(spec).get(id(layer))
    if kind is None:  # not one of spec.layers (an MTP layer): nothing to key it on
        return _layer_terms(spec, layer, mla_naive=mla_naive)
    memo = derived(spec)
    key = ("cache terms", kind, mla_naive)
    terms = memo.get(key)
    if terms is None:
        terms = memo[key] = _layer_terms(spec, layer, mla_naive=mla_naive)
    return terms


def _layer_terms(spec: ModelSpec, layer: LayerSpec, *, mla_naive: bool = False) -> tuple[CacheTerm, ...]:
    """What one sequence keeps in `layer`. Sources:
    - GQA: K and V of kv_heads x head_dim per token (vLLM/SGLang paged KV); sliding and chunked layers
      keep at most their window; a Gemma 4 K=V layer one tensor, a KV-shared layer none.
    - MLA: the latent (kv_lora_rank + qk_rope_head_dim) as vLLM and SGLang cache it (DeepSeek-V2 paper
      section 2.1.2); `mla_naive`: the per-head K and V HF eager caches. DSA indexers (DeepSeek-V3.2,
      GLM-5) add one index key of index_head_dim per token; attention then reads the top-k rows.
    - DeepSeek-V4 (transformers DeepseekV4HCACache/CSACache; vLLM's V4 cache layout): every layer a
      sliding-window branch of head_dim rows; a compressed layer one head_dim row per ratio tokens and,
      in fp32, its compressor's open windows (ratio tokens of kv + gate, twice over with overlap on CSA
      layers); CSA layers also the indexer's keys per ratio tokens and its compressor's windows.
    - Gated DeltaNet (Qwen3-Next/3.5): conv state conv_dim x (kernel - 1) in the model dtype and the
      recurrent state v_heads x key_head_dim x value_head_dim in the SSM dtype (fp32), per sequence.
    - Mamba (Jamba): conv (d_inner x d_conv) and SSM (d_inner x d_state) state in 16-bit.
    """
    if layer.mixer == "mamba":
        m = spec.mamba
        assert m is not None
        d_inner = m.expand * spec.hidden_size
        return (CacheTerm(name="Mamba state", elements=d_inner * (m.d_conv + m.d_state), dtype_bytes=2.0,
                          per_tokens=0, max_rows=1, heads=d_inner),)
    if layer.mixer == "linear":
        la = spec.linear
        assert la is not None
        return (
            CacheTerm(name="linear-attention conv state", elements=la.conv_dim, dtype_bytes=la.conv_state_bytes,
                      per_tokens=0, max_rows=la.conv_kernel - 1, heads=la.num_key_heads),
            CacheTerm(name="linear-attention recurrent state",
                      elements=la.num_value_heads * la.key_head_dim * la.value_head_dim,
                      dtype_bytes=la.ssm_state_bytes, per_tokens=0, max_rows=1, heads=la.num_value_heads),
        )  # fmt: skip
    if spec.attention == "compressed":
        return _compressed_terms(spec, layer)
    window = layer.window if layer.mixer in ("sliding", "chunked") else None
    if spec.attention == "mla" and spec.mla is not None:
        m = spec.mla
        topk = spec.indexer.topk if spec.indexer is not None else None
        if mla_naive:
            per_head = m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
            terms = [CacheTerm(name="MLA expanded K/V", elements=spec.num_attention_heads * per_head,
                               max_rows=window, heads=spec.num_attention_heads, read_rows=topk)]
        else:
            terms = [CacheTerm(name="MLA latent", elements=m.kv_lora_rank + m.qk_rope_head_dim, max_rows=window,
                               read_rows=topk)]
        if layer.indexer and spec.indexer is not None:
            terms.append(CacheTerm(name="indexer keys", elements=spec.indexer.head_dim, max_rows=window))
        return tuple(terms)
    if layer.kv_shared:
        return ()  # Gemma 3n/4: reads the K/V an earlier layer of its kind cached
    kv_heads = layer.kv_heads or spec.num_kv_heads
    hd = layer.head_dim or spec.head_dim
    kind = {"sliding": "sliding-window", "chunked": "chunked-attention"}.get(layer.mixer, "full-attention")
    if layer.k_eq_v:
        # NOTE: Gemma 4 attention_k_eq_v: V comes from the K projection, so the model needs one tensor.
        # vLLM (gemma4.py), SGLang (gemma4_causal.py), llama.cpp (gemma4.cpp) and HF all still cache K
        # and V, normed apart (K: scaled RMSNorm + RoPE, V: unscaled RMSNorm): two tensors in engines.
        return (CacheTerm(name=f"{kind} K=V", elements=kv_heads * hd, max_rows=window, heads=kv_heads,
                          engine_elements=2 * kv_heads * hd),)
    return (CacheTerm(name=f"{kind} KV", elements=2 * kv_heads * hd, max_rows=window, heads=kv_heads),)


def _compressed_terms(spec: ModelSpec, layer: LayerSpec) -> tuple[CacheTerm, ...]:
    d = spec.head_dim
    terms = [CacheTerm(name="sliding-window KV (every layer)", elements=d, max_rows=layer.window)]
    r = layer.compress_ratio if layer.mixer == "compressed" else None
    if not r:
        return tuple(terms)
    ix = spec.indexer if layer.indexer else None
    overlap = 2 if layer.indexer else 1  # CSA pools overlapping windows (Ca, Cb): twice the width and rows
    terms.append(CacheTerm(name=f"compressed KV (1/{r})", elements=d, per_tokens=r,
                           read_rows=ix.topk if ix is not None else None))
    terms.append(CacheTerm(name="compressor state", elements=2 * overlap * d, dtype_bytes=4.0, per_tokens=0,
                           max_rows=overlap * r))
    if ix is not None:
        terms.append(CacheTerm(name=f"indexer keys (1/{r})", elements=ix.head_dim, per_tokens=r))
        terms.append(CacheTerm(name="indexer compressor state", elements=2 * overlap * ix.head_dim, dtype_bytes=4.0,
                               per_tokens=0, max_rows=overlap * r))
    return tuple(terms)


class CacheBytes(Record):
    """Bytes for `batch` sequences of `context` tokens over some layers, by kind and by term."""

    grows: int  # rows that grow with context
    window: int  # rows capped at a window or chunk
    state: int  # fixed per-sequence state
    by_term: dict[str, int]

    @property
    def kv(self) -> int:
        return self.grows + self.window

    @property
    def total(self) -> int:
        return self.grows + self.window + self.state


def _layer_list(spec: ModelSpec, layers: Iterable[LayerSpec] | None, include_mtp: bool) -> list[LayerSpec]:
    chosen = list(spec.layers if layers is None else layers)
    if include_mtp:
        chosen += [spec.mtp_layer_spec] * spec.mtp_layers
    return chosen


def cache_bytes(
    spec: ModelSpec,
    context: int,
    batch: int = 1,
    kv_dtype: str = "bf16",
    *,
    layers: Iterable[LayerSpec] | None = None,
    tp: int = 1,
    include_mtp: bool = False,
    mla_naive: bool = False,
    engine: bool = False,
) -> CacheBytes:
    """What `batch` sequences of `context` tokens keep on one of `tp` ranks over `layers` (all by default).
    `engine`: as the serving engines allocate it (see CacheTerm.engine_elements), not the model's minimum."""
    by_term: dict[str, float] = {}
    kinds = _per_sequence(_weighted_terms(spec, layers, include_mtp, mla_naive), context, kv_dtype_bytes(kv_dtype),
                          tp, engine, by_term)
    return CacheBytes(
        grows=math.ceil(batch * kinds["grows"]), window=math.ceil(batch * kinds["window"]),
        state=math.ceil(batch * kinds["state"]), by_term={k: math.ceil(batch * v) for k, v in by_term.items() if v},
    )  # fmt: skip


def cache_total_fn(
    spec: ModelSpec,
    kv_dtype: str = "bf16",
    *,
    layers: Iterable[LayerSpec] | None = None,
    tp: int = 1,
    include_mtp: bool = False,
    mla_naive: bool = False,
    engine: bool = False,
) -> Callable[[int, int], int]:
    """`(context, batch) -> cache_bytes(spec, context, batch, ...).total` for these layers, with the
    layers' terms gathered once: the fit search asks for every context and batch it tries."""
    weighted = _weighted_terms(spec, layers, include_mtp, mla_naive)
    kvb = kv_dtype_bytes(kv_dtype)

    def total(context: int, batch: int) -> int:
        kinds = _per_sequence(weighted, context, kvb, tp, engine, None)
        return math.ceil(batch * kinds["grows"]) + math.ceil(batch * kinds["window"]) + math.ceil(
            batch * kinds["state"])

    return total


def _weighted_terms(
    spec: ModelSpec, layers: Iterable[LayerSpec] | None, include_mtp: bool, mla_naive: bool
) -> list[tuple[int, CacheTerm]]:
    """(how many layers, term) for every term of every kind of layer, in order of first occurrence."""
    return [(times, term) for layer, times in layer_groups(spec, _layer_list(spec, layers, include_mtp))
            for term in layer_terms(spec, layer, mla_naive=mla_naive)]


def _per_sequence(
    weighted: list[tuple[int, CacheTerm]], context: int, kv_bytes: float, tp: int, engine: bool,
    by_term: dict[str, float] | None,
) -> dict[str, float]:
    """One sequence's cache bytes by kind (and by term into `by_term`): the one sum cache_bytes and
    cache_total_fn share."""
    kinds: dict[str, float] = {"grows": 0, "window": 0, "state": 0}
    for times, term in weighted:
        b = times * term.bytes(context, kv_bytes, tp, engine)
        kinds[term.kind] += b
        if by_term is not None:
            by_term[term.name] = by_term.get(term.name, 0) + b
    return kinds


def bytes_per_token(
    spec: ModelSpec,
    kv_dtype: str = "bf16",
    *,
    beyond_windows: bool = False,
    layers: Iterable[LayerSpec] | None = None,
    include_mtp: bool = False,
    mla_naive: bool = False,
    engine: bool = False,
) -> float:
    """What one more token adds to one sequence: every row term as if no window capped it, or with
    `beyond_windows` only the terms that keep growing past every window (long-context growth)."""
    kvb = kv_dtype_bytes(kv_dtype)
    total = 0.0
    for layer, times in layer_groups(spec, _layer_list(spec, layers, include_mtp)):
        for term in layer_terms(spec, layer, mla_naive=mla_naive):
            if term.kind == "state" or (beyond_windows and term.kind == "window"):
                continue
            total += times * term.row_bytes(kvb, engine) / term.per_tokens
    return total


def state_bytes_per_sequence(spec: ModelSpec, *, layers: Iterable[LayerSpec] | None = None,
                             include_mtp: bool = False) -> int:
    """The fixed per-sequence state (conv/recurrent states, compressor windows), whatever the context."""
    return cache_bytes(spec, 1, layers=layers, include_mtp=include_mtp).state


def decode_read_bytes(spec: ModelSpec, layer: LayerSpec, context: int, kv_bytes: float, tp: int = 1) -> float:
    """Cache bytes one sequence's decode step moves in `layer` on one of `tp` ranks: the rows attention
    reads (all, or the top-k of a sparse indexer) and each fixed state read and written back, as
    the engines lay them out."""
    total = 0.0
    for term in layer_terms(spec, layer):
        rows = term.rows(context)
        if term.read_rows is not None:
            rows = min(rows, term.read_rows)
        factor = 2.0 if term.kind == "state" else 1.0
        total += factor * rows * term.row_bytes(kv_bytes, engine=True) * term.share(tp)
    return total


def attention_flops(spec: ModelSpec, layer: LayerSpec, tokens: int, context: int, seqs: int = 1) -> float:
    """Score and value FLOPs of `seqs` sequences, each with `tokens` new queries (the last `tokens` of
    `context`: a decode step has 1, a prefill chunk many), in `layer` (projections are counted with the
    weights). A batch of decode tokens is `seqs` sequences of one token, not one sequence of many.
    Sources:
    - GQA: 4 x heads x head_dim x keys (QK^T and AV).
    - MLA absorbed: 2 x heads x (2 x kv_lora_rank + qk_rope_head_dim) x keys (DeepSeek-V2 appendix);
      with a DSA indexer attention scores the top-k keys and the indexer 2 x n_heads x head_dim x all.
    - DeepSeek-V4: MQA of head_dim over the window plus the compressed rows read (top-k on CSA), 4 x
      heads x head_dim each; the CSA indexer 2 x n_heads x head_dim x compressed rows.
    - Gated DeltaNet: a constant ~6 x v_heads x key_head_dim x value_head_dim per token (state decay,
      delta update and readout), whatever the context.
    - Mamba: not charged (its scan is small beside the projections)."""
    return seqs * _attention_flops_one(spec, layer, tokens, context)


def _attention_flops_one(spec: ModelSpec, layer: LayerSpec, tokens: int, context: int) -> float:
    if layer.mixer == "mamba":
        return 0.0
    if layer.mixer == "linear":
        la = spec.linear
        assert la is not None
        return 6.0 * tokens * la.num_value_heads * la.key_head_dim * la.value_head_dim
    heads = spec.num_attention_heads
    if spec.attention == "compressed":
        rows = 0
        index = 0.0
        for term in _compressed_terms(spec, layer):
            if term.kind == "state" or term.name.startswith("indexer"):
                continue
            n = term.rows(context)
            rows += min(n, term.read_rows) if term.read_rows is not None else n
        if layer.indexer and spec.indexer is not None and layer.compress_ratio:
            ix = spec.indexer
            index = 2.0 * tokens * ix.n_heads * ix.head_dim * (context // layer.compress_ratio)
        return 4.0 * tokens * heads * spec.head_dim * rows + index
    window = layer.window if layer.mixer in ("sliding", "chunked") else None
    keys = causal_keys(tokens, context, window)
    if spec.attention == "mla" and spec.mla is not None:
        m = spec.mla
        index = 0.0
        if spec.indexer is not None:
            if layer.indexer:
                index = 2.0 * tokens * spec.indexer.n_heads * spec.indexer.head_dim * keys
            keys = min(keys, spec.indexer.topk)
        if tokens > 1:  # prefill runs per-head attention (FlashMLA / vLLM MLA prefill): q.k over nope+rope, then V
            return 2.0 * tokens * heads * keys * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) + index
        return 2.0 * tokens * heads * keys * (2 * m.kv_lora_rank + m.qk_rope_head_dim) + index
    return 4.0 * tokens * heads * (layer.head_dim or spec.head_dim) * keys


def causal_keys(tokens: int, context: int, window: int | None = None) -> float:
    """Keys each of `tokens` new queries scores, on average, when they are the last `tokens` of
    `context` (causal: query at position p sees min(p, window) keys). Decode (tokens = 1) sees them all."""
    first = max(context - tokens + 1, 1)
    last = context
    if tokens <= 1 or last <= first:
        return float(min(context, window) if window else context)
    if window is None or window >= last:
        return (first + last) / 2
    below = max(0, min(window, last) - first + 1)  # positions first..window see p keys
    below_sum = below * (first + first + below - 1) / 2 if below else 0.0
    return (below_sum + (last - first + 1 - below) * window) / (last - first + 1)
