"""The training job's building blocks: cache backbone features (and augmented views), train an encoder.
Encoding a source into an index is :mod:`hashindex.indexing`.

Each takes an optional Dask ``client``; without one it starts a LocalCluster of worker processes
(or connects to ``scheduler``) for the duration of the call.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import zarr

from . import store
from .augment import Augment, AugmentError, check_seed, check_views, mirror
from .backbones import BackboneSpec, feature_dim, load_backbone, resolve_spec
from .encoder import Encoder
from .methods import METHODS, MethodError, create_method
from .methods.deep import training_device
from .methods.student import distil
from .pipeline import FeatureTransform, ViewTransform, build_key, chunk_rows_for, job_client, run_chunks
from .sources import Source, SourceError, open_source

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    return os.environ.get("HASHINDEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hashindex"))


@dataclass
class FeatureSet:
    """Backbone features of every row of a source (rows that failed to decode: ``valid`` False)."""

    features: np.ndarray   # float16 [N, d]
    valid: np.ndarray      # bool [N]
    ids: np.ndarray
    labels: np.ndarray | None
    location: str
    seconds: float         # time spent computing (0 when read from the cache)
    backbone: BackboneSpec | None = None  # the network that computed them (None: not recorded)


def _cached_output(src: Source, location: str, chunk_rows: int, transform, output: tuple, attrs: dict, desc: str,
                   client, scheduler, n_workers) -> tuple[zarr.Group, float]:
    """The complete cache at ``location``, computing (or resuming) it with Dask first where it is not:
    (group, seconds spent computing; 0 when read from the cache)."""
    if os.path.isdir(location):
        group = zarr.open_group(location, mode="r+")
        if group.attrs.get("complete"):
            return group, 0.0
    started = time.perf_counter()
    group = store.create_version(location, ids=src.ids, chunk_rows=chunk_rows, labels=src.labels, output=output,
                                 attrs=attrs)
    with job_client(client, scheduler, n_workers) as c:
        run_chunks(c, src, group, location, transform, desc=desc)
    store.finish_version(group)
    return group, time.perf_counter() - started


def cached_features(source, backbone: BackboneSpec = BackboneSpec(), *, cache_dir: str | None = None,
                    chunk_rows: int | None = None, client=None, scheduler=None,
                    n_workers: int | None = None) -> FeatureSet:
    """Backbone features of ``source``, computed once with Dask into a Zarr cache and reused after."""
    src = open_source(source)
    spec = resolve_spec(backbone)
    chunk_rows = chunk_rows_for(len(src), chunk_rows)
    key = build_key("features", spec, src.fingerprint(), chunk_rows, len(src))
    location = os.path.join(cache_dir or default_cache_dir(), "features",
                            f"{spec.name}{spec.variant}-{spec.image_size}px-{key}.zarr")
    group, seconds = _cached_output(
        src, location, chunk_rows, FeatureTransform(spec), ("features", feature_dim(spec), "float16"),
        {"build_key": key, "backbone": spec.to_dict(), "source": src.describe()},
        f"features {spec.name}{spec.variant}", client, scheduler, n_workers)
    return FeatureSet(group["features"][:], group["valid"][:], src.ids, src.labels, location, seconds, spec)


@dataclass
class ViewSet:
    """Backbone features of ``V`` augmented views of every row of a source (rows that failed to
    decode: ``valid`` False, their views all zero). View ``v`` of row ``r`` is the image
    ``augment(pixels, [r], view=v, seed=seed, size=backbone.image_size)`` through the frozen backbone."""

    views: np.ndarray      # float16 [N, V, d]
    valid: np.ndarray      # bool [N]
    ids: np.ndarray
    labels: np.ndarray | None
    location: str
    seconds: float         # time spent computing (0 when read from the cache)
    backbone: BackboneSpec
    augment: Augment
    seed: int


def cached_views(source, backbone: BackboneSpec = BackboneSpec(), *, views: int = 8, augment: Augment = Augment(),
                 seed: int = 0, cache_dir: str | None = None, chunk_rows: int | None = None, client=None,
                 scheduler=None, n_workers: int | None = None) -> ViewSet:
    """Backbone features of ``views`` augmented views of each image of ``source``, computed once with
    Dask into a Zarr cache and reused after, like :func:`cached_features` (and resumed the same way).

    Parameters
    ----------
    source
        Anything :func:`hashindex.sources.open_source` opens.
    backbone : BackboneSpec
        The frozen network (a method's own: :func:`method_backbone`).
    views : int
        Views per image, at least 1.
    augment : Augment
        How a view is drawn from its image.
    seed : int
        Seed of the views: view ``v`` of row ``r`` depends on ``(seed, r, v)`` only, not on the
        chunking or the cluster.
    chunk_rows : int, optional
        Rows per task; by default a feature cache's rows divided by ``views``, so a task does as many
        forwards as one of :func:`cached_features` (a killed build loses no more work).

    Returns
    -------
    ViewSet
        ``views`` float16 ``[N, views, d]`` and the ``valid`` mask. The cache key holds the backbone,
        the source's fingerprint, the chunking, ``views``, the augmentation's parameters and ``seed``.
    """
    views, seed = check_views(views), check_seed(seed)
    if not isinstance(augment, Augment):
        raise AugmentError(f"augment must be an Augment, got {type(augment).__name__}")
    src = open_source(source)
    spec = resolve_spec(backbone)
    chunk_rows = chunk_rows_for(len(src), chunk_rows or max(1, chunk_rows_for(len(src)) // views))
    key = build_key("views", spec, src.fingerprint(), chunk_rows, len(src), views, augment, seed)
    location = os.path.join(cache_dir or default_cache_dir(), "views",
                            f"{spec.name}{spec.variant}-{spec.image_size}px-{views}v-{key}.zarr")
    transform = ViewTransform(spec, augment, views, seed)
    group, seconds = _cached_output(
        src, location, chunk_rows, transform, (transform.output, transform.width, "float16"),
        {"build_key": key, "backbone": spec.to_dict(), "source": src.describe(), "views": views,
         "augment": augment.to_dict(), "seed": seed, "layout": "views float16 [N, views * d], view-major"},
        f"views {spec.name}{spec.variant} x{views}", client, scheduler, n_workers)
    flat = group[transform.output][:]
    return ViewSet(flat.reshape(len(flat), views, -1), group["valid"][:], src.ids, src.labels, location, seconds,
                   spec, augment, seed)


MODES = ("head", "finetune")


def method_backbone(method: str, spec: BackboneSpec = BackboneSpec(), params: dict | None = None) -> BackboneSpec:
    """The backbone ``method`` trains on, given the one asked for: ``spec`` with the method's stem
    attention (DPFAH: ``"simam"``, its ``X + SimAM(X)`` after the stem) and feature blocks (the
    unsupervised defaults: pooled outputs of middle blocks), or ``spec`` itself for a method with
    neither. Head mode trains on the cached features of this spec, finetune mode trains this
    network, and the encoder records it, so that encoding an image later runs the network the
    method trained on. The one place that turns a method's choices into a spec: precompute
    features for :func:`train_encoder` (``features=``) with ``cached_features(source, method_backbone(…))``.
    """
    hasher = create_method(method, 8, **(params or {}))
    if hasher.stem_attention is not None:
        spec = replace(spec, stem_attention=hasher.stem_attention)
    if hasher.feature_blocks is not None:
        spec = replace(spec, blocks=hasher.feature_blocks)
    return spec


def train_encoder(source, method: str = "itq", bits: int = 32, *, backbone: BackboneSpec = BackboneSpec(),
                  params: dict | None = None, seed: int = 0, mode: str = "head", tags: np.ndarray | None = None,
                  validation: float = 0.0, features: FeatureSet | None = None, cache_dir: str | None = None,
                  client=None, scheduler=None, n_workers=None) -> Encoder:
    """Fit ``method`` on the images of ``source`` and return the encoder.

    mode
        ``head``: train on cached features of the frozen backbone (computed with Dask once).
        ``finetune``: train the backbone end to end with the method (deep methods; slow on a CPU).
        The encoder then carries the trained backbone weights.
    tags
        Multi-hot auxiliary semantics, one row per image of ``source`` (LAGNH's user tags).
    validation
        Fraction of the images held out of training (seeded); their retrieval mAP against the
        training images is recorded in ``encoder.training["validation"]``, the split to compare
        settings on, so query images are never used for tuning.
    features
        Already computed features of ``source`` (the benchmark reuses one cache for every method).
        They must come from ``method_backbone(method, backbone, params)`` (a FeatureSet that does not
        record its backbone is taken to be of ``backbone``); anything else is a :class:`MethodError`.
    """
    if mode not in MODES:
        raise MethodError(f"unknown training mode {mode!r}; use one of {', '.join(MODES)}")
    if not 0.0 <= validation < 1.0:
        raise MethodError(f"validation must be a fraction in [0, 1), got {validation}")
    src = open_source(source)
    params = dict(params or {})
    finetune_profile = getattr(METHODS.get(method), "finetune_profile", None)
    if mode == "finetune" and finetune_profile and not params.get("profile"):
        # the default profiles are built on frozen features; finetuning follows the paper unless told
        params["profile"] = finetune_profile()
    hasher = create_method(method, bits, seed=seed, **params)
    if mode == "finetune" and not hasher.can_finetune:
        raise MethodError(f"{method} has no finetune mode: it trains on backbone features only (use mode head)")
    if mode == "finetune" and hasher.student:
        raise MethodError(f"{method}: the student stage distils a head trained on frozen features; finetune "
                          "mode trains the backbone itself (set student to false, or train in head mode)")
    spec = resolve_spec(method_backbone(method, backbone, params))
    if features is None:
        features = cached_features(src, spec, cache_dir=cache_dir, client=client, scheduler=scheduler,
                                   n_workers=n_workers)
    else:
        given = resolve_spec(features.backbone) if features.backbone is not None else resolve_spec(backbone)
        if given != spec:
            raise MethodError(f"{method} trains on features of {spec}, but the features given are of {given}"
                              + ("" if features.backbone is not None else " (the FeatureSet records no backbone: "
                                 "taken to be the backbone argument's)")
                              + "; compute them with cached_features(source, method_backbone(method, backbone))")
    rows = np.flatnonzero(features.valid)
    held_out = np.empty(0, np.int64)
    if validation:
        rng = np.random.default_rng(seed)
        held_out = np.sort(rng.choice(rows, size=max(1, round(validation * len(rows))), replace=False))
        rows = np.setdiff1d(rows, held_out)
    x = features.features[rows].astype(np.float32)
    y = None if features.labels is None else features.labels[rows]
    fit_args = {}
    if tags is not None:
        if len(tags) != len(src):
            raise MethodError(f"{len(tags)} rows of tags for the {len(src)} images of {src.describe()}")
        fit_args["tags"] = np.asarray(tags)[rows]
    tuned = None
    if hasher.uses_views and mode == "head":
        # the shared views term: V augmented views of each training image, through the same network
        views = cached_views(src, spec, views=hasher.view_count, seed=seed, cache_dir=cache_dir, client=client,
                             scheduler=scheduler, n_workers=n_workers)
        fit_args["views"] = views.views[rows].astype(np.float32)
    pixels = functools.partial(_training_pixels, src, rows)
    x_fit = x
    if hasher.mirror_average:
        if mode != "head":
            raise MethodError(f"{method}: mirror_average averages frozen features; finetune mode trains the backbone")
        # each training image as the mean of its and its mirror image's features: where a mirrored
        # image is the same class (clothing, most photos; not text or digits), the average keeps
        # the class and damps what the pose adds
        x_fit = (x + mirror_features(pixels, len(rows), spec)) / 2
    if mode == "finetune":
        tuned = load_backbone(spec, device=training_device())
        fit_args.update(images=pixels, backbone=tuned)
    started = time.perf_counter()
    head = hasher.fit(x_fit, y, **fit_args)
    seconds = time.perf_counter() - started
    training = {"source": src.describe(), "source_fingerprint": src.fingerprint(), "images": int(len(x)),
                "mode": mode, "params": hasher.params(), "fit_seconds": round(seconds, 3),
                "feature_seconds": round(features.seconds, 3)}
    if hasher.student:
        # the head just trained teaches its codes to the backbone's upper blocks and a new head
        with torch.no_grad():
            teacher_bits = head(torch.from_numpy(x_fit)) >= 0
        tuned = load_backbone(spec, device=training_device())
        started = time.perf_counter()
        head = distil(teacher_bits, x, pixels, tuned, **hasher.student, seed=seed)
        training["student_seconds"] = round(time.perf_counter() - started, 3)
        training["fit_seconds"] = round(seconds + training["student_seconds"], 3)
    encoder = Encoder(method=method, bits=bits, backbone=spec, head=head, training=training,
                      backbone_state=None if tuned is None else tuned.net.state_dict(),
                      training_arrays=hasher.training_arrays())
    if len(held_out):
        training["validation"] = _validation_scores(encoder, src, features, rows, held_out)
    return encoder


def mirror_features(pixels, n: int, spec: BackboneSpec, batch_rows: int = 1024) -> np.ndarray:
    """The frozen network's features of the mirror image of each of ``n`` training images
    (``pixels``: a callable from row positions to decoded pixels), read and computed a batch at a time."""
    backbone = load_backbone(spec, device=training_device())
    out = np.empty((n, feature_dim(spec)), np.float32)
    for start in range(0, n, batch_rows):
        positions = np.arange(start, min(n, start + batch_rows))
        with torch.no_grad():
            out[positions] = backbone.features(mirror(pixels(positions)))
    return out


def _training_pixels(src: Source, rows: np.ndarray, positions: np.ndarray):
    """Decoded pixels of training rows ``rows[positions]`` (finetune mode reads them batch by batch)."""
    decoded = src.read(rows[positions])
    if not decoded.ok.all():
        bad = np.flatnonzero(~decoded.ok)[0]
        raise SourceError(f"{src.ids[rows[positions][bad]]}: could not be read again during training "
                          f"({decoded.reasons[bad]})")
    return decoded.pixels


def _training_codes(encoder: Encoder, src: Source, features: FeatureSet, rows: np.ndarray) -> np.ndarray:
    if not encoder.finetuned:
        return encoder.encode_features(features.features[rows].astype(np.float32))
    return encoder.encode_pixels(_training_pixels(src, rows, np.arange(len(rows))))


def _validation_scores(encoder: Encoder, src: Source, features: FeatureSet, train_rows: np.ndarray,
                       held_out: np.ndarray) -> dict:
    """Retrieval of the held-out images among the training images (mAP needs labels)."""
    record = {"images": int(len(held_out))}
    if features.labels is not None:
        from .metrics import evaluate
        scores = evaluate(_training_codes(encoder, src, features, held_out),
                          _training_codes(encoder, src, features, train_rows),
                          features.labels[held_out], features.labels[train_rows], topks=(None,))
        record["map@all"] = round(float(scores["map@all"]), 4)
    return record


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
