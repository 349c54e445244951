"""Every hashing method on the Fashion-MNIST retrieval protocol (shared/protocol.md): retrieval
quality, training time, encoding time and peak memory, as the LAGNH paper's Tables 3 and 4 compare them.

Backbone features of all 70,000 images are computed once with Dask into the feature cache. Each
method trains in head mode on the protocol's 5,000 training images (labels only for supervised
methods), then encodes the 69,000-image database and the 1,000 queries from the cached features.
At ``--e2e-bits`` (32, as Table 4) each method's encoder also encodes the database end to end from
images through the Dask pipeline into a Zarr index (a fresh 2-worker LocalCluster per method, so
its workers' peak memory is that method's). Nothing is tuned on the queries; every method sees the
same features, split and seed.

    python bench/compare.py                       # the full run: 7 methods × 16/32/64/128 bits, ≈ 50 min here
    python bench/compare.py --quick               # 32 bits, 2 epochs, end to end on 4,096 images: < 5 min
    python bench/compare.py --methods lsh itq --bits 32 --no-e2e

Epochs: each method's paper profile, capped by ``BENCH_EPOCHS`` so that the full run fits in an hour
on 2 cores (the caps are recorded with every result).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

import hashindex  # noqa: E402
from hashindex.backbones import BackboneSpec  # noqa: E402
from hashindex.build import FeatureSet  # noqa: E402
from hashindex.methods import METHODS  # noqa: E402
from hashindex.methods.deep import DeepHashMethod  # noqa: E402
from hashindex.pipeline import dask_client  # noqa: E402
from hashindex.plots import plot_grouped_bars, plot_lines, plot_pr_curves, plot_precision_at_n  # noqa: E402

ORDER = ["lsh", "itq", "uhga", "dpfah", "nrdh", "lagnh", "ucsh"]
# Epoch caps of the full run (None: the profile's own). UHGA's attention step costs ~11 s an epoch at
# 32 bits and grows with the bits; LAGNH's paper runs 300 epochs; UCSH's paper batch of 24 is slow.
BENCH_EPOCHS = {"uhga": 5, "lagnh": 60, "ucsh": 15}
QUICK_EPOCHS = 2
QUICK_E2E_IMAGES = 4096


class PeakRSS:
    """Peak resident memory this process adds while the block runs, sampled every 10 ms (MB)."""

    def __enter__(self):
        # hand memory freed by earlier runs back to the OS first: otherwise a run reuses what glibc
        # kept from the previous method and shows +0 MB (as the 4d07bde and e4ad74d tables did)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def added(self) -> float:
        return round(self.peak - self.start, 1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker_peak_mb() -> float:
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def method_params(method: str, args) -> dict:
    if not issubclass(METHODS[method], DeepHashMethod):
        return {}
    params = {"profile": args.profile} if args.profile else {}
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else BENCH_EPOCHS.get(method))
    if epochs:
        params["epochs"] = epochs
        if method == "nrdh" and args.quick:
            params["node_epochs"] = epochs
    return params


def end_to_end(source, encoder, from_features: np.ndarray, workers: int) -> dict:
    """Encode ``source`` from its images through Dask into a Zarr index; time, rate, worker memory."""
    folder = tempfile.mkdtemp(prefix="hashindex-bench-")
    try:
        with dask_client(n_workers=workers) as client:
            started = time.perf_counter()
            index = hashindex.encode(source, encoder, os.path.join(folder, "db.index"), client=client)
            seconds = time.perf_counter() - started
            peaks = client.run(_worker_peak_mb)
        same = float((index.codes == from_features).all(axis=1).mean())
        return {"images": len(source), "workers": workers, "seconds": round(seconds, 2),
                "images_per_second": round(len(source) / seconds, 1),
                "worker_peak_rss_mb": round(max(peaks.values()), 1),
                "codes_identical_to_from_features": round(same, 4)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--profile", help="profile of the deep methods (default: each method's own default, the paper's)")
    parser.add_argument("--epochs", type=int, help="epochs of every deep method (default: BENCH_EPOCHS caps)")
    parser.add_argument("--e2e-bits", type=int, default=32, help="bits at which to encode end to end (default: 32)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end encoding")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for the end-to-end encoding")
    parser.add_argument("--quick", action="store_true",
                        help=f"32 bits, {QUICK_EPOCHS} epochs, end to end on {QUICK_E2E_IMAGES:,} database images")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.bits = [32]
    methods = args.methods or sorted(METHODS, key=lambda m: (ORDER + [m]).index(m))
    wall = time.perf_counter()

    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    cache = hashindex.cached_features(source, spec)
    features, labels = cache.features, source.labels
    print(f"features {features.shape} float16 ({'computed in %.0f s' % cache.seconds if cache.seconds else 'cached'})"
          f"; {len(queries)} queries, {len(train)} training, {len(database)} database images", flush=True)
    train_set = FeatureSet(features[train], cache.valid[train], source.ids[train], labels[train], cache.location, 0.0)
    e2e_rows = database[:QUICK_E2E_IMAGES] if args.quick else database

    results = []
    for bits in args.bits:
        for method in methods:
            params = method_params(method, args)
            with PeakRSS() as memory:
                encoder = hashindex.train_encoder(source.subset(train), method, bits, backbone=spec,
                                                  features=train_set, params=params)
            started = time.perf_counter()
            db_codes = encoder.encode_features(features[database])
            encode_seconds = time.perf_counter() - started
            q_codes = encoder.encode_features(features[queries])
            scores = hashindex.metrics.evaluate(q_codes, db_codes, labels[queries], labels[database],
                                                topks=(None, 1000))
            used = encoder.training["params"]
            row = {"method": method, "bits": bits, "profile": used.get("profile"), "epochs": used.get("epochs"),
                   "map@all": scores["map@all"], "map@1000": scores["map@1000"],
                   "precision@r2": scores["precision@r2"], "train_seconds": encoder.training["fit_seconds"],
                   "train_peak_rss_added_mb": memory.added,
                   "encode_seconds_69k_from_features": round(encode_seconds, 3),
                   "precision@n": scores["precision@n"],
                   "pr": {k: np.asarray(v).tolist() for k, v in scores["pr"].items()}, "params": used}
            if bits == args.e2e_bits and not args.no_e2e:
                position = np.searchsorted(database, e2e_rows)
                row["end_to_end"] = end_to_end(source.subset(e2e_rows), encoder, db_codes[position], args.workers)
            results.append(row)
            e2e = row.get("end_to_end")
            print(f"{method:>6} {bits:>3} bits  mAP@all {row['map@all']:.4f}  mAP@1000 {row['map@1000']:.4f}  "
                  f"P@r2 {row['precision@r2']:.4f}  train {row['train_seconds']:.1f} s (+{memory.added:.0f} MB)  "
                  f"encode {encode_seconds:.2f} s" + (f"  end to end {e2e['seconds']:.0f} s" if e2e else ""),
                  flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compare_{args.image_size}px" + ("_quick" if args.quick else ""))
    record = {"command": "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "protocol": "fashion-mnist, seed 0: 1000 queries (test split), 5000 training (train split), "
                          "69000 database", "mode": "head", "backbone": spec.to_dict(), "image_size": args.image_size,
              "epoch_caps": {} if args.quick or args.epochs else BENCH_EPOCHS, "machine": machine_info(),
              "wall_seconds": round(time.perf_counter() - wall, 1), "results": results}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    table = markdown_table(results)
    with open(stem + ".md", "w") as f:
        f.write(f"{record['command']} — {record['machine']['cpu']}, {record['machine']['cores']} cores, "
                f"{args.image_size} px, commit {record['machine']['git_commit'][:12]}\n\n" + table)
    plots(results, stem, args)
    print(table + f"\nwritten: {stem}.json, .md and PNG plots ({record['wall_seconds'] / 60:.1f} min)")
    return 0


def markdown_table(results: list[dict]) -> str:
    lines = ["| method | profile | epochs | bits | mAP@all | mAP@1000 | P@r≤2 | train s | train MB | "
             "encode 69k s (features) | encode s (images, Dask) | img/s | worker MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e2e = r.get("end_to_end")
        e2e_cells = (f"{e2e['seconds']:.0f} ({e2e['images']:,} img) | {e2e['images_per_second']:.0f} | "
                     f"{e2e['worker_peak_rss_mb']:.0f}" if e2e else "– | – | –")
        lines.append(f"| {r['method']} | {r['profile']} | {r['epochs'] or '–'} | {r['bits']} | {r['map@all']:.4f} | "
                     f"{r['map@1000']:.4f} | {r['precision@r2']:.4f} | {r['train_seconds']:.1f} | "
                     f"{r['train_peak_rss_added_mb']:.0f} | {r['encode_seconds_69k_from_features']:.2f} | {e2e_cells} |")
    return "\n".join(lines) + "\n"


def plots(results: list[dict], stem: str, args) -> None:
    size = f"{args.image_size} px"
    for bits in sorted({r["bits"] for r in results}):
        at = [r for r in results if r["bits"] == bits]
        plot_pr_curves({r["method"]: r["pr"] for r in at}, f"{stem}_pr_{bits}bits.png",
                       title=f"PR over Hamming radius, {bits} bits, {size}")
        plot_precision_at_n({r["method"]: r["precision@n"] for r in at}, f"{stem}_pn_{bits}bits.png",
                            title=f"precision@N, {bits} bits, {size}")
    by_method: dict[str, dict] = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["bits"]] = r
    plot_lines({m: {b: r["map@all"] for b, r in rows.items()} for m, rows in by_method.items()}, f"{stem}_map.png",
               title=f"mAP@all against code length, Fashion-MNIST, {size}", xlabel="bits", ylabel="mAP@all")
    plot_grouped_bars({m: {f"{b} bits": r["train_seconds"] for b, r in rows.items()} for m, rows in by_method.items()},
                      f"{stem}_train_time.png", title="training time, 5,000 images (head mode)", ylabel="seconds",
                      logy=True)
    times = {}
    for m, rows in by_method.items():
        for r in rows.values():
            times.setdefault(m, {})[f"{r['bits']} bits, from features"] = r["encode_seconds_69k_from_features"]
            if r.get("end_to_end"):
                e2e = r["end_to_end"]
                # scaled to the 69,000 images so both bars are comparable in a quick run too
                times[m][f"{r['bits']} bits, from images (Dask)"] = e2e["seconds"] * 69_000 / e2e["images"]
    plot_grouped_bars(times, f"{stem}_encode_time.png", title="encoding time of the 69,000-image database",
                      ylabel="seconds", logy=True)


if __name__ == "__main__":
    sys.exit(main())
