"""Numba kernels for Hamming-space scans over packed binary codes.

Layout ("tiles"): codes are padded with zero bytes to ``W`` whole 64-bit words
and grouped in tiles of 64 codes; inside a tile all first words come first,
then all second words, and so on.  Word ``w`` of code ``i`` lives at
``((i >> 6) * W + w) * 64 + (i & 63)`` of a flat ``uint64`` array.  This lets
the compiler vectorise "distance to 64 codes" into contiguous loads plus
``vpopcntq`` (AVX-512) or the pshufb popcount (AVX2).  The last tile is padded
with zero codes; every kernel takes ``n`` and never reports a padding row.

All indices in hot loops are ``uint64``: with signed indices numba emits a
negative-index wraparound check per access, which blocks vectorisation.
Every integer that meets a ``uint64`` must itself be ``uint64`` (numba types
``uint64 op int64`` as float64), hence the ``_U*`` constants.

Top-k state is a bounded max-heap per (chunk, query) ordered by
``(distance, position)``.  The scan visits rows in increasing position, so a
row enters only if its distance is strictly smaller than the heap's worst:
that keeps the earliest rows among equal distances, i.e. exactly the first
``k`` rows of a stable sort by distance.  Empty slots hold the sentinel
``(SENTINEL_D, -1)``, which is what faiss returns for missing results.
"""

from __future__ import annotations

from contextlib import contextmanager

import numba
import numba.np.ufunc.parallel as _numba_parallel
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 64
# faiss IndexBinaryFlat reports missing results as D = INT32_MAX, I = -1.
SENTINEL_D = np.iinfo(np.int32).max

_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U3 = np.uint64(3)
_U4 = np.uint64(4)
_U6 = np.uint64(6)
_U63 = np.uint64(63)
_U64 = np.uint64(64)
_U128 = np.uint64(128)
_U256 = np.uint64(256)
_U8 = np.uint64(8)
# Software prefetch distance for streaming scans, in words (8 KiB ahead). The hardware prefetcher
# alone left a single-query 10M x 128-bit scan at about 2/3 of the bandwidth this VM reaches.
# 8 KiB ahead was best of 4-32 KiB in alternating runs: 1.2-1.5x at 128 bits, ~1.1x at 64 bits.
_PREFETCH_WORDS = np.uint64(1024)
_USENT = np.uint64(SENTINEL_D)


@intrinsic
def popcount64(typingctx, x):
    """Population count of a uint64, compiled to LLVM ``ctpop``."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (LLVM ``prefetch``; never faults)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def num_threads() -> int:
    """``numba.get_num_threads()`` without its per-call lock: through a multiprocessing lock that
    call costs ~15 µs here, 3% of a multi-index query. numba's internal getter once the pool runs
    (it is per thread, as set_num_threads sets it); the public call otherwise."""
    if getattr(_numba_parallel, "_is_initialized", False):
        getter = getattr(_numba_parallel, "_get_num_threads", None)
        if getter is not None:
            n = getter()
            if n > 0:
                return int(n)
    return numba.get_num_threads()


@contextmanager
def threads(n: int):
    """Run numba parallel kernels on ``n`` threads inside the block.  With one
    thread a parallel kernel costs a few microseconds more than a serial twin
    (which would double the JIT compile time), while waking the pool costs
    tens of microseconds, and milliseconds on a loaded machine."""
    before = num_threads()
    if n == before:
        yield
        return
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


# --------------------------------------------------------------------------
# Packing (numpy, runs once per index / query batch)
# --------------------------------------------------------------------------


def words_per_code(nbytes: int) -> int:
    return (nbytes + 7) // 8


def pack_rows(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, nbytes] -> uint64 [N, W] (zero-padded, row-major)."""
    n, nbytes = codes.shape
    w = words_per_code(nbytes)
    if nbytes == 8 * w:
        buf = np.ascontiguousarray(codes)
    else:
        buf = np.zeros((n, 8 * w), dtype=np.uint8)
        buf[:, :nbytes] = codes
    return buf.view(np.uint64).reshape(n, w)


def pack_tiles(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, nbytes] -> flat uint64 tiles (see module docstring)."""
    n, nbytes = codes.shape
    w = words_per_code(nbytes)
    ntiles = max(1, (n + TILE - 1) // TILE)
    buf = np.zeros((ntiles * TILE, 8 * w), dtype=np.uint8)
    buf[:n, :nbytes] = codes
    rows = buf.view(np.uint64).reshape(ntiles, TILE, w)
    del buf
    if w == 1:
        return rows.reshape(-1)
    return np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(-1)


# --------------------------------------------------------------------------
# Heap on (distance uint64, position int64); max at the root
# --------------------------------------------------------------------------


@njit(inline="always")
def _greater(d1, i1, d2, i2):
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(cache=True)
def _sift_down(hd, hi, n, pos, d, i):
    """Place (d, i) at ``pos`` and sift it down a max-heap of size ``n``."""
    while True:
        child = _U2 * pos + _U1
        if child >= n:
            break
        right = child + _U1
        if right < n and _greater(hd[right], hi[right], hd[child], hi[child]):
            child = right
        if _greater(hd[child], hi[child], d, i):
            hd[pos] = hd[child]
            hi[pos] = hi[child]
            pos = child
        else:
            break
    hd[pos] = d
    hi[pos] = i


@njit(cache=True)
def _heapsort(hd, hi):
    """Sort a max-heap in place into ascending (distance, position)."""
    end = np.uint64(hd.shape[0])
    while end > _U1:
        end -= _U1
        d = hd[end]
        i = hi[end]
        hd[end] = hd[0]
        hi[end] = hi[0]
        _sift_down(hd, hi, end, _U0, d, i)


# --------------------------------------------------------------------------
# Heap on packed keys (distance << KEY_SHIFT | position); max at the root
# --------------------------------------------------------------------------
# One uint64 per candidate: (distance, position) order is plain integer order, a comparison is one
# instruction, and a slot is written in one store, so another thread reading a heap sees each slot
# at some value it really held (multi-index hashing's shares read each other's heaps unlocked).

KEY_SHIFT = np.uint64(40)  # positions < 2**40, distances < 2**24
POSITION_MASK = np.uint64((1 << 40) - 1)
SENTINEL_KEY = np.uint64(2**64 - 1)  # an empty slot: larger than every real key


@njit(cache=True, _nrt=False)
def _sift_down_key(hk, n, pos, key):
    """Place ``key`` at ``pos`` and sift it down a max-heap of size ``n``. Every slot it changes
    only decreases, which is what makes an unlocked reader see upper bounds."""
    while True:
        child = _U2 * pos + _U1
        if child >= n:
            break
        right = child + _U1
        if right < n and hk[right] > hk[child]:
            child = right
        if hk[child] > key:
            hk[pos] = hk[child]
            pos = child
        else:
            break
    hk[pos] = key


@njit(cache=True, _nrt=False)
def _heapsort_key(hk):
    """Sort a max-heap of keys in place into ascending order."""
    end = np.uint64(hk.shape[0])
    while end > _U1:
        end -= _U1
        key = hk[end]
        hk[end] = hk[0]
        _sift_down_key(hk, end, _U0, key)


# --------------------------------------------------------------------------
# k-NN scan of a tile range for one query
# --------------------------------------------------------------------------


@njit(cache=True)
def _push_tile(tiles, w, t, n, q, hd, hi, k):
    """Offer every valid row of tile ``t`` to the heap; returns the new worst."""
    base = t * w * _U64
    row0 = t * _U64
    stop = _U64
    if n - row0 < stop:
        stop = n - row0
    worst = hd[0]
    for j in range(stop):
        d = _U0
        for ww in range(w):
            d += popcount64(tiles[base + ww * _U64 + j] ^ q[ww])
        if d < worst:
            _sift_down(hd, hi, k, _U0, d, np.int64(row0 + j))
            worst = hd[0]
    return worst


@njit(inline="always")
def _prefetch_ahead(tiles, base, nwords):
    # One hint per 64-byte line of the tile _PREFETCH_WORDS ahead, while that tile exists.
    pf = base + _PREFETCH_WORDS
    if pf + nwords <= np.uint64(tiles.shape[0]):
        for j in range(_U0, nwords, _U8):
            prefetch(tiles, pf + j)


@njit(cache=True)
def _scan_w1(tiles, t0, t1, n, q, hd, hi, k, streaming):
    q0 = q[0]
    worst = hd[0]
    for t in range(t0, t1):
        base = t * _U64
        m = _U64
        if streaming:
            _prefetch_ahead(tiles, base, _U64)
        for j in range(_U64):
            d = popcount64(tiles[base + j] ^ q0)
            m = min(m, d)
        # Most tiles cannot beat the current k-th distance: skip the heap.
        if m < worst:
            worst = _push_tile(tiles, _U1, t, n, q, hd, hi, k)


@njit(cache=True)
def _scan_w2(tiles, t0, t1, n, q, hd, hi, k, acc, streaming):
    # ``streaming`` (one query: the tiles come from memory once): two passes per tile, first word
    # into acc, then second word + min, each streaming one 512-byte run, 1.8x faster here. With
    # several queries per cached block the fused single pass is 1.4x faster.
    q0 = q[0]
    q1 = q[1]
    worst = hd[0]
    for t in range(t0, t1):
        base = t * _U128
        m = _U128
        if streaming:
            _prefetch_ahead(tiles, base, _U128)
            for j in range(_U64):
                acc[j] = popcount64(tiles[base + j] ^ q0)
            for j in range(_U64):
                m = min(m, acc[j] + popcount64(tiles[base + _U64 + j] ^ q1))
        else:
            for j in range(_U64):
                m = min(m, popcount64(tiles[base + j] ^ q0) + popcount64(tiles[base + _U64 + j] ^ q1))
        if m < worst:
            worst = _push_tile(tiles, _U2, t, n, q, hd, hi, k)


@njit(cache=True)
def _tile_distances(tiles, w, t, q, acc):
    """acc[j] = distance of row j of tile t.  Words are taken four at a time
    with the row loop innermost, so each pass vectorises over 64 rows and
    acc (in L1) is read and written once per four words."""
    base = t * w * _U64
    for j in range(_U64):
        acc[j] = _U0
    ww = _U0
    while ww + _U4 <= w:
        o0 = base + ww * _U64
        o1 = o0 + _U64
        o2 = o1 + _U64
        o3 = o2 + _U64
        qa = q[ww]
        qb = q[ww + _U1]
        qc = q[ww + _U2]
        qd = q[ww + _U3]
        for j in range(_U64):
            acc[j] += (popcount64(tiles[o0 + j] ^ qa) + popcount64(tiles[o1 + j] ^ qb)
                       + popcount64(tiles[o2 + j] ^ qc) + popcount64(tiles[o3 + j] ^ qd))
        ww += _U4
    while ww < w:
        o0 = base + ww * _U64
        qa = q[ww]
        for j in range(_U64):
            acc[j] += popcount64(tiles[o0 + j] ^ qa)
        ww += _U1


@njit(cache=True)
def _scan_w4(tiles, t0, t1, n, q, hd, hi, k, acc, streaming):
    # As _scan_w2; streaming: words 0-1 into acc, then words 2-3 + min
    q0 = q[0]
    q1 = q[1]
    q2 = q[2]
    q3 = q[3]
    worst = hd[0]
    for t in range(t0, t1):
        b0 = t * _U256
        b1 = b0 + _U64
        b2 = b1 + _U64
        b3 = b2 + _U64
        m = _U256
        if streaming:
            _prefetch_ahead(tiles, b0, _U256)
            for j in range(_U64):
                acc[j] = popcount64(tiles[b0 + j] ^ q0) + popcount64(tiles[b1 + j] ^ q1)
            for j in range(_U64):
                m = min(m, acc[j] + popcount64(tiles[b2 + j] ^ q2) + popcount64(tiles[b3 + j] ^ q3))
        else:
            for j in range(_U64):
                m = min(m, (popcount64(tiles[b0 + j] ^ q0) + popcount64(tiles[b1 + j] ^ q1)
                            + popcount64(tiles[b2 + j] ^ q2) + popcount64(tiles[b3 + j] ^ q3)))
        if m < worst:
            worst = _push_tile(tiles, _U4, t, n, q, hd, hi, k)


@njit(cache=True)
def _scan_generic(tiles, w, t0, t1, n, q, hd, hi, k, acc):
    worst = hd[0]
    for t in range(t0, t1):
        _tile_distances(tiles, w, t, q, acc)
        m = acc[0]
        for j in range(_U1, _U64):
            m = min(m, acc[j])
        if m < worst:
            row0 = t * _U64
            stop = _U64
            if n - row0 < stop:
                stop = n - row0
            for j in range(stop):
                d = acc[j]
                if d < worst:
                    _sift_down(hd, hi, k, _U0, d, np.int64(row0 + j))
                    worst = hd[0]


@njit(cache=True)
def _chunk_range(ntiles, c, nchunks):
    uc = np.uint64(c)
    un = np.uint64(nchunks)
    return ntiles * uc // un, ntiles * (uc + _U1) // un


@njit(cache=True)
def _knn_chunk(tiles, w, n, queries, k, c, nchunks, block_tiles, hd, hi):
    """Scan chunk ``c`` of the database for every query into hd/hi[c].

    The chunk is walked block by block and every query runs over a block
    while it is in cache."""
    nq = queries.shape[0]
    uw = np.uint64(w)
    un = np.uint64(n)
    uk = np.uint64(k)
    ub = np.uint64(block_tiles)
    t_lo, t_hi = _chunk_range((un + _U63) // _U64, c, nchunks)
    acc = np.empty(64, dtype=np.uint64)
    b0 = t_lo
    while b0 < t_hi:
        b1 = min(b0 + ub, t_hi)
        for qi in range(nq):
            q = queries[qi]
            chd = hd[c, qi]
            chi = hi[c, qi]
            if uw == _U1:
                _scan_w1(tiles, b0, b1, un, q, chd, chi, uk, nq == 1)
            elif uw == _U2:
                _scan_w2(tiles, b0, b1, un, q, chd, chi, uk, acc, nq == 1)
            elif uw == _U4:
                _scan_w4(tiles, b0, b1, un, q, chd, chi, uk, acc, nq == 1)
            else:
                _scan_generic(tiles, uw, b0, b1, un, q, chd, chi, uk, acc)
        b0 = b1


@njit(cache=True)
def _merge_query(hd, hi, qi, out_d, out_i):
    """Merge the chunks' heaps of query qi into its sorted top-k row."""
    nchunks = hd.shape[0]
    k = hd.shape[2]
    uk = np.uint64(k)
    md = hd[0, qi].copy()
    mi = hi[0, qi].copy()
    for c in range(1, nchunks):
        cd = hd[c, qi]
        ci = hi[c, qi]
        for j in range(k):
            d = cd[j]
            i = ci[j]
            # Other chunks hold smaller positions too: compare on (d, i).
            if _greater(md[0], mi[0], d, i):
                _sift_down(md, mi, uk, _U0, d, i)
    _heapsort(md, mi)
    for j in range(k):
        out_d[qi, j] = np.int32(md[j])
        out_i[qi, j] = mi[j]


@njit(cache=True, parallel=True)
def _knn_scan_chunks(tiles, w, n, queries, k, nchunks, block_tiles, hd, hi):
    # Kept minimal: numba's parallel compile time grows with the kernel body.
    for c in prange(nchunks):
        _knn_chunk(tiles, w, n, queries, k, c, nchunks, block_tiles, hd, hi)


@njit(cache=True)
def _merge_all(hd, hi):
    nq = hd.shape[1]
    k = hd.shape[2]
    out_d = np.empty((nq, k), dtype=np.int32)
    out_i = np.empty((nq, k), dtype=np.int64)
    for qi in range(nq):
        _merge_query(hd, hi, qi, out_d, out_i)
    return out_d, out_i


def knn(tiles, w, n, queries, k, nchunks, block_tiles):
    """Exact top-k: the database is split into ``nchunks`` tile ranges scanned
    in parallel with one heap per (chunk, query), then merged.

    Returns D int32 [Q, k] and I int64 [Q, k], sorted by (distance, position).
    """
    nq = queries.shape[0]
    hd = np.full((nchunks, nq, k), _USENT, dtype=np.uint64)
    hi = np.full((nchunks, nq, k), -1, dtype=np.int64)
    _knn_scan_chunks(tiles, w, n, queries, k, nchunks, block_tiles, hd, hi)
    return _merge_all(hd, hi)


# --------------------------------------------------------------------------
# Radius search: count pass, fill pass (position order), counting sort by
# distance (stable, so ties stay in position order).  Work items are
# (query, chunk) pairs so that a single query still uses every thread.
# --------------------------------------------------------------------------


@njit(cache=True)
def _tile_min(tiles, w, t, q, acc):
    _tile_distances(tiles, w, t, q, acc)
    m = acc[0]
    for j in range(_U1, _U64):
        m = min(m, acc[j])
    return m


@njit(cache=True)
def _radius_item(tiles, w, n, queries, radius, nchunks, item, out_d, out_i, pos):
    """Count (``out_d`` empty) or write the hits of one (query, chunk) item
    from ``pos`` on, in position order; returns the number of hits."""
    uw = np.uint64(w)
    un = np.uint64(n)
    ur = np.uint64(radius)
    write = out_d.shape[0] > 0
    t_lo, t_hi = _chunk_range((un + _U63) // _U64, item % nchunks, nchunks)
    q = queries[item // nchunks]
    acc = np.empty(64, dtype=np.uint64)
    cnt = 0
    for t in range(t_lo, t_hi):
        if _tile_min(tiles, uw, t, q, acc) <= ur:  # skip tiles with no hit
            row0 = t * _U64
            stop = min(_U64, un - row0)
            for j in range(stop):
                if acc[j] <= ur:
                    if write:
                        out_d[pos + cnt] = np.int32(acc[j])
                        out_i[pos + cnt] = np.int64(row0 + j)
                    cnt += 1
    return cnt


@njit(cache=True)
def _sort_query_by_distance(lims, out_d, out_i, maxd, qi):
    """Stable counting sort of query qi's slice by distance."""
    lo = lims[qi]
    hi = lims[qi + 1]
    if hi - lo < 2:
        return
    hist = np.zeros(maxd + 2, dtype=np.int64)
    for p in range(lo, hi):
        hist[out_d[p] + 1] += 1
    for v in range(1, maxd + 2):
        hist[v] += hist[v - 1]
    tmp_d = out_d[lo:hi].copy()
    tmp_i = out_i[lo:hi].copy()
    for p in range(hi - lo):
        d = tmp_d[p]
        dst = lo + hist[d]
        hist[d] += 1
        out_d[dst] = d
        out_i[dst] = tmp_i[p]


@njit(cache=True, parallel=True)
def _radius_pass(tiles, w, n, queries, radius, nchunks, maxd, mode, offsets, lims, out_d, out_i):
    """One parallel loop, three uses (one compiled kernel instead of three):
    mode 0 counts the hits of each (query, chunk) item, mode 1 writes them from
    ``offsets[item]`` on, mode 2 sorts each query's slice by distance."""
    nq = queries.shape[0]
    nitems = nq if mode == 2 else nq * nchunks
    counts = np.zeros(nitems, dtype=np.int64)
    for item in prange(nitems):
        if mode == 2:
            _sort_query_by_distance(lims, out_d, out_i, maxd, item)
        else:
            pos = offsets[item] if mode == 1 else 0
            counts[item] = _radius_item(tiles, w, n, queries, radius, nchunks, item, out_d, out_i, pos)
    return counts


def radius_search(tiles, w, n, queries, radius, nchunks, maxd):
    """(lims, D, I) of all rows within ``radius`` (inclusive), sorted by
    (distance, position) per query."""
    none_d = np.empty(0, dtype=np.int32)
    none_i = np.empty(0, dtype=np.int64)
    none_l = np.zeros(1, dtype=np.int64)
    counts = _radius_pass(tiles, w, n, queries, radius, nchunks, maxd, 0, none_l, none_l, none_d, none_i)
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    out_d = np.empty(offsets[-1], dtype=np.int32)
    out_i = np.empty(offsets[-1], dtype=np.int64)
    lims = np.ascontiguousarray(offsets[::nchunks])  # item q * nchunks starts query q
    if out_d.size:
        _radius_pass(tiles, w, n, queries, radius, nchunks, maxd, 1, offsets, lims, out_d, out_i)
        _radius_pass(tiles, w, n, queries, radius, nchunks, maxd, 2, offsets, lims, out_d, out_i)
    return lims, out_d, out_i


# --------------------------------------------------------------------------
# Full distance matrix
# --------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def distance_matrix(tiles, w, n, queries, block_tiles):
    """int32 [Q, N]; parallel over (query group, database block) items."""
    nq = queries.shape[0]
    uw = np.uint64(w)
    un = np.uint64(n)
    ntiles = (n + 63) // 64
    nblocks = (ntiles + block_tiles - 1) // block_tiles
    qgroup = 64
    ngroups = (nq + qgroup - 1) // qgroup
    out = np.empty((nq, n), dtype=np.int32)
    for item in prange(ngroups * nblocks):
        g = item // nblocks
        b = item % nblocks
        t0 = np.uint64(b * block_tiles)
        t1 = np.uint64(min(ntiles, (b + 1) * block_tiles))
        acc = np.empty(64, dtype=np.uint64)
        for qi in range(g * qgroup, min(nq, (g + 1) * qgroup)):
            q = queries[qi]
            row_out = out[qi]
            for t in range(t0, t1):
                _tile_distances(tiles, uw, t, q, acc)
                row0 = t * _U64
                stop = min(_U64, un - row0)
                for j in range(stop):
                    row_out[row0 + j] = np.int32(acc[j])
    return out
