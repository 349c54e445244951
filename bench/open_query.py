"""The default search path as a Python user meets it: ``hashindex.open()`` plus Q single queries, in a
fresh process per point, against faiss IndexBinaryFlat built from the same on-disk codes (issue 16).

For each kind of codes (``random``: uniform; ``learned``: the protocol's ITQ codes replicated with
2.5 % bit noise, as bench/search_speed.py makes them) an N × bits index is written once and cached.
The queries are database codes with 8 % of their bits flipped. Each point runs in a new process:

- ours: ``t0``; ``hashindex.open(path)`` (the defaults: kernels load and MIH builds in the
  background); Q calls of ``index.search(q, 10)``, one query each; ``t1``;
- faiss: ``t0``; the same codes read from the index; ``IndexBinaryFlat.add``; Q single searches; ``t1``.

Imports happen before ``t0`` on both sides. Every answer is checked against the numba linear scan
(distances and rows, ties by position). The cold case runs ours with an empty numba cache, as a
fresh install that never ran ``setup.sh``'s precompile would.

    python bench/open_query.py [--n 10000000] [--bits 64] [--counts 1 10 100 1000] [--codes random learned]

Writes bench/results/open_query.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
K = 10
QUERY_FLIP = 0.08
TARGETS = {1: 1.0, 10: 1.0, 100: 3.0, 1000: 8.0}


def cache_root() -> Path:
    root = os.environ.get("HASHINDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hashindex"))
    return Path(root) / "bench"


def prepare(kind: str, n: int, bits: int, count: int) -> tuple[str, str]:
    """The index (written once) and ``count`` query codes for it."""
    import hashindex

    path = cache_root() / f"open_query-{kind}-{n}-{bits}.index"
    queries_path = cache_root() / f"open_query-{kind}-{n}-{bits}-queries.npy"
    if not (path / "CURRENT").exists() or not queries_path.exists():
        if kind == "random":
            codes = np.random.default_rng([0, n, bits]).integers(0, 256, (n, bits // 8), dtype=np.uint8)
        else:
            sys.path.insert(0, str(HERE))
            import learned_codes
            codes = learned_codes.replicate_with_noise(learned_codes.load(bits, 0)["database"], n, 0.025,
                                                       [0, n, bits, 2])
        hashindex.write_index(str(path), codes, chunk_rows=4096)  # the task size of hashindex encode
        rng = np.random.default_rng([1, n, bits])
        picked = codes[rng.choice(n, max(count, 1000), replace=False)]
        np.save(queries_path, picked ^ np.packbits(rng.random((len(picked), bits)) < QUERY_FLIP, axis=1))
    return str(path), str(queries_path)


def child(args) -> int:
    """One point, in a fresh process: prints {"seconds": …} and saves the answers."""
    queries = np.load(args.queries)[:args.count]
    import faiss  # noqa: F401  (imports are not timed, on either side)
    import hashindex
    if args.side == "ours":
        t0 = time.perf_counter()
        index = hashindex.open(args.index)
        answers = [index.search(q, K) for q in queries]
        seconds = time.perf_counter() - t0
        searcher = index.searcher
    else:
        t0 = time.perf_counter()
        codes = hashindex.open(args.index, warm=False)._searchable_codes
        flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        flat.add(codes)
        answers = [flat.search(q[None], K) for q in queries]
        seconds = time.perf_counter() - t0
        searcher = "faiss IndexBinaryFlat"
    np.save(args.answers, np.stack([np.concatenate([d.ravel(), i.ravel()]) for d, i in answers]).astype(np.int64))
    print(json.dumps({"seconds": seconds, "searcher": searcher}))
    return 0


def run_point(side: str, index: str, queries: str, count: int, env=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        answers = os.path.join(tmp, "answers.npy")
        out = subprocess.run([sys.executable, __file__, "--child", side, "--index", index, "--queries", queries,
                              "--count", str(count), "--answers", answers],
                             capture_output=True, text=True, env=env, check=True)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        record["answers"] = np.load(answers)
    return record


def truth(index_path: str, queries_path: str, count: int) -> np.ndarray:
    import hashindex
    index = hashindex.open(index_path, searcher="linear", warm=False)
    d, i = index.search(np.load(queries_path)[:count], K)
    return np.concatenate([d, i], axis=1).astype(np.int64)


def markdown(payload: dict) -> str:
    lines = [f"`python bench/open_query.py` on {payload['machine']}, {payload['n']:,} × {payload['bits']}-bit codes, "
             f"k = {K}, queries = database codes with {QUERY_FLIP:.0%} of their bits flipped, one `search` call "
             "each, a fresh process per point (imports not timed). faiss: IndexBinaryFlat filled from the same "
             "on-disk codes, its add counted. 'cold' = ours with an empty numba cache.", "",
             "| codes | Q | ours s | faiss s | faiss / ours | target | answers = linear scan | answering at the end |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        target = TARGETS.get(r["count"], 8.0) if r["case"] == "warm" else None
        verdict = "" if target is None else (" ✓" if r["ratio"] >= target else " ✗")
        lines.append(f"| {r['codes']}{' (cold JIT)' if r['case'] == 'cold' else ''} | {r['count']:,} | "
                     f"{r['ours_s']:.2f} | {r['faiss_s']:.2f} | {r['ratio']:.1f}×{verdict} | "
                     f"{'≥ %.0f×' % target if target else '–'} | {'yes' if r['identical'] else '**no**'} | "
                     f"{r['searcher']} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    from hashindex.plots import plot_lines
    series = {}
    for r in payload["rows"]:
        name = f"{r['codes']}{' cold JIT' if r['case'] == 'cold' else ''}"
        series.setdefault(name, {})[r["count"]] = r["ratio"]
    plot_lines(series, path, f"open() + Q queries, {payload['n'] / 1e6:g}M × {payload['bits']} bits: "
               "faiss Flat time / ours", "queries after open (Q)", "× faiss IndexBinaryFlat", logy=True, logx=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--codes", nargs="+", choices=["random", "learned"], default=["random", "learned"])
    ap.add_argument("--cold-counts", type=int, nargs="*", default=[1, 1000], help="random codes, empty numba cache")
    ap.add_argument("--out", default=str(HERE / "results" / "open_query"))
    ap.add_argument("--child", choices=["ours", "faiss"])
    ap.add_argument("--index")
    ap.add_argument("--queries")
    ap.add_argument("--count", type=int)
    ap.add_argument("--answers")
    args = ap.parse_args(argv)
    if args.child:
        args.side = args.child
        return child(args)

    rows = []
    for kind in args.codes:
        index, queries = prepare(kind, args.n, args.bits, max(args.counts))
        want = truth(index, queries, max(args.counts))
        cases = [("warm", c, None) for c in args.counts]
        if kind == "random":
            cases += [("cold", c, tempfile.mkdtemp(prefix="numba-cold-")) for c in args.cold_counts]
        for case, count, numba_dir in cases:
            env = None if numba_dir is None else {**os.environ, "NUMBA_CACHE_DIR": numba_dir}
            ours = run_point("ours", index, queries, count, env)
            theirs = run_point("faiss", index, queries, count)
            row = {"codes": kind, "case": case, "count": count, "ours_s": round(ours["seconds"], 3),
                   "faiss_s": round(theirs["seconds"], 3), "ratio": round(theirs["seconds"] / ours["seconds"], 2),
                   "searcher": ours["searcher"],
                   "identical": bool((ours["answers"] == want[:count]).all()),
                   "faiss_distances_equal": bool((theirs["answers"][:, :K] == want[:count, :K]).all())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    payload = {"command": "python bench/open_query.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "n": args.n, "bits": args.bits, "k": K, "query_flip": QUERY_FLIP, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(markdown(payload))
    plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
