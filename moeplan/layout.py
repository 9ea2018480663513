"""Tensor / expert / pipeline placements and the bytes each one puts on each GPU.

How engines split a MoE model (vLLM and SGLang model code; Megatron for pipeline stages):
- tensor parallel (tp): attention heads, dense FFNs and shared experts split over tp ranks; KV heads
  split too, but a rank never holds less than one KV head, so they are replicated when tp exceeds
  them; MLA's latent cache is not split by heads at all: every TP rank keeps the whole latent
  (vLLM's MLA backend). Vocab-parallel embedding and lm_head split over tp.
- expert parallel (ep): routed experts spread over ep ranks, E // ep each and one more on the first
  E % ep ranks; attention beside it tensor-parallel (vLLM --enable-expert-parallel: ep = tp), or
  data-parallel (SGLang --enable-dp-attention): attention, dense and shared weights replicated and
  the batch split, so MLA's latent cache is not replicated.
- the 2026 layer kinds under TP: Gated DeltaNet projections, conv and states split by heads (vLLM
  shards conv_dim and the v heads); DeepSeek-V4 splits q_b and the grouped output projection by heads
  but keeps its single shared KV head, compressor and indexer whole on every rank, so its cache is not
  split; DSA indexer keys are replicated like MLA's latent; Gemma 4's global layers split their own
  KV heads (replicated below one head per rank). What each rank keeps is moeplan.kv_cache's `heads`.
- pipeline parallel (pp): layers cut into stages, the embedding on the first and the final norm
  and lm_head on the last; stages may be uneven to suit cards of different sizes.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from collections.abc import Callable


from moeplan.record import Record
from moeplan.hardware import Gpu
from moeplan.kv_cache import CacheBytes, cache_bytes, cache_total_fn
from moeplan.memory import activation_bytes, hash_table_bytes, overhead_bytes
from moeplan.params import (
    ATTENTION, DENSE_FFN, DENSE_MLP, EMBEDDING, HYPER_CONNECTIONS, LM_HEAD, MAMBA, NORMS, PER_LAYER_EMBEDDING,
    ROUTED_EXPERTS, SHARED_EXPERTS, VISION, attention_params, dsa_indexer_params, hyper_head_params, layer_groups,
    layer_params, norm_params, per_layer_embedding_params, vision_params,
)  # fmt: skip
from moeplan.quant import QuantScheme
from moeplan.spec import LayerSpec, ModelSpec



class Layout(Record):
    tp: int  # GPUs per stage that split attention (1 under DP attention)
    ep: int  # GPUs per stage that split the routed experts (1 = experts tensor-sliced over tp)
    pp: int  # pipeline stages
    dp_attention: bool = False
    stage_layers: tuple[int, ...]  # decoder layers per stage

    @property
    def gpus_per_stage(self) -> int:
        return max(self.tp, self.ep)

    @property
    def label(self) -> str:
        attn = f"dp{self.ep}" if self.dp_attention else f"tp{self.tp}"
        return f"{attn} ep{self.ep} pp{self.pp}" + (" uneven" if len(set(self.stage_layers)) > 1 else "")


class GpuUse(Record):
    name: str
    index: int  # first GPU index this row stands for
    count: int = 1  # identical GPUs this row stands for
    stage: int
    capacity_bytes: int  # usable memory the driver reports
    budget_bytes: int  # capacity x the engine's memory fraction
    used_bytes: int
    weights_bytes: int
    kv_bytes: int  # the whole cache: KV rows and fixed state
    activation_bytes: int
    overhead_bytes: int
    free_bytes: int  # budget - used (negative: overflow)
    local_experts: int
    weights: dict[str, int]
    state_bytes: int = 0  # the fixed per-sequence state inside kv_bytes (linear attention, compressors)

    @property
    def fits(self) -> bool:
        return self.used_bytes <= self.budget_bytes


def expert_share(num_experts: int, ep: int, rank: int) -> int:
    """Experts on EP rank `rank`: uneven when E is not divisible (the first E % ep ranks get one more)."""
    return num_experts // ep + (1 if rank < num_experts % ep else 0)


def _attention_fraction(spec: ModelSpec, layer: LayerSpec, tp: int) -> float:
    """Share of one layer's attention weights on one TP rank."""
    if tp == 1:
        return 1.0
    h = spec.hidden_size
    if layer.mixer in ("linear", "mamba"):
        return 1 / tp  # projections, conv and state split by heads
    total = attention_params(spec, layer)
    if spec.attention == "compressed" and spec.compressed is not None:
        # DeepSeek-V4: q_b, the grouped o_a and o_b split by heads; the q/kv down-projections and their
        # norms, the one shared KV head, the compressor and the indexer are replicated (vLLM keeps the
        # single-KV-head path whole on every rank).
        c = spec.compressed
        split = c.q_lora_rank * spec.num_attention_heads * spec.head_dim + spec.num_attention_heads
        split += spec.num_attention_heads * spec.head_dim * c.o_lora_rank + c.o_groups * c.o_lora_rank * h
        return ((total - split) + split / tp) / total
    if spec.attention == "mla" and spec.mla is not None:
        m = spec.mla
        # q_a / kv_a down-projections, their norms and any DSA indexer are replicated; the rest splits by heads.
        replicated = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        if m.q_lora_rank:
            replicated += h * m.q_lora_rank + m.q_lora_rank
        if layer.indexer and spec.indexer is not None:
            replicated += dsa_indexer_params(spec)
        return (replicated + (total - replicated) / tp) / total
    hd = layer.head_dim or spec.head_dim
    kv_heads = layer.kv_heads or spec.num_kv_heads
    q_o = (3 if spec.attn_output_gate else 2) * h * spec.num_attention_heads * hd
    kv = (0 if layer.kv_shared else 1 if layer.k_eq_v else 2) * h * kv_heads * hd
    kv_frac = math.ceil(kv_heads / tp) / kv_heads
    return (q_o / tp + kv * kv_frac) / (q_o + kv)


def kv_fraction(spec: ModelSpec, tp: int) -> float:
    """Share of a full-attention layer's KV cache one TP rank keeps (MLA: all of it; GQA: at least one
    KV head). Per-layer figures come from moeplan.kv_cache, which knows every layer kind."""
    if spec.attention != "gqa" or tp == 1:
        return 1.0
    return math.ceil(spec.num_kv_heads / tp) / spec.num_kv_heads


def even_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


@lru_cache(maxsize=256)  # every GPU row of a layout asks for its stage's bounds: pp stages, pp times
def stage_bounds(stage_layers: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    bounds, start = [], 0
    for n in stage_layers:
        bounds.append((start, start + n))
        start += n
    return tuple(bounds)


class Scenario(Record):
    context: int
    batch: int
    kv_dtype: str = "bf16"
    mem_fraction: float = 0.90
    chunk_tokens: int = 8192
    cuda_graphs: bool = True
    # EPLB: replicas of the hottest experts per EP group (--redundant-experts), and a capacity factor
    # for engines that enforce one (--capacity-factor; vLLM/SGLang inference do not).
    redundant_experts: int = 0
    capacity_factor: float | None = None


def local_experts(spec: ModelSpec, layout: Layout, rank: int, sc: Scenario) -> int:
    """Routed experts (replicas included) on EP rank `rank`: E // ep, one more on the first E % ep;
    with N redundant experts every rank gets ceil((E + N) / ep) slots, as EPLB fills them."""
    if layout.ep <= 1:
        return spec.num_experts
    if sc.redundant_experts:
        return math.ceil((spec.num_experts + sc.redundant_experts) / layout.ep)
    return expert_share(spec.num_experts, layout.ep, rank % layout.ep)


def dispatch_buffer_bytes(spec: ModelSpec, layout: Layout, sc: Scenario, local: int) -> int:
    """With a capacity factor C, an EP rank reserves per local expert a budget of ceil(C x T x k / E)
    token rows (GShard) for dispatch and as many for combine, bf16, T the prefill chunk's tokens."""
    if sc.capacity_factor is None or layout.ep <= 1 or not spec.is_moe:
        return 0
    cap = math.ceil(sc.capacity_factor * sc.chunk_tokens * spec.experts_per_token / spec.num_experts)
    return 2 * local * cap * spec.hidden_size * 2


def stage_weights(
    spec: ModelSpec, scheme: QuantScheme, layout: Layout, stage: int, local_experts: int
) -> dict[str, int]:
    """Weight bytes by component on one GPU of `stage`."""
    start, end = stage_bounds(layout.stage_layers)[stage]
    tp = 1 if layout.dp_attention else layout.tp
    out: Counter[str] = Counter()
    for layer, times in layer_groups(spec, spec.layers[start:end]):
        for comp, (total, _) in layer_params(spec, layer).items():
            if comp == ATTENTION:
                share = _attention_fraction(spec, layer, tp)
            elif comp in (MAMBA, DENSE_FFN, SHARED_EXPERTS, DENSE_MLP):
                share = 1 / tp
            elif comp == ROUTED_EXPERTS:
                share = local_experts / spec.num_experts if layout.ep > 1 else 1 / tp
            else:  # router, norms, hyper-connections, per-layer input gates: replicated
                share = 1.0
            out[comp] += math.ceil(times * total * share * scheme.bits_for(comp) / 8)
    hashed = hash_table_bytes(spec, spec.layers[start:end])
    if hashed:
        out["hash_routing_tables"] += hashed
    emb = spec.vocab_size * spec.hidden_size
    vocab_split = 1 if layout.dp_attention else layout.tp
    if stage == 0:
        out[EMBEDDING] += math.ceil(emb / vocab_split * scheme.bits_for(EMBEDDING) / 8)
        ple = per_layer_embedding_params(spec)
        if ple:
            out[PER_LAYER_EMBEDDING] += math.ceil(ple / vocab_split * scheme.bits_for(PER_LAYER_EMBEDDING) / 8)
        if spec.vision is not None:
            out[VISION] += math.ceil(vision_params(spec) * scheme.bits_for(VISION) / 8)
    if stage == layout.pp - 1:
        out[NORMS] += math.ceil(norm_params(spec, spec.hidden_size) * scheme.bits_for(NORMS) / 8)
        if spec.hc_mult > 1:
            out[HYPER_CONNECTIONS] += math.ceil(hyper_head_params(spec) * scheme.bits_for(HYPER_CONNECTIONS) / 8)
        if not spec.tie_word_embeddings or layout.pp > 1:
            # Tied weights are still a second copy when the head lives on another stage.
            head = emb + (spec.vocab_size if spec.lm_head_bias else 0)
            out[LM_HEAD] += math.ceil(head / vocab_split * scheme.bits_for(LM_HEAD) / 8)
    return {k: v for k, v in out.items() if v}


def stage_cache(spec: ModelSpec, layout: Layout, stage: int, context: int, batch: int, kv_dtype: str) -> CacheBytes:
    """KV and fixed state on one GPU of `stage` for `batch` sequences of `context` tokens, as the
    engines allocate them (moeplan.kv_cache; DP attention splits the sequences, TP the heads)."""
    start, end = stage_bounds(layout.stage_layers)[stage]
    if layout.dp_attention:
        seqs, tp = math.ceil(batch / layout.ep), 1
    else:
        seqs, tp = batch, layout.tp
    return cache_bytes(spec, context, seqs, kv_dtype, layers=spec.layers[start:end], tp=tp, engine=True)


def stage_kv_bytes(spec: ModelSpec, layout: Layout, stage: int, context: int, batch: int, kv_dtype: str) -> int:
    """All the cache (KV rows and fixed state) on one GPU of `stage`: stage_cache's total."""
    return stage_kv_fn(spec, layout, stage, kv_dtype)(context, batch)


def stage_kv_fn(spec: ModelSpec, layout: Layout, stage: int, kv_dtype: str) -> Callable[[int, int], int]:
    """`(context, batch) -> stage_kv_bytes(...)`, the stage's cache terms gathered once (the fit search
    tries a dozen contexts and batches on every GPU row)."""
    start, end = stage_bounds(layout.stage_layers)[stage]
    tp = 1 if layout.dp_attention else layout.tp
    total = cache_total_fn(spec, kv_dtype, layers=spec.layers[start:end], tp=tp, engine=True)
    if layout.dp_attention:  # as stage_cache: DP attention splits the sequences, TP the heads
        ep = layout.ep
        return lambda context, batch: total(context, math.ceil(batch / ep))
    return total


def stage_activation_bytes(
    spec: ModelSpec, layout: Layout, stage: int, sc: Scenario, context: int, batch: int
) -> int:
    """A prefill chunk's activations on one GPU of `stage`; DP attention splits the chunk, the
    last stage also holds the logits."""
    chunk = min(sc.chunk_tokens, context * batch)
    if layout.dp_attention:
        chunk = math.ceil(chunk / layout.ep)
    tp = 1 if layout.dp_attention else layout.tp
    return activation_bytes(spec, chunk, tp=tp, logits=stage == layout.pp - 1)


def gpu_rows(
    spec: ModelSpec,
    scheme: QuantScheme,
    layout: Layout,
    gpus: tuple[Gpu, ...],
    sc: Scenario,
) -> list[GpuUse]:
    """Per-GPU memory of a layout. GPUs that are the same card, stage and expert share are one row."""
    g = layout.gpus_per_stage
    n = len(gpus)
    rows: dict[tuple[int, str, int], GpuUse] = {}
    counts: Counter[tuple[int, str, int]] = Counter()
    cache: dict[tuple[int, int], tuple[dict[str, int], CacheBytes, int]] = {}
    for i, gpu in enumerate(gpus):
        stage, rank = divmod(i, g)
        local = local_experts(spec, layout, rank, sc)
        row_key = (stage, gpu.name, local)
        counts[row_key] += 1
        if row_key in rows:  # thousands of like GPUs are one row: nothing more to compute
            continue
        key = (stage, local)
        if key not in cache:
            weights = stage_weights(spec, scheme, layout, stage, local)
            held = stage_cache(spec, layout, stage, sc.context, sc.batch, sc.kv_dtype)
            act = stage_activation_bytes(spec, layout, stage, sc, sc.context, sc.batch)
            act += dispatch_buffer_bytes(spec, layout, sc, local)
            cache[key] = (weights, held, act)
        weights, held, act = cache[key]
        kv = held.total
        over = overhead_bytes(n, cuda_graphs=sc.cuda_graphs)
        budget = int(gpu.usable_bytes * sc.mem_fraction)
        w = sum(weights.values())
        used = w + kv + act + over
        rows[row_key] = GpuUse(
            name=gpu.name, index=i, stage=stage, capacity_bytes=gpu.usable_bytes, budget_bytes=budget,
            used_bytes=used, weights_bytes=w, kv_bytes=kv, activation_bytes=act, overhead_bytes=over,
            free_bytes=budget - used, local_experts=local if layout.ep > 1 else spec.num_experts, weights=weights,
            state_bytes=held.state,
        )  # fmt: skip
    return [row if counts[k] == 1 else row.model_copy(update={"count": counts[k]}) for k, row in rows.items()]


def candidate_layouts(spec: ModelSpec, gpus: tuple[Gpu, ...], nodes: int) -> list[Layout]:
    """Every (tp, ep, pp) combination worth checking for this GPU count.

    tp stays inside a node (engines run tensor parallelism over NVLink, not between nodes)."""
    n = len(gpus)
    per_node = n // nodes
    layouts: list[Layout] = []
    for pp in range(1, n + 1):
        if n % pp or pp > spec.num_layers:
            continue
        g = n // pp
        stages = even_stages(spec.num_layers, pp)
        if g <= per_node:
            layouts.append(Layout(tp=g, ep=1, pp=pp, stage_layers=stages))
        if spec.is_moe and g > 1 and g <= spec.num_experts:
            if g <= per_node:
                layouts.append(Layout(tp=g, ep=g, pp=pp, stage_layers=stages))
            layouts.append(Layout(tp=1, ep=g, pp=pp, dp_attention=True, stage_layers=stages))
    return layouts


def uneven_stages(
    spec: ModelSpec, scheme: QuantScheme, layout: Layout, gpus: tuple[Gpu, ...], sc: Scenario
) -> tuple[int, ...] | None:
    """Layers per stage in proportion to what each stage can hold, for cards of different sizes.

    Each stage's room = its smallest GPU's budget less overhead, activations and end-stage extras;
    layers go out in proportion to room (as llama.cpp's --tensor-split does by memory), at least one
    per stage, the remainder to the stages with the most room left."""
    g, pp = layout.gpus_per_stage, layout.pp
    if pp == 1:
        return None
    one = layout.model_copy(update={"pp": 1, "stage_layers": (spec.num_layers,)})
    # Bytes one decoder layer adds on a GPU, averaged over the model's layer mix.
    per_layer = layer_bytes_one_stage(spec, scheme, one, sc) / spec.num_layers
    rooms = []
    for s in range(pp):
        members = gpus[s * g:(s + 1) * g]
        budget = min(int(m.usable_bytes * sc.mem_fraction) for m in members)
        fixed = overhead_bytes(len(gpus), cuda_graphs=sc.cuda_graphs) + activation_bytes(
            spec, min(sc.chunk_tokens, sc.context * sc.batch), tp=layout.tp, logits=s == pp - 1)
        probe = layout.model_copy(update={"stage_layers": (0,) * pp})
        fixed += sum(stage_weights(spec, scheme, probe, s, spec.num_experts).values())
        rooms.append(budget - fixed)
    if min(rooms) <= per_layer or spec.num_layers < pp:
        return None
    total_room = sum(rooms)
    counts = [max(1, int(spec.num_layers * r / total_room)) for r in rooms]
    while sum(counts) > spec.num_layers:
        counts[max(range(pp), key=lambda k: counts[k])] -= 1
    while sum(counts) < spec.num_layers:
        counts[max(range(pp), key=lambda k: rooms[k] - counts[k] * per_layer)] += 1
    stages = tuple(counts)
    return None if stages == layout.stage_layers else stages


def layer_bytes_one_stage(spec: ModelSpec, scheme: QuantScheme, layout: Layout, sc: Scenario) -> int:
    """Decoder-layer weights plus KV on the busiest GPU if all layers sat in one stage."""
    local = local_experts(spec, layout, 0, sc)  # EPLB replicas included, as the even split counts them
    weights = stage_weights(spec, scheme, layout, 0, local)
    layer_w = sum(v for k, v in weights.items() if k not in (EMBEDDING, LM_HEAD, VISION, PER_LAYER_EMBEDDING))
    return layer_w + stage_kv_bytes(spec, layout, 0, sc.context, sc.batch, sc.kv_dtype)
