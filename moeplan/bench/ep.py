"""Expert parallel MoE with torch.distributed: N processes, each holding E/N experts.

One step, per rank (the scheme of DeepSeek's EP and torchtitan's expert_parallel, with plain
all-to-alls instead of DeepEP):
  1. route the rank's own tokens (its own seed: ranks hold different tokens, as data-parallel
     attention gives them) with the replicated router, and sort the token copies by expert;
  2. layout: exchange per-expert copy counts (one all_to_all_single of E integers) and bring the
     split sizes to the host, which all_to_all_single needs (DeepEP folds this into its kernels;
     the planner charges no time for it, so it is timed apart);
  3. dispatch: one all_to_all_single of the token copies, timed alone;
  4. run the local experts on what arrived, grouped by expert (grouped GEMM, as layers.experts_forward);
  5. combine: the reverse all_to_all_single, timed alone; then weight by the router and sum per token.
Dispatch and combine are the two all-to-alls moeplan.perf models (ep_alltoall_seconds). nccl on CUDA
(one GPU per rank), gloo on CPU: gloo implements all_to_all_single (pytorch PR#41424), so the logic
is tested in CI without a GPU.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from moeplan.bench.layers import (
    MoEBlock, RoutedExperts, expert_counts, experts_forward, route, sample_routes, torch_dtype,
)  # fmt: skip
from moeplan.errors import MoeplanError
from moeplan.spec import ModelSpec

# Shape legend: T = this rank's tokens, K = top-k, H = hidden, E = experts, N = ranks,
# El = this rank's experts, S = copies this rank sends (T*K), V = copies it receives.
PHASES = ("layout_s", "dispatch_s", "experts_s", "combine_s")


@dataclass
class EpResult:
    ranks: int
    experts_per_rank: list[int]
    tokens: int  # tokens over all ranks
    # medians over repeats of the slowest rank, per phase:
    layout_s: float  # count exchange + split sizes to the host (not modelled by the planner)
    dispatch_s: float  # the token all-to-all alone
    experts_s: float  # local expert GEMMs, grouping and the weighted sum
    combine_s: float  # the reverse all-to-all alone
    received: list[int]  # token copies each rank received (its expert assignments)
    output: Tensor | None = None  # (T_total, H) on CPU, when the caller passed x
    path: str = ""


def expert_split(num_experts: int, ranks: int) -> list[int]:
    """Experts per rank, contiguous blocks; the first E % N ranks hold one more (uneven split)."""
    if ranks < 1 or ranks > num_experts:
        raise MoeplanError(f"ep must be between 1 and num_experts ({num_experts}), got {ranks}")
    base, extra = divmod(num_experts, ranks)
    return [base + (r < extra) for r in range(ranks)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ready(device: torch.device) -> float:
    """All ranks at the same point with their queues empty: the clock starts for all alike."""
    _sync(device)
    dist.barrier()
    _sync(device)
    return time.perf_counter()


def ep_forward(x: Tensor, weights: Tensor, ids: Tensor, local: RoutedExperts, *, split: list[int], rank: int,
               path: str | None = None) -> tuple[Tensor, dict[str, float], str, int]:  # fmt: skip
    """One EP step on this rank. x (T, H), weights/ids (T, K) from the replicated router; `split` is
    experts per rank (contiguous blocks). Returns (out (T, H), seconds per phase, MoE path, copies
    this rank received)."""
    device, k, h = x.device, ids.shape[1], x.shape[1]
    ranks, n_experts, n_local = len(split), sum(split), split[rank]
    times: dict[str, float] = {}

    t0 = _ready(device)
    flat = ids.flatten()  # (S)
    order = flat.argsort(stable=True)  # (S): copies grouped by expert, hence by owning rank
    token_of = order // k  # (S)
    counts = expert_counts(flat, n_experts)  # (E): copies per global expert, owners in order
    recv_counts = counts.new_empty(ranks * n_local)  # (N * El): from each rank, per local expert
    dist.all_to_all_single(recv_counts, counts, output_split_sizes=[n_local] * ranks, input_split_sizes=split)
    send_n = torch.stack([c.sum() for c in counts.split(split)])  # (N)
    recv_n = recv_counts.view(ranks, n_local).sum(1)  # (N)
    sizes = torch.cat([send_n, recv_n]).tolist()  # host sync: the collective needs split sizes
    send, recv = sizes[:ranks], sizes[ranks:]
    # Each arriving block (one per source rank) is sorted by expert: its local expert ids follow
    # from the counts, and one stable sort groups all arrivals by expert for the grouped GEMM.
    local_ids = torch.arange(n_local, device=device).repeat(ranks).repeat_interleave(recv_counts, output_size=sum(recv))
    group = local_ids.argsort(stable=True)  # (V)
    xs = x.index_select(0, token_of)  # (S, H)
    recv_x = x.new_empty(sum(recv), h)  # (V, H)
    t1 = _ready(device)
    dist.all_to_all_single(recv_x, xs, output_split_sizes=recv, input_split_sizes=send)
    _sync(device)
    t2 = time.perf_counter()

    # Local experts: every copy has router weight 1 here; the sender weighs on combine.
    ones = torch.ones(group.shape[0], 1, device=device)
    y_grouped, _, ran = experts_forward(recv_x[group], ones, local_ids[group][:, None], local, path)  # (V, H)
    y = torch.empty_like(y_grouped).index_copy_(0, group, y_grouped)  # back in arrival order
    back = x.new_empty(xs.shape)  # (S, H)
    t3 = _ready(device)
    dist.all_to_all_single(back, y, output_split_sizes=send, input_split_sizes=recv)
    _sync(device)
    t4 = time.perf_counter()
    back = back * weights.flatten()[order].to(back.dtype)[:, None]
    out = torch.zeros_like(x).index_add_(0, token_of, back)  # (T, H)
    _sync(device)
    t5 = time.perf_counter()
    times.update(layout_s=t1 - t0, dispatch_s=t2 - t1, experts_s=(t3 - t2) + (t5 - t4), combine_s=t4 - t3)
    return out, times, ran, int(sum(recv))


def _router_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return dict(k=spec.experts_per_token, scoring=spec.router_scoring, norm_topk=spec.norm_topk_prob,
                scale=spec.routed_scaling_factor)  # fmt: skip


def _worker(rank: int, ranks: int, port: int, job: dict[str, Any]) -> None:
    """One rank. `job` carries the spec, sizes, optional weights and x, and shared result tensors."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    cuda = job["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))  # ranks share the cores
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=ranks)
    try:
        spec: ModelSpec = job["spec"]
        dtype = torch_dtype(job["dtype"])
        split = job["split"]
        first = sum(split[:rank])
        w: dict[str, Any] | None = job["weights"]
        torch.manual_seed(job["seed"] + 1 + rank)  # each rank its own tokens and expert weights
        local = RoutedExperts(split[rank], spec.hidden_size, spec.expert_intermediate_size, bias=spec.expert_bias,
                              device=device, dtype=dtype)  # fmt: skip
        if w is not None:  # the caller's weights: this rank's slice of them
            local.gate_up.data.copy_(w["gate_up"][first : first + split[rank]])
            local.down.data.copy_(w["down"][first : first + split[rank]])
            for name in ("gate_up_bias", "down_bias"):
                if getattr(local, name) is not None and w.get(name) is not None:
                    getattr(local, name).data.copy_(w[name][first : first + split[rank]])
            router_w = w["router"].to(device, dtype)
            router_b = w["router_bias"].to(device, dtype) if w.get("router_bias") is not None else None
            correction = w["correction"].to(device) if w.get("correction") is not None else None
        else:  # the router is replicated: the same seed on every rank
            g = torch.Generator(device="cpu").manual_seed(job["seed"])
            router_w = (torch.rand(spec.num_experts, spec.hidden_size, generator=g) - 0.5).to(device, dtype)
            router_b = correction = None
        if job["x"] is not None:  # tokens split across ranks, uneven allowed (a rank may hold none)
            x = job["x"].tensor_split(ranks)[rank].to(device, dtype)
        else:
            x = torch.randn(job["tokens_per_rank"], spec.hidden_size, device=device, dtype=dtype)
        fixed = None
        if job["route_q"] is not None:  # skewed routing: this rank's draw from the shared distribution
            gen = torch.Generator(device=device).manual_seed(job["seed"] + 1000 + rank)
            q = torch.tensor(job["route_q"], dtype=torch.float64, device=device)
            fixed = sample_routes(q, x.shape[0], spec.experts_per_token, gen)
        logits = torch.nn.functional.linear(x, router_w, router_b)
        weights, ids = route(logits, correction=correction, ids=fixed, **_router_kwargs(spec))
        samples: dict[str, list[float]] = {key: [] for key in PHASES}
        out, ran, received = x, "", 0
        for i in range(job["warmup"] + job["repeats"]):
            out, times, ran, received = ep_forward(x, weights, ids, local, split=split, rank=rank)
            if i >= job["warmup"]:
                for key, value in times.items():
                    samples[key].append(value)
        job["times"][rank] = torch.tensor([statistics.median(samples[key]) for key in PHASES], dtype=torch.float64)
        job["paths"][rank] = 1 if ran == "grouped_mm" else 0
        job["received"][rank] = received
        if job["out"] is not None:
            lo = sum(t.shape[0] for t in job["x"].tensor_split(ranks)[:rank])
            job["out"][lo : lo + out.shape[0]] = out.float().cpu()
    finally:
        dist.destroy_process_group()


def run_ep(spec: ModelSpec, *, ep: int, dtype: str = "fp32", device: str = "cpu", x: Tensor | None = None,
           block: MoEBlock | None = None, tokens_per_rank: int = 1, repeats: int = 3, warmup: int = 1,
           seed: int = 0, route_q: list[float] | None = None) -> EpResult:  # fmt: skip
    """Run the routed experts of one MoE layer on `ep` processes and time its phases.

    x (T, H): tokens to split across ranks (output returned, to compare with one process); else each
    rank routes `tokens_per_rank` random tokens of its own. block: take router and expert weights from
    this MoEBlock (on CPU); else each rank makes random weights for its own experts only. route_q:
    each expert's pick probability (skewed routing) instead of the router's top-k.
    """
    if not spec.is_moe:
        raise MoeplanError(f"{spec.name} has no MoE layers: expert parallel needs experts")
    if device not in ("cpu", "cuda"):
        raise MoeplanError(f"expert parallel runs on cpu (gloo) or cuda (nccl), not {device}")
    if device == "cuda" and torch.cuda.device_count() < ep:
        raise MoeplanError(f"--ep {ep} needs {ep} CUDA GPUs (one per rank), found {torch.cuda.device_count()}")
    split = expert_split(spec.num_experts, ep)
    weights = None
    if block is not None:
        e = block.experts
        weights = {
            "gate_up": e.gate_up.detach().cpu(), "down": e.down.detach().cpu(),
            "gate_up_bias": None if e.gate_up_bias is None else e.gate_up_bias.detach().cpu(),
            "down_bias": None if e.down_bias is None else e.down_bias.detach().cpu(),
            "router": block.router.gate.weight.detach().cpu(),
            "router_bias": None if block.router.gate.bias is None else block.router.gate.bias.detach().cpu(),
            "correction": None if block.router.e_score_correction_bias is None
            else block.router.e_score_correction_bias.detach().cpu(),
        }  # fmt: skip
    out = torch.zeros(x.shape[0], x.shape[1]).share_memory_() if x is not None else None
    job: dict[str, Any] = dict(
        spec=spec, dtype=dtype, device=device, split=split, weights=weights, seed=seed, route_q=route_q,
        x=None if x is None else x.detach().cpu(), tokens_per_rank=tokens_per_rank, repeats=repeats, warmup=warmup,
        out=out, times=torch.zeros(ep, len(PHASES), dtype=torch.float64).share_memory_(),
        paths=torch.zeros(ep, dtype=torch.int64).share_memory_(),
        received=torch.zeros(ep, dtype=torch.int64).share_memory_(),
    )  # fmt: skip
    mp.spawn(_worker, args=(ep, free_port(), job), nprocs=ep, join=True)
    slowest = dict(zip(PHASES, job["times"].max(dim=0).values.tolist()))  # a step ends when the slowest rank ends
    return EpResult(
        ranks=ep, experts_per_rank=split, tokens=x.shape[0] if x is not None else tokens_per_rank * ep,
        layout_s=slowest["layout_s"], dispatch_s=slowest["dispatch_s"], experts_s=slowest["experts_s"],
        combine_s=slowest["combine_s"], received=[int(v) for v in job["received"].tolist()],
        output=None if out is None else out.to(x.dtype if x is not None else torch.float32),
        path="grouped_mm" if bool(job["paths"].all()) else "loop",
    )  # fmt: skip
