"""Why LAGNH's `paper` profile scores near or below LSH on Fashion-MNIST (issue 13), on training images only.

The protocol's 5,000 training images are split (seeded) into 4,000 to train on and 1,000 held-out
queries retrieved among the 4,000, as ``train_encoder(validation=0.2)`` does; the protocol's queries
are never read. Prints, as JSON lines:

- the mAP@all of ranking by the similarities LAGNH's losses fit, before any training: the semantic
  graph ``S^a`` of the ImageNet top-5 tags (what ``L_r`` makes ``cos(Z, Z)`` copy), and the feature
  cosine for reference;
- the 32-bit mAP@all of the held-out images during training of the `paper` profile, every
  ``--every`` epochs, with the losses at that epoch.

    python bench/lagnh_probe.py [--epochs 300] [--every 25] [--out bench/results/lagnh_probe.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import hashindex
from hashindex.backbones import BackboneSpec
from hashindex.methods import create_method
from hashindex.methods.lagnh import semantic_similarity
from hashindex.metrics import evaluate


def ranking_map(similarity: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, seed: int = 0) -> float:
    """mAP@all of ranking the database by a real-valued similarity (ties broken at random)."""
    rng = np.random.default_rng(seed)
    noise = rng.random(similarity.shape) * 1e-9  # random tie-break, below any real difference
    order = np.argsort(-(similarity + noise), axis=1)
    relevant = db_labels[order] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    ap = (relevant * hits / ranks).sum(1) / np.maximum(relevant.sum(1), 1)
    return float(ap.mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/lagnh_probe.json")
    args = parser.parse_args(argv)
    source = hashindex.open_source("fashion-mnist")
    _, train, _ = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", 64)
    x = hashindex.cached_features(source.subset(train), spec).features.astype(np.float32)
    labels = source.labels[train]
    rng = np.random.default_rng(args.split_seed)
    held = np.sort(rng.choice(len(x), 1000, replace=False))
    fit_rows = np.setdiff1d(np.arange(len(x)), held)
    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    method = create_method("lagnh", args.bits, profile="paper", epochs=args.epochs)
    xt = torch.from_numpy(x)
    feature_cos = torch.nn.functional.normalize(xt[held], dim=1) @ torch.nn.functional.normalize(xt[fit_rows], dim=1).T
    emit({"ranking": "feature cosine", "map@all": round(ranking_map(feature_cos.numpy(), labels[held], labels[fit_rows]), 4)})

    started = time.perf_counter()
    original = method.on_epoch_start

    @torch.no_grad()
    def held_out_map() -> float:
        head = method.head_
        was_training = head.training
        head.eval()
        z_held = torch.cat([method._forward(xt[held][i:i + 1024]) for i in range(0, len(held), 1024)])
        z_fit = torch.cat([method._forward(xt[fit_rows][i:i + 1024]) for i in range(0, len(fit_rows), 1024)])
        head.train(was_training)
        pack = lambda z: np.packbits((z >= 0).numpy().astype(np.uint8), axis=1)  # noqa: E731
        return float(evaluate(pack(z_held), pack(z_fit), labels[held], labels[fit_rows], topks=(None,))["map@all"])

    def probe(epoch, features, y):
        original(epoch, features, y)
        if epoch == 0:  # the tag graph exists now: rank by it
            tags = method.tags_.cpu()  # the 4,000 training images' tags; the held-out ones by the same rule
            with torch.no_grad():
                held_tags = method.head_.tags(xt[held]).cpu()
            semantic = semantic_similarity(held_tags, tags).numpy()
            emit({"ranking": "semantic graph S^a (ImageNet top-5 tags)",
                  "map@all": round(ranking_map(semantic, labels[held], labels[fit_rows]), 4),
                  "mean tags per image": round(float(tags.float().sum(1).mean()), 2)})
        if epoch % args.every == 0:
            losses = method.history_[-1] if method.history_ else {}
            emit({"epoch": epoch, "map@all": round(held_out_map(), 4), "seconds": round(time.perf_counter() - started, 1),
                  **{k: round(v, 5) for k, v in losses.items()}})

    method.on_epoch_start = probe
    method.fit(x[fit_rows])
    emit({"epoch": args.epochs, "map@all": round(held_out_map(), 4), "seconds": round(time.perf_counter() - started, 1),
          **{k: round(v, 5) for k, v in method.history_[-1].items()}})
    with open(args.out, "w") as f:
        json.dump({"command": "python bench/lagnh_probe.py " + " ".join(sys.argv[1:] if argv is None else argv), "bits": args.bits,
                   "split": {"train": len(fit_rows), "held_out": len(held), "seed": args.split_seed},
                   "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
