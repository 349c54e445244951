"""LSH and ITQ on the Fashion-MNIST retrieval protocol (shared/protocol.md), at 16–128 bits.

Backbone features of all 70,000 images are computed once with Dask into the feature cache; each
method is trained on the protocol's 5,000 training images and encodes the 69,000-image database
and 1,000 queries from the cached features.

    python bench/baselines.py [--image-size 64] [--bits 16 32 64 128] [--out bench/results]
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
from hashindex.plots import plot_bars, plot_pr_curves, plot_precision_at_n  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=["lsh", "itq"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    started = time.perf_counter()
    cache = hashindex.cached_features(source, spec)
    feature_seconds = time.perf_counter() - started
    features = cache.features
    labels = source.labels
    print(f"features: {features.shape} float16 from {cache.location} "
          f"({'computed in %.0f s' % cache.seconds if cache.seconds else 'cached'})")

    train_set = hashindex.build.FeatureSet(features[train], cache.valid[train], source.ids[train], labels[train],
                                           cache.location, 0.0)
    results = []
    for bits in args.bits:
        for method in args.methods:
            encoder = hashindex.train_encoder(source.subset(train), method, bits, backbone=spec, features=train_set)
            t0 = time.perf_counter()
            db_codes = encoder.encode_features(features[database])
            q_codes = encoder.encode_features(features[queries])
            encode_seconds = time.perf_counter() - t0
            scores = hashindex.metrics.evaluate(q_codes, db_codes, labels[queries], labels[database],
                                                topks=(None, 1000))
            row = {"method": method, "bits": bits, "map@all": scores["map@all"], "map@1000": scores["map@1000"],
                   "precision@r2": scores["precision@r2"], "train_seconds": encoder.training["fit_seconds"],
                   "encode_seconds_from_features": round(encode_seconds, 3),
                   "precision@n": scores["precision@n"],
                   "pr": {k: np.asarray(v).tolist() for k, v in scores["pr"].items()}}
            results.append(row)
            print(f"{method:>4} {bits:>3} bits  mAP@all {row['map@all']:.4f}  mAP@1000 {row['map@1000']:.4f}  "
                  f"P@r2 {row['precision@r2']:.4f}  train {row['train_seconds']:.2f} s")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"baselines_{args.image_size}px")
    record = {"protocol": "fashion-mnist, seed 0, 1000 queries / 5000 train / 69000 database",
              "backbone": spec.to_dict(), "feature_seconds": round(feature_seconds, 1),
              "machine": machine_info(), "results": results}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    lines = ["| method | bits | mAP@all | mAP@1000 | P@r≤2 | train s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bits']} | {r['map@all']:.4f} | {r['map@1000']:.4f} | {r['precision@r2']:.4f} | "
              f"{r['train_seconds']:.2f} |" for r in results]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    for bits in args.bits:
        at = [r for r in results if r["bits"] == bits]
        plot_pr_curves({r["method"]: r["pr"] for r in at}, f"{stem}_pr_{bits}bits.png",
                       title=f"PR over Hamming radius, {bits} bits, {args.image_size} px")
        plot_precision_at_n({r["method"]: r["precision@n"] for r in at}, f"{stem}_pn_{bits}bits.png",
                            title=f"precision@N, {bits} bits, {args.image_size} px")
    plot_bars({f"{r['method']} {r['bits']}": r["map@all"] for r in results}, f"{stem}_map.png",
              title=f"mAP@all, Fashion-MNIST, {args.image_size} px", ylabel="mAP@all")
    print("\n".join(lines))
    print(f"written: {stem}.json, .md and PNG plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
