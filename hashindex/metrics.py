"""Hamming-ranking retrieval metrics for packed binary codes.

Protocol (the convention of the deep-hashing papers' evaluation code):

* Codes are packed bits, ``np.uint8`` arrays of shape ``[n, nbytes]`` in
  :func:`numpy.packbits` order; ``bits = 8 * nbytes``.
* Labels are either single-label (1-D integer vector) or multi-label (2-D
  multi-hot 0/1 matrix). A database item is relevant to a query when it has
  the same class (multi-label: shares at least one label).
* The database is ranked by Hamming distance ascending; ties are broken by
  database position (stable sort).
* AP@k is the mean of the precision at each relevant position within the top
  ``k``, divided by the number of relevant items *in the top k*. A query with
  no relevant item in its top ``k`` has AP 0 and still counts in the mean.
  ``topk=None`` (or ``topk`` >= database size) means the whole database.
* precision@N divides the relevant count in the top ``N`` by ``N`` even when
  ``N`` exceeds the database size.
* Precision/recall at Hamming radius ``r``: an item is retrieved when its
  distance is <= ``r``. A query retrieving nothing has precision 0 (and is
  counted in ``empty_queries``); a query with no relevant item in the whole
  database has recall 0. Both still count in the means over all queries.

Every metric is derived by :func:`evaluate`-style single passes over the
queries in batches; the distances of a batch are computed once and all
requested metrics are taken from them, so memory is bounded by
``batch x database size``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from hashindex.search import hamming_distances

__all__ = [
    "DEFAULT_NS",
    "DEFAULT_TOPKS",
    "evaluate",
    "mean_average_precision",
    "pr_curve",
    "precision_at_n",
    "precision_within_radius",
]

DEFAULT_TOPKS = (None, 1000)
DEFAULT_NS = (1, 5, 10, 50, 100, 500, 1000)

_MAX_BATCH = 256
# Bounds the per-batch working set (~16 bytes per query x database pair).
_MAX_BATCH_ELEMENTS = 1 << 24


class _Inputs(NamedTuple):
    query_codes: np.ndarray
    db_codes: np.ndarray
    query_labels: np.ndarray
    db_labels: np.ndarray
    multi_label: bool
    bits: int


# --------------------------------------------------------------------------
# validation


def _check_codes(name: str, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8 (packed bits), got {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, nbytes], got shape {codes.shape}")
    if codes.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if codes.shape[1] == 0:
        raise ValueError(f"{name} has 0 bytes per code")
    # the distance kernel wants C-contiguous rows
    return np.ascontiguousarray(codes)


def _check_labels(name: str, labels, n_codes: int, codes_name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (single-label) or 2-D (multi-hot), got shape {labels.shape}"
        )
    if labels.shape[0] != n_codes:
        raise ValueError(f"{name} has {labels.shape[0]} rows but {codes_name} has {n_codes}")
    if labels.ndim == 1:
        if labels.dtype.kind not in "iub":
            raise ValueError(f"{name} (single-label) must hold integers, got dtype {labels.dtype}")
        return labels
    if labels.dtype.kind not in "iufb":
        raise ValueError(f"{name} (multi-label) must be numeric 0/1, got dtype {labels.dtype}")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError(f"{name} (multi-label) must be a multi-hot matrix of 0/1 values")
    # float32 matmul is exact for label-overlap counts < 2**24
    return labels.astype(np.float32)


def _validate(query_codes, db_codes, query_labels, db_labels) -> _Inputs:
    qc = _check_codes("query_codes", query_codes)
    dc = _check_codes("db_codes", db_codes)
    if qc.shape[1] != dc.shape[1]:
        raise ValueError(
            f"query_codes has {qc.shape[1]} bytes per code but db_codes has {dc.shape[1]}"
        )
    ql = _check_labels("query_labels", query_labels, qc.shape[0], "query_codes")
    dl = _check_labels("db_labels", db_labels, dc.shape[0], "db_codes")
    if ql.ndim != dl.ndim:
        kind = {1: "single-label (1-D)", 2: "multi-label (2-D)"}
        raise ValueError(
            f"query_labels is {kind[ql.ndim]} but db_labels is {kind[dl.ndim]}"
        )
    if ql.ndim == 2 and ql.shape[1] != dl.shape[1]:
        raise ValueError(
            f"query_labels has {ql.shape[1]} classes but db_labels has {dl.shape[1]}"
        )
    return _Inputs(qc, dc, ql, dl, ql.ndim == 2, 8 * qc.shape[1])


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_topks(topks) -> tuple:
    topks = tuple(topks)
    for k in topks:
        if k is not None and not _is_positive_int(k):
            raise ValueError(f"topks entries must be None or positive integers, got {k!r}")
    return topks


def _check_ns(ns) -> tuple:
    ns = tuple(ns)
    for n in ns:
        if not _is_positive_int(n):
            raise ValueError(f"ns entries must be positive integers, got {n!r}")
    return ns


def _batch_rows(batch_size, n_db: int) -> int:
    if batch_size is None:
        return max(1, min(_MAX_BATCH, _MAX_BATCH_ELEMENTS // n_db))
    if not _is_positive_int(batch_size):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")
    return int(batch_size)


# --------------------------------------------------------------------------
# per-batch computations (each metric has exactly one home here)


def _batch_distances(query_codes: np.ndarray, db_codes: np.ndarray, bits: int) -> np.ndarray:
    dist = hamming_distances(query_codes, db_codes)
    # small unsigned ints turn numpy's stable argsort into a radix sort
    if bits < 1 << 8:
        return dist.astype(np.uint8)
    if bits < 1 << 16:
        return dist.astype(np.uint16)
    return dist


def _batch_relevance(query_labels: np.ndarray, db_labels: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        return (query_labels @ db_labels.T) > 0
    return query_labels[:, None] == db_labels[None, :]


def _ranked_relevance(dist: np.ndarray, relevant: np.ndarray, depth: int) -> np.ndarray:
    """Relevance of the top ``depth`` items of each row's Hamming ranking."""
    order = np.argsort(dist, axis=1, kind="stable")[:, :depth]
    return np.take_along_axis(relevant, order, axis=1)


def _ranking_hits(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Running relevant counts and precision-at-relevant-position terms."""
    hits = np.cumsum(ranked, axis=1, dtype=np.int32)
    positions = np.arange(1, ranked.shape[1] + 1, dtype=np.float64)
    terms = hits / positions
    terms *= ranked  # multiplying by the mask beats a where= divide
    return hits, terms


def _average_precision(hits: np.ndarray, terms: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k; 0 when nothing relevant is in the top k."""
    found = hits[:, k - 1]
    total = terms[:, :k].sum(axis=1)
    return np.divide(total, found, out=np.zeros_like(total), where=found > 0)


def _precision_at(hits: np.ndarray, n: int) -> np.ndarray:
    """Per-query precision@n; divides by n even when n exceeds the ranking."""
    return hits[:, min(n, hits.shape[1]) - 1] / n


def _radius_counts(dist: np.ndarray, relevant: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query cumulative counts of retrieved and relevant-retrieved items by radius."""
    rows, width = dist.shape[0], bits + 1
    # one flat histogram with a separate [0, bits] slot range per query
    slots = dist + (np.arange(rows, dtype=np.intp) * width)[:, None]
    retrieved = np.bincount(slots.ravel(), minlength=rows * width).reshape(rows, width)
    found = np.bincount(slots[relevant], minlength=rows * width).reshape(rows, width)
    return np.cumsum(retrieved, axis=1), np.cumsum(found, axis=1)


def _radius_precision_recall(retrieved: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query precision and recall at every radius (0 where undefined)."""
    precision = np.divide(found, retrieved, out=np.zeros(found.shape), where=retrieved > 0)
    total = found[:, -1:]
    recall = np.divide(found, total, out=np.zeros(found.shape), where=total > 0)
    return precision, recall


def _run(inputs: _Inputs, *, topks=(), ns=(), with_pr=False, batch_size=None) -> dict:
    """One batched pass over the queries computing only the requested metrics."""
    n_query, n_db, bits = inputs.query_codes.shape[0], inputs.db_codes.shape[0], inputs.bits
    rows = _batch_rows(batch_size, n_db)
    depth_of = {k: n_db if k is None else min(k, n_db) for k in topks}
    depth = max([*depth_of.values(), *(min(n, n_db) for n in ns)], default=0)

    ap_sum = dict.fromkeys(topks, 0.0)
    prec_sum = dict.fromkeys(ns, 0.0)
    pr_precision = np.zeros(bits + 1)
    pr_recall = np.zeros(bits + 1)
    pr_empty = np.zeros(bits + 1, dtype=np.int64)

    for start in range(0, n_query, rows):
        stop = min(start + rows, n_query)
        dist = _batch_distances(inputs.query_codes[start:stop], inputs.db_codes, bits)
        relevant = _batch_relevance(inputs.query_labels[start:stop], inputs.db_labels, inputs.multi_label)
        if depth:
            hits, terms = _ranking_hits(_ranked_relevance(dist, relevant, depth))
            for k, d in depth_of.items():
                ap_sum[k] += _average_precision(hits, terms, d).sum()
            for n in ns:
                prec_sum[n] += _precision_at(hits, n).sum()
            del hits, terms
        if with_pr:
            retrieved, found = _radius_counts(dist, relevant, bits)
            precision, recall = _radius_precision_recall(retrieved, found)
            pr_precision += precision.sum(axis=0)
            pr_recall += recall.sum(axis=0)
            pr_empty += (retrieved == 0).sum(axis=0)

    result = {
        "map": {k: float(s / n_query) for k, s in ap_sum.items()},
        "precision@n": {int(n): float(s / n_query) for n, s in prec_sum.items()},
    }
    if with_pr:
        result["pr"] = {
            "radius": np.arange(bits + 1),
            "precision": pr_precision / n_query,
            "recall": pr_recall / n_query,
            "empty_queries": pr_empty,
        }
    return result


def _map_key(topk) -> str:
    return "map@all" if topk is None else f"map@{topk}"


# --------------------------------------------------------------------------
# public API


def evaluate(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    topks=DEFAULT_TOPKS,
    ns=DEFAULT_NS,
    *,
    batch_size: int | None = None,
) -> dict:
    """Compute every retrieval metric in one batched pass over the queries.

    Parameters
    ----------
    query_codes, db_codes : np.ndarray
        Packed codes, ``uint8`` of shape ``[n_query, nbytes]`` and
        ``[n_db, nbytes]``.
    query_labels, db_labels : np.ndarray
        Single-label integer vectors ``[n]`` or multi-hot 0/1 matrices
        ``[n, n_classes]`` (both of the same kind).
    topks : iterable of int or None, default (None, 1000)
        Cut-offs for mAP; ``None`` means the whole database.
    ns : iterable of int, default (1, 5, 10, 50, 100, 500, 1000)
        Cut-offs for precision@N.
    batch_size : int, optional
        Queries per batch. By default up to 256, fewer for very large
        databases so that a batch holds at most ~16M query/item pairs.

    Returns
    -------
    dict
        ``'map@all'`` / ``'map@<k>'`` (one float per entry of ``topks``),
        ``'precision@n'`` (``{n: float}``), ``'pr'`` (see :func:`pr_curve`)
        and ``'precision@r2'`` (precision within Hamming radius 2).

    Raises
    ------
    ValueError
        On malformed codes, labels or cut-offs.
    """
    inputs = _validate(query_codes, db_codes, query_labels, db_labels)
    topks, ns = _check_topks(topks), _check_ns(ns)
    run = _run(inputs, topks=topks, ns=ns, with_pr=True, batch_size=batch_size)
    result = {_map_key(k): v for k, v in run["map"].items()}
    result["precision@n"] = run["precision@n"]
    result["pr"] = run["pr"]
    result["precision@r2"] = float(run["pr"]["precision"][2])  # codes have >= 8 bits
    return result


def mean_average_precision(
    query_codes, db_codes, query_labels, db_labels, topk=None, *, batch_size: int | None = None
) -> float:
    """Mean average precision over the top ``topk`` of each Hamming ranking.

    Parameters
    ----------
    query_codes, db_codes, query_labels, db_labels
        As in :func:`evaluate`.
    topk : int or None, default None
        Ranking cut-off; ``None`` (or a value >= the database size) gives
        mAP over the whole database.
    batch_size : int, optional
        As in :func:`evaluate`.

    Returns
    -------
    float
        Mean over all queries of AP@topk, where AP@k averages precision at
        the relevant positions within the top k (0 if there are none).
    """
    inputs = _validate(query_codes, db_codes, query_labels, db_labels)
    (topk,) = _check_topks((topk,))
    return _run(inputs, topks=(topk,), batch_size=batch_size)["map"][topk]


def precision_at_n(
    query_codes, db_codes, query_labels, db_labels, ns=DEFAULT_NS, *, batch_size: int | None = None
) -> dict[int, float]:
    """Mean precision of the top ``N`` of each Hamming ranking, for each ``N``.

    Parameters
    ----------
    query_codes, db_codes, query_labels, db_labels
        As in :func:`evaluate`.
    ns : iterable of int, default (1, 5, 10, 50, 100, 500, 1000)
        Cut-offs. The relevant count is always divided by ``N``, also when
        ``N`` exceeds the database size (as the deep-hashing papers' code does).
    batch_size : int, optional
        As in :func:`evaluate`.

    Returns
    -------
    dict of int to float
        ``{N: precision@N}``.
    """
    inputs = _validate(query_codes, db_codes, query_labels, db_labels)
    return _run(inputs, ns=_check_ns(ns), batch_size=batch_size)["precision@n"]


def pr_curve(
    query_codes, db_codes, query_labels, db_labels, *, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Precision and recall of Hamming-ball retrieval at every radius.

    Parameters
    ----------
    query_codes, db_codes, query_labels, db_labels
        As in :func:`evaluate`.
    batch_size : int, optional
        As in :func:`evaluate`.

    Returns
    -------
    dict
        ``'radius'``: ``0..bits``; ``'precision'``: mean over queries of
        relevant retrieved / retrieved, where a query retrieving nothing
        counts as precision 0; ``'recall'``: mean over queries of relevant
        retrieved / relevant in the database (0 for a query with no relevant
        item); ``'empty_queries'``: number of queries retrieving nothing at
        each radius. All arrays have length ``bits + 1``.
    """
    inputs = _validate(query_codes, db_codes, query_labels, db_labels)
    return _run(inputs, with_pr=True, batch_size=batch_size)["pr"]


def precision_within_radius(
    query_codes, db_codes, query_labels, db_labels, radius=2, *, batch_size: int | None = None
) -> float:
    """Mean precision of the items within Hamming ``radius`` of each query.

    Parameters
    ----------
    query_codes, db_codes, query_labels, db_labels
        As in :func:`evaluate`.
    radius : int, default 2
        Hamming radius (inclusive); values above the code length retrieve
        the whole database.
    batch_size : int, optional
        As in :func:`evaluate`.

    Returns
    -------
    float
        The :func:`pr_curve` precision at ``radius``: queries retrieving
        nothing count as precision 0.
    """
    inputs = _validate(query_codes, db_codes, query_labels, db_labels)
    if not isinstance(radius, numbers.Integral) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    pr = _run(inputs, with_pr=True, batch_size=batch_size)["pr"]
    return float(pr["precision"][min(int(radius), inputs.bits)])
