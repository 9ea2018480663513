"""How a batch's tokens land on experts and on expert-parallel ranks: the expected distinct experts
per rank and the expected load of the busiest rank, which an EP step waits for.

Model (shape legend: E experts, k = top_k, T tokens, R = ep ranks, E_r experts on rank r):
- each token picks k distinct experts; expert e is picked by a token with probability q_e = k p_e,
  where p_e is the expert's share of all picks (uniform: 1/E; skewed routing supplies its own p);
- tokens route independently, so expert e is touched by a batch with 1 - (1 - q_e)^T, and a rank's
  distinct experts are a sum of independent Bernoullis (Poisson-binomial);
- a rank's assignments (token-expert pairs, the FLOPs it runs) are T independent draws of how many
  of a token's k picks land on it; its received tokens (what an all-to-all that sends each token
  once per destination rank moves, as DeepEP does) are T Bernoullis;
- the busiest rank, for small batches (T x k <= 256 picks), is averaged over seeded random batches
  drawn by exactly this process (two ranks, uniform routing: computed exactly instead): ranks are
  far from independent there (Mixtral's 2 picks on 8 ranks of one expert each put exactly 1 on the
  busiest rank, which independent ranks would say is 0.90);
  for larger batches E[max_r X_r] = sum_x (1 - prod_r P(X_r < x)) treats ranks as independent, and
  past 64 expected assignments a rank's load is normal (central limit) and the sum an integral.
Experts sit on ranks in contiguous blocks, E // R each and one more on the first E % R ranks (vLLM
and SGLang's default placement). Tests check every expectation against a direct simulation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from moeplan.record import Record

# Beyond this many expected assignments per rank the normal approximation replaces the exact sums.
_EXACT_LIMIT = 64
# Up to this many picks per step (T x k) the busiest rank is averaged over sampled batches.
_SAMPLE_PICKS = 256
_SAMPLES = 400


class RankLoad(Record):
    """Expected per-rank figures for one MoE layer and one step of T tokens over R ranks."""

    distinct_total: float  # distinct experts the batch touches, over all ranks
    distinct_mean: float  # per rank, averaged over ranks
    distinct_max: float  # on the busiest rank (what its weight reads wait for)
    assignments_mean: float  # token-expert pairs per rank
    assignments_max: float  # on the busiest rank (its expert FLOPs)
    tokens_in_mean: float  # distinct tokens a rank receives (dispatch, once per token and rank)
    tokens_in_max: float


def blocks(num_experts: int, ranks: int) -> list[range]:
    """Expert ids on each rank: contiguous, the first E % R ranks one more."""
    out, start = [], 0
    for r in range(ranks):
        n = num_experts // ranks + (1 if r < num_experts % ranks else 0)
        out.append(range(start, start + n))
        start += n
    return out


def pick_probs(probs: Sequence[float] | None, num_experts: int, top_k: int) -> list[float]:
    """q_e: the probability one token picks expert e, k x its share of picks. A token picks an expert
    at most once, so no q exceeds 1: shares above 1/k are capped there and the excess spread over the
    others in proportion (water-filling), keeping k picks per token."""
    if probs is None:
        return [top_k / num_experts] * num_experts
    total = sum(probs)
    q = [top_k * p / total for p in probs]
    for _ in range(num_experts):
        over = [i for i, x in enumerate(q) if x > 1.0]
        if not over:
            break
        excess = sum(q[i] - 1.0 for i in over)
        for i in over:
            q[i] = 1.0
        free = sum(x for x in q if x < 1.0)
        if free <= 0:
            break
        q = [x if x >= 1.0 else x + excess * x / free for x in q]
    return [min(x, 1.0) for x in q]


def _poisson_binomial(ps: Sequence[float]) -> list[float]:
    """P(sum = n) for independent Bernoullis with probabilities ps."""
    pmf = [1.0]
    for p in ps:
        nxt = [0.0] * (len(pmf) + 1)
        for n, mass in enumerate(pmf):
            nxt[n] += mass * (1 - p)
            nxt[n + 1] += mass * p
        pmf = nxt
    return pmf


def _expected_max_discrete(pmfs: list[tuple[list[float], int]]) -> float:
    """E[max] of independent variables on 0..n given (pmf, how many ranks share it)."""
    cdfs = []
    for pmf, count in pmfs:
        acc, cdf = 0.0, []
        for mass in pmf:
            acc += mass
            cdf.append(min(acc, 1.0))
        cdfs.append((cdf, count))
    top = max(len(c) for c, _ in cdfs)
    total = 0.0
    for x in range(1, top):
        below = 1.0
        for cdf, count in cdfs:
            below *= (cdf[x - 1] if x - 1 < len(cdf) else 1.0) ** count
        total += 1 - below
    return total


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _expected_max_normal(moments: list[tuple[float, float, int]]) -> float:
    """E[max] of independent normal loads (mean, variance, count), floored at 0."""
    hi = max(m + 8 * math.sqrt(v) for m, v, _ in moments) + 1
    steps = 400
    dx = hi / steps
    total = 0.0
    erf, root2 = math.erf, math.sqrt(2)
    spread = [(m, math.sqrt(v) if v > 0 else 0.0, count) for m, v, count in moments]  # each sqrt once
    for i in range(steps):
        x = (i + 0.5) * dx
        below = 1.0
        for m, sd, count in spread:  # _phi inlined: the same operations, so the same figures to the bit
            below *= (0.5 * (1 + erf((x - m) / sd / root2))) ** count if sd > 0 else (1.0 if x >= m else 0.0)
        total += (1 - below) * dx
    return total


def _per_token_hits(q_rank: Sequence[float], top_k: int) -> list[float]:
    """P(j of one token's k picks land on a rank), j = 0..k, from the picks' probabilities there.

    Picks are without replacement: for uniform routing this is the hypergeometric law; for skewed
    routing the rank's share f = sum q / k stands in for E_r / E."""
    f = min(1.0, sum(q_rank) / top_k)
    n_exp = len(q_rank)
    if n_exp == 0 or f == 0:
        return [1.0]
    # Hypergeometric with an effective population: E' = n_exp / f experts, n_exp on this rank.
    pop = n_exp / f
    out = []
    for j in range(min(top_k, n_exp) + 1):
        out.append(_hyper(pop, n_exp, top_k, j))
    s = sum(out)
    return [p / s for p in out]


def _hyper(pop: float, good: int, draws: int, j: int) -> float:
    """P(j good in `draws` draws without replacement), population `pop` (may be fractional)."""
    def lchoose(n: float, r: int) -> float:
        if r < 0 or r > n:
            return -math.inf
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    bad = pop - good
    if draws - j > bad + 1e-9:
        return 0.0
    value = lchoose(good, j) + lchoose(bad, draws - j) - lchoose(pop, draws)
    return math.exp(value) if value > -math.inf else 0.0


def rank_load(
    num_experts: int, top_k: int, tokens: float, ranks: int, probs: Sequence[float] | None = None,
    redundant: int = 0,
) -> RankLoad:
    """The expected per-rank and busiest-rank loads of one MoE layer for `tokens` tokens.

    `probs`: each expert's share of routed picks (uniform when None); skewed routing passes its own.
    `redundant`: replicas of the hottest experts placed to balance the ranks (eplb_placement)."""
    if probs is None and redundant == 0:
        return _uniform_rank_load(num_experts, top_k, round(tokens), ranks)
    q = pick_probs(probs, num_experts, top_k)
    if redundant:
        q, placement = eplb_placement(q, ranks, redundant)
    else:
        placement = [list(r) for r in blocks(num_experts, max(ranks, 1))]
    return _rank_load(q, top_k, tokens, placement)


@lru_cache(maxsize=4096)
def _uniform_rank_load(num_experts: int, top_k: int, tokens: int, ranks: int) -> RankLoad:
    placement = [list(r) for r in blocks(num_experts, max(ranks, 1))]
    return _rank_load(pick_probs(None, num_experts, top_k), top_k, tokens, placement)


def eplb_placement(q: Sequence[float], ranks: int, redundant: int) -> tuple[list[float], list[list[int]]]:
    """DeepSeek EPLB-style balancing (deepseek-ai/EPLB): `redundant` extra replicas go one at a time to
    the expert whose replicas carry the most load each; each replica takes an equal share of its
    expert's picks. Replicas are then placed hottest first on the least-loaded rank that has a free
    slot and does not hold that expert yet (slots per rank: ceil((E + N) / ranks)). Returns the
    per-token pick probability of every replica and the replica ids on each rank."""
    replicas = [1] * len(q)
    for _ in range(redundant):
        e = max(range(len(q)), key=lambda i: q[i] / replicas[i])
        replicas[e] += 1
    virtual = [(e, q[e] / replicas[e]) for e in range(len(q)) for _ in range(replicas[e])]
    order = sorted(range(len(virtual)), key=lambda i: -virtual[i][1])
    slots = -(-len(virtual) // max(ranks, 1))
    load = [0.0] * ranks
    held: list[set[int]] = [set() for _ in range(ranks)]
    placement: list[list[int]] = [[] for _ in range(ranks)]
    for i in order:
        e, w = virtual[i]
        free = [r for r in range(ranks) if len(placement[r]) < slots and e not in held[r]]
        free = free or [r for r in range(ranks) if len(placement[r]) < slots]
        r = min(free, key=lambda x: load[x])
        placement[r].append(i)
        held[r].add(e)
        load[r] += w
    return [w for _, w in virtual], placement


def _rank_load(q: list[float], top_k: int, tokens: float, placement: list[list[int]]) -> RankLoad:
    t = max(tokens, 0.0)
    ranks = len(placement)
    touched = [1 - (1 - qe) ** t for qe in q]
    # Ranks with the same experts' probabilities share their distributions: compute each once.
    groups: Counter[tuple[float, ...]] = Counter(tuple(sorted(round(q[e], 12) for e in rng)) for rng in placement)
    touch_probs, assign_stats, token_stats = [], [], []
    for q_rank, count in groups.items():
        touch_probs.append(([1 - (1 - qe) ** t for qe in q_rank], count))
        hits = _per_token_hits(q_rank, top_k)
        mean1 = sum(j * p for j, p in enumerate(hits))
        var1 = sum(j * j * p for j, p in enumerate(hits)) - mean1**2
        assign_stats.append((hits, mean1, var1, count))
        p_in = 1 - hits[0]
        token_stats.append((p_in, count))
    n = sum(c for _, c in groups.items())
    distinct_mean = sum(touched) / n
    assignments_mean = sum(m * t * c for _, m, _, c in assign_stats) / n
    tokens_in_mean = sum(p * t * c for p, c in token_stats) / n
    sampled = ranks > 1 and float(t).is_integer() and 0 < t * top_k <= _SAMPLE_PICKS
    # The busiest rank's distinct experts from each rank's Poisson-binomial pmf, where the sampled
    # figure does not replace it (one rank: all of them). The pmf costs O(E_r^2): 256 experts on one
    # rank is most of a DeepSeek fit, so it is only built where it is read.
    if ranks > 1 and not sampled:
        distinct_max = _expected_max_discrete([(_poisson_binomial(ps), c) for ps, c in touch_probs])
    else:
        distinct_max = sum(touched)
    if ranks <= 1:
        assign_max, tokens_max = assignments_mean, tokens_in_mean
    elif sampled:
        distinct_max, assign_max, tokens_max = _sampled_max(q, top_k, int(t), placement)
    elif max(m * t for _, m, _, _ in assign_stats) <= _EXACT_LIMIT and float(t).is_integer():
        assign_max = _expected_max_discrete([(_convolve_power(h, int(t)), c) for h, _, _, c in assign_stats])
        tokens_max = _expected_max_discrete([(_binomial(int(t), p), c) for p, c in token_stats])
    else:
        assign_max = _expected_max_normal([(m * t, v * t, c) for _, m, v, c in assign_stats])
        tokens_max = _expected_max_normal([(p * t, p * (1 - p) * t, c) for p, c in token_stats])
    return RankLoad(
        distinct_total=sum(touched), distinct_mean=distinct_mean, distinct_max=distinct_max,
        assignments_mean=assignments_mean, assignments_max=max(assign_max, assignments_mean),
        tokens_in_mean=tokens_in_mean, tokens_in_max=max(tokens_max, tokens_in_mean),
    )  # fmt: skip


def _sampled_max(q: list[float], top_k: int, tokens: int, placement: list[list[int]]) -> tuple[float, float, float]:
    """E[max over ranks] of distinct experts, assignments and received tokens, averaged over _SAMPLES
    batches drawn as the model says (k distinct experts per token, expert e with weight q_e), seeded
    so every call gives the same figure. Uniform routing over two ranks is computed exactly instead
    (_two_ranks_uniform: the same expectations, without the sampling noise, at ~1/15 the cost)."""
    import random

    uniform = max(q) - min(q) < 1e-12
    if uniform and len(placement) == 2 and 0 < top_k <= len(q):
        return _two_ranks_uniform(len(q), top_k, tokens, len(placement[0]))
    rnd = random.Random(1234)
    owner = [0] * len(q)
    for r, rng in enumerate(placement):
        for e in rng:
            owner[e] = r
    if uniform and 0 < top_k <= len(q) and _fast_sample_matches():
        return _sampled_max_uniform(len(q), top_k, tokens, owner, len(placement))
    experts = range(len(q))
    sums = [0.0, 0.0, 0.0]
    for _ in range(_SAMPLES):
        touched: set[int] = set()
        assign = [0] * len(placement)
        hits = [0] * len(placement)
        for _ in range(tokens):
            picks = rnd.sample(experts, top_k) if uniform else systematic_pick(q, rnd)
            ranks_hit = set()
            for e in picks:
                touched.add(e)
                assign[owner[e]] += 1
                ranks_hit.add(owner[e])
            for r in ranks_hit:
                hits[r] += 1
        distinct = [0] * len(placement)
        for e in touched:
            distinct[owner[e]] += 1
        sums[0] += max(distinct)
        sums[1] += max(assign)
        sums[2] += max(hits)
    return sums[0] / _SAMPLES, sums[1] / _SAMPLES, sums[2] / _SAMPLES


def _hyper_pmf(total: int, good: int, draws: int) -> list[float]:
    """P(a of the `good` among `draws` drawn without replacement from `total`), a = 0..draws."""
    out = [0.0] * (draws + 1)
    ways = math.comb(total, draws)
    for a in range(max(0, draws - (total - good)), min(good, draws) + 1):
        out[a] = math.comb(good, a) * math.comb(total - good, draws - a) / ways
    return out


def _two_ranks_uniform(n: int, k: int, tokens: int, n0: int) -> tuple[float, float, float]:
    """_sampled_max's three figures for uniform routing over two ranks (n0 experts on the first),
    exactly, not sampled. Two ranks are the one case with a short exact form:
    - distinct: the law of the set of touched experts is unchanged by relabelling experts, so given
      its size m it is a uniform m-subset and the first rank holds Hypergeometric(n, n0, m) of it;
      m itself follows a chain over tokens (a token's k picks add Hypergeometric(n, n - m, k) new);
    - assignments: the first rank's count is a sum of T per-token Hypergeometric(n, n0, k) draws and
      the second's is T k minus it;
    - received tokens: a token reaches only the first rank (all k picks there), only the second, or
      both; the busiest receives the "both" tokens plus the larger of the two one-rank counts.
    tests/test_routing_offload.py checks these against the sampler and a direct simulation."""
    t = tokens
    reach = min(n, t * k)
    new = [_hyper_pmf(n, n - m, k) for m in range(reach + 1)]  # new experts a token adds, m touched
    size = [1.0]
    for _ in range(t):
        nxt = [0.0] * min(reach + 1, len(size) + k)
        for m, mass in enumerate(size):
            if mass:
                for j, p in enumerate(new[m]):
                    if p:
                        nxt[m + j] += mass * p
        size = nxt
    distinct = sum(mass * sum(p * max(a, m - a) for a, p in enumerate(_hyper_pmf(n, n0, m)))
                   for m, mass in enumerate(size) if mass)
    per_token = _hyper_pmf(n, n0, k)
    assign = sum(p * max(a, t * k - a) for a, p in enumerate(_convolve_power(per_token, t)))
    only_second, only_first = per_token[0], per_token[k]
    one_rank = only_first + only_second
    received = t * (1 - one_rank)
    if one_rank > 0:
        first = only_first / one_rank
        for m, mass in enumerate(_binomial(t, one_rank)):
            if mass > 1e-300:
                received += mass * sum(p * max(x, m - x) for x, p in enumerate(_binomial(m, first)))
    return distinct, assign, received


class _MTWords:
    """The 32-bit outputs of random.Random(seed) in order, each kept shifted right by the shifts asked
    for. getrandbits(32 x N) returns the next N outputs, output i at bits 32i..32i+31, so they are
    drawn in blocks; a shift of 24 or more needs only each output's top byte, which bytes.translate
    shifts at C speed."""

    def __init__(self, seed: int, shifts: Sequence[int]) -> None:
        import random

        self._rnd = random.Random(seed)
        self._shifts = sorted(set(shifts))
        self.by_shift: dict[int, bytearray | list[int]] = {
            sh: bytearray() if sh >= 24 else [] for sh in self._shifts}
        self.size = 0

    def grow(self, count: int) -> None:
        import struct

        raw = self._rnd.getrandbits(32 * count).to_bytes(4 * count, "little")
        top = raw[3::4]
        words = struct.unpack(f"<{count}I", raw) if any(sh < 24 for sh in self._shifts) else ()
        for sh in self._shifts:
            if sh >= 24:
                self.by_shift[sh] += top.translate(bytes(b >> (sh - 24) for b in range(256)))  # type: ignore[operator]
            else:
                self.by_shift[sh] += [w >> sh for w in words]  # type: ignore[operator]
        self.size += count


def _sample_setsize(k: int) -> int:
    """random.sample's rule: a pool list when the population is at most this, else a set of picks."""
    return 21 + (4 ** math.ceil(math.log(k * 3, 4)) if k > 5 else 0)


def _uniform_picks(n: int, k: int, seed: int, count: int) -> list[int]:
    """`count` calls of random.Random(seed).sample(range(n), k), concatenated: the same picks in the
    same order, without a method call per pick (fit samples 7,200 tokens at Mixtral's capacity batch).

    CPython's sample draws each index with _randbelow(m): getrandbits(m.bit_length()) until below m,
    and getrandbits(b <= 32) is one output shifted right by 32 - b. Populations up to _sample_setsize
    take the pool path (the pick's slot is refilled from the end of the pool), larger ones the set
    path (a repeat is drawn again), as sample does. _fast_sample_matches checks this against
    random.sample itself."""
    pool_path = n <= _sample_setsize(k)
    sizes = [n - i for i in range(k)] if pool_path else [n]
    shifts = [32 - m.bit_length() for m in sizes]
    words = _MTWords(seed, shifts)
    # Outputs one token uses on average (a draw below m takes 2^bits / m tries), with a margin; a
    # token that runs past them is redrawn after more are drawn.
    per_token = sum((1 << m.bit_length()) / m for m in sizes) if pool_path else k * (1 << n.bit_length()) / (n - k)
    words.grow(int(count * per_token * 1.1) + 64)
    out: list[int] = []
    pos = 0
    while len(out) < count * k:
        pos, done = _draw_tokens(words, n, k, pool_path, shifts, pos, count - len(out) // k, out)
        if not done:
            words.grow(4096)
    return out


def _draw_tokens(words: _MTWords, n: int, k: int, pool_path: bool, shifts: list[int], pos: int, tokens: int,
                 out: list[int]) -> tuple[int, bool]:
    """_uniform_picks' loop: up to `tokens` samples appended to `out` from output `pos` on; returns
    the next output and whether all were drawn (False: the outputs ran out at a token, which is left
    undrawn)."""
    per = [words.by_shift[sh] for sh in shifts]
    append = out.append
    if pool_path and k == 2:  # Mixtral, Grok, Jamba, Phi-3.5: after one pick the pool is known
        first, second = per
        last = n - 1
        for _ in range(tokens):
            start = pos
            try:
                j = first[pos]
                pos += 1
                while j >= n:
                    j = first[pos]
                    pos += 1
                i = second[pos]
                pos += 1
                while i >= last:
                    i = second[pos]
                    pos += 1
            except IndexError:
                return start, False
            append(j)
            append(last if i == j else i)  # pool[j] took the last expert's place
        return pos, True
    for _ in range(tokens):
        start = pos
        picks: list[int] = []
        try:
            if pool_path:
                pool = list(range(n))
                for step in range(k):
                    vals, m = per[step], n - step
                    j = vals[pos]
                    pos += 1
                    while j >= m:
                        j = vals[pos]
                        pos += 1
                    picks.append(pool[j])
                    pool[j] = pool[m - 1]
            else:
                vals = per[0]
                for _ in range(k):
                    j = vals[pos]
                    pos += 1
                    while j >= n or j in picks:
                        j = vals[pos]
                        pos += 1
                    picks.append(j)
        except IndexError:
            return start, False
        out += picks
    return pos, True


@lru_cache(maxsize=1)
def _fast_sample_matches() -> bool:
    """Does _uniform_picks reproduce random.sample on this Python (every path)? Where it does not
    (another Python's random), _sampled_max keeps calling random.sample."""
    import random

    for n, k in ((8, 2), (16, 4), (256, 8)):
        rnd = random.Random(1234)
        want = [e for _ in range(20) for e in rnd.sample(range(n), k)]
        if _uniform_picks(n, k, 1234, 20) != want:
            return False
    return True


def _sampled_max_uniform(n: int, k: int, tokens: int, owner: list[int], ranks: int) -> tuple[float, float, float]:
    """_sampled_max for uniform routing, the same figures from the same draws (_uniform_picks), counted
    without a set per token."""
    picks = _uniform_picks(n, k, 1234, _SAMPLES * tokens)
    sums = [0.0, 0.0, 0.0]
    per_sample = tokens * k
    for s in range(_SAMPLES):
        seen = bytearray(n)
        distinct = [0] * ranks
        assign = [0] * ranks
        hits = [0] * ranks
        base = s * per_sample
        if k == 2:
            for p in range(base, base + per_sample, 2):
                a, b = picks[p], picks[p + 1]
                ra, rb = owner[a], owner[b]
                if not seen[a]:
                    seen[a] = 1
                    distinct[ra] += 1
                if not seen[b]:
                    seen[b] = 1
                    distinct[rb] += 1
                assign[ra] += 1
                assign[rb] += 1
                hits[ra] += 1
                if rb != ra:
                    hits[rb] += 1
        else:
            for p in range(base, base + per_sample, k):
                hit = set()
                for e in picks[p:p + k]:
                    r = owner[e]
                    if not seen[e]:
                        seen[e] = 1
                        distinct[r] += 1
                    assign[r] += 1
                    hit.add(r)
                for r in hit:
                    hits[r] += 1
        sums[0] += max(distinct)
        sums[1] += max(assign)
        sums[2] += max(hits)
    return sums[0] / _SAMPLES, sums[1] / _SAMPLES, sums[2] / _SAMPLES


def systematic_pick(q: Sequence[float], rnd: object) -> list[int]:
    """k distinct experts with inclusion probabilities exactly q (sum q = k, each <= 1): systematic
    sampling (Madow) over a freshly shuffled order, so no fixed pattern of neighbours is favoured."""
    order = list(range(len(q)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    u = rnd.random()  # type: ignore[attr-defined]
    picks, acc, nxt = [], 0.0, u
    for e in order:
        acc += q[e]
        while acc > nxt:
            picks.append(e)
            nxt += 1.0
    return picks


def _convolve_power(pmf: list[float], times: int) -> list[float]:
    """The pmf of a sum of `times` independent draws from `pmf` (binary powering)."""
    result = [1.0]
    base = pmf
    while times:
        if times & 1:
            result = _convolve(result, base)
        times >>= 1
        if times:
            base = _convolve(base, base)
    return result


def _convolve(a: list[float], b: list[float]) -> list[float]:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x < 1e-15:
            continue
        for j, y in enumerate(b):
            out[i + j] += x * y
    return out


def _binomial(n: int, p: float) -> list[float]:
    return [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]


# ----------------------------------------------------------------------------------------------
# Routing input: `--routing uniform | zipf:S | FILE`
# ----------------------------------------------------------------------------------------------

MAX_ROUTING_FILE_BYTES = 16 * 2**20


class Routing(Record):
    """Each expert's share of routed picks, per MoE layer (None: uniform). `label` says where it came from."""

    label: str = "uniform"
    per_layer: tuple[tuple[float, ...], ...] | None = None  # one tuple of E shares per MoE layer

    @property
    def uniform(self) -> bool:
        return self.per_layer is None

    def layer(self, i: int) -> tuple[float, ...] | None:
        """The shares of MoE layer i (cycling when the file has fewer layers than the model)."""
        if self.per_layer is None:
            return None
        return self.per_layer[i % len(self.per_layer)]

    def mean(self) -> tuple[float, ...] | None:
        """The shares averaged over layers (what a one-layer step cost uses)."""
        if self.per_layer is None:
            return None
        n = len(self.per_layer)
        return tuple(sum(layer[e] for layer in self.per_layer) / n for e in range(len(self.per_layer[0])))


def zipf_shares(num_experts: int, exponent: float, seed: int = 0) -> tuple[float, ...]:
    """Zipf shares p ~ 1 / rank^s, the ranks placed on expert ids by a fixed shuffle (seed 0), so hot
    experts land on ranks as they happen to in a trained model rather than all on the first rank."""
    import random

    weights = [1 / (r + 1) ** exponent for r in range(num_experts)]
    total = sum(weights)
    order = list(range(num_experts))
    random.Random(seed).shuffle(order)
    shares = [0.0] * num_experts
    for rank, expert in enumerate(order):
        shares[expert] = weights[rank] / total
    return tuple(shares)


def parse_routing(text: str | None, num_experts: int, num_moe_layers: int) -> Routing:
    """`uniform`, `zipf:S` (S >= 0) or a file of per-layer expert frequencies (JSON or CSV).

    JSON: a list of E numbers (every layer alike), a list of such lists (one per MoE layer), or
    {"layers": [...]} / {"<layer>": [...]} as engines' expert-distribution recorders write. CSV: one
    row of E numbers per MoE layer (a header row of names is skipped). Frequencies are counts or
    shares; each layer is normalised."""
    from moeplan.errors import MoeplanError

    if text is None or text.strip().lower() in ("", "uniform"):
        return Routing()
    value = text.strip()
    if value.lower().startswith("zipf:"):
        try:
            s = float(value.split(":", 1)[1])
        except ValueError:
            raise MoeplanError(f"--routing {value!r}: write zipf:S with a number S, e.g. zipf:1.0") from None
        if not math.isfinite(s) or s < 0 or s > 10:
            raise MoeplanError(f"--routing {value!r}: the Zipf exponent must be between 0 and 10")
        return Routing(label=f"zipf:{s:g}", per_layer=(zipf_shares(num_experts, s),))
    layers = _read_routing_file(value)
    if not layers:
        raise MoeplanError(f"--routing {value}: no expert frequencies in the file")
    if len(layers) not in (1, num_moe_layers):
        raise MoeplanError(f"--routing {value}: {len(layers)} layers of frequencies for {num_moe_layers} MoE layers; "
                           "give one row per MoE layer, or one for all")
    out = []
    for i, row in enumerate(layers):
        if len(row) != num_experts:
            raise MoeplanError(f"--routing {value}: layer {i} has {len(row)} expert frequencies, the model has "
                               f"{num_experts} experts")
        if any(not math.isfinite(x) or x < 0 for x in row):
            raise MoeplanError(f"--routing {value}: layer {i} has a negative or non-finite frequency")
        top = max(row)
        if top <= 0:
            raise MoeplanError(f"--routing {value}: layer {i} has no routed tokens (all frequencies zero)")
        row = [x / top for x in row]  # by the largest first: 1e308 twice is finite, its sum is not
        total = sum(row)
        shares = tuple(x / total for x in row)
        if min(x for x in shares if x > 0) < 1e-300:  # shares so small they underflow in the load model
            raise MoeplanError(f"--routing {value}: layer {i}'s frequencies span more than 1e300; give counts or "
                               "shares of a sane range")
        out.append(shares)
    return Routing(label=value, per_layer=tuple(out))


def _read_routing_file(path_text: str) -> list[list[float]]:
    import csv
    import io

    from moeplan.errors import MoeplanError

    from moeplan.safeio import check_path_text, expand_user, loads_json, read_text

    check_path_text(path_text, "--routing")
    path = expand_user(path_text, "--routing")
    if not path.exists():
        raise MoeplanError(f"--routing {path_text}: not uniform, zipf:S or a readable file")
    text = read_text(path, what="--routing file", max_bytes=MAX_ROUTING_FILE_BYTES)

    def numbers(row: object) -> list[float]:
        if not isinstance(row, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                and math.isfinite(x) for x in row):
            raise MoeplanError(f"--routing {path_text}: each layer must be a list of finite numbers")
        return [float(x) for x in row]

    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{"):
        data = loads_json(text, f"--routing {path_text}")
        if isinstance(data, dict):  # {"layers": [...]} or {"0": [...], "1": [...]} keyed by layer
            def layer_key(k: str) -> int:
                return int(k) if k.isascii() and k.isdigit() and len(k) < 8 else 0  # "²" is a digit to isdigit()

            data = data.get("layers", [data[k] for k in sorted(data, key=layer_key)])
        if isinstance(data, list) and data and not isinstance(data[0], list):
            return [numbers(data)]
        if not isinstance(data, list):
            raise MoeplanError(f"--routing {path_text}: expected a list of frequencies per layer")
        return [numbers(row) for row in data]
    rows: list[list[float]] = []
    seen_header = False
    # Errors name the line, never its text: a file pointed at by a spec could hold anything (a secret
    # echoed into a CI annotation), and only its numbers are moeplan's business.
    reader = csv.reader(io.StringIO(text))
    records = []
    try:
        records = list(reader)
    except csv.Error as exc:  # a field past the csv module's 131,072-character limit, a NUL byte
        raise MoeplanError(f"--routing {path_text}: line {reader.line_num} cannot be read as CSV ({exc}); give "
                           "one row of comma-separated frequencies per MoE layer") from None
    for line_num, record in enumerate(records, 1):
        cells = [c.strip() for c in record if c.strip()]
        if not cells:
            continue
        try:
            values = [float(c) for c in cells]
            if not all(math.isfinite(v) for v in values):
                raise MoeplanError(f"--routing {path_text}: line {line_num} has a value that is not finite")
            rows.append(values)
        except ValueError:
            if rows or seen_header:  # one header row is allowed, and only first
                raise MoeplanError(f"--routing {path_text}: line {line_num} is not comma-separated numbers "
                                   "(one row of expert frequencies per MoE layer)") from None
            seen_header = True
    return rows


def expert_capacity(capacity_factor: float, tokens: float, num_experts: int, top_k: int) -> int:
    """Per-expert token budget (GShard, arXiv:2006.16668; Switch Transformer, arXiv:2101.03961):
    capacity = ceil(C x tokens x k / E)."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def drop_fraction(num_experts: int, top_k: int, tokens: int, capacity_factor: float,
                  probs: Sequence[float] | None = None) -> float:
    """Expected share of token-expert assignments over budget (dropped, or rerouted) in one layer:
    sum_e E[(L_e - capacity)+] / (tokens x k), with expert e's load L_e ~ Binomial(tokens, q_e).
    vLLM and SGLang inference enforce no capacity: this applies only where a factor is set."""
    from moeplan.errors import MoeplanError

    if not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise MoeplanError(f"--capacity-factor must be above 0, got {capacity_factor}")
    if tokens <= 0:
        return 0.0
    cap = expert_capacity(capacity_factor, tokens, num_experts, top_k)
    over = 0.0
    for qe in pick_probs(probs, num_experts, top_k):
        over += _expected_excess(tokens, qe, cap)
    return over / (tokens * top_k)


def _expected_excess(n: int, p: float, cap: int) -> float:
    """E[(X - cap)+] for X ~ Binomial(n, p): exact below 4096 trials, else the normal approximation."""
    if p <= 0 or cap >= n:
        return 0.0
    if n <= 4096:
        mean = n * p
        # E[(X-c)+] = E[X] - c + E[(c-X)+], the last term a short sum over x < c.
        below = 0.0
        log_p, log_q = math.log(p), math.log1p(-p) if p < 1 else -math.inf
        for x in range(0, cap):
            if p >= 1:
                break
            lpmf = math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * log_p + (n - x) * log_q
            below += (cap - x) * math.exp(lpmf)
        return max(0.0, mean - cap + below)
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    if sd == 0:
        return max(0.0, mean - cap)
    z = (cap - mean) / sd
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return sd * pdf + (mean - cap) * (1 - _phi(z))
