"""Torch modules for one MoE decoder layer (or a whole model) at a ModelSpec's true dimensions.

Random weights, created directly on the target device in the chosen dtype: the point is the shapes,
the bytes and the kernels, not the outputs. The parameter count of what is built equals
moeplan.params exactly (tests check it on the meta device), so measured weight bytes can be
compared with predicted ones to the byte.

Names follow the transformers modeling files (q_proj, kv_a_proj_with_mqa, ...). Routed experts are
stacked tensors, gate_up (E, H, 2I) and down (E, I, H), as fused-MoE kernels (vLLM, SGLang) and
torchtitan's GroupedExperts hold them, so one grouped GEMM covers all experts.

Shape legend used below:
    B = batch, T = tokens of this call, L = cached tokens attended, H = hidden,
    E = routed experts, K = experts per token, I = expert intermediate size,
    Hq = query heads, Hkv = key/value heads, G = Hq // Hkv, D = head dim,
    R = MLA kv_lora_rank, Dn = qk_nope_head_dim, Dr = qk_rope_head_dim, Dv = v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeplan.errors import MoeplanError
from moeplan.spec import LayerSpec, ModelSpec

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROPE_THETA = 10_000.0  # the spec carries no rope_theta; the value changes no shape or cost
EPS = 1e-6
# SDPA's enable_gqa (torch >= 2.5) attends grouped K/V without copying them per query head.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MoeplanError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# Small pieces: norms, rotary embedding, attention math
# ----------------------------------------------------------------------------------------------


def make_norm(spec: ModelSpec, width: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model's norm kind (params.norm_params counts the same weights)."""
    if spec.norm == "rms":
        return nn.RMSNorm(width, eps=EPS, device=device, dtype=dtype)
    return nn.LayerNorm(width, eps=EPS, bias=spec.norm == "layernorm", device=device, dtype=dtype)


def l2_norm(x: Tensor) -> Tensor:
    """Llama 4's weightless L2Norm on q and k (transformers modeling_llama4.Llama4TextL2Norm)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS).to(x.dtype)


def rope(x: Tensor, positions: Tensor, theta: float = ROPE_THETA) -> Tensor:
    """Rotary embedding (RoFormer, arXiv:2104.09864) in HF Llama's rotate-half layout.

    x: (B, T, heads, d); positions: (T,) absolute positions.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    cos = angles.cos().repeat(1, 2)[None, :, None, :].to(x.dtype)  # (1, T, 1, d)
    sin = angles.sin().repeat(1, 2)[None, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _prefill_mask(t: int, window: int | None, device: torch.device) -> Tensor:
    """(T, T) True where a query may attend: causal, and within the window for sliding layers."""
    q = torch.arange(t, device=device)[:, None]
    k = torch.arange(t, device=device)[None, :]
    keep = k <= q
    if window is not None:
        keep &= q - k < window
    return keep


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None,
           sinks: Tensor | None = None) -> Tensor:  # fmt: skip
    """q (B, Hq, T, Dk), k (B, Hkv, L, Dk), v (B, Hkv, L, Dv) -> (B, Hq, T, Dv).

    T == 1 is a decode step: the query is the newest position and sees every key given (the ring
    buffer cache holds only the window already). T > 1 is a prefill from an empty cache (L == T):
    causal, and windowed on sliding layers.
    """
    b, hq, t, dk = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if sinks is None and t == 1:
        # NOTE: GQA/MQA decode without copying K/V per query head: the G query heads of one group
        # become G "query positions" of that group's single K/V head (the FlashInfer/vLLM trick).
        out = F.scaled_dot_product_attention(q.view(b, hkv, g, dk), k, v, scale=scale)  # (B, Hkv, G, Dv)
        return out.reshape(b, hq, 1, -1)
    window = window if window is not None and window < t else None
    if sinks is None:
        mask = _prefill_mask(t, window, q.device) if window is not None else None
        causal = t > 1 and mask is None
        if g > 1 and _SDPA_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)  # fmt: skip
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    # gpt-oss attention sinks: one learned logit per head joins the softmax and carries no value
    # (transformers modeling_gpt_oss.eager_attention_forward). Written out, since SDPA has no sink.
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, Hq, T, L)
    if t > 1:
        scores = scores.masked_fill(~_prefill_mask(t, window, q.device), float("-inf"))
    sink = sinks.float().view(1, hq, 1, 1).expand(b, hq, t, 1)
    probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """One layer's cache, a ring buffer of `capacity` token slots (Mistral's rotating buffer for
    sliding layers; capacity = all tokens for full attention).

    GQA: k and v, each (B, Hkv, capacity, D). MLA: latent, (B, capacity, R + Dr): the normalised
    compressed c_kv and the shared rope key, what vLLM's and SGLang's MLA backends store, decoded
    in the absorbed form (DeepSeek-V2 paper, arXiv:2405.04434, appendix C).
    """

    capacity: int
    k: Tensor | None = None
    v: Tensor | None = None
    latent: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.latent) if t is not None)

    @property
    def batch(self) -> int:
        t = self.latent if self.latent is not None else self.k
        assert t is not None
        return t.shape[0]

    def slots(self, start: int, count: int, device: torch.device) -> tuple[Tensor, int]:
        """Ring slots for positions start..start+count-1, keeping the last `capacity` of them."""
        keep = min(count, self.capacity)
        positions = torch.arange(start + count - keep, start + count, device=device)
        return positions % self.capacity, keep

    def valid(self, end: int) -> int:
        """Slots holding real tokens once positions < end are written."""
        return min(end, self.capacity)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


class GQAttention(nn.Module):
    """Grouped-query attention with the spec's biases, q/k norm and sinks (params.attention_params)."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = spec.num_attention_heads, spec.num_kv_heads, d
        self.window = layer.window
        self.qk_norm = spec.qk_norm
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=spec.qkv_bias, **kw)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=spec.qkv_bias, **kw)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=spec.qkv_bias, **kw)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=spec.o_bias, **kw)
        # NOTE: Qwen3/GLM-4.5 norm each head (width D); OLMoE norms the whole projection.
        if spec.qk_norm == "per_head":
            self.q_norm = nn.RMSNorm(d, eps=EPS, **kw)
            self.k_norm = nn.RMSNorm(d, eps=EPS, **kw)
        elif spec.qk_norm == "full":
            self.q_norm = nn.RMSNorm(self.n_heads * d, eps=EPS, **kw)
            self.k_norm = nn.RMSNorm(self.n_kv * d, eps=EPS, **kw)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads, **kw)) if spec.attention_sinks else None

    def new_cache(self, batch: int, tokens: int, *, fill: bool) -> KVCache:
        cap = min(tokens, self.window) if self.window else tokens
        shape = (batch, self.n_kv, cap, self.head_dim)
        w = self.o_proj.weight
        k, v = (torch.empty(shape, device=w.device, dtype=w.dtype) for _ in range(2))
        if fill and w.device.type != "meta":
            k.uniform_(-1, 1), v.uniform_(-1, 1)
        return KVCache(capacity=cap, k=k, v=v)

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, Hq*D), (B, T, Hkv*D) x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        positions = torch.arange(start, start + t, device=x.device)
        q, k = rope(q, positions), rope(k, positions)
        if self.qk_norm == "l2":  # Llama 4 normalises after rope
            q, k = l2_norm(q), l2_norm(k)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            assert cache.k is not None and cache.v is not None
            slots, keep = cache.slots(start, t, x.device)
            cache.k.index_copy_(2, slots, k[:, :, t - keep :])
            cache.v.index_copy_(2, slots, v[:, :, t - keep :])
            if t == 1:
                n = cache.valid(start + 1)
                k, v = cache.k[:, :, :n], cache.v[:, :, :n]
            elif start:
                raise ValueError("bench attention prefills from an empty cache only (start 0)")
        out = attend(q, k, v, scale=self.head_dim**-0.5, window=self.window, sinks=self.sinks)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (arXiv:2405.04434 section 2.1; transformers
    modeling_deepseek_v3.DeepseekV3Attention). The cache keeps the latent; decode runs absorbed."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        m = spec.mla
        assert m is not None
        h, nh = spec.hidden_size, spec.num_attention_heads
        self.n_heads, self.r, self.dn, self.dr, self.dv = nh, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        q_out = nh * (self.dn + self.dr)
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=False, **kw)
            self.q_a_layernorm = nn.RMSNorm(m.q_lora_rank, eps=EPS, **kw)
            self.q_b_proj = nn.Linear(m.q_lora_rank, q_out, bias=False, **kw)
        else:  # NOTE: DeepSeek-V2-Lite has no q compression
            self.q_proj = nn.Linear(h, q_out, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.r + self.dr, bias=False, **kw)
        self.kv_a_layernorm = nn.RMSNorm(self.r, eps=EPS, **kw)
        self.kv_b_proj = nn.Linear(self.r, nh * (self.dn + self.dv), bias=False, **kw)
        self.o_proj = nn.Linear(nh * self.dv, h, bias=False, **kw)
        self.scale = (self.dn + self.dr) ** -0.5  # yarn's mscale is left out: it changes no cost

    def new_cache(self, batch: int, tokens: int, *, fill: bool) -> KVCache:
        w = self.o_proj.weight
        latent = torch.empty((batch, tokens, self.r + self.dr), device=w.device, dtype=w.dtype)
        if fill and w.device.type != "meta":
            latent.uniform_(-1, 1)
        return KVCache(capacity=tokens, latent=latent)

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        b, t, _ = x.shape
        nh, r, dn, dr, dv = self.n_heads, self.r, self.dn, self.dr, self.dv
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(b, t, nh, dn + dr).split([dn, dr], dim=-1)  # (B, T, Hq, Dn), (B, T, Hq, Dr)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)  # (B, T, R), (B, T, Dr)
        c_kv = self.kv_a_layernorm(c_kv)
        positions = torch.arange(start, start + t, device=x.device)
        q_pe = rope(q_pe, positions)
        k_pe = rope(k_pe.unsqueeze(2), positions)  # (B, T, 1, Dr): one rope key shared by all heads
        if cache is not None:
            assert cache.latent is not None
            slots, keep = cache.slots(start, t, x.device)
            latent = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1)  # (B, T, R + Dr)
            cache.latent.index_copy_(1, slots, latent[:, t - keep :])
            if t == 1:
                return self._absorbed_decode(q_nope, q_pe, cache.latent[:, : cache.valid(start + 1)])
            if start:
                raise ValueError("bench attention prefills from an empty cache only (start 0)")
        # Prefill: expand the latent to per-head keys and values (vLLM's MLA prefill does the same:
        # compute-bound, so the up-projection is cheaper than attending in the latent space).
        k_nope, v = self.kv_b_proj(c_kv).view(b, t, nh, dn + dv).split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, t, nh, dr)], dim=-1)  # (B, T, Hq, Dn + Dr)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)  # (B, Hq, T, Dv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, nh * dv))

    def _absorbed_decode(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor) -> Tensor:
        """Decode on the latent cache: fold W_UK into q and W_UV after attention, so the step reads
        only (R + Dr) per cached token (DeepSeek-V2 paper appendix C; vLLM MLACommonImpl)."""
        b, nh, r, dn, dv = q_nope.shape[0], self.n_heads, self.r, self.dn, self.dv
        w = self.kv_b_proj.weight.view(nh, dn + dv, r)
        w_uk, w_uv = w[:, :dn], w[:, dn:]  # (Hq, Dn, R), (Hq, Dv, R)
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope[:, 0], w_uk)  # (B, Hq, R)
        q = torch.cat([q_lat, q_pe[:, 0]], dim=-1)[:, :, None]  # (B, Hq, 1, R + Dr)
        kv = latent.unsqueeze(1)  # (B, 1, L, R + Dr): MQA with one latent head
        out = attend(q, kv, kv[..., :r], scale=self.scale)  # (B, Hq, 1, R)
        out = torch.einsum("bhr,hvr->bhv", out[:, :, 0], w_uv)  # (B, Hq, Dv)
        return self.o_proj(out.reshape(b, 1, nh * dv))


# ----------------------------------------------------------------------------------------------
# FFNs: dense SwiGLU, router, stacked routed experts, the MoE block
# ----------------------------------------------------------------------------------------------


class GatedFFN(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and shared experts (params.gated_ffn_params)."""

    def __init__(self, hidden: int, inter: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kw: dict[str, Any] = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: Tensor, *, k: int, scoring: str, norm_topk: bool, scale: float,
          correction: Tensor | None = None, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Router logits (T, E) -> weights (T, K) fp32 and expert ids (T, K).

    softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3, Llama 4) scores; DeepSeek-V3's noaux_tc adds
    the correction bias for choosing only, and weighs with the unbiased score (tech report 2.1.2).
    Group-limited routing (n_group/topk_group) is left out: it changes which experts, not how many.
    ids (T, K): a choice made elsewhere (bench's skewed routing); the top-k still runs, so the step
    runs the same kernels, and the weights are the scores of the given experts.
    """
    scores = logits.float().softmax(dim=-1) if scoring == "softmax" else logits.float().sigmoid()  # (T, E)
    choose = scores + correction.float() if correction is not None else scores
    chosen = choose.topk(k, dim=-1).indices  # (T, K)
    ids = chosen if ids is None else ids
    weights = scores.gather(-1, ids)  # (T, K)
    if norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


class Router(nn.Module):
    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.k, self.scoring = spec.experts_per_token, spec.router_scoring
        self.norm_topk, self.scale = spec.norm_topk_prob, spec.routed_scaling_factor
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias, device=device, dtype=dtype)
        # DeepSeek-V3 e_score_correction_bias is a parameter in the checkpoint (params counts it).
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(spec.num_experts, device=device, dtype=dtype)) if spec.router_correction_bias else None
        )

    def forward(self, x: Tensor, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return route(self.gate(x), k=self.k, scoring=self.scoring, norm_topk=self.norm_topk, scale=self.scale,
                     correction=self.e_score_correction_bias, ids=ids)  # fmt: skip


def sample_routes(q: Tensor, tokens: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """(T, K) expert ids, each token k distinct experts, expert e chosen with probability exactly q[e]
    (sum q = k, each <= 1: moeplan.routing.pick_probs). Systematic sampling (Madow 1949) over a fresh
    random order per token, as moeplan.routing.systematic_pick does it in Python, vectorised on the
    device: with u ~ U(0, 1), expert e is picked when an integer falls in [acc_(e-1) - u, acc_e - u).
    """
    n = q.shape[0]
    dev = q.device
    order = torch.rand(tokens, n, device=dev, generator=generator).argsort(dim=1)  # (T, E): a random order
    qo = q.double()[order]  # (T, E)
    acc = qo.cumsum(dim=1)  # (T, E)
    u = torch.rand(tokens, 1, device=dev, generator=generator, dtype=torch.float64)  # (T, 1)
    before = torch.cat([acc.new_zeros(tokens, 1), acc[:, :-1]], dim=1)  # (T, E): acc_(e-1)
    picked = torch.floor(acc - u) > torch.floor(before - u)  # (T, E): exactly k per row
    slots = picked.to(torch.float32).topk(k, dim=1).indices  # (T, K) positions in `order`
    return order.gather(1, slots)  # (T, K) expert ids


class RoutedExperts(nn.Module):
    """E SwiGLU experts stacked: gate_up (E, H, 2I) = [gate | up], down (E, I, H); gpt-oss biases."""

    def __init__(self, num_experts: int, hidden: int, inter: int, *, bias: bool,
                 device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        # NOTE: shapes (E, H, 2I) and (E, I, H), stored K-major: each expert's matrix is laid out
        # as nn.Linear keeps its weight, (out, in), and viewed transposed (torchtitan's GroupedExperts
        # passes w.transpose(-2, -1) the same way). CPU bf16 GEMMs without AMX only have a fast
        # kernel for that layout (measured on an AVX2 host: 256x4096x2048 over 8 experts, 0.22 s
        # K-major vs 16 s row-major); the CUDA grouped GEMM accepts either.
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, **kw).transpose(1, 2))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inter, **kw).transpose(1, 2))
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * inter, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden, **kw)) if bias else None
        if torch.device(device).type != "meta":
            # nn.Linear's default bound, 1/sqrt(fan_in), keeps activations O(1) through the layer.
            self.gate_up.data.uniform_(-(hidden**-0.5), hidden**-0.5)
            self.down.data.uniform_(-(inter**-0.5), inter**-0.5)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)  # (N, I) each
    return F.silu(gate) * up  # contiguous (N, I): grouped_mm needs 16-byte-aligned row strides


@lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    """Probe torch._grouped_mm once per device and dtype with a tiny call.

    CPU works from torch 2.9 (pytorch PR#161717); CUDA's public API expects bf16 on SM >= 80
    (CUTLASS path on SM90, PR#150374; loop fallback on SM80+, PR#161407). Anything else raises.
    """
    if not hasattr(torch, "_grouped_mm") or device_type == "meta":
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)  # (N, K)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype).transpose(1, 2)  # (G, K, M), K-major like the experts
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        out = torch._grouped_mm(a, b, offs=offs)
        return bool(torch.allclose(out.float(), torch.full((16, 16), 16.0, device=device)))
    except (NotImplementedError, RuntimeError, TypeError):
        return False


def _aligned(*widths: int, element_size: int) -> bool:
    """torch._grouped_mm needs every row stride a multiple of 16 bytes (reference file section 5)."""
    return all(w * element_size % 16 == 0 for w in widths)


def pick_path(x: Tensor, experts: RoutedExperts) -> str:
    hidden, inter = experts.gate_up.shape[1], experts.down.shape[1]
    d = x.device
    if grouped_mm_supported(d.type, d.index, x.dtype) and _aligned(hidden, inter, element_size=x.element_size()):
        return "grouped_mm"
    return "loop"


def expert_counts(flat_ids: Tensor, num_experts: int) -> Tensor:
    """Token copies per expert, (E) int64, computed on the device. NOTE: not torch.bincount, whose
    CUDA kernel reads the input's max back to the host to size its output (a sync that also breaks
    CUDA-graph capture); scatter_add_ into a fixed-size vector needs none."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def experts_forward(x: Tensor, weights: Tensor, ids: Tensor, experts: RoutedExperts,
                    path: str | None = None) -> tuple[Tensor, Tensor, str]:  # fmt: skip
    """Routed experts the way fast engines run them: sort token copies by expert, one grouped GEMM
    per projection over contiguous per-expert row blocks, scatter back weighted by the router.

    x (T, H), weights (T, K), ids (T, K) -> (out (T, H), tokens per expert (E,), path that ran).
    path: "grouped_mm" (torch._grouped_mm) or "loop" (a Python loop over experts with tokens,
    torchtitan's _run_experts_for_loop); None picks grouped_mm where the probe says it works.
    """
    n_experts, k = experts.num_experts, ids.shape[1]
    path = path or pick_path(x, experts)
    flat = ids.flatten()  # (T*K)
    order = flat.argsort(stable=True)  # (T*K): slots grouped by expert
    token_of = order // k  # (T*K): the source token of each sorted slot
    sorted_ids = flat[order]  # (T*K)
    counts = expert_counts(flat, n_experts)  # (E), on the device: no host sync
    xs = x.index_select(0, token_of)  # (T*K, H)
    if path == "grouped_mm":
        offs = counts.cumsum(0).to(torch.int32)  # (E): end row of each expert's block, no host sync
        h = torch._grouped_mm(xs, experts.gate_up, offs=offs)  # (T*K, 2I)
        if experts.gate_up_bias is not None:
            h = h + experts.gate_up_bias[sorted_ids]
        y = torch._grouped_mm(_swiglu(h), experts.down, offs=offs)  # (T*K, H)
        if experts.down_bias is not None:
            y = y + experts.down_bias[sorted_ids]
    elif path == "loop":
        y = torch.empty_like(xs)  # (T*K, H)
        start = 0
        for e, n in enumerate(counts.tolist()):  # host sync: the loop needs Python ints
            if n:
                h = xs[start : start + n] @ experts.gate_up[e]  # (n, 2I)
                if experts.gate_up_bias is not None:
                    h = h + experts.gate_up_bias[e]
                y[start : start + n] = _swiglu(h) @ experts.down[e]  # (n, H)
                if experts.down_bias is not None:
                    y[start : start + n] += experts.down_bias[e]
            start += n
    else:
        raise ValueError(f"MoE path must be 'grouped_mm' or 'loop', got {path!r}")
    y = y * weights.flatten()[order].to(y.dtype)[:, None]  # (T*K, H)
    out = torch.zeros_like(x).index_add_(0, token_of, y)  # (T, H): sum of each token's K experts
    return out, counts, path


def moe_reference(x: Tensor, weights: Tensor, ids: Tensor, experts: RoutedExperts) -> Tensor:
    """Readable reference, the transformers Mixtral block's loop: for each expert, find its tokens,
    run its SwiGLU, add the router-weighted result. x (T, H), weights/ids (T, K) -> (T, H)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(ids == e)  # which tokens chose expert e, and in which top-k slot
        if token.numel() == 0:
            continue
        h = x[token] @ experts.gate_up[e]  # (n, 2I)
        if experts.gate_up_bias is not None:
            h = h + experts.gate_up_bias[e]
        y = _swiglu(h) @ experts.down[e]  # (n, H)
        if experts.down_bias is not None:
            y = y + experts.down_bias[e]
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out


class MoEBlock(nn.Module):
    """Router + routed experts + shared experts (+ Qwen2-MoE's sigmoid shared-expert gate)."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        h = spec.hidden_size
        self.router = Router(spec, device, dtype)
        self.experts = RoutedExperts(spec.num_experts, h, spec.expert_intermediate_size, bias=spec.expert_bias,
                                     device=device, dtype=dtype)  # fmt: skip
        width = spec.shared_expert_intermediate_size
        self.shared_experts = GatedFFN(h, width, device, dtype) if width else None
        self.shared_expert_gate = (
            nn.Linear(h, 1, bias=False, device=device, dtype=dtype) if width and spec.shared_expert_gate else None
        )
        self.path: str | None = None  # None: pick per call; set "grouped_mm"/"loop" to force
        self.last_path = ""
        self.last_counts: Tensor | None = None  # tokens per expert of the last call, (E)
        # Skewed routing (bench --routing): each expert's pick probability (E), and the ids drawn
        # from it for the next step's tokens, (T, K); None: the router's own top-k.
        self.route_q: Tensor | None = None
        self.fixed_ids: Tensor | None = None

    def draw_routes(self, tokens: int, generator: torch.Generator | None = None) -> None:
        """Draw the ids the next call of `tokens` tokens routes to, from route_q (outside any timed
        region: the step then replays the same routing, and its bytes are exactly known)."""
        if self.route_q is not None:
            self.fixed_ids = sample_routes(self.route_q, tokens, self.router.k, generator)

    def routed(self, x: Tensor) -> Tensor:
        """Routed experts only, x (T, H) -> (T, H) (what expert parallel splits across ranks)."""
        fixed = self.fixed_ids
        if fixed is None and self.route_q is not None:
            fixed = sample_routes(self.route_q, x.shape[0], self.router.k)
        elif fixed is not None and fixed.shape[0] != x.shape[0]:
            raise ValueError(f"routes drawn for {fixed.shape[0]} tokens, the step has {x.shape[0]}")
        weights, ids = self.router(x, fixed)  # (T, K) x2
        out, self.last_counts, self.last_path = experts_forward(x, weights, ids, self.experts, self.path)
        return out

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, H), T = B * tokens
        out = self.routed(x)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.view(shape)


# ----------------------------------------------------------------------------------------------
# Decoder layer and model
# ----------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; Grok-1's four norms add post-attention and post-FFN norms."""

    def __init__(self, spec: ModelSpec, index: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        layer = spec.layers[index]
        self.index, self.spec = index, layer
        reason = unbuildable(spec, layer)
        if reason:
            raise MoeplanError(f"bench does not build {reason} (layer {index} of {spec.name}); "
                               "pick attention layers with --start-layer, or plan it with memory/fit/perf")
        h = spec.hidden_size
        self.input_layernorm = make_norm(spec, h, device, dtype)
        self.post_attention_layernorm = make_norm(spec, h, device, dtype)  # HF name: the pre-FFN norm
        self.attn_out_norm = make_norm(spec, h, device, dtype) if spec.norms_per_layer == 4 else None
        self.ffn_out_norm = make_norm(spec, h, device, dtype) if spec.norms_per_layer == 4 else None
        self.self_attn: GQAttention | MLAttention = (
            MLAttention(spec, device, dtype) if spec.attention == "mla" else GQAttention(spec, layer, device, dtype)
        )
        self.mlp: MoEBlock | GatedFFN = (
            MoEBlock(spec, device, dtype) if layer.ffn == "moe" else GatedFFN(h, spec.dense_intermediate_size, device, dtype)
        )

    def forward(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        a = self.self_attn(self.input_layernorm(x), cache, start)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a)
        x = x + a
        f = self.mlp(self.post_attention_layernorm(x))
        if self.ffn_out_norm is not None:
            f = self.ffn_out_norm(f)
        return x + f


class BenchModel(nn.Module):
    """Some decoder layers of a model, or all of it with embedding, final norm and lm_head (full)."""

    def __init__(self, spec: ModelSpec, indices: list[int], *, full: bool, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__()
        self.model_spec, self.indices, self.full = spec, indices, full
        self.layers = nn.ModuleList(DecoderLayer(spec, i, device, dtype) for i in indices)
        self.embed_tokens = self.norm = self.lm_head = None
        if full:
            h, v = spec.hidden_size, spec.vocab_size
            self.embed_tokens = nn.Embedding(v, h, device=device, dtype=dtype)
            self.norm = make_norm(spec, h, device, dtype)
            if not spec.tie_word_embeddings:
                self.lm_head = nn.Linear(h, v, bias=spec.lm_head_bias, device=device, dtype=dtype)

    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        return tuple(self.model_spec.layers[i] for i in self.indices)

    def decoders(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.decoders() if isinstance(layer.mlp, MoEBlock)]

    def new_caches(self, batch: int, tokens: int, *, fill: bool = False) -> list[KVCache]:
        return [layer.self_attn.new_cache(batch, tokens, fill=fill) for layer in self.decoders()]

    def forward(self, x: Tensor, caches: list[KVCache] | None = None, start: int = 0) -> Tensor:
        """x: hidden states (B, T, H), or token ids (B, T) when full. Returns hidden states (B, T, H),
        or when full the logits of each sequence's last token (B, V), as engines compute them."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        for i, layer in enumerate(self.decoders()):
            x = layer(x, caches[i] if caches is not None else None, start)
        if not self.full:
            return x
        assert self.norm is not None and self.embed_tokens is not None
        last = self.norm(x[:, -1])  # (B, H)
        if self.lm_head is not None:
            return self.lm_head(last)  # (B, V)
        return last @ self.embed_tokens.weight.T


def unbuildable(spec: ModelSpec, layer: LayerSpec) -> str | None:
    """What bench's torch layers do not implement in `layer`, or None when it can build it. The
    planner models all of these (moeplan.kv_cache, params); bench builds GQA/MLA MoE layers."""
    if layer.mixer == "mamba":
        return "Mamba mixers"
    if layer.mixer == "linear":
        return "Gated DeltaNet linear attention"
    if spec.attention == "compressed":
        return "DeepSeek-V4 compressed attention"
    if layer.indexer:
        return "DSA indexers"
    if spec.attn_output_gate or layer.k_eq_v or layer.kv_shared or layer.kv_heads or layer.head_dim:
        return "gated, K=V, KV-shared or per-layer-geometry attention"
    if spec.moe_dense_intermediate_size or spec.router_scale or spec.hc_mult > 1 or spec.per_layer_input_size:
        return "Gemma 4 / DeepSeek-V4 layer extras (dense MLP beside experts, router scales, hyper-connections)"
    if spec.norms_per_layer not in (2, 4):
        return f"layers with {spec.norms_per_layer} norms (2 or 4 only)"
    return None


def pick_layers(spec: ModelSpec, n_layers: int, start_layer: int | None = None) -> list[int]:
    """n consecutive layer indices. By default from the first MoE attention layer (DeepSeek's first
    layers are dense), moved back when fewer than n layers follow it."""
    if not 1 <= n_layers <= spec.num_layers:
        raise MoeplanError(f"--layers must be between 1 and {spec.num_layers} for {spec.name}, got {n_layers}")
    if start_layer is None:
        attn = [i for i, layer in enumerate(spec.layers) if unbuildable(spec, layer) is None]
        moe = [i for i in attn if spec.layers[i].ffn == "moe"]
        first = (moe or attn or [0])[0]
        start_layer = min(first, spec.num_layers - n_layers)
    if not 0 <= start_layer <= spec.num_layers - n_layers:
        raise MoeplanError(
            f"layers {start_layer}..{start_layer + n_layers - 1} are outside {spec.name}'s {spec.num_layers} layers"
        )
    return list(range(start_layer, start_layer + n_layers))


def build_layers(spec: ModelSpec, n_layers: int = 1, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device = "cpu", *, start_layer: int | None = None, full: bool = False,
                 seed: int = 0) -> BenchModel:  # fmt: skip
    """Build n decoder layers (or, with full, the whole text model) with random weights, directly
    on `device` in `dtype`. On torch.device("meta") nothing is allocated: use it to count."""
    device = torch.device(device)
    torch.manual_seed(seed)
    indices = list(range(spec.num_layers)) if full else pick_layers(spec, n_layers, start_layer)
    model = BenchModel(spec, indices, full=full, device=device, dtype=torch_dtype(dtype))
    return model.requires_grad_(False).eval()


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
