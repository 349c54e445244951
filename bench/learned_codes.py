"""Real binary codes for bench/search_speed.py: ITQ on the Fashion-MNIST retrieval protocol.

ITQ trains (seeded) on the cached 64-px EfficientNet-Lite0 features of the protocol's 5,000
training images, as bench/compare.py does, then encodes the 69,000 database and the 1,000 query
images from the same cached features (no image is decoded or re-encoded).

The codes are computed in a child process (``python bench/learned_codes.py ...``) and cached as
an .npz under the hashindex cache directory, so that the timing process never imports torch (its
OpenMP pool would share the 2 cores with numba's and faiss's) and later runs start at once.
Delete the .npz to recompute.

:func:`replicate_with_noise` grows the 69,000 real codes to any N: copies XOR'd with sparse,
seeded random bit flips.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

BACKBONE, IMAGE_SIZE, PROTOCOL_SEED = "efficientnet-lite0", 64, 0


def cache_path(bits: int, seed: int) -> Path:
    # hashindex.build.default_cache_dir's rule, repeated so that the timing process need not import
    # hashindex.build (it imports torch)
    root = os.environ.get("HASHINDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hashindex"))
    return Path(root) / "bench" / f"fashion-mnist-{BACKBONE}-{IMAGE_SIZE}px-itq-{bits}bits-seed{seed}.npz"


def load(bits: int, seed: int) -> dict:
    """``{"database": uint8 [69000, bits/8], "queries": uint8 [1000, bits/8], "info": dict}``."""
    path = cache_path(bits, seed)
    if not path.exists():
        print(f"# learned codes: training ITQ ({bits} bits) in a child process -> {path}", flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--bits", str(bits), "--seed", str(seed),
                        "--out", str(path)], check=True)
    with np.load(path, allow_pickle=False) as z:
        info = {key[5:]: z[key].item() for key in z.files if key.startswith("info_")}
        return {"database": z["database"], "queries": z["queries"], "info": info}


def replicate_with_noise(codes: np.ndarray, n: int, flip: float, seed) -> np.ndarray:
    """``n`` rows: row ``i`` is ``codes[i % len(codes)]`` with each bit flipped independently with
    probability ``flip`` (every copy is noised, the first too)."""
    out = np.resize(codes, (n, codes.shape[1]))  # cyclic copies
    bits = 8 * codes.shape[1]
    rng = np.random.default_rng(seed)
    rows = max(1, (1 << 24) // bits)  # ~64 MB of float32 draws at a time, whatever n is
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out[start:stop] ^= np.packbits(rng.random((stop - start, bits), dtype=np.float32) < flip, axis=1)
    return out


def _compute(bits: int, seed: int, out: Path) -> None:
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hashindex
    from hashindex.backbones import BackboneSpec
    from hashindex.build import FeatureSet

    started = time.perf_counter()
    source = hashindex.open_source("fashion-mnist")
    queries, train, database = hashindex.protocol_split(source, seed=PROTOCOL_SEED)
    spec = BackboneSpec(BACKBONE, IMAGE_SIZE)
    cache = hashindex.cached_features(source, spec)
    features, labels = cache.features, source.labels
    train_set = FeatureSet(features[train], cache.valid[train], source.ids[train], labels[train], cache.location, 0.0)
    encoder = hashindex.train_encoder(source.subset(train), "itq", bits, backbone=spec, features=train_set, seed=seed)
    db_codes = encoder.encode_features(features[database])
    q_codes = encoder.encode_features(features[queries])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, database=db_codes, queries=q_codes, database_rows=database, query_rows=queries,
             info_method="itq", info_bits=bits, info_seed=seed, info_protocol_seed=PROTOCOL_SEED,
             info_features=os.path.basename(cache.location), info_feature_seconds=cache.seconds,
             info_fit_seconds=encoder.training["fit_seconds"])
    os.replace(tmp, out)  # complete files only
    print(f"# learned codes: {len(db_codes):,} database + {len(q_codes):,} query codes of {bits} bits "
          f"in {time.perf_counter() - started:.1f} s (features {'computed' if cache.seconds else 'cached'})",
          flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="cache ITQ codes of the Fashion-MNIST protocol for search_speed.py")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    _compute(a.bits, a.seed, a.out)
