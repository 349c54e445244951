"""Shared fixtures: real Fashion-MNIST images, a feature cache and one Dask LocalCluster per session."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from hashindex.sources import FASHION_MNIST_DIR, open_source

needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                                  reason="dataset-fashion-mnist not installed (./setup.sh installs it)")


@pytest.fixture(scope="session")
def fmnist():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist not installed (./setup.sh installs it)")
    return open_source("fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_features(fmnist):
    """EfficientNet-Lite0 (64 px) features of 1,200 real Fashion-MNIST training images (``rows`` of the
    source): the first 1,000 to train on, the last 200 as held-out queries. Shared by every method's tests."""
    from hashindex.backbones import create_backbone
    rows = np.sort(np.random.default_rng(0).choice(60_000, 1200, replace=False))
    pixels = fmnist.read(rows).pixels
    features = create_backbone("efficientnet-lite0", image_size=64).features(pixels)
    return _feature_set(rows, pixels, features, fmnist.labels[rows])


def _feature_set(rows, pixels, features, labels) -> dict:
    return {"rows": rows, "pixels": pixels, "features": features, "labels": labels,
            "train": features[:1000], "train_labels": labels[:1000],
            "query": features[1000:], "query_labels": labels[1000:]}


@pytest.fixture(scope="session")
def method_features(fmnist_features):
    """``method_features(method)``: the images of ``fmnist_features`` through the network ``method``
    trains on by default (:func:`hashindex.build.method_backbone`: its stem attention, its feature
    blocks), computed once per network."""
    from hashindex.backbones import BackboneSpec, load_backbone
    from hashindex.build import method_backbone
    computed = {BackboneSpec("efficientnet-lite0", 64): fmnist_features}

    def features_for(method: str) -> dict:
        spec = method_backbone(method, BackboneSpec("efficientnet-lite0", 64))
        if spec not in computed:
            features = load_backbone(spec, device="cpu").features(fmnist_features["pixels"])
            computed[spec] = _feature_set(fmnist_features["rows"], fmnist_features["pixels"], features,
                                          fmnist_features["labels"])
        return computed[spec]
    return features_for


def held_out_map(head, data) -> float:
    """mAP@all of held-out queries against the training images, with a trained head's codes."""
    from hashindex import metrics
    from hashindex.encoder import pack_signs
    import torch
    with torch.inference_mode():
        train = pack_signs(head.eval()(torch.from_numpy(data["train"])))
        query = pack_signs(head(torch.from_numpy(data["query"])))
    return metrics.mean_average_precision(query, train, data["query_labels"], data["train_labels"])


def assert_head_round_trip(method: str, head, queries: np.ndarray) -> None:
    """A trained head in an encoder file: the loaded encoder gives the same 32-bit codes and id, and
    each query encoded alone gets the code it gets in the batch."""
    from hashindex.backbones import BackboneSpec
    from hashindex.encoder import Encoder
    encoder = Encoder(method=method, bits=32, backbone=BackboneSpec(), head=head)
    loaded = Encoder.from_bytes(encoder.to_bytes())
    codes = encoder.encode_features(queries)
    assert codes.shape == (len(queries), 4)
    np.testing.assert_array_equal(loaded.encode_features(queries), codes)
    assert loaded.id == encoder.id
    alone = np.concatenate([encoder.encode_features(queries[i:i + 1]) for i in range(len(queries))])
    np.testing.assert_array_equal(alone, codes)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["HASHINDEX_CACHE"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster with two worker processes, shared by the pipeline tests."""
    from hashindex.pipeline import dask_client
    with dask_client(n_workers=2) as c:
        yield c


def write_pngs(source, rows, folder) -> list[str]:
    """Save source rows as PNG files under class sub-folders; returns their ids (relative paths)."""
    decoded = source.read(rows)
    ids = []
    for row, pixels in zip(rows, decoded.pixels):
        rel = f"class{source.labels[row]}/{source.ids[row].replace('/', '_')}.png"
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, rel))
        ids.append(rel)
    return ids


@pytest.fixture(scope="session")
def image_folder(fmnist, tmp_path_factory):
    """A folder of 300 real Fashion-MNIST images as PNG files (30 per class) plus two broken files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(fmnist.labels == c), 30, replace=False)
                                   for c in range(10)]))
    ids = write_pngs(fmnist, rows, folder)
    (folder / "broken").mkdir()
    (folder / "broken" / "empty.jpg").write_bytes(b"")
    (folder / "broken" / "notes.png").write_bytes(b"this is a text file, not a png\n")
    return {"path": str(folder), "ids": ids, "rows": rows, "labels": fmnist.labels[rows]}


def random_codes(rng, n, nbytes):
    return rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)


def clustered_codes(rng, n, nbytes, centres=4, flip=0.04, dup=0.3):
    """Few centres + sparse bit noise, with a share of exact duplicates: many ties, like learned codes."""
    c = rng.integers(0, 256, size=(centres, nbytes), dtype=np.uint8)
    bits = np.unpackbits(c[rng.integers(0, centres, size=n)], axis=1)
    bits ^= (rng.random(bits.shape) < flip).astype(np.uint8)
    codes = np.packbits(bits, axis=1)
    ndup = int(dup * n)
    if n > 1 and ndup:
        codes[rng.integers(0, n, ndup)] = codes[rng.integers(0, n, ndup)]
    return codes
