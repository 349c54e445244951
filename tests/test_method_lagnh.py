"""LAGNH on real EfficientNet-Lite0 features of Fashion-MNIST (head mode, short schedules)."""
import numpy as np
import pytest

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import create_method

SHORT = {"epochs": 10, "batch_size": 256, "anchors": 500}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("lagnh", 32, profile="head-cpu", **SHORT)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_trains_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    assert method.history_[-1]["loss"] < method.history_[0]["loss"]
    assert method.tags_.shape == (1000, 1000) and (method.tags_.sum(1) >= 1).all()
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features)


def test_round_trip_and_independence(trained, fmnist_features):
    _, head = trained
    enc = Encoder(method="lagnh", bits=32, backbone=BackboneSpec("efficientnet-lite0", 64), head=head)
    back = Encoder.from_bytes(enc.to_bytes())
    assert set(back.head.kwargs) >= {"anchors", "neighbours"} and back.head.anchor_features.shape[0] == 500
    q = fmnist_features["query"]
    batch = enc.encode_features(q)
    assert np.array_equal(batch, back.encode_features(q))
    for i in (0, 7):
        assert np.array_equal(enc.encode_features(q[i:i + 1]), batch[i:i + 1])


def test_switch_seed_tags_and_fusion(fmnist_features):
    x = fmnist_features["train"][:256]
    quick = {"epochs": 2, "batch_size": 128, "anchors": 100, "critic_every": 1}
    a = create_method("lagnh", 16, profile="head-cpu", **quick)
    a.fit(x)
    b = create_method("lagnh", 16, profile="head-cpu", **quick)
    b.fit(x)
    enc = [Encoder(method="lagnh", bits=16, backbone=BackboneSpec(), head=m.head_) for m in (a, b)]
    assert np.array_equal(enc[0].encode_features(x), enc[1].encode_features(x))
    off = create_method("lagnh", 16, profile="head-cpu", loss_weights={"semantic": 0.0}, **quick)
    off.fit(x)
    assert off.history_[0]["loss"] != a.history_[0]["loss"]

    tags = np.zeros((len(x), 20), np.uint8)
    tags[np.arange(len(x)), np.arange(len(x)) % 20] = 1
    tagged = create_method("lagnh", 16, profile="head-cpu", **quick)
    head = tagged.fit(x, tags=tags)
    assert not head.predict_tags and head.concept_embedding.shape == (20, 512)
    assert Encoder(method="lagnh", bits=16, backbone=BackboneSpec(), head=head).encode_features(x[:5]).shape == (5, 2)

    semantic_only = create_method("lagnh", 16, profile="head-cpu", fusion=0.0, **quick)
    semantic_only.fit(x)
    assert np.isfinite(semantic_only.history_[-1]["loss"]) and np.isfinite(a.history_[-1]["loss"])
