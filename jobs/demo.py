"""The main job on the embedded default data, end to end, with the time of each stage.

Fashion-MNIST (Debian's dataset-fashion-mnist) when installed, else scikit-learn's digits:
cache backbone features of the protocol's training images → train the best unsupervised method
(its default profile) → encode the database with Dask into a Zarr index → encode the queries →
search → mAP@all, mAP@1000, precision within radius 2. ITQ, the baseline to beat, is trained on the
same training images (through its own network: the pooled head, where UHGA's default pools middle
blocks) and scored beside it on the queries and a seeded sample of the database
(``--baseline-rows``), encoded through the same pipeline, so the demo shows what the learned codes add.

    python jobs/demo.py [--out runs/demo] [--bits 32] [--method uhga] [--image-size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import hashindex
from hashindex.backbones import BackboneSpec
from hashindex.pipeline import dask_client
from hashindex.sources import FASHION_MNIST_DIR, open_source

# the unsupervised method whose default profile scored best on bench/compare.py's protocol at 32 bits
BEST_UNSUPERVISED = "uhga"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the indexes and results (default: %(default)s)")
    parser.add_argument("--source", help="default: fashion-mnist if installed, else digits")
    parser.add_argument("--method", default=BEST_UNSUPERVISED)
    parser.add_argument("--baseline", default="itq", help="method scored beside it (default: %(default)s; none: skip)")
    parser.add_argument("--baseline-rows", type=int, default=10_000,
                        help="database images the baseline is compared on (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="Dask worker processes (default: one per core)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler")
    args = parser.parse_args(argv)

    name = args.source or ("fashion-mnist" if os.path.isdir(FASHION_MNIST_DIR) else "digits")
    source = open_source(name)
    print(f"data: {source.describe()}" + ("" if args.source or name == "fashion-mnist" else
                                          "  (Fashion-MNIST not installed: apt-get install dataset-fashion-mnist)"))
    small = len(source) < 10_000  # digits: ~180 images a class, so scale the protocol down
    queries, train, database = hashindex.protocol_split(
        source, queries_per_class=20 if small else 100, train_per_class=80 if small else 500, seed=0)
    print(f"protocol: {len(queries):,} queries, {len(train):,} training images, {len(database):,} database images, "
          f"{args.image_size} px, {args.bits} bits, {args.method}")
    os.makedirs(args.out, exist_ok=True)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    times = {}

    with dask_client(args.scheduler, n_workers=args.workers) as client:
        started = time.perf_counter()
        # the network the method trains on (UHGA's default: pooled blocks 10, 12, 14; DPFAH's paper: SimAM)
        features = hashindex.cached_features(source.subset(train), hashindex.method_backbone(args.method, spec),
                                             client=client)
        times["features of training images"] = time.perf_counter() - started

        started = time.perf_counter()
        encoder = hashindex.train_encoder(source.subset(train), args.method, args.bits, backbone=spec,
                                          features=features)
        encoder_path = encoder.save(os.path.join(args.out, f"{args.method}-{args.bits}.encoder"))
        times[f"train {args.method}"] = time.perf_counter() - started

        started = time.perf_counter()
        db = hashindex.encode(source.subset(database), encoder, os.path.join(args.out, "database.index"), client=client)
        times["encode database (Dask → Zarr)"] = time.perf_counter() - started

        started = time.perf_counter()
        qi = hashindex.encode(source.subset(queries), encoder, os.path.join(args.out, "queries.index"), client=client)
        times["encode queries"] = time.perf_counter() - started

        baseline = None
        if args.baseline != "none":
            # the baseline on the same training features, queries and a seeded sample of the database
            started = time.perf_counter()
            sample = np.sort(np.random.default_rng(0).choice(len(database), min(args.baseline_rows, len(database)),
                                                            replace=False))
            base_features = hashindex.cached_features(  # its own network: the pooled head
                source.subset(train), hashindex.method_backbone(args.baseline, spec), client=client)
            base_encoder = hashindex.train_encoder(source.subset(train), args.baseline, args.bits, backbone=spec,
                                                   features=base_features)
            base_db = hashindex.encode(source.subset(database[sample]), base_encoder,
                                       os.path.join(args.out, f"{args.baseline}-sample.index"), client=client)
            base_q = hashindex.encode(source.subset(queries), base_encoder,
                                      os.path.join(args.out, f"{args.baseline}-queries.index"), client=client)
            times[f"{args.baseline} beside it (train, encode sample)"] = time.perf_counter() - started
            baseline = (sample, base_db, base_q)

    started = time.perf_counter()
    distances, rows = db.search(qi.codes, 10)
    times["search top-10, all queries"] = time.perf_counter() - started

    started = time.perf_counter()
    result = hashindex.metrics.evaluate(qi.codes[qi.valid], db.codes[db.valid], qi.labels[qi.valid],
                                        db.labels[db.valid], topks=(None, 1000))
    beside = {}
    if baseline is not None:
        sample, base_db, base_q = baseline
        for name, q_index, db_codes in [(args.method, qi, db.codes[sample]), (args.baseline, base_q, base_db.codes)]:
            ok = db.valid[sample] & base_db.valid  # the rows both encoded
            scores = hashindex.metrics.evaluate(q_index.codes[qi.valid], db_codes[ok], qi.labels[qi.valid],
                                                db.labels[sample][ok], topks=(None, 1000))
            beside[name] = {k: scores[k] for k in ("map@all", "map@1000", "precision@r2")}
    times["evaluate"] = time.perf_counter() - started

    summary = {"data": source.describe(), "method": args.method, "bits": args.bits, "image_size": args.image_size,
               "queries": len(queries), "train": len(train), "database": len(database),
               "encoder": encoder_path, "encoder_id": encoder.id, "rejected": db.attrs["rejected"],
               "map@all": result["map@all"], "map@1000": result["map@1000"],
               "precision@r2": result["precision@r2"], "seconds": {k: round(v, 2) for k, v in times.items()}}
    if beside:
        summary["beside_baseline"] = {"database_sample": int(len(baseline[0])), "scores": beside}
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"\nfirst query {qi.ids[0]}: nearest {', '.join(db.ids[rows[0][:5]])} at distances {distances[0][:5].tolist()}")
    print(f"\n{'mAP@all':<28}{result['map@all']:.4f}\n{'mAP@1000':<28}{result['map@1000']:.4f}\n"
          f"{'precision within radius 2':<28}{result['precision@r2']:.4f}\n")
    if beside:
        print(f"on the queries and {len(baseline[0]):,} database images:")
        for name, scores in beside.items():
            print(f"  {name:<8} mAP@all {scores['map@all']:.4f}   mAP@1000 {scores['map@1000']:.4f}   "
                  f"P@r≤2 {scores['precision@r2']:.4f}")
        print()
    for stage, seconds in times.items():
        print(f"{stage:<34}{seconds:8.1f} s")
    print(f"{'total':<34}{sum(times.values()):8.1f} s\n\nindex: {db.path}   results: {args.out}/demo.json")
    print(f"try:   hashindex query {db.path} --id {db.ids[0]} -k 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
