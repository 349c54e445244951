"""The neighbourhood embedding (methods/neighbourhood.py): one rule for training and encoding, carried
in the encoder file, per image, and worth its cost over the raw features."""
import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import create_method
from hashindex.methods.base import MethodError
from hashindex.methods.neighbourhood import NeighbourhoodEmbedding, embed
from hashindex.methods.targets import manifold_rank


def test_embedding_is_the_mean_of_the_nearest_anchors_diffused_features():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((60, 8)).astype(np.float32))
    nb = NeighbourhoodEmbedding(k=4, graph_k=5, alpha=0.9).fit(x)
    ranked = manifold_rank(x, 5, 0.9).float()
    scale = nb.diffused_.norm() / ranked.norm()
    assert torch.allclose(nb.diffused_, scale * ranked, atol=1e-5)
    # scaled to the raw features' mean norm
    assert torch.isclose(nb.transform(x).norm(dim=1).mean(), x.norm(dim=1).mean(), rtol=1e-4)
    q = torch.from_numpy(rng.standard_normal((7, 8)).astype(np.float32))
    xn, qn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(q, dim=1)
    nearest = np.argsort(-(qn @ xn.T).numpy(), axis=1)[:, :4]  # brute force
    expected = nb.diffused_.numpy()[nearest].mean(1)
    assert np.allclose(nb.transform(q).numpy(), expected, atol=1e-6)
    # a training row's nearest anchor is itself
    assert np.allclose(nb.transform(x[:3]).numpy()[:, None], nb.transform(x)[:3, None].numpy())


def test_anchors_are_capped_by_a_seeded_sample():
    x = torch.randn(300, 6)
    a = NeighbourhoodEmbedding(k=3, graph_k=3, max_anchors=100, seed=1).fit(x)
    b = NeighbourhoodEmbedding(k=3, graph_k=3, max_anchors=100, seed=1).fit(x)
    assert a.anchors_.shape == (100, 6) and torch.equal(a.anchors_, b.anchors_)


@pytest.fixture(scope="module")
def itq_pair(fmnist_features):
    raw = create_method("itq", 32).fit(fmnist_features["train"])
    hasher = create_method("itq", 32, neighbourhood=True)
    smoothed = hasher.fit(fmnist_features["train"])
    return raw, smoothed, hasher


def test_itq_on_the_neighbourhood_embedding_beats_raw_itq(fmnist_features, itq_pair):
    raw, smoothed, _ = itq_pair
    raw_map, smoothed_map = held_out_map(raw, fmnist_features), held_out_map(smoothed, fmnist_features)
    # measured 0.521 -> 0.554 here; manifold ranking switched off (alpha 0) or a wrong anchor lookup loses it
    assert smoothed_map > raw_map + 0.03, (raw_map, smoothed_map)


def test_encoder_carries_the_anchors_and_codes_are_per_image(fmnist_features, itq_pair, tmp_path):
    _, head, hasher = itq_pair
    enc = Encoder(method="itq", bits=32, backbone=BackboneSpec("efficientnet-lite0", 64), head=head,
                  training={"params": hasher.params()})
    loaded = Encoder.load(enc.save(tmp_path / "nb.encoder"))
    features = fmnist_features["features"]
    batch = loaded.encode_features(features)
    assert (batch == enc.encode_features(features)).all()
    alone = np.concatenate([loaded.encode_features(features[i:i + 1]) for i in range(0, 1200, 37)])
    assert (alone == batch[::37]).all()
    # a training image encoded alone gets the code its training input gave
    with torch.inference_mode():
        trained = head.inner(hasher.neighbourhood_.transform(torch.from_numpy(features[:1000])))
    assert ((trained.numpy() >= 0) == np.unpackbits(batch[:1000], axis=1).astype(bool)).mean() == 1.0


def test_bad_neighbourhood_settings_are_named():
    with pytest.raises(MethodError, match="neighbourhood: unknown settings \\['kk'\\]"):
        create_method("itq", 32, neighbourhood={"kk": 3})
    with pytest.raises(MethodError, match="neighbourhood"):
        create_method("uhga", 32, neighbourhood="yes")
    with pytest.raises(MethodError, match="more than 20 training rows"):  # graph_k's default
        create_method("itq", 8, neighbourhood=True).fit(np.random.default_rng(0).standard_normal((19, 8)))
