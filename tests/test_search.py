"""Exact Hamming search (hashindex.search) against faiss and numpy brute force."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from hashindex import _bitops, search as search_mod
from hashindex.search import MISSING_DISTANCE, LinearScan, hamming_distances
from conftest import clustered_codes, random_codes

faiss = pytest.importorskip("faiss")

BITS = [16, 24, 32, 64, 128, 256]


@pytest.fixture(autouse=True, params=["one-thread", "all-threads"])
def kernel_path(request, monkeypatch):
    """Run every test both ways: small inputs run on one thread, one chunk."""
    if request.param == "all-threads":
        monkeypatch.setattr(search_mod, "_PARALLEL_MIN_WORDS", 0)
    return request.param


def brute_distances(q, db):
    return np.bitwise_count(q[:, None, :] ^ db[None, :, :]).sum(-1).astype(np.int32)


def brute_knn(q, db, k):
    d = brute_distances(q, db)
    i = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, i, axis=1), i




def faiss_search(db, q, k):
    index = faiss.IndexBinaryFlat(8 * db.shape[1])
    index.add(db)
    return index.search(q, k)


def check_knn(db, q, k):
    D, I = LinearScan(db).search(q, k)
    assert D.dtype == np.int32 and I.dtype == np.int64
    assert D.shape == I.shape == (q.shape[0], k)
    kk = min(k, db.shape[0])
    bd, bi = brute_knn(q, db, kk)
    np.testing.assert_array_equal(D[:, :kk], bd)
    np.testing.assert_array_equal(I[:, :kk], bi)
    assert (D[:, kk:] == MISSING_DISTANCE).all() and (I[:, kk:] == -1).all()
    return D, I


# ---------------------------------------------------------------- k-NN


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("nq", [1, 37])
def test_search_matches_faiss_and_stable_sort(bits, kind, nq):
    rng = np.random.default_rng(bits * 10 + nq)
    make = random_codes if kind == "random" else clustered_codes
    codes = make(rng, 3000 + nq, bits // 8)  # clustered queries share the database's centres
    db, q = codes[:3000], codes[3000:]
    k = 10
    D, I = check_knn(db, q, k)
    fD, _ = faiss_search(db, q, k)
    np.testing.assert_array_equal(D, fD)


def test_clustered_data_really_has_ties():
    rng = np.random.default_rng(0)
    db = clustered_codes(rng, 2000, 8)
    D, _ = LinearScan(db).search(db[:5], 20)
    assert (np.diff(D, axis=1) == 0).mean() > 0.5


@pytest.mark.parametrize("nbytes", [1, 3, 5, 8, 9, 16, 17, 24, 32, 40])
def test_search_any_code_length(nbytes):
    rng = np.random.default_rng(nbytes)
    db = clustered_codes(rng, 700, nbytes, flip=0.1)
    check_knn(db, db[:9], 15)


def test_k_larger_than_n_matches_faiss():
    rng = np.random.default_rng(1)
    db = random_codes(rng, 5, 8)
    q = random_codes(rng, 3, 8)
    D, I = check_knn(db, q, 12)
    fD, fI = faiss_search(db, q, 12)
    np.testing.assert_array_equal(D, fD)
    np.testing.assert_array_equal(I[:, 5:], fI[:, 5:])
    assert (D[:, 5:] == np.iinfo(np.int32).max).all()


@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 130])
def test_tiny_databases(n):
    """Fewer rows than threads / than one 64-code tile."""
    rng = np.random.default_rng(n)
    db = clustered_codes(rng, n, 4)
    check_knn(db, random_codes(rng, 4, 4), 1)
    check_knn(db, random_codes(rng, 4, 4), n)
    check_knn(db, random_codes(rng, 4, 4), n + 3)


def test_k_equals_n_is_a_full_stable_sort():
    rng = np.random.default_rng(2)
    db = clustered_codes(rng, 999, 16)
    check_knn(db, db[:3], 999)


@pytest.mark.parametrize("nchunks", [1, 3, 7])
def test_chunk_merge_keeps_ties_by_position(monkeypatch, nchunks):
    """The single-query path splits the database over chunks; ties across chunks
    must come back in position order whatever the split."""
    monkeypatch.setattr(LinearScan, "_nchunks", lambda self, nq: nchunks)
    db = np.zeros((2000, 8), dtype=np.uint8)
    db[::3, 0] = 1  # only two distinct codes: every result is a tie
    D, I = check_knn(db, db[:1], 50)
    assert (D == 0).all()
    check_knn(clustered_codes(np.random.default_rng(3), 4000, 8), db[:5], 25)


def test_query_batches_bounded_by_heap_memory(monkeypatch):
    monkeypatch.setattr(search_mod, "_HEAP_BYTES", 16 * 4 * 2 * 8)  # 8 queries per kernel call
    rng = np.random.default_rng(4)
    db = clustered_codes(rng, 1500, 8)
    check_knn(db, db[:45], 4)


def test_single_thread_gives_same_results():
    rng = np.random.default_rng(5)
    db = clustered_codes(rng, 3000, 16)
    q = db[:20]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        D1, I1 = LinearScan(db).search(q, 10)
    finally:
        numba.set_num_threads(before)
    D2, I2 = LinearScan(db).search(q, 10)
    np.testing.assert_array_equal(D1, D2)
    np.testing.assert_array_equal(I1, I2)


def test_num_threads_follows_set_num_threads():
    """The lock-free thread count the kernels size their work by must be numba's."""
    before = numba.get_num_threads()
    try:
        for n in (1, before):
            numba.set_num_threads(n)
            assert _bitops.num_threads() == numba.get_num_threads() == n
    finally:
        numba.set_num_threads(before)


def test_one_dimensional_query_and_non_contiguous_inputs():
    rng = np.random.default_rng(6)
    big = random_codes(rng, 800, 16)
    db = big[::2, ::2]  # strided view, 8 bytes per code
    index = LinearScan(db)
    assert (index.ntotal, index.nbytes, index.bits) == (400, 8, 64)
    D1, I1 = index.search(db[7], 5)
    D2, I2 = index.search(np.ascontiguousarray(db[7:8]), 5)
    np.testing.assert_array_equal(D1, D2)
    np.testing.assert_array_equal(I1, I2)
    assert D1.shape == (1, 5) and I1[0, 0] == 7
    check_knn(db, np.asfortranarray(db[:6]), 5)


def test_index_does_not_depend_on_caller_array():
    rng = np.random.default_rng(7)
    db = random_codes(rng, 300, 8)
    q = db[:4].copy()
    index = LinearScan(db)
    expected = index.search(q, 3)
    db[:] = 0
    got = index.search(q, 3)
    np.testing.assert_array_equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])


def test_empty_query_batch():
    index = LinearScan(random_codes(np.random.default_rng(8), 10, 4))
    D, I = index.search(np.zeros((0, 4), np.uint8), 3)
    assert D.shape == I.shape == (0, 3)
    lims, D, I = index.radius_search(np.zeros((0, 4), np.uint8), 3)
    assert lims.tolist() == [0] and D.size == I.size == 0


# ---------------------------------------------------------------- radius search


def brute_radius(q, db, r):
    d = brute_distances(q, db)
    lims, ds, ids = [0], [], []
    for row in d:
        hit = np.flatnonzero(row <= r)
        order = np.argsort(row[hit], kind="stable")
        ds.append(row[hit][order])
        ids.append(hit[order])
        lims.append(lims[-1] + hit.size)
    return np.array(lims), np.concatenate(ds), np.concatenate(ids)


@pytest.mark.parametrize("bits", [16, 24, 64, 128, 256])
def test_radius_search_inclusive_vs_brute_force(bits):
    rng = np.random.default_rng(bits)
    db = clustered_codes(rng, 2100, bits // 8, flip=0.08)
    q = np.concatenate([db[:6], random_codes(rng, 2, bits // 8)])
    index = LinearScan(db)
    for r in sorted({0, 1, bits // 8, bits // 4, bits // 2, bits}):
        lims, D, I = index.radius_search(q, r)
        assert lims.dtype == np.int64 and D.dtype == np.int32 and I.dtype == np.int64
        bl, bd, bi = brute_radius(q, db, r)
        np.testing.assert_array_equal(lims, bl)
        np.testing.assert_array_equal(D, bd)
        np.testing.assert_array_equal(I, bi)
    lims, _, _ = index.radius_search(q, bits)
    assert (np.diff(lims) == db.shape[0]).all()
    lims, D, _ = index.radius_search(q[:6], 0)
    assert (np.diff(lims) >= 1).all() and (D == 0).all()  # queries taken from the database


def test_radius_search_is_faiss_range_search_plus_one():
    rng = np.random.default_rng(9)
    db = clustered_codes(rng, 1000, 8)
    q = db[:4]
    index = faiss.IndexBinaryFlat(64)
    index.add(db)
    lims, D, I = LinearScan(db).radius_search(q, 12)
    flims, fD, fI = index.range_search(q, 13)  # faiss: strictly below the radius
    np.testing.assert_array_equal(lims, flims)
    for j in range(len(q)):
        ours = sorted(zip(D[lims[j]:lims[j + 1]].tolist(), I[lims[j]:lims[j + 1]].tolist()))
        theirs = sorted(zip(fD[flims[j]:flims[j + 1]].astype(int).tolist(), fI[flims[j]:flims[j + 1]].tolist()))
        assert ours == theirs


def test_radius_larger_than_bits_returns_everything():
    db = random_codes(np.random.default_rng(10), 77, 2)
    lims, D, I = LinearScan(db).radius_search(db[:2], 10_000)
    assert lims.tolist() == [0, 77, 154]


# ---------------------------------------------------------------- distance matrix


@pytest.mark.parametrize("nbytes", [1, 2, 3, 4, 8, 12, 16, 32, 33])
@pytest.mark.parametrize("nq", [1, 70])
def test_hamming_distances_vs_brute_force(nbytes, nq):
    rng = np.random.default_rng(nbytes + nq)
    db = random_codes(rng, 1000 + nbytes, nbytes)
    q = random_codes(rng, nq, nbytes)
    d = hamming_distances(q, db)
    assert d.dtype == np.int32 and d.shape == (nq, db.shape[0])
    np.testing.assert_array_equal(d, brute_distances(q, db))


def test_hamming_distances_one_query_1d():
    db = random_codes(np.random.default_rng(11), 50, 4)
    np.testing.assert_array_equal(hamming_distances(db[3], db), brute_distances(db[3:4], db))


# ---------------------------------------------------------------- property test


@st.composite
def search_cases(draw):
    n = draw(st.integers(1, 400))
    nbytes = draw(st.integers(1, 20))
    k = draw(st.integers(1, 450))
    nq = draw(st.integers(1, 5))
    centres = draw(st.integers(1, 6))
    flip = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5]))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, nbytes, k, nq, centres, flip, seed


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(search_cases())
def test_property_search_equals_brute_force(case):
    n, nbytes, k, nq, centres, flip, seed = case
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, n + nq, nbytes, centres=centres, flip=flip)
    check_knn(codes[:n], codes[n:], k)


# ---------------------------------------------------------------- errors


def test_errors():
    db = random_codes(np.random.default_rng(12), 20, 8)
    index = LinearScan(db)
    with pytest.raises(TypeError, match="codes.*float64"):
        LinearScan(db.astype(np.float64))
    with pytest.raises(TypeError, match="queries.*int64"):
        index.search(db.astype(np.int64), 3)
    with pytest.raises(TypeError, match="queries.*list"):
        index.search([[1, 2]], 3)
    with pytest.raises(ValueError, match=r"queries have 4 bytes \(32 bits\) per code, the index has 8 bytes \(64 bits\)"):
        index.search(db[:, :4], 3)
    with pytest.raises(ValueError, match="2-D"):
        LinearScan(db[0])
    with pytest.raises(ValueError, match="2-D"):
        index.search(db[None], 3)
    for k in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            index.search(db, k)
    for r in (-1, 1.5, None):
        with pytest.raises(ValueError, match="radius must be an integer >= 0"):
            index.radius_search(db, r)
    with pytest.raises(TypeError, match="codes.*bool"):
        hamming_distances(db, db.astype(bool))
    with pytest.raises(ValueError, match=r"queries have 4 bytes \(32 bits\) per code, codes has 8 bytes"):
        hamming_distances(db[:, :4], db)
    index.search(db, np.int64(3))  # numpy integers are fine
    index.radius_search(db, np.uint8(0))
