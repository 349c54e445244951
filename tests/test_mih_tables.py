"""MIH tables stored with an index version (hashindex.mih_tables): written at publish, mapped at
open, searched in numpy before numba loads and by the numba kernels after; always the scan's answers."""
import os
import subprocess
import sys

import numpy as np
import pytest

import hashindex
from hashindex import index as index_module
from hashindex import mih_tables, store
from hashindex.mih import MultiIndexHashing
from hashindex.search import LinearScan, NumpyScan


@pytest.fixture
def store_small(monkeypatch):
    """Store tables for indexes of any size (the default threshold is 1M 64-bit words)."""
    monkeypatch.setattr(mih_tables, "STORE_MIN_WORDS", 1)


def codes_and_queries(nbytes, n, seed, distinct=None):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    if distinct:  # many exact duplicates: ties at every distance, ordered by position
        codes = codes[rng.integers(0, distinct, n)]
    queries = codes[rng.integers(0, n, 60)] ^ np.packbits(rng.random((60, 8 * nbytes)) < 0.08, axis=1)[:, :nbytes]
    return codes, queries


def tables_of(index):
    return mih_tables.load(str(index._group.store_path), index.ntotal, index.bits // 8)


@pytest.mark.parametrize("slice_min", [1, 10**9])  # buckets copied as slices / gathered by index
@pytest.mark.parametrize("nbytes, distinct", [(8, None), (8, 2000), (5, None), (16, None)])
def test_numpy_and_numba_mih_over_stored_tables_give_the_scan_results(tmp_path, store_small, monkeypatch, nbytes,
                                                                      distinct, slice_min):
    monkeypatch.setattr(mih_tables, "SLICE_MIN_ENTRIES", slice_min)
    # 128-bit codes take two words; at this size only more tables than the 8x budget allows keep
    # their substrings short enough for dense key tables
    monkeypatch.setattr(mih_tables, "STORE_MAX_RATIO", 64 if nbytes == 16 else mih_tables.STORE_MAX_RATIO)
    codes, queries = codes_and_queries(nbytes, 60_000, nbytes + (distinct or 0), distinct)
    index = hashindex.write_index(str(tmp_path / "idx"), codes, chunk_rows=8192)
    assert os.path.exists(os.path.join(str(tmp_path / "idx"), index.version, mih_tables.TABLES_DIR, "meta.json"))
    tables = tables_of(index)
    assert tables is not None and tables.ntotal == len(codes) and tables.m >= 2
    opened = hashindex.open(str(tmp_path / "idx"), table_memory=1 << 40)  # the 128-bit tables exceed 8x
    assert opened.info()["stored_tables"] == {"m": tables.m, "bytes": tables.nbytes_on_disk}
    numpy_mih = mih_tables.NumpyMIH(tables, lambda: NumpyScan(codes))
    numba_mih = MultiIndexHashing.from_tables(tables)
    scan = LinearScan(codes)
    for k in (1, 10, 100):
        want_d, want_i = scan.search(queries, k)
        for engine in (numpy_mih, numba_mih):
            got_d, got_i = engine.search(queries, k)
            assert (got_d == want_d).all() and (got_i == want_i).all(), (engine, k)


def test_numpy_mih_stops_by_the_pigeonhole_rule_not_by_scanning(tmp_path, store_small, monkeypatch):
    codes, queries = codes_and_queries(8, 80_000, 11)
    index = hashindex.write_index(str(tmp_path / "idx"), codes, chunk_rows=8192)
    engine = mih_tables.NumpyMIH(tables_of(index), lambda: pytest.fail("a random-code query fell back to a scan"))
    touched = []
    original = engine._scratch
    monkeypatch.setattr(engine, "_scratch", lambda total: touched.append(total) or original(total))
    want = LinearScan(codes).search(queries, 10)
    got = engine.search(queries, 10)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    assert sum(touched) < 0.25 * len(queries) * len(codes) * engine.m  # far fewer entries than scanning


def test_the_index_answers_from_stored_tables_from_its_first_query(tmp_path, store_small, monkeypatch):
    codes, queries = codes_and_queries(8, 60_000, 3)
    path = str(tmp_path / "idx")
    hashindex.write_index(path, codes, chunk_rows=8192)
    want = LinearScan(codes).search(queries, 10)

    # `hashindex query` in a fresh process: MIH in numpy from the first query, numba never imported
    # and the codes never read (the tables hold them)
    script = ("import sys, numpy as np, hashindex; ix = hashindex.open(sys.argv[1], warm=False); "
              "print(ix.searcher); d, i = ix.search(np.load(sys.argv[2]), 10); "
              "print(i.tolist(), 'numba' in sys.modules, '_searchable_codes' in ix.__dict__)")
    np.save(tmp_path / "q.npy", queries[:3])
    out = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "q.npy")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.splitlines() == ["numpy-mih", f"{want[1][:3].tolist()} False False"]

    monkeypatch.setattr(index_module, "WARM_MIN_WORDS", 1)  # background mode at this size
    monkeypatch.setattr(index_module, "WARM_KERNELS_WITH_TABLES_SECONDS", 0.0)
    index = hashindex.open(path)
    assert index.searcher == "numpy-mih"
    first = index.search(queries[:5], 10)  # answered in numpy; the kernels start loading
    assert index._loader is not None and index._planner is None  # nothing to plan or build
    assert index.wait_until_prepared(timeout=120) == "mih"
    assert index._mih.ntotal == len(codes) and index._mih._ctab.base is not None  # the mapped tables
    rest = index.search(queries[5:], 10)
    assert (np.concatenate([first[0], rest[0]]) == want[0]).all()
    assert (np.concatenate([first[1], rest[1]]) == want[1]).all()
    assert hashindex.open(path, searcher="mih").search(queries, 10)[1].tolist() == want[1].tolist()


def test_tables_cover_the_searchable_rows_of_their_own_version(tmp_path, store_small):
    codes, queries = codes_and_queries(8, 50_000, 4)
    path = str(tmp_path / "idx")
    first = hashindex.write_index(path, codes[:30_000], chunk_rows=8192)
    # a version with rejected rows: tables hold the searchable ones, positions map back to rows
    group = store.create_version(f"{path}/v-second", ids=np.array([str(i) for i in range(len(codes))], dtype=object),
                                 chunk_rows=8192, output=("codes", 8, "uint8"), labels=None, encoder_bytes=None,
                                 attrs={"bits": 64, "build_key": "second", "source": "test"})
    valid = np.random.default_rng(0).random(len(codes)) > 0.1
    rows = store.task_arrays(group)
    rows["codes"][:] = codes
    rows["valid"][:] = valid
    group["chunk_done"][:] = 1
    store.finish_version(group)
    store.write_pointer(path, "v-second")
    second = hashindex.open(path, warm=False)
    assert second.version != first.version and tables_of(second).ntotal == int(valid.sum())
    want_d, local = LinearScan(codes[valid]).search(queries, 10)
    got_d, got_rows = second.search(queries, 10)
    assert second.searcher == "mih"  # numba is loaded in this process: its kernels over the tables
    assert (got_d == want_d).all() and (got_rows == np.flatnonzero(valid)[local]).all()
    in_numpy = second._numpy_mih.search(queries, 10)
    assert (in_numpy[0] == want_d).all() and (in_numpy[1] == local).all()


def test_damaged_or_unaffordable_tables_are_not_used(tmp_path, store_small, caplog):
    codes, queries = codes_and_queries(8, 40_000, 6)
    path = str(tmp_path / "idx")
    index = hashindex.write_index(path, codes, chunk_rows=8192)
    want = LinearScan(codes).search(queries, 10)
    assert hashindex.open(path, table_memory=0, warm=False)._stored_tables is None  # over the budget

    itab = os.path.join(path, index.version, mih_tables.TABLES_DIR, "itab.npy")
    np.save(itab, np.zeros(10, np.int32))  # a truncated table
    damaged = hashindex.open(path, warm=False)
    assert damaged._stored_tables is None and "ignoring the stored MIH tables" in caplog.text
    got = damaged.search(queries, 10)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_small_and_remote_indexes_get_no_tables(tmp_path):
    codes, _ = codes_and_queries(8, 5000, 7)
    index = hashindex.write_index(str(tmp_path / "small"), codes)  # below STORE_MIN_WORDS
    assert not os.path.exists(os.path.join(str(tmp_path / "small"), index.version, mih_tables.TABLES_DIR))
    assert mih_tables.write("memory://remote/v1", codes) is None
