"""Encoding pipeline throughput against the bare backbone, at the same batch size and resolution.

Bare: the backbone's forward on already-decoded pixels in this process, with as many torch threads
as the pipeline has workers. Pipeline: ``hashindex.encode`` end to end (read → decode → backbone →
head → pack → Zarr write, scheduled by Dask) on a LocalCluster of 1 and of 2 single-threaded worker
processes, cluster start-up excluded. Target (issue 4): pipeline / bare ≥ 0.9.

    python bench/encode_throughput.py [--images 16384] [--image-size 64] [--batch 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

import hashindex  # noqa: E402
from hashindex.backbones import BackboneSpec, create_backbone  # noqa: E402
from hashindex.pipeline import dask_client  # noqa: E402
from hashindex.plots import plot_bars  # noqa: E402


def bare_forward(pixels, spec: BackboneSpec, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    backbone = create_backbone(spec.name, image_size=spec.image_size)
    backbone.features(pixels[:batch], batch_size=batch)  # warm-up
    started = time.perf_counter()
    backbone.features(pixels, batch_size=batch)
    return len(pixels) / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    source = hashindex.open_source("fashion-mnist")
    rows = np.arange(args.images)
    subset = source.subset(rows)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    pixels = source.read(rows).pixels
    encoder = hashindex.train_encoder(subset.subset(np.arange(2048)), "itq", 32, backbone=spec)

    results = []
    for workers in (1, 2):
        bare = bare_forward(pixels, spec, args.batch, workers)
        with dask_client(n_workers=workers) as client, tempfile.TemporaryDirectory() as tmp:
            # warm the workers (model load, numba) on a small index first: start-up is not throughput
            hashindex.encode(subset.subset(np.arange(512)), encoder, os.path.join(tmp, "warm"), client=client)
            started = time.perf_counter()
            hashindex.encode(subset, encoder, os.path.join(tmp, "index"), client=client)
            pipeline = len(rows) / (time.perf_counter() - started)
        results.append({"workers": workers, "bare_img_s": round(bare, 1), "pipeline_img_s": round(pipeline, 1),
                        "ratio": round(pipeline / bare, 3)})
        print(f"{workers} worker(s): bare forward {bare:.0f} img/s ({workers} torch thread(s)), "
              f"pipeline {pipeline:.0f} img/s, ratio {pipeline / bare:.2f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "encode_throughput")
    with open(stem + ".json", "w") as f:
        json.dump({"command": "python bench/encode_throughput.py " + " ".join(argv or sys.argv[1:]),
                   "images": args.images, "image_size": args.image_size, "batch": args.batch,
                   "machine": machine_info(), "results": results}, f, indent=1)
    plot_bars({f"{r['workers']} worker(s)": r["ratio"] for r in results}, stem + ".png",
              title="encoding pipeline / bare backbone forward (target ≥ 0.9)", ylabel="ratio")
    print(f"written: {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
