"""Multi-index hashing tables stored with an index version, and a numpy search over them.

Building MIH tables for 10M 64-bit codes takes ~3 s (after numba has loaded, ~0.5 s more), which a
process asking a few hundred queries never earns back, so such a process used to scan. When a
local index is published (:func:`hashindex.store.finish_version`), the tables
:class:`~hashindex.mih.MultiIndexHashing` builds for its searchable codes (the copied layout, the
default ``m``, or fewer within :data:`STORE_MAX_RATIO`) are written beside it as raw ``.npy`` files
in ``<version>/mih/``; :func:`load` memory-maps them, so opening costs nothing and pages are read as buckets are visited. The first
queries after ``open()`` then run MIH in numpy (:class:`NumpyMIH`: nothing to load or compile),
and the numba kernels, once loaded in the background, search the same mapped arrays
(``MultiIndexHashing.from_tables``). Both give the linear scan's results, ties by position.

This module imports numpy only (a query must not pay numba's import to read the tables); writing
imports :mod:`hashindex.mih`. The tables cost ``m × N × (8 × words + 4)`` bytes on disk (10M
64-bit codes, m = 5: 572 MB beside 76 MB of codes), at most :data:`STORE_MAX_RATIO` times the
codes; a version smaller than :data:`STORE_MIN_WORDS` gets none.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import uuid
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from .search import NumpyScan, _check_k, _check_queries, empty_result

logger = logging.getLogger(__name__)

TABLES_DIR = "mih"
TABLES_FORMAT = 1
# Below this many 64-bit words of searchable codes the numpy scan answers in about a millisecond,
# and the numba scan is as fast as MIH (1M random 64-bit codes): no tables are stored.
STORE_MIN_WORDS = 1 << 20
# Most bytes of stored tables, as a multiple of the packed codes: the copied layout at 64 bits takes
# 6-8x (open's default table budget is 8x); longer codes need more tables per word and get none.
STORE_MAX_RATIO = 8
# Arrays of MultiIndexHashing that make up its tables, in the order its kernels take them.
ARRAYS = ("sub_starts", "sub_lens", "masks", "ctab", "itab", "dense", "direct", "direct_base", "keys",
          "key_base", "nkeys", "starts")
# A numpy MIH query gives up and scans once it would touch more table entries than this share of N:
# a gathered entry costs a few times a scanned one.
NUMPY_FALLBACK_FRACTION = 0.25
# Buckets of at least this many entries on average are copied as slices (one Python-level slice
# each); smaller ones are gathered by index (one numpy call for all, but an index per entry).
SLICE_MIN_ENTRIES = 64


def substrings(bits: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit ranges [start, start+len) of the m substrings; lengths differ by <= 1."""
    lens = np.full(m, bits // m, dtype=np.int64)
    lens[: bits % m] += 1
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return starts, lens


def extract(words: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits [start, start+length) of each row of uint64 [N, W] words as uint64 keys."""
    w, sh = divmod(start, 64)
    key = words[:, w] >> np.uint64(sh)
    if sh + length > 64:
        key = key | (words[:, w + 1] << np.uint64(64 - sh))
    return key & np.uint64((1 << length) - 1)


def as_words(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, nbytes] -> uint64 [N, W], zero-padded (the tables' word layout)."""
    n, nbytes = codes.shape
    words = -(-nbytes // 8)
    if nbytes == 8 * words:
        return np.ascontiguousarray(codes).view(np.uint64).reshape(n, words)
    buf = np.zeros((n, 8 * words), dtype=np.uint8)
    buf[:, :nbytes] = codes
    return buf.view(np.uint64).reshape(n, words)


class StoredTables:
    """The arrays of a version's stored tables (memory-mapped), with ``ntotal``, ``nbytes``, ``m``."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.arrays, self.meta = arrays, meta
        self.ntotal, self.nbytes, self.m = int(meta["ntotal"]), int(meta["nbytes"]), int(meta["m"])

    @property
    def nbytes_on_disk(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def __repr__(self) -> str:
        return f"StoredTables(ntotal={self.ntotal}, bits={8 * self.nbytes}, m={self.m})"

    def a_code(self) -> np.ndarray:
        """One stored code, uint8 [1, nbytes] (table 0's first entry), to warm a searcher with."""
        return self.arrays["ctab"][:-(-self.nbytes // 8)].view(np.uint8)[None, :self.nbytes]


def worth_storing(n: int, nbytes: int) -> bool:
    """Whether a version of ``n`` searchable codes of ``nbytes`` bytes gets stored tables (by size)."""
    return n * -(-nbytes // 8) >= STORE_MIN_WORDS


def _local_dir(location: str) -> str | None:
    """The local folder of a version's group, or None for a remote (fsspec) store."""
    from .store import local_path  # store imports this module

    return local_path(location)


def write(location: str, codes: np.ndarray) -> StoredTables | None:
    """Build MIH tables for ``codes`` (the version's searchable rows) and store them under the
    version's folder ``location``; None where the index gets none (remote, small, or tables too
    big). Replaces tables stored before (a resumed publish); a reader never sees half of them: they
    are written to a temporary folder and renamed."""
    folder = _local_dir(location)
    n, nbytes = codes.shape
    if folder is None or not worth_storing(n, nbytes):
        return None
    from .mih import MultiIndexHashing, default_m

    # the default m, or fewer tables where those would exceed the budget (fewer, longer substrings)
    m = min(default_m(8 * nbytes, n), STORE_MAX_RATIO * nbytes // (8 * -(-nbytes // 8) + 4))
    if m < 1 or -(-8 * nbytes // m) > 24:  # keys of more bits need a key space beyond 4 x 4M codes
        return None
    mih = MultiIndexHashing(codes, m=m, layout="copied")
    if not mih._dense.all():  # sparse key tables are not worth storing (substrings of > log2(4N) bits)
        return None
    target = os.path.join(folder, TABLES_DIR)
    scratch = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(scratch)
    try:
        arrays = mih.table_arrays()
        for name in ARRAYS:
            np.save(os.path.join(scratch, f"{name}.npy"), arrays[name])
        meta = {"format": TABLES_FORMAT, "layout": "copied", "ntotal": int(n), "nbytes": int(nbytes), "m": mih.m,
                "shapes": {name: list(arrays[name].shape) for name in ARRAYS},
                "dtypes": {name: arrays[name].dtype.str for name in ARRAYS}}
        with open(os.path.join(scratch, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return load(location, n, nbytes)


def load(location: str, ntotal: int, nbytes: int) -> StoredTables | None:
    """A version's stored tables, memory-mapped, if it has tables for ``ntotal`` codes of ``nbytes``
    bytes; None if it has none. Tables that do not match (damaged, or from another build) are
    ignored with a warning: the searchers then answer without them."""
    folder = _local_dir(location)
    if folder is None:
        return None
    root = os.path.join(folder, TABLES_DIR)
    meta_path = os.path.join(root, "meta.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != TABLES_FORMAT or meta["ntotal"] != ntotal or meta["nbytes"] != nbytes:
            raise ValueError(f"they are for {meta.get('ntotal')} codes of {meta.get('nbytes')} bytes "
                             f"(format {meta.get('format')}), the index has {ntotal} of {nbytes}")
        arrays = {}
        for name in ARRAYS:
            # copy-on-write mapping: writeable, as numba's compiled kernels expect, and never written
            array = np.asarray(np.load(os.path.join(root, f"{name}.npy"), mmap_mode="c"))
            if list(array.shape) != meta["shapes"][name] or array.dtype.str != meta["dtypes"][name]:
                raise ValueError(f"{name}.npy is {array.dtype.str} {list(array.shape)}, expected "
                                 f"{meta['dtypes'][name]} {meta['shapes'][name]}")
            arrays[name] = array
        m, words = int(meta["m"]), -(-nbytes // 8)
        if arrays["ctab"].size != m * ntotal * words or arrays["itab"].size != m * ntotal or not arrays["dense"].all():
            raise ValueError("the tables do not cover the codes")
    except Exception as exc:  # noqa: BLE001 - unreadable tables only cost speed: say so and go on
        logger.warning("%s: ignoring the stored MIH tables (%s); searches scan instead", location, exc)
        return None
    return StoredTables(arrays, meta)


@lru_cache(maxsize=None)
def _flips(length: int, distance: int) -> np.ndarray:
    """Every ``length``-bit key with ``distance`` bits set (uint64), in ascending order."""
    keys = [sum(1 << bit for bit in bits) for bits in itertools.combinations(range(length), distance)]
    return np.sort(np.array(keys, dtype=np.uint64))


class NumpyMIH:
    """Exact k-NN over stored tables in plain numpy: :class:`~hashindex.search.NumpyScan`'s
    interface and results (distances, ties by position), at MIH's cost instead of a full scan (10M
    random 64-bit codes: ~2 ms a query against ~13-25 ms). Passes ``(s, j)`` and the stopping rule
    are MultiIndexHashing's: after visiting every key of table ``j`` within ``s`` of the query's
    substring, every code within ``m*s + j`` of the query has been seen. A query that would touch
    more than :data:`NUMPY_FALLBACK_FRACTION` of the table entries is answered by the scan;
    ``radius_search`` always is. ``scan`` makes that scan (a :class:`~hashindex.search.NumpyScan` of
    the same codes) when first needed: the tables hold copies of the codes, so a k-NN query reads
    nothing else."""

    def __init__(self, tables: StoredTables, scan: Callable[[], NumpyScan]):
        a = tables.arrays
        self.ntotal, self.nbytes, self.m = tables.ntotal, tables.nbytes, tables.m
        self.bits = 8 * self.nbytes
        self._words = -(-self.nbytes // 8)
        self._ctab = a["ctab"].reshape(self.m, self.ntotal, self._words)
        self._itab = a["itab"].reshape(self.m, self.ntotal)
        self._direct = a["direct"]
        self._base = a["direct_base"].astype(np.int64)
        self._starts, self._lens = a["sub_starts"].astype(np.int64), a["sub_lens"].astype(np.int64)
        self._make_scan = scan
        self._budget = max(1, int(NUMPY_FALLBACK_FRACTION * self.ntotal))
        self._lock = threading.Lock()
        self._entries = np.empty(0, np.int64)
        self._scratch(1 << 16)

    def __repr__(self) -> str:
        return f"NumpyMIH(ntotal={self.ntotal}, bits={self.bits}, m={self.m})"

    @cached_property
    def _scan(self) -> NumpyScan:
        return self._make_scan()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check_queries(queries, self.nbytes)
        k = _check_k(k)
        if k >= self.ntotal or self.ntotal == 0:
            return self._scan.search(queries, k)
        out_d, out_i = empty_result(queries.shape[0], k)
        for q, words in enumerate(as_words(queries)):
            found = self._knn(words, k)
            if found is None:
                out_d[q], out_i[q] = (a[0] for a in self._scan.search(queries[q:q + 1], k))
            else:
                out_d[q], out_i[q] = found
        return out_d, out_i

    def radius_search(self, queries: np.ndarray, radius: int):
        return self._scan.radius_search(queries, radius)

    def _scratch(self, total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Buffers for ``total`` entries (entry index, gathered codes, popcounts), reused between
        passes and queries: fresh arrays of this size would each be mapped and faulted in by the
        allocator, which doubled a query's time."""
        if total > self._entries.size:
            size = max(total, 2 * self._entries.size)
            self._entries = np.empty(size, np.int64)
            self._gathered = np.empty((size, self._words), np.uint64)
            self._counts = np.empty((size, self._words), np.uint8)
        return self._entries[:total], self._gathered[:total], self._counts[:total]

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:  # one query at a time uses the scratch buffers
            return self._knn_unlocked(q, k)

    def _knn_unlocked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        m = self.m
        keys = [int(extract(q[None], int(s), int(n))[0]) for s, n in zip(self._starts, self._lens)]
        best_d = np.zeros(0, np.int64)
        best_p = np.zeros(0, np.int64)
        touched = 0
        for s in range(int(self._lens.max()) + 1):
            for j in range(m):
                length = int(self._lens[j])
                if s > length:  # table j was enumerated whole: every code has been seen
                    return best_d[:k], best_p[:k]
                bucket = self._base[j] + (np.uint64(keys[j]) ^ _flips(length, s)).astype(np.int64)
                lo = self._direct[bucket].astype(np.int64)
                sizes = self._direct[bucket + 1] - lo
                touched += bucket.size
                lo, sizes = lo[sizes > 0], sizes[sizes > 0]
                total = int(sizes.sum())
                touched += total
                if touched > self._budget:
                    return None
                if total:
                    entry, gathered, counts = self._scratch(total)
                    ends = np.cumsum(sizes)
                    if sizes.size * SLICE_MIN_ENTRIES <= total:
                        # large buckets: copy them whole (a slice each); entries found later
                        table = self._ctab[j]
                        np.concatenate([table[a:b] for a, b in zip(lo.tolist(), (lo + sizes).tolist())], out=gathered)
                        entry = None
                    else:
                        # many small buckets: their entry indices, a running sum of steps of 1 that
                        # jump at each bucket's start, then one gather
                        entry.fill(1)
                        entry[0] = lo[0]
                        entry[ends[:-1]] = lo[1:] - (lo[:-1] + sizes[:-1]) + 1
                        np.cumsum(entry, out=entry)
                        np.take(self._ctab[j], entry, axis=0, out=gathered, mode="wrap")  # in range: no check
                    np.bitwise_xor(gathered, q, out=gathered)
                    np.bitwise_count(gathered, out=counts)
                    d = counts[:, 0] if self._words == 1 else counts.sum(axis=1, dtype=np.int64)
                    near = np.flatnonzero(d <= best_d[k - 1]) if best_d.size >= k else np.arange(total)
                    if near.size:
                        if entry is None:
                            bucket_of = np.searchsorted(ends, near, side="right")
                            found = lo[bucket_of] + near - (ends - sizes)[bucket_of]
                        else:
                            found = entry[near]
                        p = np.concatenate([best_p, self._itab[j][found].astype(np.int64)])
                        d = np.concatenate([best_d, d[near].astype(np.int64)])
                        p, first = np.unique(p, return_index=True)  # a code met again in a later table
                        order = np.lexsort((p, d[first]))[:k]
                        best_d, best_p = d[first][order], p[order]
                if best_d.size >= k and best_d[k - 1] <= m * s + j:
                    return best_d, best_p
        return best_d[:k], best_p[:k]
