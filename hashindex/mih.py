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

Tables are CSR arrays: per table, the positions (ids) in bucket order and, in
the default "copied" layout, a copy of the full codes in the same order (so a
bucket's candidates are contiguous memory; "compact" keeps ids only and
gathers candidates from the codes), plus either a dense offset array indexed
by the key (when the key space is at most a few times N) or the sorted
distinct keys with their offsets (binary search).

A single query runs on all threads in one parallel region: the keys of every
pass are dealt round-robin to the threads, each with a private heap, and each
thread prunes and stops by the k-th distance of all the heaps together;
batches run one query per thread.

A query whose search would touch more table entries than half the database
(heavily duplicated data, very large ``k`` or radius) falls back to the
linear scan, which gives identical results.

When it pays: the cost grows with the k-th distance relative to the code
length.  Measured with k=10, single queries (2-core Intel Xeon, bench/search_speed.py,
commit 1a57e5d): at 64 bits and 10M random codes 5.4x our linear scan and 63x faiss
IndexBinaryFlat; on learned codes, whose neighbours are closer, 17x and 178x at 10M and
5x the scan already at 1M. At 1M random codes, or at 128 bits on random codes, the
(AVX-512) linear scan is about as fast or faster; :func:`plan` tells these apart.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import _bitops
from ._bitops import (KEY_SHIFT, POSITION_MASK, SENTINEL_KEY, _U0, _U1, _U63, _U64, _USENT, _heapsort,
                      _heapsort_key, _sift_down, _sift_down_key, popcount64, prefetch)
from .mih_tables import ARRAYS, StoredTables, extract as _extract_np, substrings as _substrings
from .search import (LinearScan, empty_result, empty_result_radius, _check_codes, _check_k, _check_queries,
                     _check_radius)

__all__ = ["LAYOUTS", "MultiIndexHashing", "Plan", "default_m", "plan", "table_bytes"]

LAYOUTS = ("copied", "compact")

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


# Per-query cost model of one k-NN query (2 threads): a bucket visit (a lookup and a random memory
# access, ~0.16 µs), an entry streamed through a bucket (~0.75 ns per 64-bit word), a visited entry
# within the query's k-th distance (a heap offer, ~0.13 µs), and the linear scan (~0.24 ns per word
# of the database). From `python bench/mih_plan_fit.py` on this 2-core machine (two runs, 11 m
# settings of random and learned 10M x 64/128-bit codes, bench/results/mih_plan_fit.*): estimates
# within 0.53-1.28x of measured (median error 15%). Least squares puts the bucket/entry ratio
# anywhere in 150-335 depending on which rows it favours; random 64-bit codes need more than 172
# to rank m=5 (the fastest) first, so the ratio is kept at 215, as in the first fit. Known miss:
# on learned 128-bit codes it picks m=8 where m=6 is 1.7x faster (many of the buckets m=6 visits
# are empty and cheap; the model counts keys, not occupied buckets); on learned 64-bit codes m=4
# where m=3 is 0-16% faster.
SECONDS_PER_BUCKET = 1.6e-7
SECONDS_PER_ENTRY_WORD = 7.5e-10
SECONDS_PER_NEAR_ENTRY = 1.3e-7
SCAN_SECONDS_PER_WORD = 2.4e-10
# The compact layout gathers each candidate from the codes: ~8.5 ns an entry (10M random 64-bit codes,
# m=5: 200 q/s against 1,700-2,100 copied; learned codes, m=4: 1,030 against 3,860).
SECONDS_PER_GATHER = 8.5e-9


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` found for each layout: the best ``m`` and the estimated seconds per single
    query of MIH with ``m`` tables, and of the linear scan. ``costs[layout][m]`` holds every
    estimate, ``work[m]`` the mean (buckets, table entries, entries within the k-th distance) a
    query visits, which the estimates are made of (bench/mih_plan_fit.py fits the constants)."""

    m: int
    seconds: float
    compact_m: int
    compact_seconds: float
    scan_seconds: float
    costs: dict = field(default_factory=dict, repr=False)
    work: dict = field(default_factory=dict, repr=False)

    @property
    def speedup(self) -> float:
        """Estimated linear-scan time over MIH time per query (> 1: MIH is worth building)."""
        return self.scan_seconds / self.seconds

    @property
    def compact_speedup(self) -> float:
        """The same for the compact layout (ids-only tables)."""
        return self.scan_seconds / self.compact_seconds


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
    near = {m: np.zeros(queries.shape[0]) for m in ms}  # visited entries within the k-th distance
    for q0 in range(0, queries.shape[0], 4):  # 4 queries at a time bound the memory
        q = queries[q0:q0 + 4]
        diff = np.unpackbits(q[:, None, :] ^ rows[None], axis=2, bitorder="little")
        cumulative = np.zeros(diff.shape[:2] + (bits + 1,), dtype=np.int16)
        np.cumsum(diff, axis=2, out=cumulative[:, :, 1:])
        del diff
        r = radii[q0:q0 + 4]
        close = cumulative[:, :, bits] <= r[:, None]  # [q, row]: within the k-th distance
        for m in ms:
            starts, lens = _substrings(bits, m)
            sub = cumulative[:, :, starts + lens] - cumulative[:, :, starts]       # [q, row, m]
            visited = sub <= _deepest_pass(r, m)[:, None, :]                       # [q, row, m]
            entries[m][q0:q0 + 4] = visited.sum(axis=(1, 2)) * scale
            near[m][q0:q0 + 4] = (visited & close[:, :, None]).sum(axis=(1, 2)) * scale
    scan_seconds = SCAN_SECONDS_PER_WORD * n * words
    per_entry = {"copied": SECONDS_PER_ENTRY_WORD * words, "compact": SECONDS_PER_GATHER}
    costs = {layout: {} for layout in LAYOUTS}
    work = {}
    for m in ms:
        _, lens = _substrings(bits, m)
        deepest = _deepest_pass(radii, m)
        # within[j, s + 1]: buckets at key distance <= s in table j, a sum of C(l, i), at most n
        within = np.zeros((m, bits + 2))
        for j, length in enumerate(lens):
            within[j, 1:] = np.minimum(np.cumsum([math.comb(int(length), i) for i in range(bits + 1)]), n)
        buckets = within[np.arange(m)[None, :], np.clip(deepest + 1, 0, bits + 1)].sum(axis=1)
        work[m] = (float(buckets.mean()), float(entries[m].mean()), float(near[m].mean()))
        for layout, entry_seconds in per_entry.items():
            seconds = SECONDS_PER_BUCKET * buckets + entry_seconds * entries[m] + SECONDS_PER_NEAR_ENTRY * near[m]
            # past _FALLBACK_FRACTION of the database a query gives up and scans
            seconds = np.minimum(seconds, entry_seconds * _FALLBACK_FRACTION * n + scan_seconds)
            costs[layout][m] = float(seconds.mean())
    best = {}
    for layout, by_m in costs.items():
        best[layout] = min(by_m, key=by_m.get)
        if by_m[best[layout]] >= scan_seconds:  # MIH does not pay at any m: the usual m, not an arbitrary one
            best[layout] = min(max(default_m(bits, n), lo_m), hi_m)
    return Plan(m=best["copied"], seconds=costs["copied"][best["copied"]], compact_m=best["compact"],
                compact_seconds=costs["compact"][best["compact"]], scan_seconds=scan_seconds, costs=costs,
                work=work)


def table_bytes(n: int, bits: int, m: int, layout: str = "copied") -> int:
    """Memory of the id (int32) and code-copy arrays of ``m`` tables over ``n`` codes, bucket
    offsets aside: the codes themselves are not counted, the compact layout searches them in place."""
    copy = 8 * _bitops.words_per_code(-(-bits // 8)) if layout == "copied" else 0
    return m * n * (4 + copy)


def _deepest_pass(radii: np.ndarray, m: int) -> np.ndarray:
    """[q, m]: the largest key distance probed in each table by a k-NN query whose k-th distance is
    r: it stops after pass (r // m, r % m), so tables j <= r % m reach r // m, the rest one less."""
    return (radii // m)[:, None] - (np.arange(m)[None, :] > (radii % m)[:, None])


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

# The per-bucket helpers allocate nothing and only use arrays their callers hold, so they are
# compiled without numba's reference counting: with it, every call increfs and decrefs each array
# argument, ~30 atomic operations per bucket visited, on counters both threads of a split query
# share (10-15% of a single query's time, measured with perf).
_hot = njit(cache=True, _nrt=False)


def _word(ctab, itab, w, p, ww):
    """Word ``ww`` of the code at table entry ``p`` (compiled by :func:`_word_impl`)."""
    raise NotImplementedError


@overload(_word, inline="always")
def _word_impl(ctab, itab, w, p, ww):
    # The layout is told apart by type, so each compiles to its own straight-line access.
    if ctab.ndim == 1:  # "copied": the codes themselves in bucket order, w words per entry
        return lambda ctab, itab, w, p, ww: ctab[p * w + ww]
    # "compact": the tables hold ids only; the code is gathered from the packed rows [N, W]
    return lambda ctab, itab, w, p, ww: ctab[np.uint64(itab[p]), ww]


def _prefetch_entry(ctab, itab, w, p):
    """Hint the memory that entry ``p``'s bucket stream starts at (compiled by the overload)."""
    raise NotImplementedError


@overload(_prefetch_entry, inline="always")
def _prefetch_entry_impl(ctab, itab, w, p):
    if ctab.ndim == 1:
        return lambda ctab, itab, w, p: prefetch(ctab, p * w)
    return lambda ctab, itab, w, p: prefetch(itab, p)


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
        if ctab.shape[0] > 0:  # "compact" passes an empty ctab: ids only
            ctab[p, :] = words[i, :]
        itab[p] = i


@_hot
def _extract(q, start, length):
    w = start >> np.uint64(6)
    sh = start & _U63
    key = q[w] >> sh
    if sh + length > _U64:
        key |= q[w + _U1] << (_U64 - sh)
    return key & ((_U1 << length) - _U1)


@_hot
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


@_hot
def _next_combination(v):
    """Next larger integer with the same popcount (Gosper's hack)."""
    c = v & (~v + _U1)
    r = v + c
    return (((r ^ v) >> np.uint64(2)) // c) | r


@_hot
def _binom(n, k):
    """C(n, k) for n <= 64 (exact in uint64 for the n <= 32 used here)."""
    if k > n:
        return _U0
    k = min(k, n - k)
    r = _U1
    for i in range(k):
        r = r * (n - np.uint64(i)) // (np.uint64(i) + _U1)
    return r


@_hot
def _distance(ctab, itab, w, p, q):
    d = _U0
    for ww in range(w):
        d += popcount64(_word(ctab, itab, w, p, ww) ^ q[ww])
    return d


@_hot
def _bucket_min(ctab, itab, w, lo, hi, q):
    """Smallest distance in [lo, hi), codes of several words (one-word codes take _probe's runs)."""
    m = _USENT
    for p in range(lo, hi):
        m = min(m, _distance(ctab, itab, w, p, q))
    return m


@_hot
def _first_seen_here(ctab, itab, w, p, q, masks, j, s):
    """True if the entry at p, found in table j at substring distance s, is at
    its first pass: no table j2 < j within s, no table j2 > j within s - 1."""
    m = masks.shape[0]
    for j2 in range(m):
        if j2 == j:
            continue
        d2 = _U0
        for ww in range(w):
            d2 += popcount64((_word(ctab, itab, w, p, ww) ^ q[ww]) & masks[j2, ww])
        if j2 < j:
            if d2 <= s:
                return False
        elif d2 < s:
            return False
    return True


@_hot
def _first_position_at_least(itab, lo, hi, pos):
    """First entry in [lo, hi) whose position is >= pos (positions ascend within a bucket)."""
    while lo < hi:
        mid = (lo + hi) >> _U1
        if np.int64(itab[mid]) < pos:
            lo = mid + _U1
        else:
            hi = mid
    return lo


@_hot
def _probe(ctab, itab, w, lo, hi, q, masks, j, s, bound, hk, k, collect_d, collect_i, ncollect, capkey, acc,
           next_lo, next_hi):
    """Visit bucket entries [lo, hi), prefetching the next bucket's [next_lo, next_hi) meanwhile.

    k-NN mode (``bound`` < 0): offer first-seen entries to the heap of keys ``hk``
    (_bitops: distance << KEY_SHIFT | position); they must also be below ``capkey``,
    the k-th smallest key of all shares' heaps (a split query). Radius mode: count
    (and store when ``collect_d`` is non-empty) first-seen entries within ``bound``;
    returns the updated count.
    """
    if lo == hi:
        return ncollect
    limit = min(hk[0], capkey) >> KEY_SHIFT if bound < 0 else np.uint64(bound)
    if bound < 0 and limit == np.uint64(masks.shape[0]) * s + np.uint64(j):
        # Only ties can enter now: every code first seen in pass (s, j) is at distance >= m*s + j,
        # the k-th distance, so it must come before the k-th in position. Positions ascend inside
        # a bucket: the entries from the k-th's position on are cut off. (This is the query's
        # last pass, often a quarter of its entries.)
        hi = _first_position_at_least(itab, lo, hi, np.int64(min(hk[0], capkey) & POSITION_MASK))
        if lo == hi:
            return ncollect
    if w == _U1:
        # Runs of 64 entries: their distances in one vectorised pass (into acc), then only the
        # entries within the limit, if any, get the scalar work. Until the heap has settled most
        # runs hold such an entry, so keeping the distances matters as much as the minimum.
        q0 = q[0]
        p0 = lo
        # The next bucket's lines, a few per run: the hardware prefetcher alone restarts at every
        # bucket (a random address) and leaves one thread's stream at ~2/3 of what it reaches.
        pf = next_lo + _U8 * _PREFETCH_LINES  # its head was prefetched at lookup
        lines_left = -(-(next_hi - min(pf, next_hi)) // _U8)
        runs = -(-(hi - lo) // _U64)
        pf_step = _U8 * (lines_left // runs + _U1)  # entries (8 a line) prefetched per run
        while p0 < hi:
            p1 = min(p0 + _U64, hi)
            m = _U64
            pf_end = min(pf + pf_step, next_hi)
            while pf < pf_end:
                _prefetch_entry(ctab, itab, w, pf)
                pf += _U8
            if p1 - p0 == _U64:
                for jj in range(_U64):  # constant trip count: fully vectorised
                    d = popcount64(_word(ctab, itab, _U1, p0 + jj, _U0) ^ q0)
                    acc[jj] = d
                    m = min(m, d)
            else:
                for jj in range(p1 - p0):
                    d = popcount64(_word(ctab, itab, _U1, p0 + jj, _U0) ^ q0)
                    acc[jj] = d
                    m = min(m, d)
            if m <= limit:
                for jj in range(p1 - p0):
                    if acc[jj] <= limit:
                        ncollect = _take(ctab, itab, w, p0 + jj, acc[jj], q, masks, j, s, bound, hk, k,
                                         collect_d, collect_i, ncollect, capkey)
                        limit = min(hk[0], capkey) >> KEY_SHIFT if bound < 0 else limit
            p0 = p1
        return ncollect
    # Wider codes: the next bucket's lines all at once (w words an entry, 8 words a line), then
    # most buckets hold nothing close enough: check their minimum first.
    for pf in range(next_lo, next_hi, max(_U1, _U8 // w)):
        _prefetch_entry(ctab, itab, w, pf)
    if _bucket_min(ctab, itab, w, lo, hi, q) > limit:
        return ncollect
    for p in range(lo, hi):
        d = _distance(ctab, itab, w, p, q)
        if d <= limit:
            ncollect = _take(ctab, itab, w, p, d, q, masks, j, s, bound, hk, k, collect_d, collect_i, ncollect,
                             capkey)
            limit = min(hk[0], capkey) >> KEY_SHIFT if bound < 0 else limit
    return ncollect


@_hot
def _take(ctab, itab, w, p, d, q, masks, j, s, bound, hk, k, collect_d, collect_i, ncollect, capkey):
    """Entry p at distance d (within the limit): into the heap or the results, if first seen here."""
    pos = np.int64(itab[p])
    if bound < 0:
        key = (d << KEY_SHIFT) | np.uint64(pos)
        # below the heap's root and the shares' k-th: keys are distinct (a code is taken once)
        if key < min(hk[0], capkey) and _first_seen_here(ctab, itab, w, p, q, masks, j, s):
            _sift_down_key(hk, k, _U0, key)
    elif _first_seen_here(ctab, itab, w, p, q, masks, j, s):
        if collect_d.shape[0] > 0:
            collect_d[ncollect] = np.int32(d)
            collect_i[ncollect] = pos
        ncollect += 1
    return ncollect


@_hot
def _pass_share(q, n, w, j, s, part, nparts, radius, masks, sub_starts, sub_lens, ctab, itab, dense, direct,
                direct_base, keys, key_base, nkeys, starts_, budget, hk, uk, collect_d, collect_i,
                ncollect, capkey, shares, scratch, acc, blo, bhi):
    """Pass (s, j): probe every bucket of table j at key distance exactly s,
    or only share ``part`` of ``nparts`` (keys dealt round-robin).
    Returns (ncollect, entries and buckets touched, done); stops early once the
    touched count exceeds ``budget``. A share of a split k-NN query (``shares``:
    all shares' heaps) re-reads the k-th key of all heaps after each batch of
    buckets: it tightens the cap, and once its distance is below ``m*s + j`` this pass
    cannot add anything (``done``): the other shares found the k nearest meanwhile.
    Scratch: ``acc`` holds one run's distances (_probe), ``blo``/``bhi`` a batch of
    bucket ranges (_PREFETCH each)."""
    length = np.uint64(sub_lens[j])
    touched = _U0
    if s > length:
        return ncollect, touched, False
    qj = _extract(q, np.uint64(sub_starts[j]), length)
    upart = np.uint64(part)
    unparts = np.uint64(nparts)
    if not dense[j] and _binom(length, s) > nkeys[j]:
        # Sparse table and many keys at distance s: walking the table's
        # distinct keys is cheaper than enumerating them.
        k0 = key_base[j]
        for kk in range(k0, k0 + nkeys[j]):
            if kk % unparts != upart or popcount64(keys[kk] ^ qj) != s:
                continue
            sb = np.uint64(j) * np.uint64(n)
            lo = sb + np.uint64(starts_[kk + np.uint64(j)])
            hi = sb + np.uint64(starts_[kk + np.uint64(j) + _U1])
            touched += hi - lo
            ncollect = _probe(ctab, itab, w, lo, hi, q, masks, j, s, radius, hk, uk,
                              collect_d, collect_i, ncollect, capkey, acc, _U0, _U0)
        touched += nkeys[j] // unparts
        return ncollect, touched, False
    top = _U1 << length
    v = (_U1 << s) - _U1
    key_index = _U0
    rotate = s * np.uint64(sub_lens.shape[0]) + np.uint64(j)  # pass (s, j)'s first key: share (s*m + j) % nparts
    nb = 0  # looked-up buckets waiting in blo/bhi
    while True:
        # Look up a batch of this share's buckets and prefetch their heads, so the random DRAM
        # accesses overlap instead of queueing one after the other. Keys are dealt one by one
        # (key_index % nparts): dealing whole batches left one thread idle for a third of a
        # 78-key pass.
        while v < top and nb < _PREFETCH:
            if (key_index + rotate) % unparts == upart:
                lo, hi = _lookup(j, qj ^ v, dense, direct, direct_base, keys, key_base, nkeys, starts_,
                                 np.uint64(n))
                touched += _U1
                if hi > lo:
                    blo[nb] = lo
                    bhi[nb] = hi
                    for line in range(_PREFETCH_LINES):
                        _prefetch_entry(ctab, itab, w, lo + np.uint64(line) * _U8)
                    nb += 1
            key_index += _U1
            if s == _U0:
                v = top
            else:
                v = _next_combination(v)
        if nb == 0:
            break
        # Probe each with the next one's lines prefetched meanwhile; the batch's last bucket waits
        # for the next batch (as its first), unless no key is left.
        last = nb - 1 if v < top else nb
        for b in range(last):
            touched += bhi[b] - blo[b]
            nlo = blo[b + 1] if b + 1 < nb else _U0
            nhi = bhi[b + 1] if b + 1 < nb else _U0
            ncollect = _probe(ctab, itab, w, blo[b], bhi[b], q, masks, j, s, radius, hk, uk,
                              collect_d, collect_i, ncollect, capkey, acc, nlo, nhi)
        if last < nb:
            blo[0] = blo[last]
            bhi[0] = bhi[last]
            nb = 1
        else:
            nb = 0
        if touched > budget:
            return ncollect, touched, False
        if shares.shape[0] > 1:
            capkey = _kth_key_of_shares(shares, uk, scratch)
            if capkey >> KEY_SHIFT < np.uint64(sub_lens.shape[0]) * s + np.uint64(j):
                return ncollect, touched, True
    return ncollect, touched, False


@njit(cache=True)
def _radius_one(q, w, n, radius, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys,
                key_base, nkeys, starts_, budget, collect_d, collect_i):
    """Radius search of one query: counts the first-seen codes within ``radius``, storing them in
    collect_* when those are non-empty. Returns the count, or -1 if the budget ran out (the caller
    falls back to the linear scan)."""
    m = sub_lens.shape[0]
    maxlen = np.uint64(0)
    for j in range(m):
        maxlen = max(maxlen, np.uint64(sub_lens[j]))
    touched = np.uint64(0)
    ncollect = 0
    no_heap = np.empty(1, dtype=np.uint64)
    no_shares = np.empty((0, 0), dtype=np.uint64)
    acc, blo, bhi = np.empty(64, dtype=np.uint64), np.empty(_PREFETCH, dtype=np.uint64), np.empty(_PREFETCH, dtype=np.uint64)
    for s_ in range(maxlen + _U1):
        s = np.uint64(s_)
        for j in range(m):
            if np.uint64(radius) < np.uint64(m) * s + np.uint64(j):  # every code within m*s + j - 1 seen
                return ncollect
            ncollect, t, _ = _pass_share(q, n, w, j, s, 0, 1, radius, masks, sub_starts, sub_lens, ctab, itab,
                                         dense, direct, direct_base, keys, key_base, nkeys, starts_,
                                         budget - touched, no_heap, _U1, collect_d, collect_i, ncollect,
                                         SENTINEL_KEY, no_shares, no_heap, acc, blo, bhi)
            if t > budget - touched:
                return -1
            touched += t
    return ncollect


@njit(cache=True)
def _knn_query(qi, queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
               keys, key_base, nkeys, starts_, budget, hk, out_d, out_i, ok):
    # one share of its own: the single-query split's code path with nothing to split
    ok[qi] = _knn_share(queries[qi], w, n, k, 0, sub_starts, sub_lens, masks, ctab, itab, dense, direct,
                        direct_base, keys, key_base, nkeys, starts_, budget, hk[qi])
    if ok[qi]:
        _heapsort_key(hk[qi, 0])
        _unpack_keys(hk[qi, 0], out_d[qi], out_i[qi])


@njit(cache=True, parallel=True)
def _knn_parallel(queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                  keys, key_base, nkeys, starts_, budget, hk, out_d, out_i, ok):
    # Kept minimal: numba's parallel compile time grows with the kernel body.
    for qi in prange(queries.shape[0]):
        _knn_query(qi, queries, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                   keys, key_base, nkeys, starts_, budget, hk, out_d, out_i, ok)


@_hot
def _unpack_keys(sorted_keys, out_d, out_i):
    """Sorted heap keys into a result row: distances and positions."""
    for j in range(sorted_keys.shape[0]):
        out_d[j] = np.int32(sorted_keys[j] >> KEY_SHIFT)
        out_i[j] = np.int64(sorted_keys[j] & POSITION_MASK)


@_hot
def _kth_key_of_shares(hk2, k, scratch):
    """The k-th smallest key in all shares' heaps together: an upper bound on the query's k-th
    (distance, position) (the shares hold distinct codes). ``scratch`` (k keys) becomes a max-heap
    of the k smallest. Read without locks while the other shares write: a heap slot is one store
    and only ever decreases, so a read is never below the slot's value at the read's end, and the
    bound is at worst stale (larger), which only makes a share prune less and stop later."""
    scratch[:k] = SENTINEL_KEY
    for t in range(hk2.shape[0]):
        for i in range(k):
            key = hk2[t, i]
            if key < scratch[0]:
                _sift_down_key(scratch, k, _U0, key)
    return scratch[0]


@njit(cache=True)
def _knn_share(q, w, n, k, part, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys,
               key_base, nkeys, starts_, budget, hk2):
    """Share ``part`` of a single query's k-NN: every pass, but only the keys dealt to this share
    (_pass_share), into a private heap of keys ``hk2[part]``. Before each pass (and batch of
    buckets) the share takes the k-th smallest key of all shares' heaps together
    (_kth_key_of_shares): candidates above it cannot make the top k, and the share stops once its
    distance is within reach of the passes done (``<= m*s + j - 1``): a code not seen yet is
    farther than that. Taking the union, not the share's own k-th, matters: two shares holding 5
    close codes each know the 10th of the query before either heap does; and in the last pass,
    where only ties at the k-th distance can enter, the union's k-th position cuts each bucket
    short. Returns False if this share's budget ran out (and tells the other shares to stop by
    zeroing its heap)."""
    m = sub_lens.shape[0]
    nparts = hk2.shape[0]
    maxlen = np.uint64(0)
    for j in range(m):
        maxlen = max(maxlen, np.uint64(sub_lens[j]))
    uk = np.uint64(k)
    hk = hk2[part, :k]
    scratch = np.empty(k, dtype=np.uint64)
    acc, blo, bhi = np.empty(64, dtype=np.uint64), np.empty(_PREFETCH, dtype=np.uint64), np.empty(_PREFETCH, dtype=np.uint64)
    touched = _U0
    none_d = np.empty(0, dtype=np.int32)
    none_i = np.empty(0, dtype=np.int64)
    for s_ in range(maxlen + _U1):
        s = np.uint64(s_)
        for j in range(m):
            capkey = _kth_key_of_shares(hk2, uk, scratch)
            if capkey >> KEY_SHIFT < np.uint64(m) * s + np.uint64(j):  # every code within m*s + j - 1 seen
                return True
            _, tch, done = _pass_share(q, n, w, j, s, part, nparts, np.int64(-1), masks, sub_starts, sub_lens,
                                       ctab, itab, dense, direct, direct_base, keys, key_base, nkeys, starts_,
                                       budget - touched, hk, uk, none_d[0:0], none_i[0:0], 0, capkey, hk2,
                                       scratch, acc, blo, bhi)
            if done:
                return True
            if tch > budget - touched:
                hk2[part, :] = _U0  # the query falls back to the scan: stop the other shares too
                return False
            touched += tch
    return True


@njit(cache=True, parallel=True)
def _knn_split(q, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys,
               key_base, nkeys, starts_, budget, hk2, ok):
    # Kept minimal: numba's parallel compile time grows with the kernel body.
    for t in prange(hk2.shape[0]):
        ok[t] = _knn_share(q, w, n, k, t, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base,
                           keys, key_base, nkeys, starts_, budget, hk2)


@njit(cache=True)
def _knn_one_split(q, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys, key_base,
                   nkeys, starts_, budget, nparts, out_d, out_i):
    """k-NN of a single query on ``nparts`` threads in one parallel region (no barrier per pass):
    the keys of every pass are dealt round-robin to the shares, each with a private heap; a code is
    taken only at its first pass, so the heaps hold distinct codes and merge without dedup.
    Writes the sorted result to out_d/out_i [1, k]; returns False if the query should fall back to
    the scan. One compiled call: a query costs ~0.4 ms, and the Python-side allocations and merge
    cost 20 µs of it."""
    # each share's heap on cache lines of its own: no false sharing
    hk2 = np.full((nparts, k + 8), SENTINEL_KEY, dtype=np.uint64)
    ok = np.ones(nparts, dtype=np.bool_)
    # the fallback rule ("more than half the database") holds for the shares' sum
    share_budget = max(_U1, budget // np.uint64(nparts))
    _knn_split(q, w, n, k, sub_starts, sub_lens, masks, ctab, itab, dense, direct, direct_base, keys, key_base,
               nkeys, starts_, share_budget, hk2, ok)
    if not ok.all():
        return False
    merged = np.empty(k, dtype=np.uint64)
    _kth_key_of_shares(hk2, np.uint64(k), merged)  # the k smallest keys, as a heap
    _heapsort_key(merged)
    _unpack_keys(merged, out_d[0], out_i[0])
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
        cd = out_d[lo:hi]
        ci = out_i[lo:hi]
        counts[qi] = _radius_one(queries[qi], np.uint64(w), n, np.int64(radius), sub_starts, sub_lens, masks,
                                 ctab, itab, dense, direct, direct_base, keys, key_base, nkeys, starts_, budget,
                                 cd, ci)
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

    layout : {"copied", "compact"}
        ``"copied"`` (default): each of the ``m`` tables holds the ids and a
        copy of the codes in bucket order, so a bucket's candidates are read
        sequentially: ``m * N * (8 * ceil(nbytes / 8) + 4)`` bytes with int32
        ids, plus bucket offsets (10M 64-bit codes: 460 MB at m=4, 570 MB at
        m=5, against 76 MB of codes). ``"compact"``: the tables hold ids only
        (``m * N * 4`` bytes) and candidates are gathered from the packed codes,
        which are searched in place, not copied (when ``nbytes`` is a multiple
        of 8 and ``codes`` is C-contiguous; do not modify them afterwards):
        a random memory access per candidate, so slower where many candidates
        are checked (random codes), close where few are (learned codes).

    A linear-scan copy of the codes is made only if some query falls back to
    it. Fewer tables cost less memory; :func:`plan` picks ``m`` from the data.

    Attributes: ``ntotal``, ``nbytes``, ``bits``, ``m`` as for LinearScan;
    ``split_single_query`` (default True) lets one query use all threads.
    """

    def __init__(self, codes: np.ndarray, m: int | None = None, layout: str = "copied"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout = layout
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
        if self.ntotal >= 1 << int(_bitops.KEY_SHIFT):
            raise ValueError(f"MultiIndexHashing holds fewer than 2**{int(_bitops.KEY_SHIFT)} codes, got {self.ntotal:,}")
        self.m = int(m)
        #: Deal a single query's large passes out to all threads (True), or
        #: answer it on one thread (better when the cores are oversubscribed).
        self.split_single_query = True
        self._words = _bitops.words_per_code(self.nbytes)
        self._build(_bitops.pack_rows(codes))

    @classmethod
    def from_tables(cls, tables: StoredTables) -> "MultiIndexHashing":
        """MIH over tables stored with an index (:mod:`hashindex.mih_tables`), without building."""
        self = cls.__new__(cls)
        self.layout, self.ntotal, self.nbytes, self.m = "copied", tables.ntotal, tables.nbytes, tables.m
        self.bits = 8 * self.nbytes
        self.split_single_query = True
        self._words = _bitops.words_per_code(self.nbytes)
        self._set_tables(tables.arrays)
        return self

    def table_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that make up the tables (:data:`hashindex.mih_tables.ARRAYS`), to store them."""
        return dict(zip(ARRAYS, self._table_args))

    def _set_tables(self, arrays: dict) -> None:
        (self._sub_starts, self._sub_lens, self._masks, self._ctab, self._itab, self._dense, self._direct,
         self._direct_base, self._keys, self._key_base, self._nkeys, self._starts) = (arrays[name] for name in ARRAYS)
        self._budget = np.uint64(max(1, int(_FALLBACK_FRACTION * self.ntotal)))
        # the kernels' table arguments, in their order
        self._table_args = tuple(arrays[name] for name in ARRAYS)

    @cached_property
    def _scan(self) -> LinearScan:
        """The linear scan that answers queries MIH gives up on, built at the first such query (so
        its copy of the codes costs memory only where the data needs it) from table 0, which holds
        every code: row ``itab[0][p]`` is ``ctab[0][p]``."""
        n, nw = self.ntotal, self._words
        if self.layout == "compact":
            words = self._ctab
        else:
            words = np.empty((n, nw), dtype=np.uint64)
            words[self._itab[:n]] = self._ctab[:n * nw].reshape(n, nw)
        return LinearScan(words.view(np.uint8)[:, :self.nbytes])

    def __repr__(self) -> str:
        return f"MultiIndexHashing(ntotal={self.ntotal}, bits={self.bits}, m={self.m}, layout={self.layout!r})"

    def _build(self, words: np.ndarray) -> None:
        n, m, nw = self.ntotal, self.m, self._words
        self._sub_starts, self._sub_lens = _substrings(self.bits, m)
        self._masks = _masks(self._sub_starts, self._sub_lens, nw)
        id_dtype = np.int32 if n < 2**31 else np.int64
        off_dtype = np.int32 if n < 2**31 else np.int64
        copied = self.layout == "copied"
        ctab = np.empty((m, n if copied else 0, nw), dtype=np.uint64)
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
                if copied:
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
        # the kernels tell the layouts apart by ctab's rank (_word)
        self._set_tables({
            "sub_starts": self._sub_starts, "sub_lens": self._sub_lens, "masks": self._masks,
            "ctab": ctab.reshape(-1) if copied else np.ascontiguousarray(words), "itab": itab.reshape(-1),
            "dense": dense, "direct": np.concatenate(direct) if direct else np.zeros(1, dtype=off_dtype),
            "direct_base": direct_base, "keys": np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64),
            "key_base": key_base, "nkeys": nkeys, "starts": np.concatenate(starts_)})

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
        if nq == 1 and self.split_single_query:
            # the path of `hashindex query`: a few µs of Python matter against ~0.4 ms of search
            if _knn_one_split(qwords[0], np.uint64(self._words), self.ntotal, k, *self._table_args, self._budget,
                              _bitops.num_threads(), D, I):
                return D, I
            logger.debug("MIH: the query fell back to the linear scan")
            return self._scan.search(queries, k)
        else:
            # each query's heap as the one share of a split: [nq, 1, k]
            heap = np.full((nq, 1, k), SENTINEL_KEY, dtype=np.uint64)
            ok = np.ones(nq, dtype=np.bool_)
            # a single query without splitting runs on one thread: waking the pool costs more
            with _bitops.threads(1 if nq == 1 else _bitops.num_threads()):
                _knn_parallel(qwords, np.uint64(self._words), self.ntotal, k, *self._table_args, self._budget, heap,
                              D, I, ok)
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
        tables = self._table_args
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
