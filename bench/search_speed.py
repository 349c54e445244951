"""Queries/s of hashindex's Hamming k-NN search vs faiss's binary indexes (issue #6's bench).

    python bench/search_speed.py [--quick] [--sizes 1000000 10000000] [--bits 64 128] [--codes random learned]

Codes
    random   uniform random codes (seeded); queries are other random codes.
    learned  real codes: ITQ trained on the Fashion-MNIST protocol's cached 64-px EfficientNet-Lite0
             features (bench/learned_codes.py); its 69,000 database codes are replicated to N rows,
             each copy with every bit flipped independently with probability --flip (default 2.5%:
             a copy is ~1.6 bits from its original at 64 bits), seeded. Queries are the codes of
             the protocol's 1,000 query images (never database rows): 800 are timed, 200 (a seeded
             draw) only tune faiss's hash indexes.

Methods
    scan             hashindex LinearScan (exact; the reference for agreement)
    mih              hashindex MultiIndexHashing (exact), at --mih-bits only
    faiss-flat       faiss IndexBinaryFlat (exact)
    faiss-hash       faiss IndexBinaryHash(d, b): buckets on the first b bits, visits every bucket
                     within nflip bit flips of the query's. NOT exact k-NN.
    faiss-multihash  faiss IndexBinaryMultiHash(d, nhash, b): nhash tables on consecutive b-bit
                     substrings, candidates = union of the buckets within nflip flips in each
                     table. NOT exact k-NN (exact only for range search up to nhash*(nflip+1)-1
                     when nhash*b = d); at --mih-bits only.
    faiss's hash indexes are tuned per setting on the separate tuning queries, one query at a time:
    for each structure of a small grid (b; nhash with b = d // nhash), nflip grows from 0 until
    their tie-aware recall@k reaches --hash-recall, or until a query costs more than --hash-cap
    times an IndexBinaryFlat query; the fastest structure that reaches the target is timed (if none
    does, the one of highest recall). Their recall on the timed queries is reported beside their
    speed. They answer batches of <= 100 queries on one thread (faiss: "omp parallel if n > 100").

Agreement with the linear scan, on the timed queries: "identical" = fraction of queries whose
(distance, id) lists equal LinearScan's (ties ordered by position); "distances exact" = fraction
whose distance lists are equal (an exact k-NN up to the order of ties); "recall" = recall@k of
ids; "recall (ties)" = tie-aware recall@k, the multiset overlap of the returned distances with the
exact ones / k. MIH must be identical on every query, faiss IndexBinaryFlat exact in distances:
the run stops otherwise.

Memory: ours = bytes of the numpy arrays an index holds (MIH: its tables plus the LinearScan copy
it falls back to); faiss-flat = ntotal * code_size (its code array); faiss hash indexes = bytes
malloc holds more after building than before (glibc mallinfo2; their std::unordered_map buckets
and vectors have no size accessor). "heap MB" is that malloc measure for every method, as a check.

Timing: for each (codes, N, bits, batch) the methods are timed in interleaved rounds (scan, mih,
faiss-flat, ..., scan, ...) so that all see the same background load on a shared machine;
queries/s = queries answered / time spent over all rounds.

Writes bench/results/search_speed.json, .md (tables; issue #6's target ratios marked met or not),
.png (speed relative to IndexBinaryFlat) and _methods.png (queries/s and recall at batch 1).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
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
import psutil  # noqa: E402 - dask's dependency

import learned_codes  # noqa: E402 - bench/learned_codes.py
from hashindex.index import PLAN_QUERIES  # noqa: E402
from hashindex.search import LinearScan  # noqa: E402
from machine import cpu_model, git_commit  # noqa: E402 - one home for the machine record

try:  # phase 2; the bench still runs without it
    from hashindex.mih import MultiIndexHashing, default_m, plan, table_bytes  # noqa: E402
except ImportError:  # pragma: no cover
    MultiIndexHashing = default_m = plan = table_bytes = None

RESULTS = ROOT / "bench" / "results"
ORDER = ["scan", "mih", "mih-compact", "faiss-flat", "faiss-hash", "faiss-multihash"]
APPROXIMATE = ("faiss-hash", "faiss-multihash")
COLORS = {"scan": "C0", "mih": "C1", "mih-compact": "C4", "faiss-flat": "C7", "faiss-hash": "C2", "faiss-multihash": "C3"}
# issue #6's targets (ratios of queries/s measured in one run)
SCAN_TARGET = 3.0                       # scan / faiss-flat at 1M and 10M codes, 64 and 128 bits, batch 1 and 100
SCAN_TARGET_SIZES = (1_000_000, 10_000_000)
MIH_TARGET_FLAT, MIH_TARGET_SCAN = 15.0, 5.0   # exact MIH, k=10, 10M 64-bit codes, batch 1
MIH_TARGET_SIZE, MIH_TARGET_BITS = 10_000_000, 64
TUNING_QUERIES = 200


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "faiss": faiss.__version__,
        "git_commit": git_commit(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": None,  # filled after the first parallel call
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _MallInfo2
except (OSError, AttributeError):  # not glibc >= 2.33: no heap measure
    _libc = None


def heap_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (small blocks + mmapped large ones)."""
    if _libc is None:
        return None
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def array_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the numpy arrays ``obj`` holds, and those of the hashindex objects it holds (MIH's
    fallback LinearScan); a view counts its base array, once."""
    seen = set() if seen is None else seen
    total = 0
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            if id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
        elif type(value).__module__.startswith("hashindex") and hasattr(value, "__dict__") and id(value) not in seen:
            seen.add(id(value))
            total += array_bytes(value, seen)
    return total


def available_bytes() -> int:
    return psutil.virtual_memory().available


def estimated_bytes(n: int, bits: int, mih: bool) -> tuple[int, int]:
    """Rough peak memory of one setting: (codes and exact indexes, faiss's hash indexes while tuned)."""
    nbytes, words = bits // 8, 8 * -(-bits // 64)
    exact = n * (nbytes + nbytes + words)  # codes, faiss-flat, LinearScan
    if mih:
        m = default_m(bits, n)
        exact += table_bytes(n, bits, m) + n * 4 * m  # copied tables, and their offsets at most
        if bits <= 64:
            exact += table_bytes(n, bits, m, "compact")
    # measured at 1M: IndexBinaryHash ~1.3 * (8 + nbytes) B/code, MultiHash ~nbytes + 16 B/code and table;
    # while tuning, the best so far and one candidate are alive
    hmax = max([h for h, _ in multihash_grid(n, bits)] or [0])
    hashes = 2 * int(1.5 * n * (8 + nbytes)) + 2 * n * (nbytes + 16 * hmax)
    return exact, hashes


# --------------------------------------------------------------------------
# codes
# --------------------------------------------------------------------------


def make_codes(kind: str, n: int, bits: int, args, learned: dict | None):
    """(database, timed queries, tuning queries) as uint8 packed codes."""
    if kind == "random":
        rng = np.random.default_rng([args.seed, n, bits])
        db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
        pool = rng.integers(0, 256, size=(max(1000, max(args.batches)), bits // 8), dtype=np.uint8)
        tune = rng.integers(0, 256, size=(TUNING_QUERIES, bits // 8), dtype=np.uint8)
        return db, pool, tune
    queries = learned["queries"]
    order = np.random.default_rng([args.seed, 1]).permutation(len(queries))
    tune, pool = queries[np.sort(order[:TUNING_QUERIES])], queries[np.sort(order[TUNING_QUERIES:])]
    db = learned_codes.replicate_with_noise(learned["database"], n, args.flip, [args.seed, n, bits, 2])
    return db, pool, tune


# --------------------------------------------------------------------------
# agreement with the linear scan
# --------------------------------------------------------------------------


def agreement(D, I, D_true, I_true, bits: int) -> dict:
    """How far (D, I) is from the exact k-NN (D_true, I_true); see the module docstring."""
    nq, k = D_true.shape
    rows = np.arange(nq)[:, None]
    # ids: offset each query's ids so that one isin() matches within rows only
    span = int(max(I.max(initial=0), I_true.max(initial=0))) + 1
    found = np.isin(I + rows * span, I_true + rows * span) & (I >= 0)

    def histogram(d):  # per query counts of each distance 0..bits; missing results in bin bits+1
        d = np.where((d >= 0) & (d <= bits), d, bits + 1)
        return np.bincount((rows * (bits + 2) + d).ravel(), minlength=nq * (bits + 2)).reshape(nq, bits + 2)

    overlap = np.minimum(histogram(D), histogram(D_true))[:, :bits + 1].sum()
    return {"identical": float(np.mean(np.all((D == D_true) & (I == I_true), axis=1))),
            "distances_exact": float(np.mean(np.all(D == D_true, axis=1))),
            "recall": float(found.sum() / (nq * k)),
            "recall_ties": float(overlap / (nq * k))}


# --------------------------------------------------------------------------
# faiss's hash indexes
# --------------------------------------------------------------------------


def hash_grid(n: int, bits: int) -> list[int]:
    """IndexBinaryHash key lengths b: buckets of ~4096, ~256 and ~16 codes."""
    lg = round(math.log2(max(n, 2)))
    return sorted({min(bits, 32, max(4, lg - d)) for d in (12, 8, 4)})


def multihash_grid(n: int, bits: int) -> list[tuple[int, int]]:
    """IndexBinaryMultiHash (nhash, b = bits // nhash): from substrings of ~log2(N) bits (Norouzi et
    al.'s choice, one code per bucket) to shorter ones (fuller buckets, fewer flips)."""
    base = max(1, round(bits / math.log2(max(n, 2))))
    return [(h, bits // h) for h in (base, base + 1, base + 2) if 4 <= bits // h <= 32]


def one_at_a_time(index, queries: np.ndarray, k: int, give_up_s: float | None = None):
    """Search the queries one by one: (D, I, seconds per query), or None past give_up_s per query."""
    D = np.empty((len(queries), k), np.int32)
    I = np.empty((len(queries), k), np.int64)
    start = time.perf_counter()
    for i in range(len(queries)):
        D[i:i + 1], I[i:i + 1] = index.search(queries[i:i + 1], k)
        if give_up_s is not None and (i + 1) % 20 == 0 and time.perf_counter() - start > give_up_s * (i + 1):
            return None
    return D, I, (time.perf_counter() - start) / len(queries)


def tune_faiss_hash(kind: str, db: np.ndarray, tune: np.ndarray, truth, args, flat_s: float):
    """Build each structure of the grid, grow nflip; return (index, its build record, tuning log)."""
    bits = 8 * db.shape[1]
    if kind == "faiss-hash":
        grid = [({"b": b}, lambda b=b: faiss.IndexBinaryHash(bits, b)) for b in hash_grid(len(db), bits)]
    else:
        grid = [({"nhash": h, "b": b}, lambda h=h, b=b: faiss.IndexBinaryMultiHash(bits, h, b))
                for h, b in multihash_grid(len(db), bits)]
    log, best, best_key, started = [], None, None, time.perf_counter()
    for params, make in grid:
        heap0, t0 = heap_bytes(), time.perf_counter()
        index = make()
        index.add(db)
        build = {"build_seconds": time.perf_counter() - t0,
                 "heap_bytes": None if heap0 is None else heap_bytes() - heap0}
        kept = None
        for nflip in range(params["b"] + 1):
            index.nflip = nflip
            got = one_at_a_time(index, tune, args.k, give_up_s=args.hash_cap * flat_s)
            if got is None:  # slower than hash_cap x IndexBinaryFlat: more flips only cost more
                log.append({**params, "nflip": nflip, "ms_per_query": None, "recall_ties": None,
                            "note": f"over {args.hash_cap:g}x IndexBinaryFlat's time, stopped"})
                break
            D, I, seconds = got
            recall = agreement(D, I, *truth, bits)["recall_ties"]
            log.append({**params, "nflip": nflip, "ms_per_query": 1e3 * seconds, "recall_ties": recall,
                        "build_seconds": build["build_seconds"]})
            # reaching the target first, then the time per query
            key = (recall >= args.hash_recall, -seconds if recall >= args.hash_recall else recall, -seconds)
            if best_key is None or key > best_key:
                best_key, kept = key, {**params, "nflip": nflip}
            if recall >= args.hash_recall:
                break
        if kept is not None:
            index.nflip = kept["nflip"]
            best = (index, {**kept, **build, "reached_target": bool(best_key[0])})
        del index  # freed unless kept as best
    if best is None:
        raise SystemExit(f"{kind}: no setting answered within {args.hash_cap:g}x IndexBinaryFlat's time")
    best[1]["tuning_seconds"] = time.perf_counter() - started
    return best[0], best[1], log


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# one setting: (codes, N, bits)
# --------------------------------------------------------------------------


def faiss_flat(codes: np.ndarray):
    index = faiss.IndexBinaryFlat(8 * codes.shape[1])
    index.add(codes)
    return index


def run_setting(kind: str, n: int, bits: int, args, learned: dict | None, qps_key: str, use_mih: bool,
                use_hash: bool) -> list[dict]:
    db, pool, tune = make_codes(kind, n, bits, args, learned)
    codes_bytes = db.nbytes
    # load the compiled kernels now, so that neither build time nor heap growth below counts them
    LinearScan(db[:4096]).search(pool[:1], args.k)
    if use_mih:
        MultiIndexHashing(db[:4096]).search(pool[:1], args.k)

    indexes, build, memory, heap, params = {}, {}, {}, {}, {}
    def planned_mih(db, layout="copied"):
        # as hashindex.open's "auto" does: m from the cost model run on queries the scan answered
        # (here the tuning queries, never the timed ones); planning counts in the build time
        t0 = time.perf_counter()
        seen = tune[:PLAN_QUERIES]  # as many as the index keeps
        found = plan(db, seen, indexes["scan"].search(seen, args.k)[0][:, -1])
        m, speedup = (found.m, found.speedup) if layout == "copied" else (found.compact_m, found.compact_speedup)
        name = "mih" if layout == "copied" else "mih-compact"
        params[name] = {"m": m, "plan_seconds": time.perf_counter() - t0, "plan_speedup": speedup,
                        "default_m": default_m(bits, len(db))}
        return MultiIndexHashing(db, m=m, layout=layout)

    def compact_bytes(index):  # its ids-only tables; the codes it searches are the caller's
        return array_bytes(index) - index._ctab.nbytes

    exact = [("scan", LinearScan, array_bytes)]
    if use_mih:
        exact.append(("mih", planned_mih, array_bytes))
        if bits <= 64:  # at 128 bits even the copied tables lose to the scan on random codes
            exact.append(("mih-compact", lambda db: planned_mih(db, "compact"), compact_bytes))
    exact.append(("faiss-flat", faiss_flat, lambda index: index.ntotal * index.code_size))
    for name, make, size in exact:
        heap0, t0 = heap_bytes(), time.perf_counter()
        indexes[name] = make(db)
        build[name] = time.perf_counter() - t0
        heap[name] = None if heap0 is None else heap_bytes() - heap0
        memory[name] = size(indexes[name])

    k = args.k
    truth = indexes["scan"].search(pool, k)
    tuning = {}
    if use_hash:
        tune_truth = indexes["scan"].search(tune, k)
        _, _, flat_s = one_at_a_time(indexes["faiss-flat"], tune[:50], k)
        for name in APPROXIMATE:
            index, record, tuning[name] = tune_faiss_hash(name, db, tune, tune_truth, args, flat_s)
            indexes[name] = index
            build[name], heap[name] = record.pop("build_seconds"), record.pop("heap_bytes")
            memory[name] = heap[name]
            params[name] = record
            print(f"#   {name}: {record}", flush=True)
    del db

    # agreement with the scan on the timed queries (and JIT warm-up)
    agree = {}
    for name, index in indexes.items():
        D, I = index.search(pool, k)
        index.search(pool[:1], k)
        agree[name] = agreement(D, I, *truth, bits)
    if agree["faiss-flat"]["distances_exact"] < 1.0:
        raise SystemExit(f"scan: distances differ from faiss IndexBinaryFlat ({kind}, N={n}, bits={bits})")
    for name in ("mih", "mih-compact"):
        if name in agree and agree[name]["identical"] < 1.0:
            raise SystemExit(f"{name}: results differ from the linear scan on {1 - agree[name]['identical']:.2%} "
                             f"of the queries ({kind}, N={n}, bits={bits})")

    rows = []
    for batch in args.batches:
        fns = {name: (lambda q, index=index: index.search(q, k)) for name, index in indexes.items()}
        timing = timed_rounds(fns, pool, batch, args.min_time, round_time=min(0.5, args.min_time / 4))
        qps = {name: timing[name][qps_key] for name in indexes}
        row = {"codes": kind, "n": n, "bits": bits, "batch": batch, "k": k, "timing": timing, "ranked_by": qps_key,
               "qps": qps,
               "speedup_vs_faiss": {m: qps[m] / qps["faiss-flat"] for m in indexes if m != "faiss-flat"},
               "speedup_vs_scan": {m: qps[m] / qps["scan"] for m in indexes if m != "scan"},
               "agreement": agree, "build_seconds": build, "memory_bytes": memory, "heap_bytes_added": heap,
               "codes_bytes": codes_bytes, "params": params, "timed_queries": len(pool)}
        if "mih" in indexes:
            row["mih_vs_scan"] = row["speedup_vs_scan"]["mih"]
        if tuning:
            row["faiss_hash_tuning"] = tuning
        rows.append(row)
        for m in indexes:
            mb = memory[m] / 2**20 if memory[m] is not None else float("nan")
            print(f"{kind:>7} {n:>11,} {bits:>4} {batch:>5} {m:>15} {qps[m]:>10,.0f} "
                  f"{qps[m] / qps['faiss-flat']:>7.1f}× {qps[m] / qps['scan']:>6.2f}× "
                  f"{agree[m]['recall_ties']:>6.3f} {mb:>9.1f}", flush=True)
    return rows


# --------------------------------------------------------------------------
# report: markdown and plots
# --------------------------------------------------------------------------


def _fmt_mb(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def _param_text(params: dict) -> str:
    text = ", ".join(f"{key}={value}" for key, value in params.items() if key in ("m", "b", "nhash", "nflip"))
    if "reached_target" in params:
        missed = "" if params["reached_target"] else "; recall target not reached"
        text += f" (tuned in {params['tuning_seconds']:.0f} s{missed})"
    if "plan_speedup" in params:
        text += (f" (planned in {params['plan_seconds']:.1f} s, model {params['plan_speedup']:.1f}× the scan; "
                 f"default m={params['default_m']})")
    return text


def markdown(payload: dict) -> str:
    results, info = payload["results"], payload["machine"]
    lines = [f"# Hamming k-NN search speed (k = {payload['k']})", "",
             f"`{payload['command']}`  ", f"{info['cpu_model']}, {info['cores']} cores, numba {info['numba']} "
             f"({info['numba_threads']} threads), faiss {info['faiss']} ({info['faiss_omp_threads']} OpenMP threads), "
             f"commit {info['git_commit'][:12]}; load average {info['loadavg_start'][0]:.2f} at start, "
             f"{info['loadavg_end'][0]:.2f} at end; ranked by {results[0]['ranked_by'] if results else 'qps'}, "
             f"{payload['min_time_s']:g} s of timing per method and setting.  ",
             f"Learned codes: ITQ on Fashion-MNIST, 69,000 real codes replicated with {payload['flip']:.1%} bit noise; "
             f"queries: {payload['queries']}.  ",
             f"faiss hash indexes tuned to tie-aware recall@k ≥ {payload['hash_recall']:g} on separate queries "
             "(see search_speed.py's docstring); they answer batches ≤ 100 on one thread.", "",
             "## Targets (issue #6)", "",
             "| target | codes | N | bits | batch | ratio | needed | |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        in_scope = r["n"] in SCAN_TARGET_SIZES
        ratio = r["speedup_vs_faiss"]["scan"]
        lines.append(f"| scan / faiss-flat | {r['codes']} | {r['n']:,} | {r['bits']} | {r['batch']} | {ratio:.1f}× | "
                     f"≥ {SCAN_TARGET:g}× | {_verdict(ratio >= SCAN_TARGET, in_scope)} |")
    for r in results:
        if "mih" not in r["qps"] or r["batch"] != 1:
            continue
        in_scope = r["n"] == MIH_TARGET_SIZE and r["bits"] == MIH_TARGET_BITS and r["k"] == 10
        note = "" if r["codes"] == "random" else " (more expected on learned codes)"
        for label, ratio, need in (("mih / faiss-flat", r["speedup_vs_faiss"]["mih"], MIH_TARGET_FLAT),
                                   ("mih / scan", r["speedup_vs_scan"]["mih"], MIH_TARGET_SCAN)):
            lines.append(f"| {label} | {r['codes']} | {r['n']:,} | {r['bits']} | 1 | {ratio:.1f}× | "
                         f"≥ {need:g}×{note} | {_verdict(ratio >= need, in_scope)} |")
    lines += ["", "Targets apply at 1M and 10M codes (scan) and at 10M 64-bit codes, k = 10 (MIH); rows outside "
              "that scope are marked in parentheses.", "",
              "## Every method", "",
              "| codes | N | bits | batch | method | q/s | × faiss-flat | × scan | identical | distances exact | "
              "recall | recall (ties) | build s | memory MB | heap MB | parameters |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in sorted(r["qps"], key=ORDER.index):
            a = r["agreement"][m]
            lines.append(
                f"| {r['codes']} | {r['n']:,} | {r['bits']} | {r['batch']} | {m} | {r['qps'][m]:,.0f} | "
                f"{r['qps'][m] / r['qps']['faiss-flat']:.2f} | {r['qps'][m] / r['qps']['scan']:.2f} | "
                f"{a['identical']:.3f} | {a['distances_exact']:.3f} | {a['recall']:.3f} | {a['recall_ties']:.3f} | "
                f"{r['build_seconds'][m]:.2f} | {_fmt_mb(r['memory_bytes'][m])} | "
                f"{_fmt_mb(r['heap_bytes_added'][m])} | {_param_text(r['params'].get(m, {}))} |")
    sizes = sorted({(r["n"], r["bits"], r["codes_bytes"]) for r in results})
    lines += ["", "Packed codes for reference: " + ", ".join(f"{n:,} × {bits} bits = {_fmt_mb(size)} MB"
                                                           for n, bits, size in sizes) + ".", ""]
    lines += [f"Skipped: {message}.  " for message in payload["skipped"]]
    return "\n".join(lines)


def _verdict(met: bool, in_scope: bool) -> str:
    text = "met" if met else "**not met**"
    return text if in_scope else f"({'met' if met else 'not met'})"


def plot(results: list, path: Path, target: float, threads: int, ranked_by: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in results for m in r["speedup_vs_faiss"]}, key=ORDER.index)
    labels = [f"{r['codes']}\nN={r['n']:,}\n{r['bits']} bits\nbatch {r['batch']}" for r in results]
    x = np.arange(len(results))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.8))
    for j, m in enumerate(methods):
        vals = [r["speedup_vs_faiss"].get(m, np.nan) for r in results]
        bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, color=COLORS[m],
                      label=m + (" (approximate)" if m in APPROXIMATE else ""))
        ax.bar_label(bars, fmt="%.1f×", fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(target, color="red", lw=0.8, ls="--", label=f"scan target {target:g}×")
    if "mih" in methods:
        ax.axhline(MIH_TARGET_FLAT, color="purple", lw=0.8, ls=":", label="mih target 15× (10M, 64 bits, batch 1)")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("queries/s relative to faiss IndexBinaryFlat")
    clock = "CPU time" if ranked_by == "thread_cpu_qps" else "wall clock"
    ax.set_title(f"Hamming k-NN (k=10) vs faiss IndexBinaryFlat, {threads} thread(s), {clock}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars reach every height
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_methods(results: list, path: Path) -> bool:
    """Per codes kind: queries/s of every method at batch 1 where all were run, with their recall."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["batch"] == 1 and len(r["qps"]) > 3]
    kinds = sorted({r["codes"] for r in rows}, key=["random", "learned"].index)
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds) + 1, 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["codes"] == kind]
        methods = sorted({m for r in mine for m in r["qps"]}, key=ORDER.index)
        x = np.arange(len(mine))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [r["qps"].get(m, np.nan) for r in mine]
            bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, color=COLORS[m], label=m)
            ax.bar_label(bars, labels=[f"r={r['agreement'][m]['recall_ties']:.2f}" if m in APPROXIMATE else ""
                                       for r in mine], fontsize=6)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"N={r['n']:,}\n{r['bits']} bits" for r in mine], fontsize=8)
        ax.set_ylabel("queries/s, one query at a time")
        ax.set_title(f"{kind} codes (r = tie-aware recall@k of the approximate ones)", fontsize=9)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small run: N=100,000, 64 bits, both kinds of codes, 0.3 s per measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000],
                    help="database sizes (100000000 is skipped when it would not fit in the available memory)")
    ap.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--codes", nargs="+", choices=["random", "learned"], default=["random", "learned"])
    ap.add_argument("--flip", type=float, default=0.025,
                    help="learned codes: probability that each bit of a replicated copy is flipped")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per method and setting")
    ap.add_argument("--no-mih", action="store_true", help="skip multi-index hashing")
    ap.add_argument("--mih-bits", type=int, nargs="+", default=[64, 128],
                    help="code lengths at which multi-index hashing and faiss's hash indexes are timed too "
                         "(at 128 bits MIH wins on learned codes only: on random ones the k-th distance is "
                         "too large a share of the bits)")
    ap.add_argument("--no-hash", action="store_true", help="skip faiss IndexBinaryHash and IndexBinaryMultiHash")
    ap.add_argument("--hash-recall", type=float, default=0.95,
                    help="tie-aware recall@k that faiss's hash indexes are tuned to reach (on separate queries)")
    ap.add_argument("--hash-cap", type=float, default=2.0,
                    help="tuning stops growing nflip once a query costs more than this many IndexBinaryFlat queries")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both numba and faiss (default: all cores)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="rank by this thread's CPU time instead of wall clock (needs --threads 1; "
                         "for a machine shared with other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the .md and PNGs go beside it)")
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
    learned = {bits: learned_codes.load(bits, args.seed) for bits in args.bits} if "learned" in args.codes else {}
    results, skipped = [], []
    print(f"{'codes':>7} {'N':>11} {'bits':>4} {'batch':>5} {'method':>15} {'q/s':>10} {'×flat':>8} {'×scan':>7} "
          f"{'recall':>6} {'memory MB':>9}")
    for kind in args.codes:
        for n in args.sizes:
            for bits in args.bits:
                use_mih = MultiIndexHashing is not None and not args.no_mih and bits in args.mih_bits
                use_hash = not args.no_hash and bits in args.mih_bits
                exact, hashes = estimated_bytes(n, bits, use_mih)
                have = available_bytes()
                if exact > have:
                    skipped.append(f"{kind} N={n:,} {bits} bits skipped: it needs ~{exact / 2**30:.1f} GiB "
                                   f"(codes, scan, faiss-flat{', mih' if use_mih else ''}), "
                                   f"{have / 2**30:.1f} GiB available")
                    print("# " + skipped[-1], flush=True)
                    continue
                if use_hash and exact + hashes > have:
                    skipped.append(f"{kind} N={n:,} {bits} bits: faiss hash indexes skipped, they would need "
                                   f"~{hashes / 2**30:.1f} GiB more than the ~{exact / 2**30:.1f} GiB of the rest, "
                                   f"{have / 2**30:.1f} GiB available")
                    print("# " + skipped[-1], flush=True)
                    use_hash = False
                results += run_setting(kind, n, bits, args, learned.get(bits), qps_key, use_mih, use_hash)

    info["numba_threading_layer"] = numba.threading_layer()
    info["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python bench/search_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": info, "k": args.k, "min_time_s": args.min_time, "flip": args.flip,
               "hash_recall": args.hash_recall, "hash_cap": args.hash_cap,
               "queries": f"random: {max(1000, max(args.batches))} random codes timed, {TUNING_QUERIES} others tune "
                          f"faiss's hash indexes; learned: the 1,000 protocol queries, {TUNING_QUERIES} of them "
                          "(seeded) tune, the rest are timed",
               "learned_codes": {bits: d["info"] for bits, d in learned.items()},
               "results": results, "skipped": skipped,
               "note": "interleaved rounds; queries/s = queries answered / seconds spent; "
                       "speedup_vs_faiss = queries/s over faiss IndexBinaryFlat's"}
    args.out.write_text(json.dumps(payload, indent=1))
    md = args.out.with_suffix(".md")
    md.write_text(markdown(payload))
    png = args.out.with_suffix(".png")
    plot(results, png, target=SCAN_TARGET, threads=info["numba_threads"], ranked_by=qps_key)
    written = [args.out, md, png]
    methods_png = args.out.with_name(args.out.stem + "_methods.png")
    if plot_methods(results, methods_png):
        written.append(methods_png)
    print(md.read_text().split("## Every method")[0])
    print("# wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
