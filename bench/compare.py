"""Every hashing method on the Fashion-MNIST retrieval protocol (shared/protocol.md): retrieval
quality, training time, encoding time and peak memory, as the LAGNH paper's Tables 3 and 4 compare them.

Backbone features of all 70,000 images are computed once with Dask into the feature cache. Each
method trains in head mode on the protocol's 5,000 training images (labels only for supervised
methods), then encodes the 69,000-image database and the 1,000 queries from the cached features.
At ``--e2e-bits`` (32, as Table 4) each method's encoder also encodes the database end to end from
images through the Dask pipeline into a Zarr index (a fresh 2-worker LocalCluster per method, so
its workers' peak memory is that method's). Nothing is tuned on the queries; every method sees the
same features, split and seed.

    python bench/compare.py                       # the full run: 7 methods × 16/32/64/128 bits
    python bench/compare.py --quick               # 32 bits, 2 epochs, end to end on 4,096 images: < 5 min
    python bench/compare.py --methods lsh itq --bits 32 --no-e2e
    python bench/compare.py --methods lagnh --bits 32 --params '{"fusion": 0}' --label eta=0 --no-e2e
    python bench/compare.py --methods uhga dpfah nrdh ucsh --bits 32 --mode finetune
    python bench/compare.py --methods uhga --bits 32 --no-e2e --seed 1   # rows labelled 'seed 1'

Epochs: each method's profile runs its own schedule; a ``paper`` profile runs the paper's in full at
``--full-bits`` (32), and at the other lengths ``BENCH_EPOCHS`` caps the slow ones so that the full run
fits in about an hour on 2 cores, and those rows say ``capped``. The default profiles (``--profile``
unset) are never capped. Finetune mode (the backbone trains end to end on the 5,000 images, 64 px)
runs ``FINETUNE_EPOCHS``, a CPU budget, not the papers' schedules; its database and queries are
encoded from their images (the finetuned network), the database through the Dask pipeline. So are
those of a head-mode encoder whose profile trains a student (UHGA's default: the student's tuned
blocks compute its features), whatever ``--no-e2e`` says.

Each run merges its rows into ``results/compare_{px}px.json`` (a row with the same method, bits,
profile, mode and label is replaced), so one row can be re-measured alone; every row records the
commit that measured it, and the markdown table and plots are rewritten from all rows.
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
from hashindex.build import MODES, FeatureSet, method_backbone  # noqa: E402
from hashindex.methods import METHODS  # noqa: E402
from hashindex.methods.deep import DeepHashMethod  # noqa: E402
from hashindex.pipeline import dask_client  # noqa: E402
from hashindex.plots import plot_grouped_bars, plot_lines, plot_pr_curves, plot_precision_at_n  # noqa: E402

ORDER = ["lsh", "itq", "uhga", "dpfah", "nrdh", "lagnh", "ucsh"]
# Epoch caps of the full run (None: the profile's own). UHGA's attention step costs ~11 s an epoch at
# 32 bits and grows with the bits; LAGNH's paper runs 300 epochs; UCSH's paper batch of 24 is slow.
BENCH_EPOCHS = {"uhga": 5, "lagnh": 60, "ucsh": 15}
# Finetune mode's CPU budget: epochs over the 5,000 training images with the backbone training.
FINETUNE_EPOCHS = 3
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


def method_params(method: str, bits: int, args) -> tuple[dict, bool]:
    """The parameters of one row, and whether its epochs are capped below the profile's schedule."""
    if not issubclass(METHODS[method], DeepHashMethod):  # the baselines take --params too (feature_blocks)
        return (json.loads(args.params) if args.params else {}), False
    params = {"profile": args.profile} if args.profile else {}
    params.update(json.loads(args.params) if args.params else {})
    capped = False
    if args.epochs or args.quick:
        params["epochs"] = args.epochs or QUICK_EPOCHS
    elif args.mode == "finetune":
        params["epochs"] = FINETUNE_EPOCHS
    elif bits not in args.full_bits and method in BENCH_EPOCHS and METHODS[method](bits, **params).profile == "paper":
        schedule = METHODS[method](bits, **params).epochs
        params["epochs"] = min(BENCH_EPOCHS[method], schedule)
        capped = params["epochs"] < schedule
    if method == "nrdh" and args.quick:
        params["node_epochs"] = params["epochs"]
    return params, capped


def end_to_end(source, encoder, workers: int) -> tuple[dict, np.ndarray]:
    """Encode ``source`` from its images through Dask into a Zarr index: (time, rate, worker memory), codes."""
    folder = tempfile.mkdtemp(prefix="hashindex-bench-")
    try:
        with dask_client(n_workers=workers) as client:
            started = time.perf_counter()
            index = hashindex.encode(source, encoder, os.path.join(folder, "db.index"), client=client)
            seconds = time.perf_counter() - started
            peaks = client.run(_worker_peak_mb)
        return {"images": len(source), "workers": workers, "seconds": round(seconds, 2),
                "images_per_second": round(len(source) / seconds, 1),
                "worker_peak_rss_mb": round(max(peaks.values()), 1)}, np.asarray(index.codes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(source, split: tuple, cache, spec, method: str, bits: int, params: dict, *, mode: str = "head",
            seed: int = 0, workers: int = 2, e2e_rows=None) -> dict:
    """Train one method on the protocol's training images and score its codes: one row of results.

    ``split`` is the protocol's (queries, training, database) rows and ``cache`` the method's features
    of every image. A head on frozen features encodes from those features (and ``e2e_rows`` of the
    database also from images through Dask, when given); an encoder with a tuned backbone (finetune
    mode, or a student) encodes from images, the database through Dask."""
    queries, train, database = split
    labels = source.labels
    features = cache.features
    method_spec = method_backbone(method, spec, params)
    train_set = FeatureSet(features[train], cache.valid[train], source.ids[train], labels[train],
                           cache.location, 0.0, method_spec)
    with PeakRSS() as memory:
        encoder = hashindex.train_encoder(source.subset(train), method, bits, backbone=spec,
                                          features=train_set, params=params, mode=mode, seed=seed)
    e2e = None
    if encoder.finetuned:  # finetune mode, or a student (the default of some methods)
        # the finetuned network's codes exist only from images: the database through Dask
        e2e, db_codes = end_to_end(source.subset(database), encoder, workers)
        encode_seconds = None
        q_codes = encoder.encode_pixels(source.read(queries).pixels)
    else:
        started = time.perf_counter()
        db_codes = encoder.encode_features(features[database])
        encode_seconds = round(time.perf_counter() - started, 3)
        q_codes = encoder.encode_features(features[queries])
        if e2e_rows is not None:
            e2e, codes = end_to_end(source.subset(e2e_rows), encoder, workers)
            e2e["codes_identical_to_from_features"] = round(float(
                (codes == db_codes[np.searchsorted(database, e2e_rows)]).all(axis=1).mean()), 4)
    scores = hashindex.metrics.evaluate(q_codes, db_codes, labels[queries], labels[database], topks=(None, 1000))
    used = encoder.training["params"]
    row = {"method": method, "bits": bits, "profile": used.get("profile"), "mode": mode, "seed": seed,
           "epochs": used.get("epochs"), "map@all": scores["map@all"], "map@1000": scores["map@1000"],
           "precision@r2": scores["precision@r2"], "train_seconds": encoder.training["fit_seconds"],
           "train_peak_rss_added_mb": memory.added, "encode_seconds_69k_from_features": encode_seconds,
           "precision@n": scores["precision@n"], "pr": {k: np.asarray(v).tolist() for k, v in scores["pr"].items()},
           "params": used, "backbone": method_spec.to_dict()}
    if e2e:
        row["end_to_end"] = e2e
    return row


def row_summary(r: dict) -> str:
    """One printed line per row: its scores and times."""
    encode, e2e = r["encode_seconds_69k_from_features"], r.get("end_to_end")
    return (f"{row_name(r):>20} {r['bits']:>3} bits  mAP@all {r['map@all']:.4f}  mAP@1000 {r['map@1000']:.4f}  "
            f"P@r2 {r['precision@r2']:.4f}  train {r['train_seconds']:.1f} s (+{r['train_peak_rss_added_mb']:.0f} MB)"
            + (f"  encode {encode:.2f} s" if encode is not None else "")
            + (f"  end to end {e2e['seconds']:.0f} s" if e2e else ""))


def row_key(r: dict) -> tuple:
    return (r["method"], r["bits"], r.get("profile"), r.get("mode", "head"), r.get("label", ""))


def row_name(r: dict) -> str:
    """The method with what sets its row apart: ``uhga (finetune)``, ``lagnh (eta=0)``."""
    extra = [x for x in (r.get("mode") if r.get("mode", "head") != "head" else "", r.get("label", "")) if x]
    return r["method"] + (f" ({', '.join(extra)})" if extra else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--profile", help="profile of the deep methods (default: each method's own default, "
                                          "'frozen' for the unsupervised four, 'head-cpu' for DPFAH)")
    parser.add_argument("--mode", choices=MODES, default="head",
                        help=f"head (default) or finetune (the backbone trains too; {FINETUNE_EPOCHS} epochs)")
    parser.add_argument("--params", help="JSON of parameters of the methods, e.g. '{\"fusion\": 0}' (LAGNH) or "
                                          "'{\"feature_blocks\": [10, 12, 14]}' (any method)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of every method (default 0; another seed adds 'seed N' to the rows' "
                             "label, so seeds never replace each other's rows), to see how much a figure moves "
                             "from seed to seed")
    parser.add_argument("--label", default="", help="names the variant in the results (with --params)")
    parser.add_argument("--epochs", type=int, help="epochs of every deep method (default: the profiles' own)")
    parser.add_argument("--full-bits", type=int, nargs="+", default=[32],
                        help="lengths at which the profiles' full schedules run (default: 32; else BENCH_EPOCHS caps)")
    parser.add_argument("--e2e-bits", type=int, default=32, help="bits at which to encode end to end (default: 32)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end encoding (head mode)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for the end-to-end encoding")
    parser.add_argument("--quick", action="store_true",
                        help=f"32 bits, {QUICK_EPOCHS} epochs, end to end on {QUICK_E2E_IMAGES:,} database images")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.bits = [32]
    if args.params and not args.label:
        parser.error("--params needs a --label naming the variant")
    if args.seed:  # rows of different seeds must not replace each other
        args.label = ", ".join(filter(None, [args.label, f"seed {args.seed}"]))
    methods = args.methods or sorted(METHODS, key=lambda m: (ORDER + [m]).index(m))
    if args.mode == "finetune":
        methods = [m for m in methods if METHODS[m].can_finetune]
    wall = time.perf_counter()

    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    caches: dict = {}

    def features_of(method_spec):
        if method_spec not in caches:
            cache = hashindex.cached_features(source, method_spec)
            print(f"features {cache.features.shape} of {method_spec} "
                  f"({'computed in %.0f s' % cache.seconds if cache.seconds else 'cached'})", flush=True)
            caches[method_spec] = cache
        return caches[method_spec]

    print(f"{len(queries)} queries, {len(train)} training, {len(database)} database images", flush=True)
    e2e_rows = database[:QUICK_E2E_IMAGES] if args.quick else database
    machine = machine_info()
    commit, cpu = machine["git_commit"], machine["cpu"]

    results, stem = [], None
    for bits in args.bits:
        for method in methods:
            params, capped = method_params(method, bits, args)
            cache = features_of(method_backbone(method, spec, params))
            row = measure(source, (queries, train, database), cache, spec, method, bits, params, mode=args.mode,
                          seed=args.seed, workers=args.workers,
                          e2e_rows=e2e_rows if bits == args.e2e_bits and not args.no_e2e else None)
            row.update({"label": args.label, "capped": capped, "commit": commit, "cpu": cpu})
            results.append(row)
            stem = write_results(results, args, argv, wall, spec)  # after every row: an interrupted run keeps its rows
            print(row_summary(row), flush=True)

    print(markdown_table(results) + f"\nwritten: {stem}.json, .md and PNG plots "
          f"({(time.perf_counter() - wall) / 60:.1f} min)")
    return 0


def write_results(results: list[dict], args, argv, wall: float, spec) -> str:
    """Merge ``results`` into the results file, rewrite its markdown and plots; returns the file stem."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compare_{args.image_size}px" + ("_quick" if args.quick else ""))
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"commands": [], "results": []}
    if os.path.exists(stem + ".json") and not args.quick:
        with open(stem + ".json") as f:
            record = json.load(f)
        record.setdefault("commands", [record.pop("command")] if "command" in record else [])
        for r in record["results"]:  # rows of a file written before rows carried these
            r.setdefault("commit", record.get("machine", {}).get("git_commit"))
            r.setdefault("capped", r["epochs"] == record.get("epoch_caps", {}).get(r["method"], -1))
    new_keys = {row_key(r) for r in results}
    kept = [r for r in record["results"] if row_key(r) not in new_keys]
    order = {m: i for i, m in enumerate(ORDER)}
    merged = sorted(kept + results, key=lambda r: (r.get("mode", "head") != "head", r["bits"],
                                                   order.get(r["method"], 99), r.get("label", "")))
    if record["commands"][-1:] != [command]:  # written after every row: the command once
        record["commands"].append(command)
    record.update({
                   "protocol": "fashion-mnist, seed 0: 1000 queries (test split), 5000 training (train split), "
                               "69000 database", "backbone": spec.to_dict(), "image_size": args.image_size,
                   "epoch_caps": BENCH_EPOCHS, "finetune_epochs": FINETUNE_EPOCHS, "machine": machine_info(),
                   "wall_seconds_last_run": round(time.perf_counter() - wall, 1), "results": merged})
    record.pop("mode", None)
    record.pop("wall_seconds", None)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    table = markdown_table(merged)
    with open(stem + ".md", "w") as f:
        f.write(f"python bench/compare.py runs, {record['machine']['cores']} cores, {args.image_size} px (commands "
                f"in the JSON; each row's CPU and commit in the last columns: times compare within one CPU). "
                f"'capped': epochs cut below the profile's schedule (BENCH_EPOCHS); finetune rows: "
                f"{FINETUNE_EPOCHS} epochs with the backbone training, codes encoded from images.\n\n" + table)
    plots(merged, stem, args)
    return stem


def markdown_table(results: list[dict]) -> str:
    lines = ["| method | profile | epochs | bits | mAP@all | mAP@1000 | P@r≤2 | train s | train MB | "
             "encode 69k s (features) | encode s (images, Dask) | img/s | worker MB | CPU | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e2e = r.get("end_to_end")
        e2e_cells = (f"{e2e['seconds']:.0f} ({e2e['images']:,} img) | {e2e['images_per_second']:.0f} | "
                     f"{e2e['worker_peak_rss_mb']:.0f}" if e2e else "– | – | –")
        epochs = "–" if not r["epochs"] else f"{r['epochs']}" + (" (capped)" if r.get("capped") else "")
        encode = r["encode_seconds_69k_from_features"]
        lines.append(f"| {row_name(r)} | {r['profile']} | {epochs} | {r['bits']} | {r['map@all']:.4f} | "
                     f"{r['map@1000']:.4f} | {r['precision@r2']:.4f} | {r['train_seconds']:.1f} | "
                     f"{r['train_peak_rss_added_mb']:.0f} | {'–' if encode is None else f'{encode:.2f}'} | {e2e_cells} | "
                     f"{_short_cpu(r.get('cpu'))} | {_short_commit(r.get('commit'))} |")
    return "\n".join(lines) + "\n"


def _short_cpu(cpu: str | None) -> str:
    """``AMD EPYC``, ``Intel Xeon``: the maker and family of a /proc/cpuinfo model name."""
    if not cpu:
        return "?"
    words = [w for w in cpu.replace("(R)", "").replace("(TM)", "").split() if w not in ("Processor", "CPU")]
    return " ".join(words[:2])


def _short_commit(commit: str | None) -> str:
    """``3bec8f1``, or ``3bec8f1+`` for a tree with uncommitted changes."""
    return "?" if not commit else commit[:7] + ("+" if commit.endswith("+uncommitted") else "")


def plots(results: list[dict], stem: str, args) -> None:
    size = f"{args.image_size} px"
    for bits in sorted({r["bits"] for r in results}):
        # rows of other training seeds repeat a variant: the table holds them, the curves would only crowd
        at = [r for r in results if r["bits"] == bits and not r.get("seed")]
        plot_pr_curves({row_name(r): r["pr"] for r in at}, f"{stem}_pr_{bits}bits.png",
                       title=f"PR over Hamming radius, {bits} bits, {size}")
        plot_precision_at_n({row_name(r): r["precision@n"] for r in at}, f"{stem}_pn_{bits}bits.png",
                            title=f"precision@N, {bits} bits, {size}")
    by_name: dict[str, dict] = {}
    for r in results:
        by_name.setdefault(row_name(r), {})[r["bits"]] = r
    plot_lines({m: {b: r["map@all"] for b, r in rows.items()} for m, rows in by_name.items() if len(rows) > 1},
               f"{stem}_map.png", title=f"mAP@all against code length, Fashion-MNIST, {size}", xlabel="bits",
               ylabel="mAP@all")
    plot_grouped_bars({m: {f"{b} bits": r["train_seconds"] for b, r in rows.items()} for m, rows in by_name.items()},
                      f"{stem}_train_time.png", title="training time, 5,000 images", ylabel="seconds", logy=True)
    times = {}
    for m, rows in by_name.items():
        for r in rows.values():
            if r["encode_seconds_69k_from_features"] is not None:
                times.setdefault(m, {})[f"{r['bits']} bits, from features"] = r["encode_seconds_69k_from_features"]
            if r.get("end_to_end"):
                e2e = r["end_to_end"]
                # scaled to the 69,000 images so both bars are comparable in a quick run too
                times.setdefault(m, {})[f"{r['bits']} bits, from images (Dask)"] = e2e["seconds"] * 69_000 / e2e["images"]
    plot_grouped_bars(times, f"{stem}_encode_time.png", title="encoding time of the 69,000-image database",
                      ylabel="seconds", logy=True)


if __name__ == "__main__":
    sys.exit(main())
