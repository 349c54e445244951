"""Encoding pipeline throughput against the eager backbone forward, at the same batch size and resolution.

Eager: the backbone's plain PyTorch forward (fp32, default memory layout) on already-decoded
pixels in this process, with as many torch threads as the pipeline has workers; beside it the
forward as the encoder now runs it (channels-last, and bf16 where the CPU has it). Pipeline:
``hashindex.encode`` end to end (read → decode → backbone → head → pack → Zarr write, scheduled by
Dask) on a LocalCluster of 1 and of 2 single-threaded worker processes, cluster start-up excluded,
at the default precision and at ``bf16``. Targets (issue 15): default pipeline ≥ 1.3× the eager
forward with ≥ 99.99 % of bits agreeing with the eager path's codes; bf16 ≥ 99 % of bits agreeing
with fp32 and protocol mAP@all within 0.005 (``--protocol``: encodes the 70,000 protocol images
twice, ~5 min).

    python bench/encode_throughput.py [--images 16384] [--image-size 64] [--batch 256] [--protocol]
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
from hashindex.encoder import EncoderError  # noqa: E402
from hashindex.pipeline import dask_client  # noqa: E402
from hashindex.plots import plot_bars  # noqa: E402


def eager_features(pixels, spec: BackboneSpec, batch: int) -> tuple[np.ndarray, float]:
    """The plain PyTorch forward: fp32, the default (contiguous) layout, inference mode."""
    backbone = create_backbone(spec.name, image_size=spec.image_size)
    backbone.net.to(memory_format=torch.contiguous_format)

    def run(images):
        with torch.inference_mode():
            return np.concatenate([backbone.net(backbone.preprocess(images[i:i + batch])).numpy()
                                   for i in range(0, len(images), batch)])
    run(pixels[:batch])  # warm-up
    started = time.perf_counter()
    out = run(pixels)
    return out, len(pixels) / (time.perf_counter() - started)


def encoder_forward(pixels, encoder, batch: int) -> float:
    """The forward as an encoder runs it (channels-last; its precision)."""
    encoder.backbone.features(pixels[:batch], batch_size=batch)  # warm-up
    started = time.perf_counter()
    encoder.backbone.features(pixels, batch_size=batch)
    return len(pixels) / (time.perf_counter() - started)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return round(1.0 - float(np.unpackbits(a ^ b).mean()), 6)


def pipeline(subset, encoder, workers: int) -> tuple[float, np.ndarray]:
    with dask_client(n_workers=workers) as client, tempfile.TemporaryDirectory() as tmp:
        # warm the workers (model load, numba) on a small index first: start-up is not throughput
        hashindex.encode(subset.subset(np.arange(512)), encoder, os.path.join(tmp, "warm"), client=client)
        started = time.perf_counter()
        index = hashindex.encode(subset, encoder, os.path.join(tmp, "index"), client=client)
        return len(subset) / (time.perf_counter() - started), index.codes


def protocol_map(encoder, bits: int, workers: int) -> dict:
    """mAP@all of the protocol (1,000 queries, 69,000 database images) with codes encoded from the
    images through the pipeline at fp32 and at bf16, ITQ trained on the cached training features."""
    source = hashindex.open_source("fashion-mnist")
    queries, _, database = hashindex.protocol_split(source, seed=0)
    out = {}
    with dask_client(n_workers=workers) as client, tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            enc = encoder.with_precision(precision)
            q = hashindex.encode(source.subset(queries), enc, os.path.join(tmp, f"q-{precision}"), client=client)
            db = hashindex.encode(source.subset(database), enc, os.path.join(tmp, f"db-{precision}"), client=client)
            out[precision] = {"map@all": round(hashindex.metrics.mean_average_precision(
                q.codes, db.codes, source.labels[queries], source.labels[database]), 4),
                "codes": np.concatenate([q.codes, db.codes])}
    return {"fp32_map@all": out["fp32"]["map@all"], "bf16_map@all": out["bf16"]["map@all"],
            "bits_agree": agreement(out["fp32"]["codes"], out["bf16"]["codes"]), "images": len(queries) + len(database)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--protocol", action="store_true", help="also protocol mAP@all at fp32 and bf16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)

    source = hashindex.open_source("fashion-mnist")
    rows = np.arange(args.images)
    subset = source.subset(rows)
    spec = BackboneSpec("efficientnet-lite0", args.image_size)
    pixels = source.read(rows).pixels
    _, train, _ = hashindex.protocol_split(source, seed=0)
    encoder = hashindex.train_encoder(source.subset(train), "itq", 32, backbone=spec)
    try:
        reduced = encoder.with_precision("bf16")
    except EncoderError as exc:
        print(f"bf16 not measured: {exc}")
        reduced = None

    results = []
    for workers in (1, 2):
        torch.set_num_threads(workers)
        eager_out, eager = eager_features(pixels, spec, args.batch)
        eager_codes = encoder.encode_features(eager_out)
        row = {"workers": workers, "eager_img_s": round(eager, 1),
               "forward_channels_last_img_s": round(encoder_forward(pixels, encoder, args.batch), 1)}
        speed, codes = pipeline(subset, encoder, workers)
        row.update(pipeline_img_s=round(speed, 1), ratio=round(speed / eager, 3),
                   bits_agree_with_eager=agreement(codes, eager_codes))
        if reduced is not None:
            row["forward_bf16_img_s"] = round(encoder_forward(pixels, reduced, args.batch), 1)
            speed_bf16, codes_bf16 = pipeline(subset, reduced, workers)
            row.update(pipeline_bf16_img_s=round(speed_bf16, 1), ratio_bf16=round(speed_bf16 / eager, 3),
                       bf16_bits_agree_with_fp32=agreement(codes_bf16, codes))
        results.append(row)
        print(json.dumps(row), flush=True)
    protocol = protocol_map(encoder, 32, 2) if args.protocol and reduced is not None else None
    if protocol:
        print(json.dumps(protocol), flush=True)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "encode_throughput")
    with open(stem + ".json", "w") as f:
        json.dump({"command": "python bench/encode_throughput.py " + " ".join(argv or sys.argv[1:]),
                   "images": args.images, "image_size": args.image_size, "batch": args.batch,
                   "machine": machine_info(), "results": results, "protocol": protocol}, f, indent=1)
    bars = {f"{r['workers']} worker(s), fp32": r["ratio"] for r in results}
    bars.update({f"{r['workers']} worker(s), bf16": r["ratio_bf16"] for r in results if "ratio_bf16" in r})
    plot_bars(bars, stem + ".png", title="encoding pipeline / eager fp32 forward (target ≥ 1.3)", ylabel="ratio")
    print(f"written: {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
