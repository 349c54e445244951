"""Exact Hamming-space search over packed binary codes.

Codes are ``np.uint8`` arrays ``[N, nbytes]`` in ``numpy.packbits`` order (bit
set <=> +1).  The API mirrors faiss's binary indexes so that callers can swap
``faiss.IndexBinaryFlat`` in and out:

* :class:`LinearScan` -- ``search(queries, k) -> (D, I)`` and
  ``radius_search(queries, radius) -> (lims, D, I)``, on numba kernels;
* :class:`NumpyScan` -- the same in plain numpy, for processes that ask a few
  queries and should not wait for numba to load;
* :func:`hamming_distances` -- the full ``[Q, N]`` distance matrix.

Results are deterministic: equal distances are ordered by database position,
exactly as a stable sort by distance would order them.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

# numba and the kernels (_bitops) are imported where LinearScan first needs them: importing numba and
# loading the kernels' compiled cache costs a fresh process ~0.5 s, which a one-off query on NumpyScan
# never pays.

__all__ = ["LinearScan", "NumpyScan", "hamming_distances", "MISSING_DISTANCE"]

logger = logging.getLogger(__name__)

#: Distance reported for result slots that have no row (``k > ntotal``);
#: the matching id is ``-1``.  Same convention as faiss ``IndexBinaryFlat``.
MISSING_DISTANCE = int(np.iinfo(np.int32).max)  # == _bitops.SENTINEL_D

# Database bytes scanned per block while every query of a batch visits it:
# small enough to stay in L1/L2 across the queries.
_BLOCK_BYTES = 32 * 1024
# Caps the per-chunk heaps (nchunks * queries * k entries of 16 bytes).
_HEAP_BYTES = 64 * 1024 * 1024
_MAX_QUERY_BATCH = 4096
# Below this many 64-bit words scanned per call, one thread is faster than
# waking the pool (tens of microseconds, far more on a loaded machine).
_PARALLEL_MIN_WORDS = 1 << 18


def empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D, I)`` with every slot missing: no queries, or an empty database."""
    return np.full((nq, k), MISSING_DISTANCE, dtype=np.int32), np.full((nq, k), -1, dtype=np.int64)


def empty_result_radius(nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lims, D, I)`` with no results for any query."""
    return np.zeros(nq + 1, dtype=np.int64), np.empty(0, np.int32), np.empty(0, np.int64)


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------


def _check_codes(codes, name: str) -> np.ndarray:
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"{name} must be a np.uint8 array of packed bits, got {got}")
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array [n, nbytes] with nbytes >= 1, got shape {codes.shape}")
    return np.ascontiguousarray(codes)


def _check_queries(queries, nbytes: int, name: str = "queries", other: str = "the index") -> np.ndarray:
    if isinstance(queries, np.ndarray) and queries.ndim == 1 and queries.dtype == np.uint8:
        queries = queries.reshape(1, -1)  # one query given as a 1-D code
    queries = _check_codes(queries, name)
    if queries.shape[1] != nbytes:
        raise ValueError(f"{name} have {queries.shape[1]} bytes ({8 * queries.shape[1]} bits) per code, "
                         f"{other} has {nbytes} bytes ({8 * nbytes} bits)")
    return queries


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_radius(radius) -> int:
    if isinstance(radius, (bool, np.bool_)) or not isinstance(radius, numbers.Integral) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0 (Hamming distance, inclusive), got {radius!r}")
    return int(radius)


def _block_tiles(words: int) -> int:
    from . import _bitops

    return max(1, _BLOCK_BYTES // (_bitops.TILE * 8 * words))


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


class LinearScan:
    """Exact brute-force Hamming search, a drop-in for ``faiss.IndexBinaryFlat``.

    Parameters
    ----------
    codes : np.ndarray
        ``uint8 [N, nbytes]`` packed codes (``numpy.packbits`` order); ``nbytes``
        may be any positive number.  The index keeps one zero-padded ``uint64``
        copy (``N * ceil(nbytes / 8) * 8`` bytes, in tiles of 64 codes) and no
        reference to ``codes``.

    Attributes
    ----------
    ntotal : int   number of database codes
    nbytes : int   bytes per code
    bits : int     bits per code (``8 * nbytes``)

    Uses all numba threads (``numba.set_num_threads``); small calls run on one.
    Speed: see ``bench/search_speed.py`` (2-core AMD EPYC: 5.5-13x faiss
    IndexBinaryFlat at 1M/10M codes, 64/128 bits, except single 128-bit
    queries at 10M, which are near the memory bandwidth: ~3x).
    """

    def __init__(self, codes: np.ndarray):
        from . import _bitops

        codes = _check_codes(codes, "codes")
        self.ntotal = int(codes.shape[0])
        self.nbytes = int(codes.shape[1])
        self.bits = 8 * self.nbytes
        self._words = _bitops.words_per_code(self.nbytes)
        self._tiles = _bitops.pack_tiles(codes)
        logger.debug("LinearScan: %d codes of %d bits, %.1f MB", self.ntotal, self.bits, self._tiles.nbytes / 1e6)

    def __repr__(self) -> str:
        return f"LinearScan(ntotal={self.ntotal}, bits={self.bits})"

    def _nchunks(self, nqueries: int) -> int:
        """Database ranges scanned in parallel; 1 means run on one thread."""
        from . import _bitops

        if self.ntotal * self._words * nqueries < _PARALLEL_MIN_WORDS:
            return 1
        # One database range per thread, never shorter than a 64-code tile.
        ntiles = -(-self.ntotal // _bitops.TILE)
        return max(1, min(_bitops.num_threads(), ntiles))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest codes of each query.

        Returns ``(D, I)``: ``D`` int32 ``[Q, k]`` Hamming distances in
        ascending order, ``I`` int64 ``[Q, k]`` database row positions.  Equal
        distances are ordered by position (the first ``k`` of a stable sort by
        distance).  If ``k > ntotal`` the missing tail has ``I = -1`` and
        ``D = MISSING_DISTANCE`` (``2**31 - 1``), as faiss does.
        A 1-D ``queries`` of ``nbytes`` is one query.
        """
        from . import _bitops

        queries = _check_queries(queries, self.nbytes)
        k = _check_k(k)
        nq = queries.shape[0]
        if nq == 0 or self.ntotal == 0:
            return empty_result(nq, k)
        qwords = _bitops.pack_rows(queries)
        nchunks = self._nchunks(nq)
        blk = _block_tiles(self._words)
        batch = max(1, min(_MAX_QUERY_BATCH, _HEAP_BYTES // (16 * k * nchunks)))
        out_d = np.empty((nq, k), dtype=np.int32)
        out_i = np.empty((nq, k), dtype=np.int64)
        for start in range(0, nq, batch):  # bounds heap memory; one kernel call per batch
            stop = min(nq, start + batch)
            with _bitops.threads(1 if nchunks == 1 else _bitops.num_threads()):
                out_d[start:stop], out_i[start:stop] = _bitops.knn(
                    self._tiles, self._words, self.ntotal, qwords[start:stop], k, nchunks, blk)
        return out_d, out_i

    def radius_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All codes within Hamming distance ``<= radius`` of each query.

        The bound is INCLUSIVE; faiss ``range_search`` is strict (``< radius``),
        so ``faiss_index.range_search(q, r + 1)`` matches ``radius_search(q, r)``.

        Returns ``(lims, D, I)`` in the faiss layout: ``lims`` int64 ``[Q + 1]``;
        the results of query ``i`` are ``D[lims[i]:lims[i+1]]`` (int32) and
        ``I[lims[i]:lims[i+1]]`` (int64), sorted by (distance, position).
        """
        from . import _bitops

        queries = _check_queries(queries, self.nbytes)
        radius = _check_radius(radius)
        nq = queries.shape[0]
        if nq == 0 or self.ntotal == 0:
            return empty_result_radius(nq)
        radius = min(radius, self.bits)  # keeps the kernels' uint64 compare in range
        # Always the parallel kernel: a serial twin would add JIT compile time.
        nchunks = max(1, min(_bitops.num_threads(), -(-self.ntotal // _bitops.TILE)))
        lims, out_d, out_i = _bitops.radius_search(self._tiles, self._words, self.ntotal,
                                                   _bitops.pack_rows(queries), radius, nchunks, self.bits)
        return lims, out_d, out_i


class NumpyScan:
    """Exact brute-force Hamming search in plain numpy, with :class:`LinearScan`'s interface and
    results (the same distances; ties by position).

    5-20x slower per query than LinearScan, but with nothing to compile or load: LinearScan costs a
    fresh process ~0.5 s (importing numba, loading the kernels' cache) before its first answer, by
    which time this scan has answered a one-off query on 10M 64-bit codes about ten times. The
    ``"auto"`` searcher of :class:`hashindex.Index` starts here. Keeps a reference to ``codes`` (no
    copy) and works through them in blocks of ``BLOCK_ROWS``, so its scratch memory is bounded.
    """

    BLOCK_ROWS = 1 << 16

    def __init__(self, codes: np.ndarray):
        codes = _check_codes(codes, "codes")
        self.ntotal, self.nbytes = int(codes.shape[0]), int(codes.shape[1])
        self.bits = 8 * self.nbytes
        # whole 64-bit words where the code length allows: 8x fewer popcounts than bytes
        self._words = codes.view(np.uint64) if self.nbytes % 8 == 0 else codes
        self._distance_dtype = np.uint8 if self.bits <= 255 else np.uint16

    def __repr__(self) -> str:
        return f"NumpyScan(ntotal={self.ntotal}, bits={self.bits})"

    def _distance_blocks(self, query: np.ndarray):
        """``(start, distances)`` of one query to the codes, block after block of ``BLOCK_ROWS``."""
        query = np.ascontiguousarray(query).view(self._words.dtype)
        for start in range(0, self.ntotal, self.BLOCK_ROWS):
            counts = np.bitwise_count(np.bitwise_xor(self._words[start:start + self.BLOCK_ROWS], query))
            total = counts[:, 0].astype(self._distance_dtype)
            for word in range(1, counts.shape[1]):  # column sums: np.sum(axis=1) is 3x slower here
                np.add(total, counts[:, word], out=total, casting="unsafe")
            yield start, total

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`LinearScan.search`."""
        queries = _check_queries(queries, self.nbytes)
        k = _check_k(k)
        out_d, out_i = empty_result(queries.shape[0], k)
        if self.ntotal == 0:
            return out_d, out_i
        found = min(k, self.ntotal)
        for q, query in enumerate(queries):
            out_d[q, :found], out_i[q, :found] = self._within(query, self.bits, found)
        return out_d, out_i

    def radius_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`LinearScan.radius_search` (inclusive radius)."""
        queries = _check_queries(queries, self.nbytes)
        radius = _check_radius(radius)
        if queries.shape[0] == 0 or self.ntotal == 0:
            return empty_result_radius(queries.shape[0])
        per_query = [self._within(query, radius) for query in queries]
        lims = np.concatenate([[0], np.cumsum([len(rows) for _, rows in per_query])]).astype(np.int64)
        return (lims, np.concatenate([d for d, _ in per_query]).astype(np.int32),
                np.concatenate([r for _, r in per_query]).astype(np.int64))

    def _within(self, query: np.ndarray, limit: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distances and rows of the codes within ``limit`` of one query, by (distance, position).

        With ``k``, only the k nearest: the limit then shrinks to the k-th distance seen so far (a
        few rows per block pass it once the first block has set it), so a query costs one pass over
        the codes and no [N] array."""
        kept_d, kept_rows = [], []
        kept = kept_after_cut = 0
        for start, distance in self._distance_blocks(query):
            rows = np.flatnonzero(distance <= limit)
            if rows.size == 0:
                continue
            kept_d.append(distance[rows])
            kept_rows.append(rows + start)
            kept += rows.size
            # cut back to the k-th distance; only after the kept rows doubled, since ties at the
            # k-th distance can be many (duplicate codes) and each cut concatenates them all
            if k is not None and kept >= k and kept >= 2 * kept_after_cut:
                d, r = np.concatenate(kept_d), np.concatenate(kept_rows)
                limit = int(np.partition(d, k - 1)[k - 1])
                near = d <= limit
                kept_d, kept_rows = [d[near]], [r[near]]
                kept = kept_after_cut = int(np.count_nonzero(near))
        if not kept_d:
            return np.empty(0, self._distance_dtype), np.empty(0, np.int64)
        d, r = np.concatenate(kept_d), np.concatenate(kept_rows)
        order = np.argsort(d, kind="stable")[:k]  # kept rows are in position order: ties stay so
        return d[order], r[order]


def hamming_distances(queries: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Full Hamming distance matrix, int32 ``[Q, N]`` (parallel numba).

    ``queries`` and ``codes`` are ``uint8`` packed codes with the same number
    of bytes; a 1-D ``queries`` is one query.
    """
    from . import _bitops

    codes = _check_codes(codes, "codes")
    queries = _check_queries(queries, codes.shape[1], other="codes")
    nq, n = queries.shape[0], codes.shape[0]
    if nq == 0 or n == 0:
        return np.zeros((nq, n), dtype=np.int32)
    words = _bitops.words_per_code(codes.shape[1])
    tiles = _bitops.pack_tiles(codes)
    return _bitops.distance_matrix(tiles, words, n, _bitops.pack_rows(queries), _block_tiles(words))


def compile_kernels() -> float:
    """Compile every numba kernel of the searchers into numba's on-disk cache (``cache=True``), so
    that no later search pays a first-time compile; ``setup.sh`` runs it once after installing
    (``python -m hashindex.search``). Returns the seconds it took (near zero when already cached)."""
    import time

    from .mih import MultiIndexHashing

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for nbytes in (8, 16):  # 64- and 128-bit codes take the same kernels; both shapes are warmed
        codes = rng.integers(0, 256, (4096, nbytes), dtype=np.uint8)
        queries = codes[:3]
        for engine in (LinearScan(codes), MultiIndexHashing(codes, layout="copied"),
                       MultiIndexHashing(codes, layout="compact")):
            engine.search(queries, 5)
            engine.search(queries[0], 5)
            engine.radius_search(queries, 3)
    return time.perf_counter() - started


if __name__ == "__main__":
    print(f"hashindex: search kernels compiled and cached in {compile_kernels():.1f} s")
