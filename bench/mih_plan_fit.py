"""Fit the constants of hashindex.mih.plan's cost model to measured multi-index hashing queries.

    python bench/mih_plan_fit.py [--n 10000000] [--queries 200]

``mih.plan`` estimates a single k-NN query of MIH with m tables as
``SECONDS_PER_BUCKET * buckets + SECONDS_PER_ENTRY_WORD * entries * words
+ SECONDS_PER_NEAR_ENTRY * near entries`` (the buckets and table entries the query visits, and the
visited entries within its k-th distance, which each cost a heap offer; counted by the plan on a
sample of the database) and the linear scan's as ``SCAN_SECONDS_PER_WORD * N * words``. This script times MIH at several m on random and learned
codes (bench/search_speed.py's two kinds, k = 10, one query at a time on all threads) and the
linear scan beside it, takes the plan's own counts for the same queries, and fits the three MIH
constants by least squares on relative error. The constants matter for ranking m (their ratio)
and for `hashindex.open`'s choice of MIH over the scan (their scale); set them in hashindex/mih.py
from this script's output on the target machine (the comment above mih.SECONDS_PER_BUCKET says how
the current ones were chosen from it: least squares alone can rank m wrong where the ranking rests
on a close bucket/entry trade-off, so check the "model picks" lines).

Writes bench/results/mih_plan_fit.{json,png}: every setting's counts, measured and predicted times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learned_codes  # noqa: E402 - bench/learned_codes.py
from hashindex import _bitops, mih  # noqa: E402
from hashindex.search import LinearScan  # noqa: E402
from machine import cpu_model, git_commit  # noqa: E402
from search_speed import make_codes  # noqa: E402 - the bench's codes, so the fit sees what it times

RESULTS = ROOT / "bench" / "results"
# (codes, bits, m values): around each kind's best m, where the ranking has to be right
SETTINGS = [("random", 64, (4, 5, 6)), ("learned", 64, (3, 4, 5)), ("random", 128, (8, 10)),
            ("learned", 128, (6, 8, 10))]
K = 10


def per_query_seconds(index, queries: np.ndarray, rounds: int = 3) -> float:
    """Median over rounds of the mean wall time of one single-query k-NN."""
    index.search(queries[:1], K)  # compiled, pool awake
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(len(queries)):
            index.search(queries[i:i + 1], K)
        times.append((time.perf_counter() - start) / len(queries))
    return float(np.median(times))


def measure(args) -> list[dict]:
    rows = []
    codes_args = SimpleNamespace(seed=args.seed, batches=[1], flip=args.flip)
    for kind, bits, ms in SETTINGS:
        learned = learned_codes.load(bits, args.seed) if kind == "learned" else None
        db, _, queries = make_codes(kind, args.n, bits, codes_args, learned)
        queries = queries[:args.queries]
        scan = LinearScan(db)
        kth = scan.search(queries, K)[0][:, -1]
        scan_seconds = per_query_seconds(scan, queries[:max(20, args.queries // 4)], rounds=3)
        work = mih.plan(db, queries, kth).work
        del scan
        for m in ms:
            index = mih.MultiIndexHashing(db, m)
            buckets, entries, near = work[m]
            row = {"codes": kind, "n": args.n, "bits": bits, "m": m, "buckets": buckets,
                   "entry_words": entries * _bitops.words_per_code(bits // 8), "near_entries": near,
                   "seconds": per_query_seconds(index, queries), "scan_seconds": scan_seconds}
            del index
            rows.append(row)
            print(f"{kind:8s} {bits:4d} bits m={m:2d}: {row['buckets']:9.1f} buckets {row['entry_words']:11.0f} "
                  f"entry words {near:9.1f} near  {row['seconds'] * 1e3:7.3f} ms/query  "
                  f"(scan {scan_seconds * 1e3:.3f} ms)", flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    """Least squares on relative error: sum over settings of (predicted / measured - 1)^2."""
    work = np.array([[r["buckets"], r["entry_words"], r["near_entries"]] for r in rows])
    seconds = np.array([r["seconds"] for r in rows])
    per_bucket, per_entry_word, per_near = np.linalg.lstsq(work / seconds[:, None], np.ones(len(rows)), rcond=None)[0]
    scan_per_word = {bits: float(np.median([r["scan_seconds"] / (r["n"] * _bitops.words_per_code(bits // 8))
                                            for r in rows if r["bits"] == bits]))
                     for bits in sorted({r["bits"] for r in rows})}
    for r in rows:
        r["predicted_seconds"] = float(per_bucket * r["buckets"] + per_entry_word * r["entry_words"]
                                       + per_near * r["near_entries"])
        r["predicted_with_current_constants"] = float(mih.SECONDS_PER_BUCKET * r["buckets"]
                                                      + mih.SECONDS_PER_ENTRY_WORD * r["entry_words"]
                                                      + mih.SECONDS_PER_NEAR_ENTRY * r["near_entries"])
    ranking = {}
    for kind, bits, ms in SETTINGS:
        group = [r for r in rows if (r["codes"], r["bits"]) == (kind, bits)]
        best = min(group, key=lambda r: r["seconds"])
        chosen = min(group, key=lambda r: r["predicted_seconds"])
        ranking[f"{kind} {bits}"] = {"fastest_m": best["m"], "model_m": chosen["m"],
                                     "model_m_slowdown": chosen["seconds"] / best["seconds"]}
    return {"SECONDS_PER_BUCKET": float(per_bucket), "SECONDS_PER_ENTRY_WORD": float(per_entry_word),
            "SECONDS_PER_NEAR_ENTRY": float(per_near), "scan_seconds_per_word": scan_per_word, "ranking": ranking}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, marker in (("random", "o"), ("learned", "s")):
        for bits, color in ((64, "C0"), (128, "C1")):
            group = [r for r in rows if (r["codes"], r["bits"]) == (kind, bits)]
            if not group:
                continue
            x = [r["seconds"] * 1e3 for r in group]
            ax.scatter(x, [r["predicted_seconds"] * 1e3 for r in group], marker=marker, color=color,
                       label=f"{kind} {bits} bits (m = {', '.join(str(r['m']) for r in group)})")
            for r, xi in zip(group, x):
                ax.annotate(f"m={r['m']}", (xi, r["predicted_seconds"] * 1e3), fontsize=7,
                            textcoords="offset points", xytext=(4, 2))
    lo = min(min(r["seconds"], r["predicted_seconds"]) for r in rows) * 1e3 / 1.5
    hi = max(max(r["seconds"], r["predicted_seconds"]) for r in rows) * 1e3 * 1.5
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms per single query")
    ax.set_ylabel("mih.plan's estimate, fitted constants (ms)")
    ax.set_title(f"MIH cost model vs measurement, N={rows[0]['n']:,}, k={K}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="database codes")
    ap.add_argument("--queries", type=int, default=200, help="single queries timed per setting (<= 200)")
    ap.add_argument("--flip", type=float, default=0.025, help="learned codes: bit noise of the replicas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "mih_plan_fit.json")
    args = ap.parse_args(argv)
    rows = measure(args)
    fitted = fit(rows)
    payload = {"command": "python bench/mih_plan_fit.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpu": cpu_model(), "commit": git_commit()}, "k": K, "fit": fitted, "settings": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    png = args.out.with_suffix(".png")
    plot(rows, png)
    print(f"SECONDS_PER_BUCKET = {fitted['SECONDS_PER_BUCKET']:.3g}   (current {mih.SECONDS_PER_BUCKET:.3g})")
    print(f"SECONDS_PER_ENTRY_WORD = {fitted['SECONDS_PER_ENTRY_WORD']:.3g}   (current {mih.SECONDS_PER_ENTRY_WORD:.3g})")
    print(f"SECONDS_PER_NEAR_ENTRY = {fitted['SECONDS_PER_NEAR_ENTRY']:.3g}   (current {mih.SECONDS_PER_NEAR_ENTRY:.3g})")
    print("scan seconds per word:", {b: f"{v:.3g}" for b, v in fitted["scan_seconds_per_word"].items()},
          f"(current {mih.SCAN_SECONDS_PER_WORD:.3g})")
    for name, r in fitted["ranking"].items():
        print(f"{name}: fastest m={r['fastest_m']}, model picks m={r['model_m']} "
              f"({r['model_m_slowdown']:.2f}x the fastest's time)")
    print(f"# wrote {args.out}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
