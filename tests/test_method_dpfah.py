"""DPFAH: the SimAM module and the head-mode trainer on real features (finetune mode: test_finetune)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import MethodError, create_method
from hashindex.methods.dpfah import SimAM

FAST = {"profile": "head-cpu", "epochs": 20}


# ----------------------------------------------------------------------------- SimAM and the network
def test_simam_matches_formula_and_has_no_parameters():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    lam = 1e-4
    mu = x.mean(axis=(2, 3), keepdims=True)
    d = (x - mu) ** 2
    v = d.sum(axis=(2, 3), keepdims=True) / (4 * 5 - 1)
    expected = x / (1 + np.exp(-(d / (4 * (v + lam)) + 0.5)))
    got = SimAM(lam)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert sum(p.numel() for p in SimAM().parameters()) == 0


# ----------------------------------------------------------------------------- head mode
@pytest.fixture(scope="module")
def trained(fmnist_features):
    data = fmnist_features
    method = create_method("dpfah", 32, **FAST)
    head = method.fit(data["train"], data["train_labels"])
    return method, head


def test_trains_and_beats_baselines(trained, fmnist_features):
    method, head = trained
    data = fmnist_features
    losses = [h["loss"] for h in method.history_]
    assert losses[-1] < 0.7 * losses[0]
    assert set(method.history_[0]) == {"loss", "pairwise", "quantization", "classwise"}
    ours = held_out_map(head, data)
    lsh = held_out_map(create_method("lsh", 32).fit(data["train"]), data)
    itq = held_out_map(create_method("itq", 32).fit(data["train"]), data)
    assert ours > lsh + 0.2, (ours, lsh)
    assert ours > itq + 0.05, (ours, itq)


def test_encoder_round_trip_and_batch_independence(trained, fmnist_features):
    _, head = trained
    q = fmnist_features["query"]
    enc = Encoder(method="dpfah", bits=32, backbone=BackboneSpec(), head=head)
    loaded = Encoder.from_bytes(enc.to_bytes())
    codes = enc.encode_features(q)
    assert codes.shape == (len(q), 4)
    np.testing.assert_array_equal(loaded.encode_features(q), codes)
    assert loaded.id == enc.id
    alone = np.concatenate([enc.encode_features(q[i:i + 1]) for i in range(len(q))])
    np.testing.assert_array_equal(alone, codes)


def test_same_seed_same_codes_and_loss_switch(fmnist_features):
    data = fmnist_features
    x, y = data["train"][:300], data["train_labels"][:300]
    short = {"profile": "head-cpu", "epochs": 3}
    a = create_method("dpfah", 16, seed=3, **short)
    b = create_method("dpfah", 16, seed=3, **short)
    enc = [Encoder(method="dpfah", bits=16, backbone=BackboneSpec(), head=m.fit(x, y)) for m in (a, b)]
    np.testing.assert_array_equal(enc[0].encode_features(data["query"]), enc[1].encode_features(data["query"]))
    off = create_method("dpfah", 16, seed=3, loss_weights={"quantization": 0.0}, **short)
    off.fit(x, y)
    assert off.history_[0]["loss"] != a.history_[0]["loss"]
    assert off.config["loss_weights"] == {"pairwise": 1.0, "quantization": 0.0, "classwise": 0.1}
    with pytest.raises(MethodError, match="unknown loss terms"):
        create_method("dpfah", 16, loss_weights={"pairwise_typo": 1.0})


def test_needs_labels(fmnist_features):
    with pytest.raises(MethodError, match="supervised.*no labels"):
        create_method("dpfah", 16, epochs=1).fit(fmnist_features["train"])
    with pytest.raises(MethodError, match="labels for"):
        create_method("dpfah", 16, epochs=1).fit(fmnist_features["train"], fmnist_features["train_labels"][:10])


def test_multi_hot_labels(fmnist_features):
    data = fmnist_features
    multi = np.eye(10, dtype=np.int64)[data["train_labels"]]
    method = create_method("dpfah", 32, profile="head-cpu", epochs=10)
    head = method.fit(data["train"], multi)
    assert method.classifier_.out_features == 10
    q_multi = np.eye(10, dtype=np.int64)[data["query_labels"]]
    score = held_out_map(head, {**data, "train_labels": multi, "query_labels": q_multi})
    itq = held_out_map(create_method("itq", 32).fit(data["train"]), data)
    assert score > itq, (score, itq)
