"""Queries/s of hashindex's exact Hamming search vs faiss IndexBinaryFlat.

    python bench/search_speed.py [--quick] [--sizes 1000000 10000000] [--bits 64 128]

Random codes (seeded).  For each (N, bits, batch) the methods are timed in
interleaved rounds (ours, faiss, ours, faiss, ...) so that both see the same
background load on a shared machine; queries/s = queries answered / time
spent over all rounds.  Before timing, distances are checked identical to
faiss on the query pool.  Writes bench/results/search_speed.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faiss  # noqa: E402
import numba  # noqa: E402

from hashindex.search import LinearScan  # noqa: E402
from machine import cpu_model  # noqa: E402 - one home for the machine record

try:  # phase 2; the bench still runs without it
    from hashindex.mih import MultiIndexHashing  # noqa: E402
except ImportError:  # pragma: no cover
    MultiIndexHashing = None

RESULTS = ROOT / "bench" / "results"


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "faiss": faiss.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": None,  # filled after the first parallel call
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "loadavg_start": os.getloadavg(),
    }


def timed_rounds(fns: dict, pool: np.ndarray, batch: int, min_time: float, round_time: float) -> dict:
    """Alternate the methods in rounds of ~round_time s until each has min_time s.

    Records wall-clock time and this thread's CPU time; with one thread the
    latter is immune to other processes taking turns on the cores."""
    spent = {name: 0.0 for name in fns}
    cpu = {name: 0.0 for name in fns}
    answered = {name: 0 for name in fns}
    per_round = {name: [] for name in fns}
    cursor = {name: 0 for name in fns}
    npool = pool.shape[0] - pool.shape[0] % batch
    while min(spent.values()) < min_time:
        for name, fn in fns.items():
            # Let the other method's OpenMP threads stop spinning (numba and
            # faiss each bring their own pool), then one untimed call.
            time.sleep(0.05)
            fn(pool[:batch])
            t_start = time.perf_counter()
            c_start = time.thread_time()
            n = 0
            while True:
                s = cursor[name]
                fn(pool[s:s + batch])
                cursor[name] = (s + batch) % npool
                n += batch
                elapsed = time.perf_counter() - t_start
                if elapsed >= round_time:
                    break
            cpu[name] += time.thread_time() - c_start
            spent[name] += elapsed
            answered[name] += n
            per_round[name].append(n / elapsed)
    return {name: {"qps": answered[name] / spent[name], "seconds": spent[name], "queries": answered[name],
                   "thread_cpu_qps": answered[name] / max(cpu[name], 1e-9),
                   "round_qps": per_round[name]} for name in fns}


def plot(results: list, path: Path, target: float, threads: int, ranked_by: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in results for m in r["speedup_vs_faiss"]})
    labels = [f"N={r['n']:,}\n{r['bits']} bits\nbatch {r['batch']}" for r in results]
    x = np.arange(len(results))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results) + 2), 4.5))
    for j, m in enumerate(methods):
        vals = [r["speedup_vs_faiss"].get(m, np.nan) for r in results]
        bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.bar_label(bars, fmt="%.1f×", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(target, color="red", lw=0.8, ls="--", label=f"scan target {target:g}×")
    if "mih" in methods:
        ax.axhline(15.0, color="purple", lw=0.8, ls=":", label="mih target 15× (10M, 64 bits, batch 1)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("queries/s relative to faiss IndexBinaryFlat")
    clock = "CPU time" if ranked_by == "thread_cpu_qps" else "wall clock"
    ax.set_title(f"Exact Hamming k-NN (k=10) vs faiss IndexBinaryFlat, {threads} thread(s) each, {clock}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run: N=100,000, 64 bits, 0.3 s per measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per method and setting")
    ap.add_argument("--no-mih", action="store_true", help="skip multi-index hashing")
    ap.add_argument("--mih-bits", type=int, nargs="+", default=[64],
                    help="code lengths at which multi-index hashing is timed too (it loses to the scan "
                         "at 128 bits: the k-th distance is too large a share of the bits)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both numba and faiss (default: all cores)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="rank by this thread's CPU time instead of wall clock (needs --threads 1; "
                         "for a machine shared with other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.bits, args.min_time = [100_000], [64], 0.3
    if args.out is None:
        name = "search_speed" + ("_quick" if args.quick else "") + (f"_{args.threads}thread" if args.threads else "")
        args.out = RESULTS / (name + ".json")

    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1 (CPU time of one thread)")
    if args.threads:
        numba.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    info = machine_info()
    qps_key = "thread_cpu_qps" if args.cpu_time else "qps"
    print(f"# {info['cpu_model']}, {info['cores']} cores; numba {info['numba']} ({info['numba_threads']} threads), "
          f"faiss {info['faiss']} ({info['faiss_omp_threads']} OpenMP threads), numpy {info['numpy']}")
    use_mih = MultiIndexHashing is not None and not args.no_mih
    results = []
    header = f"{'N':>11} {'bits':>4} {'batch':>5} {'method':>7} {'q/s':>10} {'faiss q/s':>10} {'ratio':>6}"
    print(header)
    for n in args.sizes:
        for bits in args.bits:
            rng = np.random.default_rng([args.seed, n, bits])
            db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
            pool = rng.integers(0, 256, size=(max(1000, max(args.batches)), bits // 8), dtype=np.uint8)
            t0 = time.perf_counter()
            ours = {"scan": LinearScan(db)}
            build = {"scan": time.perf_counter() - t0}
            if use_mih and bits in args.mih_bits:
                t0 = time.perf_counter()
                ours["mih"] = MultiIndexHashing(db)
                build["mih"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fidx = faiss.IndexBinaryFlat(bits)
            fidx.add(db)
            build["faiss"] = time.perf_counter() - t0
            del db

            # correctness (and JIT warm-up) on 100 queries
            check = pool[:100]
            fD, _ = fidx.search(check, args.k)
            identical = {}
            for name, idx in ours.items():
                D, _ = idx.search(check, args.k)
                idx.search(check[:1], args.k)
                identical[name] = bool(np.array_equal(D, fD))
                if not identical[name]:
                    raise SystemExit(f"{name}: distances differ from faiss at N={n}, bits={bits}")

            for batch in args.batches:
                fns = {name: (lambda q, idx=idx: idx.search(q, args.k)) for name, idx in ours.items()}
                fns["faiss"] = lambda q: fidx.search(q, args.k)
                round_time = min(0.5, args.min_time / 4)
                timing = timed_rounds(fns, pool, batch, args.min_time, round_time)
                fq = timing["faiss"][qps_key]
                row = {"n": n, "bits": bits, "batch": batch, "k": args.k, "timing": timing,
                       "ranked_by": qps_key,
                       "speedup_vs_faiss": {m: timing[m][qps_key] / fq for m in ours},
                       "distances_identical_to_faiss": identical, "build_seconds": build}
                if "mih" in ours:
                    row["mih_vs_scan"] = timing["mih"][qps_key] / timing["scan"][qps_key]
                results.append(row)
                for m in ours:
                    print(f"{n:>11,} {bits:>4} {batch:>5} {m:>7} {timing[m][qps_key]:>10,.0f} {fq:>10,.0f} "
                          f"{timing[m][qps_key] / fq:>5.1f}×", flush=True)
            del ours, fidx

    info["numba_threading_layer"] = numba.threading_layer()
    info["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python bench/search_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": info, "k": args.k, "min_time_s": args.min_time, "results": results,
               "note": "interleaved rounds; queries/s = queries answered / seconds spent; "
                       "ratio = our queries/s over faiss IndexBinaryFlat queries/s"}
    args.out.write_text(json.dumps(payload, indent=1))
    png = args.out.with_suffix(".png")
    plot(results, png, target=3.0, threads=info["numba_threads"], ranked_by=qps_key)
    print(f"# wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
