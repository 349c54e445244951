"""Exact multi-index hashing (Norouzi, Punjani & Fleet, TPAMI 2014).

Each code is cut into ``m`` disjoint bit substrings and every substring gets
its own table.  If two codes are within Hamming distance ``r``, at least one
substring is within ``r // m`` (pigeonhole), so a query only has to look at
the table buckets near its own substrings.

Search order and stopping rule (our formulation).  Passes ``(s, j)`` run for
``s = 0, 1, 2, ...`` and, inside, ``j = 0 .. m-1``: pass ``(s, j)`` visits
every bucket of table ``j`` whose key is at distance exactly ``s`` from the
query's substring ``j``.  After pass ``(s, j)`` a code not yet seen has
substring distance ``>= s+1`` on substrings ``0..j`` and ``>= s`` on the rest,
so its full distance is ``>= m*s + j + 1``: every code within ``m*s + j`` has
been seen.  k-NN stops as soon as the k-th best distance is ``<= m*s + j``.

A code is seen once per table; it is taken only at its first pass, i.e. the
smallest ``(substring distance, j)``, which needs no visited set: the other
substring distances come from the full XOR computed anyway.  Candidates meet
a max-heap on ``(distance, position)`` and enter if strictly smaller than
its root, so ties come out in position order exactly as in
:class:`~hashindex.search.LinearScan`.

Tables are compact CSR arrays: per table, the positions (ids) and a copy of
the full codes in bucket order (so a bucket's candidates are contiguous
memory), plus either a dense offset array indexed by the key (when the key
space is at most a few times N) or the sorted distinct keys with their
offsets (binary search).

A single query deals each large pass out to all threads (private heaps,
capped by the k-th best so far and merged after the pass); batches run one
query per thread.

A query whose search would touch more table entries than half the database
(heavily duplicated data, very large ``k`` or radius) falls back to the
linear scan, which gives identical results.

When it pays: the cost grows with the k-th distance relative to the code
length.  Measured with k=10, single queries (2-core AMD EPYC, bench/search_speed.py):
at 64 bits and 10M random codes 5x our linear scan and 30x faiss
IndexBinaryFlat (100M: 9x and 54x); on learned codes, whose neighbours are
closer, 14x and 78x at 10M and 1.5x the scan already at 1M. At 1M random
codes, or at 128 bits, the (AVX-512) linear scan is faster.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property

import numba
import numpy as np
from numba import njit, prange

from . import _bitops
from ._bitops import _U0, _U1, _U63, _U64, _USENT, _greater, _heapsort, _sift_down, popcount64, prefetch
from .search import (LinearScan, empty_result, empty_result_radius, _check_codes, _check_k, _check_queries,
                     _check_radius)

__all__ = ["MultiIndexHashing", "Plan", "default_m", "plan"]

logger = logging.getLogger(__name__)

_PREFETCH = 16  # buckets looked up (and prefetched) ahead of scanning them
_PREFETCH_LINES = 2  # 64-byte lines prefetched per bucket (then the hardware streams)
_U8 = np.uint64(8)

# Longest substring: keys are enumerated with 64-bit masks.
_MAX_SUBSTRING_BITS = 32
# Dense offset table when the key space is at most this many times N.
_DENSE_FACTOR = 4
# Per query, give up (and use the linear scan) after touching this many
# table entries and buckets, as a multiple of N: an entry reached through a
# random bucket access costs a few times a linearly scanned one.
_FALLBACK_FRACTION = 0.5


def default_m(bits: int, n: int) -> int:
    """Number of substrings for ``n`` codes of ``bits`` bits.

    Norouzi et al. suggest substrings of ~log2(n) bits (one code per bucket).
    Our tables hold a copy of the codes, so streaming through a bucket is cheap
    and each bucket visit (a random memory access) is what costs: substrings
    of ~log2(n) - 10 bits (buckets of ~1000 codes) measured fastest here
    (64-bit random codes: m=5 at 10M, m=6 at 1M; m=3 was 10x slower).
    Clamped to substrings of 4..32 bits.
    """
    length = min(float(_MAX_SUBSTRING_BITS), max(4.0, math.log2(max(n, 2)) - 10.0))
    m = max(1, round(bits / length), -(-bits // _MAX_SUBSTRING_BITS))
    return int(min(bits, m))


# Per-query cost model of one k-NN query (2 threads), fitted to single-query runs on 10M random
# 64-bit codes at m=4 and m=5 on this 2-core machine: a bucket visit is a random memory access
# (~0.28 µs), an entry streamed through a bucket costs ~1.3 ns per 64-bit word, and the linear scan
# ~0.23 ns per word of the database. Checked against measured m sweeps (random and learned codes,
# 10M x 64 bits): it ranks m right to within ~15% of the best, absolute times within 2x.
SECONDS_PER_BUCKET = 2.8e-7
SECONDS_PER_ENTRY_WORD = 1.3e-9
SCAN_SECONDS_PER_WORD = 2.3e-10


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` found: the best ``m`` and the estimated seconds per single query of MIH
    with ``m`` tables and of the linear scan (``costs`` holds the estimate for every ``m`` tried)."""

    m: int
    seconds: float
    scan_seconds: float
    costs: dict = field(default_factory=dict, repr=False)

    @property
    def speedup(self) -> float:
        """Estimated linear-scan time over MIH time per query (> 1: MIH is worth building)."""
        return self.scan_seconds / self.seconds


def plan(codes: np.ndarray, queries: np.ndarray, kth_distances, *, sample_rows: int = 8192,
         seed: int = 0) -> Plan:
    """Choose ``m`` for these codes and queries like these, and estimate whether MIH pays.

    ``kth_distances``: each query's k-th nearest distance (from a scan that answered it). A query
    of radius r runs the passes up to ``(r // m, r % m)`` (module docstring), so its cost is the
    buckets those passes visit and the entries in them; the entries are counted on a sample of
    ``sample_rows`` database rows, which is what makes the choice data-aware: learned codes, whose
    neighbours are close and whose substrings are skewed, want fewer, longer substrings than
    random codes (10M x 64 bits: m=3-4 against m=5).
    """
    codes = _check_codes(codes, "codes")
    queries = _check_queries(queries, codes.shape[1])
    radii = np.asarray(kth_distances, dtype=np.int64).reshape(-1)
    if queries.shape[0] == 0 or radii.shape[0] != queries.shape[0]:
        raise ValueError(f"plan needs at least one query and one k-th distance per query, got "
                         f"{queries.shape[0]} queries and {radii.shape[0]} distances")
    n, bits = codes.shape[0], 8 * codes.shape[1]
    words = _bitops.words_per_code(codes.shape[1])
    rng = np.random.default_rng(seed)
    rows = codes[np.sort(rng.choice(n, min(n, sample_rows), replace=False))]
    scale = n / rows.shape[0]
    # cumulative[q, r, b]: differing bits among the first b bits (the words' bit order) of
    # query q against sample row r; a substring's distance is a difference of two columns
    lo_m, hi_m = -(-bits // _MAX_SUBSTRING_BITS), max(-(-bits // _MAX_SUBSTRING_BITS), bits // 4)
    ms = list(range(lo_m, hi_m + 1))
    entries = {m: np.zeros(queries.shape[0]) for m in ms}
    for q0 in range(0, queries.shape[0], 4):  # 4 queries at a time bound the memory
        q = queries[q0:q0 + 4]
        diff = np.unpackbits(q[:, None, :] ^ rows[None], axis=2, bitorder="little")
        cumulative = np.zeros(diff.shape[:2] + (bits + 1,), dtype=np.int16)
        np.cumsum(diff, axis=2, out=cumulative[:, :, 1:])
        del diff
        r = radii[q0:q0 + 4]
        for m in ms:
            starts, lens = _substrings(bits, m)
            sub = cumulative[:, :, starts + lens] - cumulative[:, :, starts]       # [q, row, m]
            deepest = _deepest_pass(r, m)                                          # [q, m]
            entries[m][q0:q0 + 4] = (sub <= deepest[:, None, :]).sum(axis=(1, 2)) * scale
    scan_seconds = SCAN_SECONDS_PER_WORD * n * words
    costs = {}
    for m in ms:
        _, lens = _substrings(bits, m)
        deepest = _deepest_pass(radii, m)
        # within[j, s + 1]: buckets at key distance <= s in table j, a sum of C(l, i), at most n
        within = np.zeros((m, bits + 2))
        for j, length in enumerate(lens):
            within[j, 1:] = np.minimum(np.cumsum([math.comb(int(length), i) for i in range(bits + 1)]), n)
        buckets = within[np.arange(m)[None, :], np.clip(deepest + 1, 0, bits + 1)].sum(axis=1)
        seconds = SECONDS_PER_BUCKET * buckets + SECONDS_PER_ENTRY_WORD * words * entries[m]
        # past _FALLBACK_FRACTION of the database a query gives up and scans
        seconds = np.minimum(seconds, SECONDS_PER_ENTRY_WORD * words * _FALLBACK_FRACTION * n + scan_seconds)
        costs[m] = float(seconds.mean())
    best = min(costs, key=costs.get)
    return Plan(m=best, seconds=costs[best], scan_seconds=scan_seconds, costs=costs)


def _deepest_pass(radii: np.ndarray, m: int) -> np.ndarray:
    """[q, m]: the largest key distance probed in each table by a k-NN query whose k-th distance is
    r: it stops after pass (r // m, r % m), so tables j <= r % m reach r // m, the rest one less."""
    return (radii // m)[:, None] - (np.arange(m)[None, :] > (radii % m)[:, None])


def _substrings(bits: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit ranges [start, start+len) of the m substrings; lengths differ by <= 1."""
    lens = np.full(m, bits // m, dtype=np.int64)
    lens[: bits % m] += 1
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return starts, lens


def _extract_np(words: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits [start, start+length) of each row of uint64 [N, W] words as uint64 keys."""
    w, sh = divmod(start, 64)
    key = words[:, w] >> np.uint64(sh)
    if sh + length > 64:
        key = key | (words[:, w + 1] << np.uint64(64 - sh))
    return key & np.uint64((1 << length) - 1)


def _masks(starts, lens, nwords) -> np.ndarray:
    """uint64 [m, W]: mask_j selects the bits of substring j."""
    bits = np.zeros((len(starts), nwords * 64), dtype=bool)
    for j, (a, n) in enumerate(zip(starts, lens)):
        bits[j, a:a + n] = True
    # bit b of word w is global bit 64*w + b
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    return (bits.reshape(len(starts), nwords, 64) * weights).sum(-1, dtype=np.uint64)


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------


@njit(cache=True)
def _counting_sort_scatter(words, key, off, ctab, itab):
    """Rows into their buckets: row i goes to the next free slot of bucket ``key[i]`` (bucket b
    spans ``off[b]:off[b+1]``). Rows are taken in order, so ids ascend inside each bucket, the
    tie order the search relies on."""
    fill = off[:-1].copy()
    for i in range(words.shape[0]):
        b = key[i]
        p = fill[b]
        fill[b] = p + 1
        ctab[p, :] = words[i, :]
        itab[p] = i


@njit(cache=True)
def _extract(q, start, length):
    w = start >> np.uint64(6)
    sh = start & _U63
    key = q[w] >> sh
    if sh + length > _U64:
        key |= q[w + _U1] << (_U64 - sh)
    return key & ((_U1 << length) - _U1)


@njit(cache=True)
def _lookup(j, key, dense, direct, direct_base, keys, key_base, nkeys, starts_, n):
    """Entry range [lo, hi) of bucket ``key`` in table j (absolute indices)."""
    tbase = np.uint64(j) * n
    if dense[j]:
        b = direct_base[j] + key
        return tbase + np.uint64(direct[b]), tbase + np.uint64(direct[b + _U1])
    lo = key_base[j]
    hi = lo + nkeys[j]
    while lo < hi:  # first key >= key
        mid = (lo + hi) >> _U1
        if keys[mid] < key:
            lo = mid + _U1
        else:
            hi = mid
    if lo < key_base[j] + nkeys[j] and keys[lo] == key:
        return tbase + np.uint64(starts_[lo + np.uint64(j)]), tbase + np.uint64(starts_[lo + np.uint64(j) + _U1])
    return tbase, tbase


@njit(cache=True)
def _next_combination(v):
    """Next larger integer with the same popcount (Gosper's hack)."""
    c = v & (~v + _U1)
    r = v + c
    return (((r ^ v) >> np.uint64(2)) // c) | r


@njit(cache=True)
def _binom(n, k):
    """C(n, k) for n <= 64 (exact in uint64 for the n <= 32 used here)."""
    if k > n:
        return _U0
    k = min(k, n - k)
    r = _U1
    for i in range(k):
        r = r * (n - np.uint64(i)) // (np.uint64(i) + _U1)
    return r


@njit(cache=True)
def _distance(ctab, w, p, q):
    base = p * w
    d = _U0
    for ww in range(w):
        d += popcount64(ctab[base + ww] ^ q[ww])
    return d


@njit(cache=True)
def _bucket_min(ctab, w, lo, hi, q):
    m = _USENT
    if w == _U1:
        q0 = q[0]
        for p in range(lo, hi):
            m = min(m, popcount64(ctab[p] ^ q0))
    else:
        for p in range(lo, hi):
            m = min(m, _distance(ctab, w, p, q))
    return m


@njit(cache=True)
def _first_seen_here(ctab, w, p, q, masks, j, s):
    """True if the entry at p, found in table j at substring distance s, is at
    its first pass: no table j2 < j within s, no table j2 > j within s - 1."""
    m = masks.shape[0]
    base = p * w
    for j2 in range(m):
        if j2 == j:
            continue
        d2 = _U0
        for ww in range(w):
            d2 += popcount64((ctab[base + ww] ^ q[ww]) & masks[j2, ww])
        if j2 < j:
            if d2 <= s:
                return False
        elif d2 < s:
            return False
    return True


@njit(cache=True)
def _probe(ctab, itab, w, lo, hi, q, masks, j, s, bound, hd, hi_, k, collect_d, collect_i, ncollect, capd, capi,
           acc):
    """Visit bucket entries [lo, hi).

    k-NN mode (``bound`` < 0): offer first-seen entries to the heap; they must
    also beat ``(capd, capi)``, the k-th best known elsewhere (parallel passes).
    Radius mode: count (and store when ``collect_d`` is non-empty) first-seen
    entries within ``bound``; returns the updated count.
    """
    if lo == hi:
        return ncollect
    limit = min(hd[0], capd) if bound < 0 else np.uint64(bound)
    if w == _U1:
        # Runs of 64 entries: their distances in one vectorised pass (into acc), then only the
        # entries within the limit, if any, get the scalar work. Until the heap has settled most
        # runs hold such an entry, so keeping the distances matters as much as the minimum.
        q0 = q[0]
        p0 = lo
        while p0 < hi:
            p1 = min(p0 + _U64, hi)
            m = _U64
            if p1 - p0 == _U64:
                for jj in range(_U64):  # constant trip count: fully vectorised
                    d = popcount64(ctab[p0 + jj] ^ q0)
                    acc[jj] = d
                    m = min(m, d)
            else:
                for jj in range(p1 - p0):
                    d = popcount64(ctab[p0 + jj] ^ q0)
                    acc[jj] = d
                    m = min(m, d)
            if m <= limit:
                for jj in range(p1 - p0):
                    if acc[jj] <= limit:
                        ncollect = _take(ctab, itab, w, p0 + jj, acc[jj], q, masks, j, s, bound, hd, hi_, k,
                                         collect_d, collect_i, ncollect, capd, capi)
                        limit = min(hd[0], capd) if bound < 0 else limit
            p0 = p1
        return ncollect
    # Most buckets hold nothing close enough: check their minimum first.
    if _bucket_min(ctab, w, lo, hi, q) > limit:
        return ncollect
    for p in range(lo, hi):
        d = _distance(ctab, w, p, q)
        if d <= limit:
            ncollect = _take(ctab, itab, w, p, d, q, masks, j, s, bound, hd, hi_, k, collect_d, collect_i,
                             ncollect, capd, capi)
            limit = min(hd[0], capd) if bound < 0 else limit
    return ncollect


@njit(cache=True)
def _take(ctab, itab, w, p, d, q, masks, j, s, bound, hd, hi_, k, collect_d, collect_i, ncollect, capd, capi):
    """Entry p at distance d (within the limit): into the heap or the results, if first seen here."""
    pos = np.int64(itab[p])
    if bound < 0:
        if (_greater(hd[0], hi_[0], d, pos) and _greater(capd, capi, d, pos)
                and _first_seen_here(ctab, w, p, q, masks, j, s)):
            _sift_down(hd, hi_, k, _U0, d, pos)
    elif _first_seen_here(ctab, w, p, q, masks, j, s):
        if collect_d.shape[0] > 0:
            collect_d[ncollect] = np.int32(d)
            collect_i[ncollect] = pos
        ncollect += 1
    return ncollect


@njit(cache=True)
def _pass_share(q, n, w, j, s, part, nparts, radius, masks, sub_starts, sub_lens, ctab, itab, dense, direct,
                direct_base, keys, key_base, nkeys, starts_, budget, hd, hi_, uk, collect_d, collect_i,
                ncollect, capd, capi):
    """Pass (s, j): probe every bucket of table j at key distance exactly s,
    or only share ``part`` of ``nparts`` (batches of keys dealt round-robin).
    Returns (ncollect, entries and buckets touched); stops early once the
    touched count exceeds ``budget``."""
    length = np.uint64(sub_lens[j])
    touched = _U0
    if s > length:
        return ncollect, touched
    qj = _extract(q, np.uint64(sub_starts[j]), length)
    acc = np.empty(64, dtype=np.uint64)  # one run's distances (_probe)
    upart = np.uint64(part)
    unparts = np.uint64(nparts)
    if not dense[j] and _binom(length, s) > nkeys[j]:
        # Sparse table and many keys at distance s: walking the table's
        # distinct keys is cheaper than enumerating them.
        k0 = key_base[j]
        for kk in range(k0, k0 + nkeys[j]):
            if (kk // _U64) % unparts != upart or popcount64(keys[kk] ^ qj) != s:
                continue
            sb = np.uint64(j) * np.uint64(n)
            lo = sb + np.uint64(starts_[kk + np.uint64(j)])
            hi = sb + np.uint64(starts_[kk + np.uint64(j) + _U1])
            touched += hi - lo
            ncollect = _probe(ctab, itab, w, lo, hi, q, masks, j, s, radius, hd, hi_, uk,
                              collect_d, collect_i, ncollect, capd, capi, acc)
        touched += nkeys[j] // unparts
        return ncollect, touched
    blo = np.empty(_PREFETCH, dtype=np.uint64)
    bhi = np.empty(_PREFETCH, dtype=np.uint64)
    top = _U1 << length
    v = (_U1 << s) - _U1
    batch = _U0
    while v < top:
        # Look up a batch of buckets and prefetch their heads, so the random
        # DRAM accesses overlap instead of queueing one after the other.
        mine = batch % unparts == upart
        batch += _U1
        nb = 0
        while v < top and nb < _PREFETCH:
            if mine:
                lo, hi = _lookup(j, qj ^ v, dense, direct, direct_base, keys, key_base, nkeys, starts_,
                                 np.uint64(n))
                touched += _U1
                blo[nb] = lo
                bhi[nb] = hi
                if hi > lo:
                    for line in range(_PREFETCH_LINES):
                        prefetch(ctab, (lo + np.uint64(line) * _U8) * w)
            nb += 1
            if s == _U0:
                v = top
            else:
                v = _next_combination(v)
        if mine:
            for b in range(nb):
                if bhi[b] > blo[b]:
                    touched += bhi[b] - blo[b]
                    ncollect = _probe(ctab, itab, w, blo[b], bhi[b], q, masks, j, s, radius, hd, hi_, uk,
                                      collect_d, collect_i, ncollect, capd, capi, acc)
            if touched > budget:
                return ncollect, touched
    return ncollect, touched


@njit(cache=True)
def _search_one(q, w, n, k, radius, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                keys, key_base, nkeys, starts_, budget, hd, hi_, collect_d, collect_i):
    """One query.  k-NN if ``radius`` < 0 (heap in hd/hi_), else radius search
    (count, or fill collect_*).  Returns the hit count (radius mode) or 0, or
    -1 if the budget ran out (caller falls back to the linear scan)."""
    m = sub_lens.shape[0]
    maxlen = np.uint64(0)
    for j in range(m):
        maxlen = max(maxlen, np.uint64(sub_lens[j]))
    uk = np.uint64(k)
    touched = np.uint64(0)
    ncollect = 0
    for s_ in range(maxlen + _U1):
        s = np.uint64(s_)
        for j in range(m):
            ncollect, t = _pass_share(q, n, w, j, s, 0, 1, radius, masks, sub_starts, sub_lens, ctab, itab, dense,
                                      direct, direct_base, keys, key_base, nkeys, starts_, budget - touched,
                                      hd, hi_, uk, collect_d, collect_i, ncollect, _USENT, np.int64(-1))
            if t > budget - touched:
                return -1
            touched += t
            # every code within m*s + j has been seen now
            seen = np.uint64(m) * s + np.uint64(j)
            if radius < 0:
                if hd[0] <= seen:
                    return 0
            elif np.uint64(radius) <= seen:
                return ncollect
    return ncollect


@njit(cache=True)
def _knn_query(qi, queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
               keys, key_base, nkeys, starts_, budget, hd, hi_, out_d, ok):
    none_d = np.empty(0, dtype=np.int32)
    none_i = np.empty(0, dtype=np.int64)
    # same argument types as the radius calls: one compiled _search_one
    st = _search_one(queries[qi], np.uint64(w), n, k, np.int64(-1), sub_starts, sub_lens, masks, ctab, itab,
                     dense, direct, direct_base, keys, key_base, nkeys, starts_, budget, hd[qi], hi_[qi],
                     none_d[0:0], none_i[0:0])
    ok[qi] = st >= 0
    if st >= 0:
        _heapsort(hd[qi], hi_[qi])
        for j in range(k):
            out_d[qi, j] = np.int32(hd[qi, j])


@njit(cache=True, parallel=True)
def _knn_parallel(queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                  keys, key_base, nkeys, starts_, budget, hd, hi_, out_d, ok):
    # Kept minimal: numba's parallel compile time grows with the kernel body.
    for qi in prange(queries.shape[0]):
        _knn_query(qi, queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                   keys, key_base, nkeys, starts_, budget, hd, hi_, out_d, ok)


@njit(cache=True, parallel=True)
def _pass_parallel(q, n, w, j, s, nparts, masks, sub_starts, sub_lens, ctab, itab, dense, direct, direct_base,
                   keys, key_base, nkeys, starts_, budget, hd2, hi2, uk, capd, capi, touched_out):
    for t in prange(nparts):
        none_d = np.empty(0, dtype=np.int32)
        none_i = np.empty(0, dtype=np.int64)
        _, tch = _pass_share(q, n, w, j, s, t, nparts, np.int64(-1), masks, sub_starts, sub_lens, ctab, itab,
                             dense, direct, direct_base, keys, key_base, nkeys, starts_, budget, hd2[t], hi2[t],
                             uk, none_d[0:0], none_i[0:0], 0, capd, capi)
        touched_out[t] = tch


@njit(cache=True)
def _knn_one_split(q, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys,
                   key_base, nkeys, starts_, budget, hd2, hi2, out_d, out_i, split_min_keys):
    """k-NN of a single query using every thread: each large pass is dealt
    out to ``nparts`` threads with private heaps (capped by the k-th best so
    far), merged after the pass.  Row 0 of hd2/hi2 [nparts, k] is the query's
    heap.  A code is taken only at its first pass, so the private heaps hold
    distinct codes and the merge needs no dedup.  Returns False if the budget
    ran out."""
    nparts = hd2.shape[0]
    m = sub_lens.shape[0]
    maxlen = np.uint64(0)
    for j in range(m):
        maxlen = max(maxlen, np.uint64(sub_lens[j]))
    uk = np.uint64(k)
    touched = _U0
    touched_out = np.zeros(nparts, dtype=np.uint64)
    none_d = np.empty(0, dtype=np.int32)
    none_i = np.empty(0, dtype=np.int64)
    done = False
    for s_ in range(maxlen + _U1):
        s = np.uint64(s_)
        for j in range(m):
            length = np.uint64(sub_lens[j])
            if s <= length and _binom(length, s) >= split_min_keys:
                for t in range(1, nparts):
                    hd2[t, :] = _USENT
                    hi2[t, :] = -1
                _pass_parallel(q, n, w, j, s, nparts, masks, sub_starts, sub_lens, ctab, itab, dense, direct,
                               direct_base, keys, key_base, nkeys, starts_, budget - touched, hd2, hi2, uk,
                               hd2[0, 0], hi2[0, 0], touched_out)
                tch = _U0
                for t in range(nparts):
                    tch += touched_out[t]
                for t in range(1, nparts):
                    for e in range(k):
                        if hi2[t, e] >= 0 and _greater(hd2[0, 0], hi2[0, 0], hd2[t, e], hi2[t, e]):
                            _sift_down(hd2[0], hi2[0], uk, _U0, hd2[t, e], hi2[t, e])
            else:
                _, tch = _pass_share(q, n, w, j, s, 0, 1, np.int64(-1), masks, sub_starts, sub_lens, ctab, itab,
                                     dense, direct, direct_base, keys, key_base, nkeys, starts_, budget - touched,
                                     hd2[0], hi2[0], uk, none_d[0:0], none_i[0:0], 0, _USENT, np.int64(-1))
            if tch > budget - touched:
                return False
            touched += tch
            if hd2[0, 0] <= np.uint64(m) * s + np.uint64(j):  # every code within m*s + j seen
                done = True
                break
        if done:
            break
    _heapsort(hd2[0], hi2[0])
    for e in range(k):
        out_d[e] = np.int32(hd2[0, e])
        out_i[e] = hi2[0, e]
    return True


@njit(cache=True)
def _sort_hits(cd, ci):
    """Sort hits by (distance, position) with the heap code already compiled
    (numba's np.argsort costs seconds of JIT time)."""
    n = cd.shape[0]
    hd = cd.astype(np.uint64)
    hi = ci.copy()
    un = np.uint64(n)
    for p in range(n // 2 - 1, -1, -1):  # heapify
        _sift_down(hd, hi, un, np.uint64(p), hd[p], hi[p])
    _heapsort(hd, hi)
    for p in range(n):
        cd[p] = np.int32(hd[p])
        ci[p] = hi[p]


@njit(cache=True, parallel=True)
def _radius_pass(queries, w, n, radius, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                 keys, key_base, nkeys, starts_, budget, lims, skip, out_d, out_i):
    """Count pass when ``out_d`` is empty: hits per query, -1 where the budget
    ran out.  Fill pass otherwise: each query's hits go to its ``lims`` slice,
    sorted by (distance, position); ``skip`` marks queries not to search."""
    nq = queries.shape[0]
    counts = np.zeros(nq, dtype=np.int64)
    fill = out_d.shape[0] > 0
    for qi in prange(nq):
        lo = lims[qi] if fill else 0
        hi = lims[qi + 1] if fill else 0
        if skip[qi] or (fill and hi == lo):
            continue
        hd = np.empty(1, dtype=np.uint64)
        hi_ = np.empty(1, dtype=np.int64)
        cd = out_d[lo:hi]
        ci = out_i[lo:hi]
        counts[qi] = _search_one(queries[qi], np.uint64(w), n, np.int64(1), np.int64(radius), sub_starts,
                                 sub_lens, masks, ctab, itab, dense, direct, direct_base, keys, key_base, nkeys,
                                 starts_, budget, hd, hi_, cd, ci)
        if fill:
            _sort_hits(cd, ci)
    return counts


# --------------------------------------------------------------------------
# public class
# --------------------------------------------------------------------------


class MultiIndexHashing:
    """Exact k-NN / radius search by multi-index hashing; same API and same
    results (distances, ids, tie order) as :class:`~hashindex.search.LinearScan`.

    Parameters
    ----------
    codes : np.ndarray
        ``uint8 [N, nbytes]`` packed codes.
    m : int, optional
        Number of substrings (tables); default :func:`default_m` (substrings
        of about ``log2(N) - 10`` bits, e.g. m=5 for 64-bit codes at 10M).
        Substrings are at most 32 bits.

    Memory: ``m`` tables each holding a copy of the codes and the ids in bucket
    order (``m * N * (8 * ceil(nbytes / 8) + 4)`` bytes with int32 ids) plus
    bucket offsets (10M 64-bit codes: 460 MB at m=4, 570 MB at m=5), plus a
    linear-scan copy of the codes if some query falls back to it. Fewer
    tables cost less memory; :func:`plan` picks ``m`` from the data.

    Attributes: ``ntotal``, ``nbytes``, ``bits``, ``m`` as for LinearScan;
    ``split_single_query`` (default True) lets one query use all threads.
    """

    def __init__(self, codes: np.ndarray, m: int | None = None):
        codes = _check_codes(codes, "codes")
        self.ntotal = int(codes.shape[0])
        self.nbytes = int(codes.shape[1])
        self.bits = 8 * self.nbytes
        if m is None:
            m = default_m(self.bits, self.ntotal)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= self.bits:
            raise ValueError(f"m must be an integer in [1, {self.bits}], got {m!r}")
        if -(-self.bits // m) > _MAX_SUBSTRING_BITS:
            raise ValueError(f"m={m} gives substrings longer than {_MAX_SUBSTRING_BITS} bits; "
                             f"use m >= {-(-self.bits // _MAX_SUBSTRING_BITS)} for {self.bits}-bit codes")
        self.m = int(m)
        #: Deal a single query's large passes out to all threads (True), or
        #: answer it on one thread (better when the cores are oversubscribed).
        self.split_single_query = True
        # passes with fewer keys stay on one thread (a parallel region costs more)
        self._split_min_keys = 32
        self._words = _bitops.words_per_code(self.nbytes)
        self._build(_bitops.pack_rows(codes))

    @cached_property
    def _scan(self) -> LinearScan:
        """The linear scan that answers queries MIH gives up on, built at the first such query (so
        its copy of the codes costs memory only where the data needs it) from table 0, which holds
        every code: row ``itab[0][p]`` is ``ctab[0][p]``."""
        n, nw = self.ntotal, self._words
        words = np.empty((n, nw), dtype=np.uint64)
        words[self._itab[:n]] = self._ctab[:n * nw].reshape(n, nw)
        return LinearScan(words.view(np.uint8)[:, :self.nbytes])

    def __repr__(self) -> str:
        return f"MultiIndexHashing(ntotal={self.ntotal}, bits={self.bits}, m={self.m})"

    def _build(self, words: np.ndarray) -> None:
        n, m, nw = self.ntotal, self.m, self._words
        self._sub_starts, self._sub_lens = _substrings(self.bits, m)
        self._masks = _masks(self._sub_starts, self._sub_lens, nw)
        id_dtype = np.int32 if n < 2**31 else np.int64
        off_dtype = np.int32 if n < 2**31 else np.int64
        ctab = np.empty((m, n, nw), dtype=np.uint64)
        itab = np.empty((m, n), dtype=id_dtype)
        dense = np.zeros(m, dtype=np.bool_)
        direct, direct_base = [], np.zeros(m, dtype=np.uint64)
        keys, key_base, nkeys, starts_ = [], np.zeros(m, dtype=np.uint64), np.zeros(m, dtype=np.uint64), []
        nd = nk = 0
        for j in range(m):
            length = int(self._sub_lens[j])
            key = _extract_np(words, int(self._sub_starts[j]), length)
            if (1 << length) <= _DENSE_FACTOR * max(n, 1):
                dense[j] = True
                off = np.zeros((1 << length) + 1, dtype=off_dtype)
                np.cumsum(np.bincount(key, minlength=1 << length), out=off[1:])
                _counting_sort_scatter(words, key, off, ctab[j], itab[j])  # O(N): 10x a stable argsort
                del key
                direct.append(off)
                direct_base[j] = nd
                nd += off.size
                starts_.append(np.zeros(1, dtype=off_dtype))  # keeps starts_ indexing by j uniform
                keys.append(np.zeros(0, dtype=np.uint64))
            else:  # key space too large for a dense offset array: sort, and binary-search the keys
                order = np.argsort(key, kind="stable")  # ids ascending inside each bucket
                ctab[j] = words[order]
                itab[j] = order
                skey = key[order]
                del key, order
                uniq, first = np.unique(skey, return_index=True)
                keys.append(uniq)
                key_base[j] = nk
                nkeys[j] = uniq.size
                # table j's starts live at [key_base[j] + j, key_base[j] + j + nkeys[j]]
                starts_.append(np.append(first, n).astype(off_dtype))
                nk += uniq.size
                del skey
        self._ctab = ctab.reshape(-1)
        self._itab = itab.reshape(-1)
        self._dense = dense
        self._direct = np.concatenate(direct) if direct else np.zeros(1, dtype=off_dtype)
        self._direct_base = direct_base
        self._keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
        self._key_base = key_base
        self._nkeys = nkeys
        self._starts = np.concatenate(starts_)
        self._budget = np.uint64(max(1, int(_FALLBACK_FRACTION * n)))

    def _tables(self):
        return (self._sub_starts, self._sub_lens, self._masks, self._ctab, self._itab, self._dense, self._direct,
                self._direct_base, self._keys, self._key_base, self._nkeys, self._starts)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest codes; same contract as :meth:`LinearScan.search`."""
        queries = _check_queries(queries, self.nbytes)
        k = _check_k(k)
        nq = queries.shape[0]
        if nq == 0 or self.ntotal == 0:
            return empty_result(nq, k)
        if k >= self.ntotal:  # MIH would visit everything anyway
            return self._scan.search(queries, k)
        qwords = _bitops.pack_rows(queries)
        D = np.empty((nq, k), dtype=np.int32)
        I = np.full((nq, k), -1, dtype=np.int64)
        nthreads = numba.get_num_threads()
        if nq == 1 and nthreads > 1 and self.split_single_query:
            heap_d = np.full((nthreads, k), _bitops.SENTINEL_D, dtype=np.uint64)
            heap_i = np.full((nthreads, k), -1, dtype=np.int64)
            ok = np.array([_knn_one_split(qwords[0], self._words, self.ntotal, k, *self._tables(), self._budget,
                                          heap_d, heap_i, D[0], I[0], np.uint64(self._split_min_keys))])
        else:
            heap_d = np.full((nq, k), _bitops.SENTINEL_D, dtype=np.uint64)
            ok = np.ones(nq, dtype=np.bool_)
            # a single query without splitting runs on one thread: waking the pool costs more
            with _bitops.threads(1 if nq == 1 else nthreads):
                _knn_parallel(qwords, self._words, self.ntotal, k, *self._tables(), self._budget, heap_d, I, D, ok)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            logger.debug("MIH: %d of %d queries fell back to the linear scan", bad.size, nq)
            D[bad], I[bad] = self._scan.search(queries[bad], k)
        return D, I

    def radius_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All codes within distance ``<= radius`` (inclusive); same contract as
        :meth:`LinearScan.radius_search`."""
        queries = _check_queries(queries, self.nbytes)
        radius = _check_radius(radius)
        nq = queries.shape[0]
        if nq == 0 or self.ntotal == 0:
            return empty_result_radius(nq)
        radius = min(radius, self.bits)
        qwords = _bitops.pack_rows(queries)
        tables = self._tables()
        none_d = np.empty(0, dtype=np.int32)
        none_i = np.empty(0, dtype=np.int64)
        skip = np.zeros(nq, dtype=np.bool_)
        counts = _radius_pass(qwords, self._words, self.ntotal, radius, *tables, self._budget,
                              np.zeros(nq + 1, dtype=np.int64), skip, none_d, none_i)
        skip = counts < 0
        bad = np.flatnonzero(skip)
        if bad.size:
            logger.debug("MIH: %d of %d queries fell back to the linear scan", bad.size, nq)
            blims, bd, bi = self._scan.radius_search(queries[bad], radius)
            counts[bad] = np.diff(blims)
        lims = np.zeros(nq + 1, dtype=np.int64)
        np.cumsum(counts, out=lims[1:])
        out_d = np.empty(int(lims[-1]), dtype=np.int32)
        out_i = np.empty(int(lims[-1]), dtype=np.int64)
        if out_d.size:
            _radius_pass(qwords, self._words, self.ntotal, radius, *tables, self._budget, lims, skip, out_d, out_i)
        if bad.size:  # place the fallback results in their queries' slices
            dst = np.repeat(lims[bad] - blims[:-1], np.diff(blims)) + np.arange(bd.size)
            out_d[dst], out_i[dst] = bd, bi
        return lims, out_d, out_i
