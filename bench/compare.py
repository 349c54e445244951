"""Every hashing method on the Fashion-MNIST retrieval protocol (shared/protocol.md): retrieval
quality, training time and encoding time, as the LAGNH paper's Tables 3 and 4 compare them.

Backbone features of all 70,000 images are computed once with Dask into the feature cache; each
method trains on the protocol's 5,000 training images (labels only for supervised methods) and
encodes the 69,000-image database and the 1,000 queries from the cached features. Nothing is tuned
on the queries; every method sees the same features, split and seed.

    python bench/compare.py                      # every registered method, 16/32/64/128 bits
    python bench/compare.py --methods lsh itq --bits 32
    python bench/compare.py --quick              # 32 bits, 3 epochs for deep methods: a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

import hashindex  # noqa: E402
from hashindex.backbones import BackboneSpec  # noqa: E402
from hashindex.build import FeatureSet  # noqa: E402
from hashindex.methods import METHODS  # noqa: E402
from hashindex.methods.deep import DeepHashMethod  # noqa: E402
from hashindex.plots import plot_bars, plot_pr_curves, plot_precision_at_n  # noqa: E402

ORDER = ["lsh", "itq", "uhga", "dpfah", "nrdh", "lagnh", "ucsh"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--profile", help="profile of the deep methods (default: each method's own default)")
    parser.add_argument("--epochs", type=int, help="override the deep methods' epochs")
    parser.add_argument("--quick", action="store_true", help="32 bits and 3 epochs: a smoke run of a few minutes")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.bits, args.epochs = [32], args.epochs or 3
    methods = args.methods or sorted(METHODS, key=lambda m: (ORDER + [m]).index(m))

    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    cache = hashindex.cached_features(source, spec)
    features, labels = cache.features, source.labels
    print(f"features {features.shape} float16 ({'computed in %.0f s' % cache.seconds if cache.seconds else 'cached'})"
          f"; {len(queries)} queries, {len(train)} training, {len(database)} database images")
    train_set = FeatureSet(features[train], cache.valid[train], source.ids[train], labels[train], cache.location, 0.0)

    results = []
    for bits in args.bits:
        for method in methods:
            params = {}
            if issubclass(METHODS[method], DeepHashMethod):
                params = {k: v for k, v in (("profile", args.profile), ("epochs", args.epochs)) if v is not None}
            encoder = hashindex.train_encoder(source.subset(train), method, bits, backbone=spec, features=train_set,
                                              params=params)
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
                   "encode_seconds_69k_from_features": round(encode_seconds, 3),
                   "precision@n": scores["precision@n"],
                   "pr": {k: np.asarray(v).tolist() for k, v in scores["pr"].items()}, "params": used}
            results.append(row)
            print(f"{method:>6} {bits:>3} bits  mAP@all {row['map@all']:.4f}  mAP@1000 {row['map@1000']:.4f}  "
                  f"P@r2 {row['precision@r2']:.4f}  train {row['train_seconds']:.1f} s  "
                  f"encode {encode_seconds:.2f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"compare_{args.image_size}px" + ("_quick" if args.quick else ""))
    record = {"command": "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "protocol": "fashion-mnist, seed 0: 1000 queries (test split), 5000 training (train split), "
                          "69000 database", "backbone": spec.to_dict(), "machine": machine_info(),
              "results": results}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    table = ["| method | profile | epochs | bits | mAP@all | mAP@1000 | P@r≤2 | train s | encode 69k s |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['method']} | {r['profile']} | {r['epochs'] or '–'} | {r['bits']} | {r['map@all']:.4f} | "
              f"{r['map@1000']:.4f} | {r['precision@r2']:.4f} | {r['train_seconds']:.1f} | "
              f"{r['encode_seconds_69k_from_features']:.2f} |" for r in results]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(table) + "\n")
    for bits in args.bits:
        at = [r for r in results if r["bits"] == bits]
        plot_pr_curves({r["method"]: r["pr"] for r in at}, f"{stem}_pr_{bits}bits.png",
                       title=f"PR over Hamming radius, {bits} bits, {args.image_size} px")
        plot_precision_at_n({r["method"]: r["precision@n"] for r in at}, f"{stem}_pn_{bits}bits.png",
                            title=f"precision@N, {bits} bits, {args.image_size} px")
    plot_bars({f"{r['method']} {r['bits']}": r["map@all"] for r in results}, f"{stem}_map.png",
              title=f"mAP@all, Fashion-MNIST, {args.image_size} px", ylabel="mAP@all")
    plot_bars({f"{r['method']} {r['bits']}": r["train_seconds"] for r in results}, f"{stem}_train_time.png",
              title="training time (5,000 images, cached features)", ylabel="seconds")
    print("\n".join(table) + f"\nwritten: {stem}.json, .md and PNG plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
