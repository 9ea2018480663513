"""Expert parallel MoE with torch.distributed: N processes, each holding E/N experts.

One step, per rank (the scheme of DeepSeek's EP and torchtitan's expert_parallel, with plain
all-to-alls instead of DeepEP):
  1. route the rank's own tokens with the replicated router and sort the token copies by expert;
  2. exchange per-rank copy counts with all_to_all_single on a count tensor;
  3. dispatch: all_to_all_single the copies (and their local expert ids) with those split sizes;
  4. run the local experts on what arrived (grouped GEMM, as layers.experts_forward);
  5. combine: the reverse all_to_all_single, then weight by the router and sum per token.
nccl on CUDA (one GPU per rank), gloo on CPU: gloo implements all_to_all_single (pytorch
PR#41424), so the logic is tested in CI without a GPU.
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

from moeplan.bench.layers import MoEBlock, RoutedExperts, experts_forward, route, torch_dtype
from moeplan.errors import MoeplanError
from moeplan.spec import ModelSpec

# Shape legend: T = this rank's tokens, K = top-k, H = hidden, E = experts, N = ranks,
# S = copies this rank sends (T*K), V = copies it receives.


@dataclass
class EpResult:
    ranks: int
    experts_per_rank: list[int]
    tokens: int  # tokens over all ranks
    dispatch_s: float  # median over repeats of the slowest rank: counts + token all-to-all
    combine_s: float  # reverse all-to-all + weighted sum
    experts_s: float  # local expert GEMMs
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


def ep_forward(x: Tensor, weights: Tensor, ids: Tensor, local: RoutedExperts, *, first_expert: int,
               owner: Tensor, ranks: int, path: str | None = None) -> tuple[Tensor, dict[str, float], str]:  # fmt: skip
    """One EP step on this rank. x (T, H), weights/ids (T, K) from the replicated router; `owner`
    (E,) maps each global expert to its rank. Returns (out (T, H), seconds per phase, MoE path)."""
    device, k, h = x.device, ids.shape[1], x.shape[1]
    times: dict[str, float] = {}

    _sync(device)
    t0 = time.perf_counter()
    flat = ids.flatten()  # (S)
    order = flat.argsort(stable=True)  # (S): copies grouped by expert, hence by owning rank
    token_of = order // k  # (S)
    sorted_ids = flat[order]  # (S)
    send_counts = torch.bincount(owner[sorted_ids], minlength=ranks)  # (N)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)  # each rank learns what it will receive
    send, recv = send_counts.tolist(), recv_counts.tolist()  # host sync: the collective needs sizes
    xs = x.index_select(0, token_of)  # (S, H)
    recv_x = x.new_empty(sum(recv), h)  # (V, H)
    dist.all_to_all_single(recv_x, xs, output_split_sizes=recv, input_split_sizes=send)
    # The receiver needs each copy's expert: send the global id, made local on arrival.
    recv_ids = torch.empty(sum(recv), dtype=sorted_ids.dtype, device=device)  # (V)
    dist.all_to_all_single(recv_ids, sorted_ids, output_split_sizes=recv, input_split_sizes=send)
    _sync(device)
    t1 = time.perf_counter()

    # Local experts: every copy has router weight 1 here; the sender weighs on combine.
    ones = torch.ones(recv_ids.shape[0], 1, device=device)
    y, _, ran = experts_forward(recv_x, ones, (recv_ids - first_expert)[:, None], local, path)  # (V, H)
    _sync(device)
    t2 = time.perf_counter()

    back = x.new_empty(xs.shape)  # (S, H)
    dist.all_to_all_single(back, y, output_split_sizes=send, input_split_sizes=recv)
    back = back * weights.flatten()[order].to(back.dtype)[:, None]
    out = torch.zeros_like(x).index_add_(0, token_of, back)  # (T, H)
    _sync(device)
    t3 = time.perf_counter()
    times.update(dispatch_s=t1 - t0, experts_s=t2 - t1, combine_s=t3 - t2)
    return out, times, ran


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
        owner = torch.repeat_interleave(torch.arange(ranks), torch.tensor(split)).to(device)  # (E)
        w: dict[str, Any] | None = job["weights"]
        torch.manual_seed(job["seed"])  # same router and tokens on every rank when random
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
        else:
            g = torch.Generator(device="cpu").manual_seed(job["seed"])
            router_w = (torch.rand(spec.num_experts, spec.hidden_size, generator=g) - 0.5).to(device, dtype)
            router_b = correction = None
        if job["x"] is not None:  # tokens split across ranks, uneven allowed (a rank may hold none)
            x = job["x"].tensor_split(ranks)[rank].to(device, dtype)
        else:
            x = torch.randn(job["tokens_per_rank"], spec.hidden_size, device=device, dtype=dtype)
        logits = torch.nn.functional.linear(x, router_w, router_b)
        weights, ids = route(logits, correction=correction, **_router_kwargs(spec))
        samples: dict[str, list[float]] = {"dispatch_s": [], "experts_s": [], "combine_s": []}
        out, ran = x, ""
        for i in range(job["warmup"] + job["repeats"]):
            dist.barrier()
            out, times, ran = ep_forward(x, weights, ids, local, first_expert=first, owner=owner, ranks=ranks)
            if i >= job["warmup"]:
                for key, value in times.items():
                    samples[key].append(value)
        job["times"][rank] = torch.tensor([statistics.median(samples[k]) for k in ("dispatch_s", "experts_s", "combine_s")],
                                          dtype=torch.float64)  # fmt: skip
        job["paths"][rank] = 1 if ran == "grouped_mm" else 0
        if job["out"] is not None:
            lo = sum(t.shape[0] for t in job["x"].tensor_split(ranks)[:rank])
            job["out"][lo : lo + out.shape[0]] = out.float().cpu()
    finally:
        dist.destroy_process_group()


def run_ep(spec: ModelSpec, *, ep: int, dtype: str = "fp32", device: str = "cpu", x: Tensor | None = None,
           block: MoEBlock | None = None, tokens_per_rank: int = 1, repeats: int = 3, warmup: int = 1,
           seed: int = 0) -> EpResult:  # fmt: skip
    """Run the routed experts of one MoE layer on `ep` processes and time dispatch and combine.

    x (T, H): tokens to split across ranks (output returned, to compare with one process); else each
    rank routes `tokens_per_rank` random tokens. block: take router and expert weights from this
    MoEBlock (on CPU); else each rank makes random weights for its own experts only.
    """
    if not spec.is_moe:
        raise MoeplanError(f"{spec.name} has no MoE layers: expert parallel needs experts")
    split = expert_split(spec.num_experts, ep)
    if device == "cuda" and torch.cuda.device_count() < ep:
        raise MoeplanError(f"ep={ep} needs {ep} CUDA GPUs (one per rank), found {torch.cuda.device_count()}")
    if device not in ("cpu", "cuda"):
        raise MoeplanError(f"expert parallel runs on cpu (gloo) or cuda (nccl), not {device}")
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
        spec=spec, dtype=dtype, device=device, split=split, weights=weights, seed=seed,
        x=None if x is None else x.detach().cpu(), tokens_per_rank=tokens_per_rank, repeats=repeats, warmup=warmup,
        out=out, times=torch.zeros(ep, 3, dtype=torch.float64).share_memory_(),
        paths=torch.zeros(ep, dtype=torch.int64).share_memory_(),
    )  # fmt: skip
    mp.spawn(_worker, args=(ep, free_port(), job), nprocs=ep, join=True)
    slowest = job["times"].max(dim=0).values.tolist()  # a step ends when the slowest rank ends
    return EpResult(
        ranks=ep, experts_per_rank=split, tokens=x.shape[0] if x is not None else tokens_per_rank * ep,
        dispatch_s=slowest[0], experts_s=slowest[1], combine_s=slowest[2],
        output=None if out is None else out.to(x.dtype if x is not None else torch.float32),
        path="grouped_mm" if bool(job["paths"].all()) else "loop",
    )  # fmt: skip
