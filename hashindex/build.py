"""The jobs' building blocks: cache backbone features, train an encoder, encode a source into an index.

Each takes an optional Dask ``client``; without one it starts a LocalCluster of worker processes
(or connects to ``scheduler``) for the duration of the call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import zarr

from . import store
from .backbones import BackboneSpec, feature_dim, resolve_spec
from .encoder import Encoder
from .index import Index
from .index import open as open_index
from .methods import create_method
from .pipeline import CodeTransform, FeatureTransform, build_key, chunk_rows_for, dask_client, run_chunks
from .sources import Source, open_source

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get("HASHINDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hashindex"))


@contextlib.contextmanager
def _client(client=None, scheduler=None, n_workers=None):
    if client is not None:
        yield client
    else:
        with dask_client(scheduler, n_workers=n_workers) as new:
            yield new


@dataclass
class FeatureSet:
    """Backbone features of every row of a source (rows that failed to decode: ``valid`` False)."""

    features: np.ndarray   # float16 [N, d]
    valid: np.ndarray      # bool [N]
    ids: np.ndarray
    labels: np.ndarray | None
    location: str
    seconds: float         # time spent computing (0 when read from the cache)


def cached_features(source, backbone: BackboneSpec = BackboneSpec(), *, cache_dir: str | None = None,
                    chunk_rows: int | None = None, client=None, scheduler=None,
                    n_workers: int | None = None) -> FeatureSet:
    """Backbone features of ``source``, computed once with Dask into a Zarr cache and reused after."""
    src = open_source(source)
    spec = resolve_spec(backbone)
    chunk_rows = chunk_rows_for(len(src), chunk_rows)
    key = build_key("features", spec, src.fingerprint(), chunk_rows, len(src))
    location = os.path.join(cache_dir or default_cache_dir(), "features", f"{spec.name}-{spec.image_size}px-{key}.zarr")
    seconds = 0.0
    group = None
    if os.path.isdir(location):
        group = zarr.open_group(location, mode="r+")
    if group is None or not group.attrs.get("complete"):
        started = time.perf_counter()
        group = store.create_version(location, ids=src.ids, chunk_rows=chunk_rows, labels=src.labels,
                                     output=("features", feature_dim(spec.name), "float16"),
                                     attrs={"build_key": key, "backbone": spec.to_dict(), "source": src.describe()})
        with _client(client, scheduler, n_workers) as c:
            run_chunks(c, src, group, location, FeatureTransform(spec), desc=f"features {spec.name}")
        store.finish_version(group)
        seconds = time.perf_counter() - started
    return FeatureSet(group["features"][:], group["valid"][:], src.ids, src.labels, location, seconds)


def train_encoder(source, method: str = "itq", bits: int = 32, *, backbone: BackboneSpec = BackboneSpec(),
                  params: dict | None = None, seed: int = 0, features: FeatureSet | None = None,
                  cache_dir: str | None = None, client=None, scheduler=None, n_workers=None) -> Encoder:
    """Fit ``method`` on the backbone features of ``source`` and return the encoder.

    ``features`` may be passed when already computed (the benchmark reuses one cache for every method).
    """
    src = open_source(source)
    spec = resolve_spec(backbone)
    if features is None:
        features = cached_features(src, spec, cache_dir=cache_dir, client=client, scheduler=scheduler,
                                   n_workers=n_workers)
    x = features.features[features.valid].astype(np.float32)
    y = None if features.labels is None else features.labels[features.valid]
    hasher = create_method(method, bits, seed=seed, **(params or {}))
    started = time.perf_counter()
    head = hasher.fit(x, y)
    seconds = time.perf_counter() - started
    training = {"source": src.describe(), "source_fingerprint": src.fingerprint(), "images": int(len(x)),
                "params": hasher.params(), "fit_seconds": round(seconds, 3),
                "feature_seconds": round(features.seconds, 3)}
    return Encoder(method=method, bits=bits, backbone=spec, head=head, training=training)


def encode(source, encoder: "Encoder | str", out: str, *, chunk_rows: int | None = None, client=None,
           scheduler: str | None = None, n_workers: int | None = None) -> Index:
    """Encode every image of ``source`` into a new version of the index at ``out`` and publish it.

    Rerunning after an interruption resumes the same build (same encoder, same source, same
    chunking) and skips its finished chunks. The previous version stays the visible one until
    the new one is complete.
    """
    src = open_source(source)
    enc = encoder if isinstance(encoder, Encoder) else Encoder.load(encoder)
    chunk_rows = chunk_rows_for(len(src), chunk_rows)
    fingerprint = src.fingerprint()  # hashes the whole listing of a folder source: once
    key = build_key("codes", enc.id, fingerprint, chunk_rows, len(src))
    version = f"v-{key}"
    location = f"{str(out).rstrip('/')}/{version}"
    started = time.perf_counter()
    group = store.create_version(
        location, ids=src.ids, chunk_rows=chunk_rows, labels=src.labels, output=("codes", enc.bits // 8, "uint8"),
        encoder_bytes=enc.to_bytes(),
        attrs={"build_key": key, "bits": enc.bits, "encoder_id": enc.id, "encoder_config": enc.config,
               "source": src.describe(), "source_fingerprint": fingerprint})
    if not group.attrs.get("complete"):
        with _client(client, scheduler, n_workers) as c:
            counts = run_chunks(c, src, group, location, CodeTransform(location), desc="encoding")
        summary = store.finish_version(group)
        log.info("encoded %s: %s in %.1f s", location, {**counts, **summary}, time.perf_counter() - started)
    store.write_pointer(str(out), version)
    return open_index(out)


def encode_images(encoder: Encoder, paths: list[str]) -> np.ndarray:
    """Encode a few image files in this process (for queries); a bad file is an error naming it."""
    from .images import ImageError, decode_image
    pixels = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                pixels.append(decode_image(f.read()))
        except (ImageError, OSError) as exc:
            raise ImageError(f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return encoder.encode_pixels(pixels)


def protocol_split(source: Source, *, queries_per_class: int = 100, train_per_class: int = 500,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The retrieval protocol's rows: (query, train, database), as numpy row positions, sorted.

    Queries are drawn per class from the test split when the source has one (else from all rows),
    training images per class from the train split; the database is every row that is not a query
    (training images included). Multi-label sources draw ``queries_per_class × classes`` at random.
    """
    if source.labels is None:
        raise ValueError(f"{source.describe()}: the retrieval protocol needs labels")
    rng = np.random.default_rng(seed)
    n = len(source)
    splits = source.splits if source.splits is not None else np.array(["all"] * n, dtype=object)
    test_pool = np.flatnonzero(splits == "test") if (splits == "test").any() else np.arange(n)
    train_pool = np.flatnonzero(splits == "train") if (splits == "train").any() else np.arange(n)

    def draw(pool: np.ndarray, per_class: int, exclude: np.ndarray) -> np.ndarray:
        pool = np.setdiff1d(pool, exclude)
        labels = source.labels[pool]
        if labels.ndim == 2:
            return np.sort(rng.choice(pool, size=min(len(pool), per_class * labels.shape[1]), replace=False))
        picked = [rng.choice(pool[labels == c], size=min(per_class, int((labels == c).sum())), replace=False)
                  for c in np.unique(labels)]
        return np.sort(np.concatenate(picked))

    queries = draw(test_pool, queries_per_class, np.empty(0, np.int64))
    train = draw(train_pool, train_per_class, queries)
    database = np.setdiff1d(np.arange(n), queries)
    return queries, train, database
