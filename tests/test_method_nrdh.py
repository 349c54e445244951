"""NRDH on real EfficientNet-Lite0 features of Fashion-MNIST (head mode, short schedules)."""
import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import create_method
from hashindex.methods.nrdh import reweighted_correlation

SHORT = {"node_epochs": 4, "epochs": 8, "graphs_per_step": 16}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("nrdh", 32, profile="head-cpu", **SHORT)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_correlation_reweighting():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    u = reweighted_correlation(x, rho=0.4, p=0.8)[0]
    assert torch.allclose(u[0], torch.tensor([0.8, 0.2, 0.0]))
    assert torch.allclose(u[2], torch.tensor([0.0, 0.0, 1.0]))  # isolated node keeps all its weight


def test_trains_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    assert method.node_history_[-1]["loss"] < method.node_history_[0]["loss"]
    assert method.history_[-1]["loss"] < method.history_[0]["loss"]
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features)


def test_node_representations_recorded(trained, fmnist_features):
    method, _ = trained
    assert method.node_representations_.shape == (len(fmnist_features["train"]), 32)
    assert np.array_equal(method.training_arrays()["node_representations"], method.node_representations_)


def test_round_trip_and_independence(trained, fmnist_features):
    _, head = trained
    enc = Encoder(method="nrdh", bits=32, backbone=BackboneSpec("efficientnet-lite0", 64), head=head)
    back = Encoder.from_bytes(enc.to_bytes())
    q = fmnist_features["query"]
    batch = enc.encode_features(q)
    assert np.array_equal(batch, back.encode_features(q))
    assert np.array_equal(enc.encode_features(q[3:4]), batch[3:4])


def test_switch_and_seed(fmnist_features):
    x = fmnist_features["train"][:300]
    quick = {"node_epochs": 1, "epochs": 2, "graphs_per_step": 16}
    a = create_method("nrdh", 16, profile="head-cpu", **quick)
    a.fit(x)
    b = create_method("nrdh", 16, profile="head-cpu", **quick)
    b.fit(x)
    assert np.array_equal(a.node_representations_, b.node_representations_)
    codes = [Encoder(method="nrdh", bits=16, backbone=BackboneSpec(), head=m.head_).encode_features(x) for m in (a, b)]
    assert np.array_equal(*codes)
    off = create_method("nrdh", 16, profile="head-cpu", loss_weights={"quantization": 0.0}, **quick)
    off.fit(x)
    assert off.history_[0]["loss"] != a.history_[0]["loss"]


def test_paper_profile_random_graphs(fmnist_features):
    method = create_method("nrdh", 16, node_epochs=1, epochs=1)
    method.fit(fmnist_features["train"][:200])
    assert method.node_representations_.shape == (200, 16)
