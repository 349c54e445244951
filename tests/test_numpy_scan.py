"""NumpyScan, the plain-numpy searcher a fresh process answers with: the linear scan's results exactly."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hashindex import search as search_mod
from hashindex.search import MISSING_DISTANCE, LinearScan, NumpyScan
from conftest import clustered_codes, random_codes


def brute_force(queries, codes):
    return np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(-1)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 300))
    nbytes = draw(st.integers(1, 40))  # up to 320 bits: distances past 255 need 16-bit counts
    return (n, nbytes, draw(st.integers(1, 350)), draw(st.integers(1, 4)), draw(st.integers(1, 5)),
            draw(st.sampled_from([0.0, 0.02, 0.1, 0.5])), draw(st.integers(0, 64)),
            draw(st.integers(1, 70)), draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_knn_and_radius_equal_brute_force_with_ties_by_position(case):
    n, nbytes, k, nq, centres, flip, radius, block, seed = case
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, n + nq, nbytes, centres=centres, flip=flip)
    db, queries = codes[:n], codes[n:]
    scan = NumpyScan(db)
    scan.BLOCK_ROWS = block  # block edges anywhere in the database
    d = brute_force(queries, db)
    order = np.argsort(d, axis=1, kind="stable")
    found = min(k, n)
    D, I = scan.search(queries, k)
    assert D.dtype == np.int32 and I.dtype == np.int64 and D.shape == (nq, k)
    np.testing.assert_array_equal(I[:, :found], order[:, :found])
    np.testing.assert_array_equal(D[:, :found], np.take_along_axis(d, order[:, :found], 1))
    assert (D[:, found:] == MISSING_DISTANCE).all() and (I[:, found:] == -1).all()
    lims, RD, RI = scan.radius_search(queries, radius)
    for q in range(nq):
        want = order[q][d[q][order[q]] <= radius]
        np.testing.assert_array_equal(RI[lims[q]:lims[q + 1]], want)
        np.testing.assert_array_equal(RD[lims[q]:lims[q + 1]], d[q][want])


@pytest.mark.parametrize("bits", [16, 64, 128, 256, 264])
def test_same_results_as_the_numba_linear_scan(bits):
    rng = np.random.default_rng(bits)
    db = np.concatenate([random_codes(rng, 3000, bits // 8), clustered_codes(rng, 3000, bits // 8)])
    queries = db[rng.integers(0, len(db), 7)] ^ np.uint8(3)
    for a, b in zip(NumpyScan(db).search(queries, 50), LinearScan(db).search(queries, 50)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(NumpyScan(db).radius_search(queries, bits // 4), LinearScan(db).radius_search(queries, bits // 4)):
        np.testing.assert_array_equal(a, b)


def test_inputs_are_checked_like_the_linear_scan():
    db = random_codes(np.random.default_rng(1), 20, 8)
    scan = NumpyScan(db)
    with pytest.raises(TypeError, match="codes.*float64"):
        NumpyScan(db.astype(np.float64))
    with pytest.raises(ValueError, match=r"queries have 4 bytes \(32 bits\) per code, the index has 8 bytes"):
        scan.search(db[:, :4], 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        scan.search(db, 0)
    with pytest.raises(ValueError, match="radius must be an integer >= 0"):
        scan.radius_search(db, -1)
    assert [a.shape for a in scan.search(db[:0], 3)] == [(0, 3), (0, 3)]
    assert [a.shape for a in NumpyScan(db[:0]).radius_search(db[:2], 3)] == [(3,), (0,), (0,)]
    D, I = scan.search(db[3], 1)  # a 1-D query is one query
    assert I.tolist() == [[3]] and D.tolist() == [[0]]


def test_missing_distance_is_the_kernels_sentinel():
    from hashindex import _bitops

    assert search_mod.MISSING_DISTANCE == _bitops.SENTINEL_D


def test_a_query_by_code_loads_neither_numba_nor_torch(tmp_path):
    # what makes a cold `hashindex query` fast: it reads the codes and scans them with numpy
    import hashindex

    codes = random_codes(np.random.default_rng(2), 5000, 8)
    hashindex.write_index(str(tmp_path / "idx"), codes)
    script = ("import sys; from hashindex.cli import main; "
              f"main(['query', {str(tmp_path / 'idx')!r}, '--code', {codes[42].tobytes().hex()!r}, '-k', '3']); "
              "print('loaded:', sorted(m for m in ('numba', 'torch', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "d=0    42" in out and "loaded: []" in out, out
