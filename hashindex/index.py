"""Reading an index: :func:`open` → :class:`Index`, searched like a faiss binary index."""
from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from . import store
from .errors import HashindexError
from .search import MISSING_DISTANCE, LinearScan, NumpyScan
from .store import StoreError

if TYPE_CHECKING:
    from .encoder import Encoder

logger = logging.getLogger(__name__)

SEARCHERS = ("auto", "numpy", "linear", "mih", "mih-compact")
# Building MIH tables costs ~60 ns per code, table and 64-bit word (10M 64-bit codes: ~3 s at m=5;
# 10M 128-bit codes: ~8 s at m=7), plus ~0.4-1.2 s of planning (mih.plan).
MIH_BUILD_SECONDS_PER_CODE = 6e-8
MIH_PLAN_SECONDS = 1.0
# "auto" builds MIH only where the cost model (mih.plan) expects it to answer this many times faster
# than the scan: the model's times are within 0.5-1.3x of measured ones (bench/mih_plan_fit.py).
MIH_MIN_SPEEDUP = 1.5
# "auto" gives MIH tables at most TABLE_MEMORY_RATIO times the bytes of the packed codes unless told
# otherwise (open's table_memory), and never more than MIH_MEMORY_SHARE of the memory available then.
# 8x admits the 2-6x faster copied tables at 64 bits (m x (code + id): 6-8x the codes), what a user
# with memory to spare would choose (issue 16; it was 4x, compact tables only: m int32 ids a code,
# 2-3x); table_memory=0 keeps a process at its codes.
TABLE_MEMORY_RATIO = 8
MIH_MEMORY_SHARE = 0.5
# Below this many 64-bit words of codes the numpy scan answers in well under a millisecond a query,
# so open() starts no background work (a process of tiny indexes never imports numba).
WARM_MIN_WORDS = 1 << 18
# Background mode: plan MIH once the scans have seen this many queries (and, rent or buy, spent as
# long answering as planning and building would take).
WARM_PLAN_QUERIES = 8
# Background mode: start loading the kernels once the numpy scan has spent this long answering. The
# import competes with the scan for the GIL and the cores (~0.5-0.7 s at 10M codes on 2 cores), so
# a process asking a handful of queries is better off never starting it.
WARM_KERNELS_AFTER_SECONDS = 0.2
# The same with MIH tables stored with the index: numpy MIH answers ~2 ms a query at 10M codes and
# numba's MIH ~0.25 ms, but loading numba takes ~0.35 s of GIL from the answering thread. Measured
# at 10M random 64-bit codes (bench/open_query.py): 0.25 s keeps 100 queries (~0.17 s) clear of the
# load, and 1,000 queries finish in ~1 s; at 0.15-0.2 s the load lands inside the first 100.
WARM_KERNELS_WITH_TABLES_SECONDS = 0.25
# Queries (with their k-th distances) kept from the scan's answers for mih.plan.
PLAN_QUERIES = 32
# A fresh process spends ~0.5 s importing numba and loading the linear scan's compiled kernels before
# its first answer; the numpy scan needs nothing loaded and costs ~4 ns per 64-bit word of the
# database per query (16-40 ms for 10M 64-bit codes), so a one-off query is answered sooner by it.
KERNEL_LOAD_SECONDS = 0.5
NUMPY_SECONDS_PER_WORD = 4e-9


class Index:
    """One published version of an index, loaded for search.

    Holds the packed codes of the searchable rows (valid, not removed) in memory and nothing bigger:
    ``search`` and ``radius_search`` return row positions in the stored arrays, so ``index.ids[I]``
    names the images.
    """

    def __init__(self, path: str, group, version: str | None, searcher: str = "auto",
                 table_memory: int | None = None, warm: bool = False):
        if searcher not in SEARCHERS:
            raise HashindexError(f"searcher must be one of {', '.join(SEARCHERS)}, got {searcher!r}")
        if table_memory is not None and (isinstance(table_memory, bool) or not isinstance(table_memory, int)
                                         or table_memory < 0):
            raise HashindexError(f"table_memory must be a number of bytes >= 0, got {table_memory!r}")
        self.path, self.version, self._group, self._searcher_choice = path, version, group, searcher
        self._table_memory = table_memory
        self.attrs = group.attrs.asdict()
        self.bits = int(self.attrs["bits"])
        self._scan_seconds = 0.0   # time the scans have spent answering ("auto" cost model)
        self._mih = None
        self._plan = None          # mih.Plan, once "auto" has asked whether MIH pays
        # recent queries answered by a scan and their k-th distances, for the plan
        self._seen_queries = np.zeros((0, self.bits // 8), dtype=np.uint8)
        self._seen_kth = np.zeros(0, dtype=np.int32)
        # background mode (open's warm): kernels load and MIH tables build on threads while the
        # numpy scan answers; the foreground never waits for either
        self._kernels_ready: threading.Event | None = None
        self._loader: threading.Thread | None = None
        self._planner: threading.Thread | None = None
        if warm and searcher == "auto":
            words = int(self.attrs.get("valid", 0) or 0) * -(-self.bits // 64)
            if words >= WARM_MIN_WORDS:
                self._kernels_ready = threading.Event()

    # -- background preparation -------------------------------------------------------------------
    def _load_kernels(self) -> None:
        """Build the numba scan, or MIH over the stored tables, and run it once: loads its compiled
        kernels (compiles them on a fresh install, once, into numba's cache)."""
        try:
            if self._stored_tables is not None:
                from .mih import MultiIndexHashing

                mih = MultiIndexHashing.from_tables(self._stored_tables)
                mih.search(self._stored_tables.a_code(), 1)  # a stored code: the codes need not be read
                self._mih = mih
                logger.info("%s: MIH over the stored tables (m=%d) answers from now on", self.path, mih.m)
                return
            scan = LinearScan(self._searchable_codes)
            scan.search(self._searchable_codes[:1], 1)
            self.__dict__["_linear"] = scan
        except Exception:  # noqa: BLE001 - the numpy scan goes on answering; say why it stays
            logger.warning("%s: loading the search kernels failed; the numpy scan answers", self.path,
                           exc_info=True)
        finally:
            self._kernels_ready.set()

    def _plan_and_build(self) -> None:
        """Plan MIH on the queries seen so far and, if it pays and fits, build its tables; the scans
        answer until the tables are ready."""
        try:
            self._make_plan()
            layout = ("copied" if self._plan.speedup >= MIH_MIN_SPEEDUP and self._tables_fit("copied") else
                      "compact" if self._plan.compact_speedup >= MIH_MIN_SPEEDUP and self._tables_fit("compact")
                      else None)
            if layout is not None:
                from .mih import MultiIndexHashing
                m = self._plan.m if layout == "copied" else self._plan.compact_m
                self._mih = MultiIndexHashing(self._searchable_codes, m=m, layout=layout)
                self.__dict__.pop("_linear", None)  # one searcher's memory at a time
                logger.info("%s: MIH (%s, m=%d) answers from now on", self.path, layout, m)
        except Exception:  # noqa: BLE001 - the scan goes on answering
            logger.warning("%s: building MIH in the background failed; the scan answers", self.path, exc_info=True)

    # -- arrays --------------------------------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        """A whole stored array; damage on disk becomes an error naming the array, not a traceback."""
        try:
            return self._group[name][:]
        except Exception as exc:  # noqa: BLE001 - codec, I/O and shape errors all mean a damaged index
            raise StoreError(f"{self.path}: the {name!r} array of version {self.version} cannot be read "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             "the index is damaged: rebuild it with hashindex encode") from None

    @cached_property
    def codes(self) -> np.ndarray:
        """Packed codes of every row, uint8 ``[N, bits/8]`` (rejected rows are zeros)."""
        codes = self._read("codes")
        if codes.shape != (len(self), self.bits // 8):
            raise StoreError(f"{self.path}: codes have shape {codes.shape}, expected ({len(self)}, {self.bits // 8})")
        return codes

    @cached_property
    def ids(self) -> np.ndarray:
        return np.asarray(self._read("ids"), dtype=object)

    @cached_property
    def valid(self) -> np.ndarray:
        return self._read("valid")

    @cached_property
    def removed(self) -> np.ndarray:
        """Tombstones: rows whose image left the source (``hashindex update``); never searched."""
        if "removed" in self._group:
            return self._read("removed")
        return np.zeros(len(self), bool)

    @cached_property
    def labels(self) -> np.ndarray | None:
        return self._read("labels") if "labels" in self._group else None

    @property
    def ntotal(self) -> int:
        """Number of searchable rows."""
        return len(self) if self._valid_rows is None else int(self._valid_rows.size)

    def __len__(self) -> int:
        return int(self.attrs["count"])

    @property
    def searchable(self) -> np.ndarray:
        """bool ``[N]``: rows that take part in search (decoded, not removed)."""
        return self.valid & ~self.removed

    @cached_property
    def _valid_rows(self) -> np.ndarray | None:
        """Row of each searchable code, or None when every row is searchable. That case is read off
        the version's counts, so a query on a clean index never reads the valid and removed arrays."""
        if self.attrs.get("valid") == len(self) and self.attrs.get("removed", 0) == 0:
            return None
        return np.flatnonzero(self.searchable).astype(np.int64)

    @property
    def rejects(self) -> list[tuple[str, str]]:
        rows = np.flatnonzero(~self.valid & ~self.removed)
        reasons = self._read("reason")
        return [(self.ids[r], str(reasons[r])) for r in rows]

    @cached_property
    def encoder(self) -> Encoder | None:
        if "encoder" not in self._group:
            return None
        from .encoder import Encoder  # torch: imported only by those who encode, not by every query

        return Encoder.from_bytes(self._read("encoder").tobytes(), name=f"{self.path} (stored encoder)")

    # -- search --------------------------------------------------------------------------------
    @property
    def searcher(self) -> str:
        """``"numpy"``, ``"numpy-mih"`` (numpy over stored MIH tables), ``"linear"``, ``"mih"`` or
        ``"mih-compact"``: what answers this index's next single query."""
        return self._choose(1)

    def _choose(self, nqueries: int) -> str:
        """The searcher for a call of ``nqueries`` queries.

        With tables stored in the index (:attr:`_stored_tables`), ``"auto"`` answers by MIH over them:
        in numpy (``"numpy-mih"``) until loading numba's kernels would have paid, then in numba.
        Otherwise ``"auto"`` climbs by a rent-or-buy rule, each step taken once the time spent answering would
        have paid for it: the numpy scan answers first (nothing to load), the numba linear scan once
        loading its kernels (:data:`KERNEL_LOAD_SECONDS`) pays, and MIH once building its tables
        would have paid, if then MIH's cost model, run on the queries the scans answered
        (:func:`hashindex.mih.plan`), expects it to be :data:`MIH_MIN_SPEEDUP` times faster on
        these codes; with copied tables if they fit in ``table_memory`` bytes (default:
        :data:`TABLE_MEMORY_RATIO` times the packed codes; never more than :data:`MIH_MEMORY_SHARE`
        of the memory available then), else compact ones if they fit, else none. A one-off
        ``hashindex query`` loads neither; a long-running process asking many queries gets MIH where
        the data and its memory budget make it pay (by default the copied tables at 64 bits: 572 MB
        beside 76 MB of codes at 10M). With ``open(..., warm=True)`` the same steps happen on
        background threads instead (:meth:`_choose_in_background`).
        """
        if self._kernels_ready is not None:
            return self._choose_in_background(nqueries)
        if self._searcher_choice != "auto":
            return self._searcher_choice
        if self._mih is not None:
            return "mih-compact" if self._mih.layout == "compact" else "mih"
        spent = self._scan_seconds
        if self._stored_tables is not None:  # MIH needs no build: numpy's until loading numba pays
            kernels_ready = "hashindex._bitops" in sys.modules
            return "mih" if kernels_ready or spent >= KERNEL_LOAD_SECONDS else "numpy-mih"
        # spent >= MIH_PLAN_SECONDS first: the numpy stage ends before that, so a one-off query
        # never imports numba here
        if (self._plan is None and len(self._seen_kth) and spent >= MIH_PLAN_SECONDS
                and spent >= self._mih_setup_seconds()):
            self._make_plan()
        if self._plan is not None and self._plan.speedup >= MIH_MIN_SPEEDUP and self._tables_fit("copied"):
            return "mih"
        if self._plan is not None and self._plan.compact_speedup >= MIH_MIN_SPEEDUP and self._tables_fit("compact"):
            return "mih-compact"
        kernels_ready = "_linear" in self.__dict__ or "hashindex._bitops" in sys.modules
        numpy_seconds = nqueries * self.ntotal * -(-self.bits // 64) * NUMPY_SECONDS_PER_WORD
        if kernels_ready or spent + numpy_seconds > KERNEL_LOAD_SECONDS:
            return "linear"
        return "numpy"

    def _choose_in_background(self, nqueries: int) -> str:
        """Background mode: the numpy scan until the kernels are loaded, then the numba scan, then
        MIH once its tables, planned and built on a thread, are ready."""
        mih = self._mih
        if mih is not None:
            return "mih-compact" if mih.layout == "compact" else "mih"
        if self._stored_tables is not None:
            if self._loader is None and self._scan_seconds >= WARM_KERNELS_WITH_TABLES_SECONDS:
                self._loader = threading.Thread(target=self._load_kernels, name="hashindex-kernels", daemon=True)
                self._loader.start()
            return "numpy-mih"
        if self._loader is None and self._scan_seconds >= WARM_KERNELS_AFTER_SECONDS:
            # not before: a few queries are answered sooner without the import running beside them
            self._loader = threading.Thread(target=self._load_kernels, name="hashindex-kernels", daemon=True)
            self._loader.start()
        if (self._planner is None and self._kernels_ready.is_set() and len(self._seen_kth) >= WARM_PLAN_QUERIES
                and self._scan_seconds >= self._mih_setup_seconds()):
            self._planner = threading.Thread(target=self._plan_and_build, name="hashindex-mih", daemon=True)
            self._planner.start()
        return "linear" if self._kernels_ready.is_set() and "_linear" in self.__dict__ else "numpy"

    def wait_until_prepared(self, timeout: float | None = None) -> str:
        """Block until the background preparation is done (kernels loaded; MIH built if it was
        planned); returns what answers now. Tests and benchmarks use it; searches never wait."""
        if self._kernels_ready is not None and self._loader is not None:
            self._kernels_ready.wait(timeout)
        if self._planner is not None:
            self._planner.join(timeout)
        return self._choose(1)

    def _mih_setup_seconds(self) -> float:
        from .mih import default_m  # numba is loaded by now: the linear scan answered

        tables = default_m(self.bits, max(self.ntotal, 1)) * -(-self.bits // 64)
        return self.ntotal * tables * MIH_BUILD_SECONDS_PER_CODE + MIH_PLAN_SECONDS

    def _tables_fit(self, layout: str) -> bool:
        from .mih import table_bytes

        m = self._plan.m if layout == "copied" else self._plan.compact_m
        need = table_bytes(self.ntotal, self.bits, m, layout)
        if need > self.table_memory:
            return False
        import psutil  # dask's own dependency

        return need <= MIH_MEMORY_SHARE * psutil.virtual_memory().available

    @property
    def table_memory(self) -> int:
        """Most bytes ``"auto"`` gives MIH tables (``open``'s ``table_memory``, by default
        :data:`TABLE_MEMORY_RATIO` times the packed codes)."""
        if self._table_memory is not None:
            return self._table_memory
        return TABLE_MEMORY_RATIO * self.ntotal * (self.bits // 8)

    def _make_plan(self) -> None:
        """Decide once, on the queries seen so far, whether MIH pays and with how many tables."""
        from .mih import plan

        self._plan = plan(self._searchable_codes, self._seen_queries, self._seen_kth)
        logger.info("%s: MIH cost model on %d queries: copied tables m=%d %.1fx the scan, compact m=%d "
                    "%.1fx; answering with %s", self.path, len(self._seen_kth), self._plan.m, self._plan.speedup,
                    self._plan.compact_m, self._plan.compact_speedup, self._choose(1))

    def _remember(self, queries, distances: np.ndarray) -> None:
        """Keep the latest PLAN_QUERIES scan-answered queries and their k-th distances for the plan."""
        if self._searcher_choice != "auto" or self._plan is not None or distances.shape[1] == 0:
            return
        kth = distances[:, -1]
        found = kth != MISSING_DISTANCE
        queries = np.atleast_2d(np.asarray(queries))  # a single query may come as one row
        self._seen_queries = np.concatenate([self._seen_queries, queries[found]])[-PLAN_QUERIES:]
        self._seen_kth = np.concatenate([self._seen_kth, kth[found]])[-PLAN_QUERIES:]

    @cached_property
    def _searchable_codes(self) -> np.ndarray:
        if self._valid_rows is None:
            return np.ascontiguousarray(self.codes)
        return np.ascontiguousarray(self.codes[self._valid_rows])

    @cached_property
    def _linear(self) -> LinearScan:
        return LinearScan(self._searchable_codes)

    @cached_property
    def _numpy(self) -> NumpyScan:
        return NumpyScan(self._searchable_codes)

    @cached_property
    def _stored_tables(self):
        """The MIH tables stored with this version (:mod:`hashindex.mih_tables`), memory-mapped, where
        it has them and MIH may be used within ``table_memory``; else None."""
        if self._searcher_choice not in ("auto", "mih"):
            return None
        from . import mih_tables

        tables = mih_tables.load(str(self._group.store_path), self.ntotal, self.bits // 8)
        if tables is not None and self._searcher_choice == "auto" and tables.nbytes_on_disk > self.table_memory:
            return None
        return tables

    @cached_property
    def _numpy_mih(self):
        from .mih_tables import NumpyMIH

        return NumpyMIH(self._stored_tables, lambda: self._numpy)

    def _engine(self, nqueries: int):
        choice = self._choose(nqueries)
        if choice == "numpy":
            return self._numpy
        if choice == "numpy-mih":
            return self._numpy_mih
        if choice == "linear":
            return self._linear  # the background loader's scan, once it has cached one
        if self._mih is None:
            from .mih import MultiIndexHashing
            if choice == "mih" and self._stored_tables is not None:
                self._mih = MultiIndexHashing.from_tables(self._stored_tables)
            else:
                layout = "compact" if choice == "mih-compact" else "copied"
                m = None if self._plan is None else self._plan.compact_m if layout == "compact" else self._plan.m
                self._mih = MultiIndexHashing(self._searchable_codes, m=m, layout=layout)
                self.__dict__.pop("_linear", None)  # one searcher's memory at a time
        return self._mih

    def _timed(self, nqueries: int, call):
        engine = self._engine(nqueries)
        started = time.perf_counter()
        result = call(engine)
        if engine is not self._mih:
            self._scan_seconds += time.perf_counter() - started
        return result

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest rows by Hamming distance: ``(D int32 [Q, k], I int64 [Q, k])``, ties by row position.

        Missing results (k larger than the index) are ``I = -1``.
        """
        distances, local = self._timed(_count(queries), lambda engine: engine.search(queries, k))
        if self._mih is None:
            self._remember(queries, distances)
        return distances, self._to_rows(local)

    def radius_search(self, queries: np.ndarray, radius: int):
        """All rows within Hamming distance ``<= radius``: ``(lims, D, I)`` as faiss's range_search."""
        lims, distances, local = self._timed(_count(queries),
                                             lambda engine: engine.radius_search(queries, radius))
        return lims, distances, self._to_rows(local)

    def _to_rows(self, local: np.ndarray) -> np.ndarray:
        if self._valid_rows is None:
            return local.astype(np.int64, copy=False)
        rows = np.full(local.shape, -1, dtype=np.int64)
        found = local >= 0
        rows[found] = self._valid_rows[local[found]]
        return rows

    def to_faiss(self):
        """The searchable rows as a faiss binary index: an ``IndexBinaryIDMap`` over an
        ``IndexBinaryFlat`` (``faiss.downcast_IndexBinary(f.index)``) whose labels are this index's
        row positions, so its ``search`` returns what :meth:`search` returns and ``index.ids_at(I)``
        names the images. ``hashindex.write_index(path, faiss_index, ids)`` goes the other way."""
        import faiss

        flat = faiss.IndexBinaryFlat(self.bits)
        mapped = faiss.IndexBinaryIDMap(flat)
        rows = (np.arange(len(self.codes), dtype=np.int64) if self._valid_rows is None
                else self._valid_rows.astype(np.int64))
        mapped.add_with_ids(self._searchable_codes, rows)
        mapped.referenced_objects = [flat]  # faiss's own idiom: the map does not own the flat index
        return mapped

    def ids_at(self, rows: np.ndarray) -> np.ndarray:
        """Ids of some rows, reading only their chunks (a query on a huge index needs few ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        if "ids" in self.__dict__ or len(rows) == 0:
            return self.ids[rows]
        try:
            return np.asarray(self._group["ids"].get_orthogonal_selection(rows), dtype=object)
        except Exception:  # noqa: BLE001 - damaged chunk: the whole-array read names the problem
            return self.ids[rows]

    @cached_property
    def _row_of_id(self) -> dict[str, int]:
        live = ~self.removed  # a removed image's id may come back as a new row
        return {name: int(row) for row, name in zip(np.flatnonzero(live), self.ids[live])}

    def _rows_by_checksum(self, ids: list[str]) -> dict[str, int]:
        """Rows of these ids, found by their CRC32 and confirmed on the few ids that share one: a
        query by id on a 10M-row index reads 40 MB of checksums, not every id (seconds)."""
        rows = np.flatnonzero(np.isin(self._read("id_crc32"), store.id_checksums(ids)))
        if self.attrs.get("removed", 0):
            rows = rows[~self.removed[rows]]  # a removed image's id may come back as a new row
        return {name: int(row) for row, name in zip(rows, self.ids_at(rows))}

    def rows_of(self, ids) -> np.ndarray:
        """Row positions of the given ids; an unknown id is an error naming it."""
        ids = [str(i) for i in ids]
        if "ids" not in self.__dict__ and "id_crc32" in self._group:
            position = self._rows_by_checksum(ids)
        else:  # every id is read already, or an index written before id_crc32
            position = self._row_of_id
        missing = [i for i in ids if i not in position]
        if missing:
            raise StoreError(f"{self.path}: unknown id {missing[0]!r}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return np.array([position[i] for i in ids], dtype=np.int64)

    def info(self) -> dict:
        return {"path": self.path, "version": self.version, "bits": self.bits, "rows": len(self),
                "searchable": self.ntotal, "searcher": self.searcher,
                "stored_tables": None if self._stored_tables is None else
                {"m": self._stored_tables.m, "bytes": self._stored_tables.nbytes_on_disk},
                **{k: v for k, v in self.attrs.items() if k not in ("bits",)},
                "versions": store.list_versions(self.path) if self.version else []}

    def __repr__(self) -> str:
        return f"Index({self.path!r}, version={self.version!r}, bits={self.bits}, rows={len(self):,})"


def _count(queries) -> int:
    shape = np.shape(queries)
    return 1 if len(shape) < 2 else int(shape[0])


def open(path: str, *, searcher: str = "auto", table_memory: int | None = None,  # noqa: A001 - like zarr.open
         warm: bool = True) -> Index:
    """Open the published version of the index at ``path`` (a folder or fsspec URL).

    ``searcher``: ``"numpy"`` (plain numpy scan, nothing to load), ``"linear"`` (numba popcount
    scan), ``"mih"`` (exact multi-index hashing; tables holding copies of the codes, built on the
    first query), ``"mih-compact"`` (the same with ids-only tables: a third to a quarter of the
    memory, several times slower) or ``"auto"`` (each in turn as the time spent answering pays for
    the next one's set-up, MIH where its cost model expects it to pay, compact where the copied
    tables would not fit in memory; see :meth:`Index._choose`). All give identical results.

    ``table_memory``: the most bytes ``"auto"`` may give MIH tables, beside the codes; by default
    :data:`TABLE_MEMORY_RATIO` (8) times the packed codes, and never more than half the memory
    available when it decides. That admits the fast copied tables at 64 bits (10M 64-bit codes: 76 MB
    of codes, ~570 MB of copied tables, 5x the scan on random codes, where the compact ones lose to
    it), the choice of a user with memory to spare; ``table_memory=0`` keeps a process at its codes.

    Stored tables: a local index of at least 2^20 64-bit words is published with its MIH tables
    (:mod:`hashindex.mih_tables`), which ``"auto"`` and ``"mih"`` memory-map instead of building:
    ``"auto"`` answers by MIH in numpy from the first query, then (``warm``, once it has answered for
    :data:`WARM_KERNELS_WITH_TABLES_SECONDS`) by the numba kernels over the same tables. Opening a
    local index reads its metadata only; zarr is imported when an array is first read.

    ``warm`` (default True; with ``"auto"``, on indexes above :data:`WARM_MIN_WORDS` words): once
    the numpy scan has answered for :data:`WARM_KERNELS_AFTER_SECONDS`, the numba kernels load on a background thread (compiled once into numba's
    cache on a fresh install) while the numpy scan answers, and once the scans have spent as long
    answering as MIH's set-up would take, MIH is planned and built on another thread; a search
    never waits for either.
    ``hashindex query`` (one query, then exit) opens with ``warm=False``.
    """
    group, version = store.open_group(str(path))
    return Index(str(path), group, version, searcher, table_memory, warm)


def codes_from_faiss(faiss_index) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed codes ``[ntotal, d/8]`` of a faiss binary index, and its int64 labels when it maps ids
    (``IndexBinaryIDMap``; None where labels are the positions)."""
    import faiss

    labels = None
    if isinstance(faiss_index, faiss.IndexBinaryIDMap):
        labels = faiss.vector_to_array(faiss_index.id_map).astype(np.int64)
        faiss_index = faiss.downcast_IndexBinary(faiss_index.index)
    n, width = faiss_index.ntotal, faiss_index.code_size
    if isinstance(faiss_index, faiss.IndexBinaryFlat):
        codes = faiss.vector_to_array(faiss_index.xb).reshape(n, width)
    else:
        try:
            codes = faiss_index.reconstruct_n(0, n) if n else np.zeros((0, width), np.uint8)
        except RuntimeError as exc:
            raise HashindexError(f"{type(faiss_index).__name__} cannot hand back its codes ({exc}); "
                                 "export an IndexBinaryFlat or IndexBinaryIDMap of one") from None
    return np.ascontiguousarray(codes, dtype=np.uint8), labels


def write_index(path: str, codes, ids=None, *, labels: np.ndarray | None = None,
                encoder: Encoder | None = None, chunk_rows: int = 65536) -> Index:
    """Publish codes computed elsewhere as a new version of the index at ``path``.

    ``codes`` is a uint8 array ``[n, bits/8]`` or a faiss binary index (``IndexBinaryFlat``,
    ``IndexBinaryIDMap``, or any that reconstructs its codes); an ``IndexBinaryIDMap``'s labels
    become the ids unless ``ids`` is given."""
    if hasattr(codes, "ntotal") and hasattr(codes, "code_size"):  # a faiss binary index
        codes, faiss_ids = codes_from_faiss(codes)
        ids = faiss_ids if ids is None else ids
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise TypeError(f"codes must be a uint8 array [n, bits/8], got {codes.dtype} with shape {codes.shape}")
    n = len(codes)
    ids = np.array([str(i) for i in range(n)] if ids is None else [str(i) for i in ids], dtype=object)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries for {n} codes")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} rows for {n} codes")
    from .pipeline import build_key  # one home for build keys
    key = build_key("codes", hashlib.sha256(np.ascontiguousarray(codes)).hexdigest(), ids.tolist(), store._now())
    version = f"v-{key}"
    attrs = {"bits": codes.shape[1] * 8, "build_key": key, "source": "write_index"}
    if encoder is not None:
        attrs.update(encoder_id=encoder.id, encoder_config=encoder.config)
    group = store.create_version(f"{str(path).rstrip('/')}/{version}", ids=ids, chunk_rows=chunk_rows,
                                 output=("codes", codes.shape[1], "uint8"), labels=labels,
                                 encoder_bytes=None if encoder is None else encoder.to_bytes(), attrs=attrs)
    rows = store.task_arrays(group)
    rows["codes"][:] = codes
    rows["valid"][:] = True
    group["chunk_done"][:] = 1
    store.finish_version(group)
    store.write_pointer(str(path), version)
    return open(path)
