"""Tests for hashindex.metrics and hashindex.plots.

Every metric is checked against a brute-force pure-Python reference (loops,
int.bit_count, explicit sorting) on small random cases with many distance
ties, plus hand-computed cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashindex import metrics
from hashindex.metrics import (
    evaluate,
    mean_average_precision,
    pr_curve,
    precision_at_n,
    precision_within_radius,
)
from hashindex.plots import plot_bars, plot_pr_curves, plot_precision_at_n

NS = (1, 2, 3, 5, 10, 50)


# --------------------------------------------------------------------------
# brute-force reference


def ref_distance(a, b) -> int:
    return sum(int(x ^ y).bit_count() for x, y in zip(a.tolist(), b.tolist()))


def ref_relevant(q_label, d_label) -> bool:
    if np.ndim(q_label) == 0:
        return int(q_label) == int(d_label)
    return any(x > 0 and y > 0 for x, y in zip(q_label.tolist(), d_label.tolist()))


def ref_evaluate(qc, dc, ql, dl, topks, ns) -> dict:
    n_q, n_db, bits = len(qc), len(dc), 8 * qc.shape[1]
    ap = {k: 0.0 for k in topks}
    prec = {n: 0.0 for n in ns}
    pr_p, pr_r, empty = [0.0] * (bits + 1), [0.0] * (bits + 1), [0] * (bits + 1)
    for i in range(n_q):
        dist = [ref_distance(qc[i], dc[j]) for j in range(n_db)]
        rel = [ref_relevant(ql[i], dl[j]) for j in range(n_db)]
        ranking = sorted(range(n_db), key=lambda j: (dist[j], j))
        ranked_rel = [rel[j] for j in ranking]
        for k in topks:
            cut = n_db if k is None else min(k, n_db)
            hits, total = 0, 0.0
            for pos in range(cut):
                if ranked_rel[pos]:
                    hits += 1
                    total += hits / (pos + 1)
            ap[k] += total / hits if hits else 0.0
        for n in ns:
            prec[n] += sum(ranked_rel[:n]) / n
        n_rel = sum(rel)
        for r in range(bits + 1):
            got = [j for j in range(n_db) if dist[j] <= r]
            good = sum(rel[j] for j in got)
            pr_p[r] += good / len(got) if got else 0.0
            pr_r[r] += good / n_rel if n_rel else 0.0
            empty[r] += not got
    out = {("map@all" if k is None else f"map@{k}"): v / n_q for k, v in ap.items()}
    out["precision@n"] = {n: v / n_q for n, v in prec.items()}
    out["pr"] = {
        "radius": np.arange(bits + 1),
        "precision": np.array(pr_p) / n_q,
        "recall": np.array(pr_r) / n_q,
        "empty_queries": np.array(empty),
    }
    out["precision@r2"] = out["pr"]["precision"][2]
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "pr":
            for name in value:
                np.testing.assert_allclose(got["pr"][name], value[name], rtol=1e-12, atol=1e-12, err_msg=name)
            np.testing.assert_array_equal(got["pr"]["empty_queries"], value["empty_queries"])
        elif key == "precision@n":
            assert got[key].keys() == value.keys()
            for n in value:
                assert got[key][n] == pytest.approx(value[n], rel=1e-12, abs=1e-12), n
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def random_case(rng, bits, n_q, n_db, multi, n_classes=4):
    """Codes close to a few centres so that Hamming distances tie a lot."""
    nbytes = bits // 8
    centres = rng.integers(0, 256, size=(3, nbytes), dtype=np.uint8)

    def codes(n):
        out = centres[rng.integers(0, 3, size=n)].copy()
        flat = np.unpackbits(out, axis=1)
        flips = rng.random(flat.shape) < 2.0 / bits  # ~2 flipped bits per code
        return np.packbits(flat ^ flips, axis=1)

    if multi:
        ql = (rng.random((n_q, n_classes)) < 0.3).astype(np.int64)
        dl = (rng.random((n_db, n_classes)) < 0.3).astype(np.int64)
    else:
        ql = rng.integers(0, n_classes, size=n_q)
        dl = rng.integers(0, n_classes, size=n_db)
    return codes(n_q), codes(n_db), ql, dl


# --------------------------------------------------------------------------
# hand-computed cases

# 1 query (code 0, class 1) against 5 items at distances [3, 1, 0, 1, 2]
# with classes [1, 0, 1, 1, 0]. Stable ranking: item2 (d0, rel), item1 (d1),
# item3 (d1, rel; after item1 by position), item4 (d2), item0 (d3, rel):
# relevance along the ranking = 1, 0, 1, 0, 1.
HAND_Q = np.array([[0b0000_0000]], dtype=np.uint8)
HAND_DB = np.array([[0b111], [0b001], [0b000], [0b010], [0b011]], dtype=np.uint8)
HAND_QL = np.array([1])
HAND_DL = np.array([1, 0, 1, 1, 0])


def test_hand_average_precision():
    # AP@all = (1/1 + 2/3 + 3/5) / 3 = 34/45
    assert mean_average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL) == pytest.approx(34 / 45)
    # top-k: AP@1 = 1/1; AP@2 = 1/1 (one relevant in top 2); AP@3 = (1 + 2/3) / 2 = 5/6
    for k, want in [(1, 1.0), (2, 1.0), (3, 5 / 6), (4, 5 / 6), (5, 34 / 45), (100, 34 / 45)]:
        assert mean_average_precision(HAND_Q, HAND_DB, HAND_QL, HAND_DL, topk=k) == pytest.approx(want), k


def test_hand_ties_broken_by_database_position():
    # swapping items 1 and 3 (both at distance 1) puts the relevant one first:
    # relevance along the ranking = 1, 1, 0, 0, 1 -> AP = (1 + 1 + 3/5) / 3 = 13/15
    db = HAND_DB[[0, 3, 2, 1, 4]]
    dl = HAND_DL[[0, 3, 2, 1, 4]]
    assert mean_average_precision(HAND_Q, db, HAND_QL, dl) == pytest.approx(13 / 15)


def test_hand_precision_at_n():
    got = precision_at_n(HAND_Q, HAND_DB, HAND_QL, HAND_DL, ns=(1, 2, 3, 5, 10))
    # N larger than the database still divides by N: 3 relevant / 10
    assert got == pytest.approx({1: 1.0, 2: 1 / 2, 3: 2 / 3, 5: 3 / 5, 10: 3 / 10})


def test_hand_pr_curve():
    pr = pr_curve(HAND_Q, HAND_DB, HAND_QL, HAND_DL)
    np.testing.assert_array_equal(pr["radius"], np.arange(9))
    # r=0: {2} -> P 1, R 1/3; r=1: {2,1,3} -> 2/3, 2/3; r=2: +{4} -> 1/2, 2/3; r>=3: all -> 3/5, 1
    np.testing.assert_allclose(pr["precision"], [1, 2 / 3, 1 / 2] + [3 / 5] * 6)
    np.testing.assert_allclose(pr["recall"], [1 / 3, 2 / 3, 2 / 3] + [1.0] * 6)
    np.testing.assert_array_equal(pr["empty_queries"], np.zeros(9))
    assert precision_within_radius(HAND_Q, HAND_DB, HAND_QL, HAND_DL) == pytest.approx(1 / 2)
    assert precision_within_radius(HAND_Q, HAND_DB, HAND_QL, HAND_DL, radius=0) == 1.0
    assert precision_within_radius(HAND_Q, HAND_DB, HAND_QL, HAND_DL, radius=99) == pytest.approx(3 / 5)


def test_hand_multi_label():
    # query labels {0, 2}; items share a label: [yes (0), no, yes (2), yes (0,1), no (empty)]
    ql = np.array([[1, 0, 1]])
    dl = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    # distances [3, 1, 0, 1, 2] -> ranking items 2, 1, 3, 4, 0 -> relevance 1, 0, 1, 0, 1
    assert mean_average_precision(HAND_Q, HAND_DB, ql, dl) == pytest.approx(34 / 45)
    # boolean multi-hot works the same
    assert mean_average_precision(HAND_Q, HAND_DB, ql.astype(bool), dl.astype(bool)) == pytest.approx(34 / 45)


def test_query_without_relevant_items_counts_as_zero():
    # query 0 = hand case; query 1 has class 7, absent from the database
    qc = np.repeat(HAND_Q, 2, axis=0)
    ql = np.array([1, 7])
    assert mean_average_precision(qc, HAND_DB, ql, HAND_DL) == pytest.approx(34 / 45 / 2)
    assert mean_average_precision(qc, HAND_DB, ql, HAND_DL, topk=1) == pytest.approx(1 / 2)
    pr = pr_curve(qc, HAND_DB, ql, HAND_DL)
    assert pr["recall"][-1] == pytest.approx(1 / 2)  # no-relevant query has recall 0


def test_relevant_items_outside_topk_give_zero_ap():
    # the only relevant item (class 1) is ranked last
    dl = np.array([1, 0, 0, 0, 0])
    assert mean_average_precision(HAND_Q, HAND_DB, HAND_QL, dl, topk=4) == 0.0
    assert mean_average_precision(HAND_Q, HAND_DB, HAND_QL, dl) == pytest.approx(1 / 5)


def test_precision_within_radius_with_empty_retrievals():
    # query 0 (code 0) finds items at distance 0 and 2; query 1 (code 0xFF) finds nothing within 2
    qc = np.array([[0x00], [0xFF]], dtype=np.uint8)
    db = np.array([[0x00], [0x03], [0x0F]], dtype=np.uint8)  # distances to q0: 0, 2, 4; to q1: 8, 6, 4
    ql = np.array([0, 0])
    dl = np.array([0, 1, 0])
    # r=2: q0 precision 1/2, q1 retrieves nothing -> 0; mean 1/4
    assert precision_within_radius(qc, db, ql, dl) == pytest.approx(1 / 4)
    pr = pr_curve(qc, db, ql, dl)
    np.testing.assert_array_equal(pr["empty_queries"], [1, 1, 1, 1, 0, 0, 0, 0, 0])
    result = evaluate(qc, db, ql, dl)
    assert result["precision@r2"] == pytest.approx(1 / 4)


# --------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("bits", [8, 16, 64, 256])
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_matches_reference(bits, multi):
    rng = np.random.default_rng(bits + multi)
    qc, dc, ql, dl = random_case(rng, bits, n_q=13, n_db=40, multi=multi)
    topks = (None, 1, 7, 40, 1000)
    got = evaluate(qc, dc, ql, dl, topks=topks, ns=NS, batch_size=5)
    assert_same(got, ref_evaluate(qc, dc, ql, dl, topks, NS))


def test_single_metric_functions_agree_with_evaluate():
    rng = np.random.default_rng(3)
    qc, dc, ql, dl = random_case(rng, 16, n_q=20, n_db=50, multi=True)
    full = evaluate(qc, dc, ql, dl, topks=(None, 10), ns=NS)
    assert mean_average_precision(qc, dc, ql, dl) == full["map@all"]
    assert mean_average_precision(qc, dc, ql, dl, topk=10) == full["map@10"]
    assert precision_at_n(qc, dc, ql, dl, ns=NS) == full["precision@n"]
    pr = pr_curve(qc, dc, ql, dl)
    for name in pr:
        np.testing.assert_array_equal(pr[name], full["pr"][name])
    assert precision_within_radius(qc, dc, ql, dl) == full["precision@r2"]


def test_pr_curve_recall_monotone_and_complete():
    rng = np.random.default_rng(4)
    qc, dc, ql, dl = random_case(rng, 16, n_q=30, n_db=80, multi=False, n_classes=3)
    pr = pr_curve(qc, dc, ql, dl)
    assert np.all(np.diff(pr["recall"]) >= 0)
    assert np.all(np.diff(pr["empty_queries"]) <= 0)
    has_relevant = (ql[:, None] == dl[None]).any(axis=1)
    # the largest radius retrieves everything
    assert pr["recall"][-1] == pytest.approx(has_relevant.mean())
    assert pr["precision"][-1] == pytest.approx((ql[:, None] == dl[None]).mean())
    assert pr["empty_queries"][-1] == 0


@pytest.mark.parametrize("batch_size", [1, 4, 36, 37, 38, 500])
def test_batch_boundaries(batch_size):
    rng = np.random.default_rng(5)
    qc, dc, ql, dl = random_case(rng, 16, n_q=37, n_db=60, multi=False)
    one = evaluate(qc, dc, ql, dl, topks=(None, 9), ns=NS, batch_size=37)
    assert_same(evaluate(qc, dc, ql, dl, topks=(None, 9), ns=NS, batch_size=batch_size), one)


def test_distances_computed_once_per_batch(monkeypatch):
    calls = []
    real = metrics.hamming_distances

    def counting(q, db):
        calls.append(len(q))
        return real(q, db)

    monkeypatch.setattr(metrics, "hamming_distances", counting)
    rng = np.random.default_rng(6)
    qc, dc, ql, dl = random_case(rng, 8, n_q=10, n_db=20, multi=False)
    evaluate(qc, dc, ql, dl, batch_size=4)
    assert calls == [4, 4, 2]
    # the automatic batch size keeps batch x database under the element budget
    calls.clear()
    monkeypatch.setattr(metrics, "_MAX_BATCH_ELEMENTS", 60)
    evaluate(qc, dc, ql, dl)
    assert calls == [3, 3, 3, 1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from([8, 16, 64]),
    n_q=st.integers(1, 7),
    n_db=st.integers(1, 15),
    multi=st.booleans(),
    n_classes=st.integers(1, 4),
    topk=st.one_of(st.none(), st.integers(1, 20)),
    batch_size=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_reference(bits, n_q, n_db, multi, n_classes, topk, batch_size, seed):
    rng = np.random.default_rng(seed)
    qc, dc, ql, dl = random_case(rng, bits, n_q, n_db, multi, n_classes)
    topks = (None, topk) if topk else (None,)
    got = evaluate(qc, dc, ql, dl, topks=topks, ns=NS, batch_size=batch_size)
    assert_same(got, ref_evaluate(qc, dc, ql, dl, topks, NS))


# --------------------------------------------------------------------------
# input validation

Q = np.zeros((2, 2), dtype=np.uint8)
D = np.zeros((3, 2), dtype=np.uint8)
QL = np.array([0, 1])
DL = np.array([0, 1, 1])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((Q.astype(np.int64), D, QL, DL), "query_codes must have dtype uint8"),
        ((Q, D.astype(bool), QL, DL), "db_codes must have dtype uint8"),
        ((Q[0], D, QL, DL), "query_codes must be 2-D"),
        ((Q[:0], D, QL[:0], DL), "query_codes is empty"),
        ((Q, D[:0], QL, DL[:0]), "db_codes is empty"),
        ((Q[:, :0], D[:, :0], QL, DL), "query_codes has 0 bytes"),
        ((Q, D[:, :1], QL, DL), "query_codes has 2 bytes per code but db_codes has 1"),
        ((Q, D, QL[:1], DL), "query_labels has 1 rows but query_codes has 2"),
        ((Q, D, QL, DL[:2]), "db_labels has 2 rows but db_codes has 3"),
        ((Q, D, QL.astype(float), DL), "query_labels .*integers"),
        ((Q, D, QL[:, None, None], DL), "query_labels must be 1-D"),
        ((Q, D, QL, np.eye(3, dtype=int)), "query_labels is single-label .* db_labels is multi-label"),
        ((Q, D, np.eye(2, dtype=int), DL), "query_labels is multi-label .* db_labels is single-label"),
        ((Q, D, np.eye(2, dtype=int), np.eye(3, dtype=int)), "query_labels has 2 classes but db_labels has 3"),
        ((Q, D, np.eye(2) * 2, np.eye(3, 2)), "query_labels .*0/1"),
        ((Q, D, np.eye(2), np.full((3, 2), np.nan)), "db_labels .*0/1"),
    ],
)
def test_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        evaluate(*args)


def test_parameter_errors():
    with pytest.raises(ValueError, match="topks"):
        mean_average_precision(Q, D, QL, DL, topk=0)
    with pytest.raises(ValueError, match="topks"):
        evaluate(Q, D, QL, DL, topks=(None, 2.5))
    with pytest.raises(ValueError, match="ns"):
        precision_at_n(Q, D, QL, DL, ns=(1, -5))
    with pytest.raises(ValueError, match="radius"):
        precision_within_radius(Q, D, QL, DL, radius=-1)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(Q, D, QL, DL, batch_size=0)


def test_accepts_lists_and_non_contiguous_codes():
    wide = np.zeros((2, 4), dtype=np.uint8)
    result = evaluate(wide[:, ::2], D, QL.tolist(), DL.tolist(), topks=(None,), ns=(1,))
    # all distances are 0, so ranking is database order: relevance for q0 = 1,0,0; q1 = 0,1,1
    assert result["map@all"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)


# --------------------------------------------------------------------------
# plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(7)
    qc, dc, ql, dl = random_case(rng, 16, n_q=10, n_db=30, multi=False)
    result = evaluate(qc, dc, ql, dl, ns=(1, 5, 10))
    paths = [
        plot_pr_curves({"a": result["pr"], "b": result["pr"]}, tmp_path / "pr.png", "PR"),
        # string keys, as after a JSON round trip
        plot_precision_at_n(
            {"a": result["precision@n"], "b": {str(n): p for n, p in result["precision@n"].items()}},
            tmp_path / "sub" / "pn.png",
            "P@N",
        ),
        plot_bars({"16 bits": result["map@all"], "32 bits": 0.5}, tmp_path / "bars.png", "mAP", "mAP"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width


def test_many_curves_get_their_legend_beside_the_axes(tmp_path):
    # bench/compare.py plots every variant it has measured: past a handful, a legend inside the
    # axes would hide the curves, so the figure widens and the legend moves beside them
    curve = {1: 0.9, 10: 0.8, 100: 0.7}
    few = plot_precision_at_n({f"m{i}": curve for i in range(3)}, tmp_path / "few.png", "P@N")
    many = plot_precision_at_n({f"m{i}": curve for i in range(30)}, tmp_path / "many.png", "P@N")
    assert _png_width(many) > _png_width(few) * 1.3
