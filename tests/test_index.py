"""The Python API over an on-disk index: write_index, open, search, radius_search, ids, errors."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import hashindex
from hashindex import mih, store


def brute_force(queries, codes, k):
    d = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.fixture
def clustered(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    which = rng.integers(0, 5, 500)
    noise = np.packbits(rng.random((500, 64)) < 0.05, axis=1)
    codes = centres[which] ^ noise
    index = hashindex.write_index(str(tmp_path / "idx"), codes, ids=[f"img{i}" for i in range(500)], labels=which)
    return codes, which, index


def test_write_then_open(clustered, tmp_path):
    codes, labels, index = clustered
    opened = hashindex.open(index.path)
    assert opened.bits == 64 and len(opened) == 500 and opened.ntotal == 500
    assert (opened.codes == codes).all() and (opened.labels == labels).all()
    assert opened.ids[3] == "img3" and opened.rows_of(["img7", "img2"]).tolist() == [7, 2]
    assert store.read_pointer(index.path) == opened.version


def test_search_matches_brute_force_with_ties_by_position(clustered):
    codes, _, index = clustered
    queries = codes[:20] ^ np.uint8(1)
    distances, rows = index.search(queries, 25)
    want_d, want_i = brute_force(queries, codes, 25)
    assert distances.dtype == np.int32 and rows.dtype == np.int64
    assert (distances == want_d).all() and (rows == want_i).all()


def test_mih_searcher_gives_the_linear_scan_results(clustered):
    codes, _, index = clustered
    linear = hashindex.open(index.path, searcher="linear")
    mih = hashindex.open(index.path, searcher="mih")
    assert linear.searcher == "linear" and mih.searcher == "mih"
    queries = codes[:30] ^ np.uint8(2)
    for a, b in zip(linear.search(queries, 15), mih.search(queries, 15)):
        assert (a == b).all()
    for a, b in zip(linear.radius_search(queries, 5), mih.radius_search(queries, 5)):
        assert (a == b).all()
    compact = hashindex.open(index.path, searcher="mih-compact")
    for a, b in zip(linear.search(queries, 15), compact.search(queries, 15)):
        assert (a == b).all()
    assert compact.searcher == "mih-compact" and compact._mih.layout == "compact"
    assert hashindex.open(index.path).searcher == "linear"  # no MIH before the cost model says so
    with pytest.raises(ValueError, match="searcher must be one of"):
        hashindex.open(index.path, searcher="fast")


def test_auto_searcher_builds_mih_once_the_scan_has_paid_for_it(clustered, monkeypatch):
    codes, _, index = clustered
    monkeypatch.setattr(hashindex.mih, "SCAN_SECONDS_PER_WORD", 1e-3)  # pretend MIH is faster at this size
    auto = hashindex.open(index.path, table_memory=2**30)  # room for the copied tables
    linear = hashindex.open(index.path, searcher="linear")
    queries = codes[:30] ^ np.uint8(4)
    expected = linear.search(queries, 10)  # warm: JIT and loading out of the timing
    started = time.perf_counter()
    linear.search(queries, 10)
    per_call = time.perf_counter() - started
    # planning and tables that cost as much as ~5 scans of 30 queries
    monkeypatch.setattr(hashindex.index, "MIH_PLAN_SECONDS", 5 * per_call)
    monkeypatch.setattr(hashindex.index, "MIH_BUILD_SECONDS_PER_CODE", 0.0)
    engines = []
    for _ in range(200):
        engines.append(auto.searcher)
        got = auto.search(queries, 10)
        assert all((a == b).all() for a, b in zip(got, expected))
        if engines[-1] == "mih":
            break
    assert engines[0] == "linear" and engines[-1] == "mih", engines
    assert auto.searcher == "mih" and "_linear" not in auto.__dict__  # the scan's copy is released
    # the plan saw the scan's last queries and their k-th distances, and set the tables' m
    assert auto._plan.speedup >= hashindex.index.MIH_MIN_SPEEDUP and auto._mih.m == auto._plan.m
    last = hashindex.index.PLAN_QUERIES  # the latest ones, across calls
    assert (auto._seen_queries == np.concatenate([queries, queries])[-last:]).all()
    assert (auto._seen_kth == np.concatenate([expected[0], expected[0]])[-last:, -1]).all()
    # where the model expects the scan to win, the index keeps scanning however many queries it answers
    monkeypatch.setattr(hashindex.mih, "SCAN_SECONDS_PER_WORD", 1e-15)
    never = hashindex.open(index.path)
    for _ in range(40):
        never.search(queries, 10)
    assert never._plan is not None and never._plan.speedup < 1 and never.searcher == "linear"


def test_auto_searcher_builds_only_the_tables_that_fit_in_table_memory(clustered, monkeypatch):
    codes, _, index = clustered
    monkeypatch.setattr(hashindex.mih, "SCAN_SECONDS_PER_WORD", 1e-3)  # MIH pays, in both layouts
    monkeypatch.setattr(hashindex.index, "MIH_PLAN_SECONDS", 0.0)
    monkeypatch.setattr(hashindex.index, "MIH_BUILD_SECONDS_PER_CODE", 0.0)
    queries = codes[:30] ^ np.uint8(4)
    expected = hashindex.open(index.path, searcher="linear").search(queries, 10)

    def answer(auto):
        for _ in range(3):
            got = auto.search(queries, 10)
            assert all((a == b).all() for a, b in zip(got, expected))
        return auto

    codes_only = answer(hashindex.open(index.path, table_memory=0))
    assert codes_only._plan.speedup > 1.5 and codes_only.searcher == "linear" and codes_only._mih is None
    compact = mih.table_bytes(500, 64, codes_only._plan.compact_m, "compact")
    assert mih.table_bytes(500, 64, codes_only._plan.m, "copied") > compact
    auto = answer(hashindex.open(index.path, table_memory=compact))
    assert auto.searcher == "mih-compact" and auto._mih.m == auto._plan.compact_m
    # by default: TABLE_MEMORY_RATIO x the codes (4,000 bytes here)
    default = hashindex.index.TABLE_MEMORY_RATIO * codes.nbytes
    assert hashindex.open(index.path).table_memory == default
    copied = mih.table_bytes(500, 64, codes_only._plan.m, "copied")
    by_default = "mih" if copied <= default else "mih-compact" if compact <= default else "linear"
    assert answer(hashindex.open(index.path)).searcher == by_default
    monkeypatch.setattr(hashindex.index, "MIH_MEMORY_SHARE", 1e-12)  # and never past the available memory
    assert answer(hashindex.open(index.path, table_memory=2**30)).searcher == "linear"
    with pytest.raises(hashindex.errors.HashindexError, match="table_memory must be a number of bytes"):
        hashindex.open(index.path, table_memory=-1)


def test_auto_searcher_starts_on_numpy_and_loads_the_kernels_once_that_pays(clustered, monkeypatch):
    codes, _, index = clustered
    # as in a fresh process: the numba kernels are not loaded yet
    monkeypatch.delitem(sys.modules, "hashindex._bitops", raising=False)
    auto = hashindex.open(index.path)
    assert auto.searcher == "numpy"
    assert auto._choose(10**7) == "linear"  # a bulk call would cost the scan more than the load
    queries = codes[:5] ^ np.uint8(8)
    expected = hashindex.open(index.path, searcher="numpy").search(queries, 10)
    numpy_only = hashindex.open(index.path, searcher="numpy")
    timings = []
    for _ in range(5):  # the least of a few: one slow call (a GC pause, a busy core) must not set the bar
        started = time.perf_counter()
        numpy_only.search(queries, 10)
        timings.append(time.perf_counter() - started)
    monkeypatch.setattr(hashindex.index, "KERNEL_LOAD_SECONDS", 5 * min(timings))
    engines = []
    for _ in range(200):
        engines.append(auto.searcher)
        got = auto.search(queries, 10)
        assert all((a == b).all() for a, b in zip(got, expected))
        if engines[-1] == "linear":
            break
    assert engines[0] == "numpy" and engines[-1] == "linear", engines


def test_search_skips_rejected_rows_and_keeps_row_positions(tmp_path, clustered):
    codes, _, _ = clustered
    index = hashindex.write_index(str(tmp_path / "masked"), codes)
    group = zarr.open_group(f"{index.path}/{index.version}", mode="r+")
    valid = np.ones(500, bool)
    valid[::2] = False
    group["valid"][:] = valid
    store.finish_version(group)  # the version's counts, which tell open whether any row is masked
    reopened = hashindex.open(index.path)
    distances, rows = reopened.search(codes[:4], 10)
    assert (rows % 2 == 1).all() and reopened.ntotal == 250
    want_d, want_i = brute_force(codes[:4], codes[1::2], 10)
    assert (distances == want_d).all() and (rows == 2 * want_i + 1).all()


def test_k_larger_than_the_index(tmp_path):
    codes = np.array([[1], [3], [255]], dtype=np.uint8)
    index = hashindex.write_index(str(tmp_path / "tiny"), codes)
    distances, rows = index.search(codes[:1], 5)
    assert rows[0, :3].tolist() == [0, 1, 2] and (rows[0, 3:] == -1).all()


def test_radius_search_is_inclusive(clustered):
    codes, _, index = clustered
    lims, distances, rows = index.radius_search(codes[:3], 4)
    d = np.bitwise_count(codes[:3, None, :] ^ codes[None]).sum(-1)
    for q in range(3):
        got = rows[lims[q]:lims[q + 1]]
        want = np.flatnonzero(d[q] <= 4)
        assert sorted(got.tolist()) == want.tolist() and (distances[lims[q]:lims[q + 1]] <= 4).all()


def test_store_errors(tmp_path, clustered):
    with pytest.raises(store.StoreError, match="no index here"):
        hashindex.open(str(tmp_path / "missing"))
    plain = zarr.open_group(str(tmp_path / "plain"), mode="w")
    plain.attrs["format"] = "something-else"
    with pytest.raises(store.StoreError, match="not a hashindex index"):
        hashindex.open(str(tmp_path / "plain"))
    _, _, index = clustered
    group = zarr.open_group(f"{index.path}/{index.version}", mode="r+")
    group.attrs["format_version"] = 99
    with pytest.raises(store.StoreError, match="format version 99 is not supported"):
        hashindex.open(index.path)
    with pytest.raises(store.StoreError, match="unknown id 'nope'"):
        group.attrs["format_version"] = store.FORMAT_VERSION
        hashindex.open(index.path).rows_of(["img1", "nope"])


def test_ids_of_a_few_rows_across_shards_and_chunks(tmp_path):
    n = store.IDS_SHARD + 3 * store.IDS_CHUNK + 5  # a second, partial shard
    codes = np.random.default_rng(0).integers(0, 256, (n, 2), dtype=np.uint8)
    names = [f"p{i:06d}" for i in range(n)]
    hashindex.write_index(str(tmp_path / "idx"), codes, ids=names, chunk_rows=5000)
    index = hashindex.open(str(tmp_path / "idx"))
    rows = np.array([n - 1, 0, store.IDS_SHARD, store.IDS_CHUNK - 1, store.IDS_CHUNK, 7, 7])
    assert index.ids_at(rows).tolist() == [names[r] for r in rows]
    assert "ids" not in index.__dict__  # read from the rows' chunks, not the whole array
    assert index.ids.tolist() == names


def test_rows_of_ids_found_by_checksum_tell_colliding_ids_apart(tmp_path):
    a, b = "img29685295.jpg", "img32060020.jpg"  # the same CRC32
    assert store.id_checksums([a])[0] == store.id_checksums([b])[0]
    names = ["x.jpg", b, "y.jpg", a, "z.jpg"]
    hashindex.write_index(str(tmp_path / "idx"), np.zeros((5, 1), np.uint8), ids=names)
    index = hashindex.open(str(tmp_path / "idx"))
    assert index.rows_of([a, "z.jpg", b, a]).tolist() == [3, 4, 1, 3]
    assert "ids" not in index.__dict__  # only the matching rows' ids were read
    with pytest.raises(store.StoreError, match="unknown id 'img1.jpg'"):
        index.rows_of(["x.jpg", "img1.jpg"])


def test_indexes_with_compressed_codes_and_unsharded_ids_still_read(tmp_path, clustered):
    # the layout of indexes written before codes were stored raw and ids in shards
    codes, _, index = clustered
    group = zarr.open_group(f"{index.path}/{index.version}", mode="r+")
    ids = group["ids"][:]
    del group["codes"], group["ids"]
    group.create_array("codes", shape=codes.shape, dtype="uint8", chunks=(128, 8))[:] = codes
    group.create_array("ids", shape=ids.shape, dtype=str, chunks=(128,))[:] = ids
    assert type(group["codes"].compressors[0]).__name__ == "ZstdCodec" and group["ids"].shards is None
    old = hashindex.open(index.path)
    queries = codes[:20] ^ np.uint8(1)
    for a, b in zip(old.search(queries, 15), brute_force(queries, codes, 15)):
        np.testing.assert_array_equal(a, b)
    assert old.ids_at(np.array([300, 2])).tolist() == ["img300", "img2"]
    del group["id_crc32"]  # nor did they have id checksums
    assert hashindex.open(index.path).rows_of(["img9", "img499"]).tolist() == [9, 499]


def test_write_index_checks_its_input(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        hashindex.write_index(str(tmp_path / "x"), np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="ids has 2 entries for 3 codes"):
        hashindex.write_index(str(tmp_path / "x"), np.zeros((3, 4), np.uint8), ids=["a", "b"])


def test_cli_eval_agrees_with_the_metrics_module(tmp_path, clustered):
    codes, labels, index = clustered
    queries = hashindex.write_index(str(tmp_path / "q"), codes[:50] ^ np.uint8(4), labels=labels[:50])
    out = subprocess.run([sys.executable, "-m", "hashindex.cli", "eval", index.path, queries.path, "--topk", "100",
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    want = hashindex.metrics.mean_average_precision(queries.codes, codes, labels[:50], labels, topk=100)
    assert result["map@100"] == pytest.approx(want) and result["queries"] == 50


def test_to_faiss_holds_the_searchable_rows_and_searches_alike(tmp_path, clustered):
    import faiss

    codes, _, _ = clustered
    index = hashindex.write_index(str(tmp_path / "masked"), codes, ids=[f"img{i}" for i in range(500)])
    group = zarr.open_group(f"{index.path}/{index.version}", mode="r+")
    group["valid"][:] = np.arange(500) % 3 != 0  # rejected rows are not exported
    store.finish_version(group)
    index = hashindex.open(index.path)
    exported = index.to_faiss()
    flat = faiss.downcast_IndexBinary(exported.index)
    assert isinstance(flat, faiss.IndexBinaryFlat) and exported.ntotal == index.ntotal == 333
    kept = np.flatnonzero(np.arange(500) % 3 != 0)
    assert (faiss.vector_to_array(exported.id_map) == kept).all()
    assert (faiss.vector_to_array(flat.xb).reshape(-1, 8) == codes[kept]).all()
    queries = codes[:20] ^ np.uint8(1)
    faiss_d, faiss_rows = exported.search(queries, 10)
    our_d, our_rows = index.search(queries, 10)
    assert (faiss_d == our_d).all()
    # each row is at its reported distance; below the k-th distance the two agree row for row as sets
    # (rows tied at the k-th distance may differ in which are cut)
    assert (np.bitwise_count(queries[:, None] ^ codes[faiss_rows]).sum(-1) == faiss_d).all()
    for q in range(len(queries)):
        inside = faiss_d[q] < faiss_d[q].max()
        assert set(faiss_rows[q][inside]) == set(our_rows[q][our_d[q] < our_d[q].max()])
    assert list(index.ids_at(faiss_rows[0])) == [f"img{r}" for r in faiss_rows[0]]


def test_write_index_imports_a_faiss_index_both_ways_round_trip(tmp_path, clustered):
    import faiss

    codes, _, index = clustered
    flat = faiss.IndexBinaryFlat(64)
    flat.add(codes)
    imported = hashindex.write_index(str(tmp_path / "from_flat"), flat)
    assert (imported.codes == codes).all() and imported.ids[7] == "7"
    back = hashindex.write_index(str(tmp_path / "round_trip"), index.to_faiss(), ids=index.ids)
    assert (back.codes == index.codes).all() and (back.ids == index.ids).all()
    hnsw = faiss.IndexBinaryHNSW(64)  # any binary index that reconstructs its codes
    hnsw.add(codes)
    assert (hashindex.write_index(str(tmp_path / "from_hnsw"), hnsw).codes == codes).all()
    mapped = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(64))
    mapped.add_with_ids(codes[:3], np.array([30, 10, 20], dtype=np.int64))
    assert list(hashindex.write_index(str(tmp_path / "from_map"), mapped).ids) == ["30", "10", "20"]


def test_cli_eval_plots_write_the_curves_beside_the_json(tmp_path, clustered):
    from PIL import Image

    codes, labels, index = clustered
    queries = hashindex.write_index(str(tmp_path / "q"), codes[:50] ^ np.uint8(4), labels=labels[:50])
    out = subprocess.run([sys.executable, "-m", "hashindex.cli", "eval", index.path, queries.path, "--plots",
                          str(tmp_path / "plots")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "plots" / "eval.json").read_text())
    assert saved["queries"] == 50 and len(saved["pr"]["precision"]) == 65 and saved["precision@n"]
    blue = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first cycle colour: one curve each, so no second
    orange = np.array([0xFF, 0x7F, 0x0E])
    for name in ("pr_radius.png", "precision_at_n.png"):
        picture = np.asarray(Image.open(tmp_path / "plots" / name).convert("RGB")).astype(int)
        assert picture.shape[0] >= 400 and picture.shape[1] >= 600
        near = lambda colour: (np.abs(picture - colour).sum(-1) < 30).sum()  # noqa: E731
        assert near(blue) > 200 and near(orange) == 0, name


def test_open_warms_the_kernels_and_builds_mih_in_the_background(tmp_path, monkeypatch):
    from hashindex import index as index_module

    rng = np.random.default_rng(5)
    centres = rng.integers(0, 256, (64, 8), dtype=np.uint8)  # learned-like: clustered codes, MIH pays
    codes = centres[rng.integers(0, 64, 300_000)] ^ np.packbits(rng.random((300_000, 64)) < 0.03, axis=1)
    path = str(tmp_path / "big")
    hashindex.write_index(path, codes, chunk_rows=1 << 17)
    queries = codes[rng.choice(len(codes), 40, replace=False)] ^ np.uint8(2)
    want = hashindex.open(path, searcher="linear").search(queries, 10)

    monkeypatch.setattr(index_module.Index, "_mih_setup_seconds", lambda self: 0.0)  # plan after 8 queries
    monkeypatch.setattr(index_module, "WARM_KERNELS_AFTER_SECONDS", 0.0)  # load after the first answer
    index = hashindex.open(path)
    assert index._kernels_ready is not None  # above WARM_MIN_WORDS: preparing on threads
    first = [index.search(q, 10) for q in queries[:8]]  # answered at once, by whichever scan is ready
    assert first and index._loader is not None  # the kernels load once the first answer is out
    assert index.wait_until_prepared(timeout=120) == "linear"
    rest = [index.search(q, 10) for q in queries[8:]]  # the numba scan answers; the planner starts
    final = index.wait_until_prepared(timeout=120)
    assert final in ("mih", "mih-compact"), final
    after = index.search(queries, 10)
    got_d = np.concatenate([d for d, _ in first + rest])
    got_i = np.concatenate([i for _, i in first + rest])
    for d, i in ((got_d, got_i), after):
        assert (d == want[0]).all() and (i == want[1]).all()
    small = hashindex.write_index(str(tmp_path / "small"), codes[:1000])
    assert hashindex.open(small.path)._kernels_ready is None  # tiny: the numpy scan is enough
