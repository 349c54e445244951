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
    method = create_method("nrdh", 16, profile="paper", node_epochs=1, epochs=1)
    method.fit(fmnist_features["train"][:200])
    assert method.node_representations_.shape == (200, 16)


# -- issue #13: what each stage learns ----------------------------------------------------------
def _reconstruction_error(method, x, graphs):
    """Mean ‖X − X̂‖² per node of the fitted stage-1 auto-encoder over the graphs ``graphs`` of ``x``."""
    nodes = torch.from_numpy(x)[graphs]
    with torch.no_grad():
        _, recon = method.node_autoencoder_(reweighted_correlation(nodes, method.rho, method.p), nodes)
    return float(((recon - nodes) ** 2).sum(2).mean())


STAGE1 = {"node_epochs": 2}  # the paper profile: random 10-node graphs, one graph a step


@pytest.fixture(scope="module")
def stage1_only(fmnist_features):
    """Stage 1 trained on 300 training features, stage 2 not at all (0 epochs)."""
    method = create_method("nrdh", 32, profile="paper", epochs=0, **STAGE1)
    method.fit(fmnist_features["train"][:300])
    return method


def test_stage1_autoencoder_learns_to_reconstruct_through_the_graphs(stage1_only, fmnist_features):
    x, held_out = fmnist_features["train"][:300], fmnist_features["query"]
    # same seed: the untrained auto-encoder is the one stage 1 started from
    untrained = create_method("nrdh", 32, profile="paper", node_epochs=0, epochs=0)
    untrained.fit(x)
    trained = stage1_only
    terms = [epoch["reconstruction"] for epoch in trained.node_history_]
    assert terms[-1] < terms[0]
    for rows in (x, held_out):  # the training graphs and graphs of images it never saw
        graphs = trained._random_graphs(len(rows), torch.Generator().manual_seed(7))
        before = _reconstruction_error(untrained, rows, graphs)
        after = _reconstruction_error(trained, rows, graphs)
        # predicting every node as the mean training feature: what an auto-encoder that ignores its
        # input would get at best
        mean_only = float(((rows - x.mean(0)) ** 2).sum(1).mean())
        assert after < 0.6 * before, (after, before)
        assert after < 0.95 * mean_only, (after, mean_only)


def _per_dimension_correlation(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return float(((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-12)).mean())


def test_stage2_fc_output_approaches_the_node_representations(stage1_only, fmnist_features):
    x = fmnist_features["train"][:300]
    start = stage1_only  # the hash network as stage 2 begins
    fitted = create_method("nrdh", 32, profile="paper", epochs=4, **STAGE1)
    fitted.fit(x)
    # same seed and stage-1 settings: the same targets
    np.testing.assert_array_equal(start.node_representations_, fitted.node_representations_)
    g = torch.from_numpy(fitted.node_representations_)
    shuffled = g[torch.randperm(len(g), generator=torch.Generator().manual_seed(0))]

    def fc(method):  # the hash network before its tanh, as at encoding time
        with torch.no_grad():
            return method.head_.eval().net[:-1](torch.from_numpy(x))

    mse_start = float(((fc(start) - g) ** 2).mean())
    mse_fitted = float(((fc(fitted) - g) ** 2).mean())
    assert fitted.history_[-1]["fit"] < fitted.history_[0]["fit"]
    assert mse_fitted < 0.9 * mse_start, (mse_fitted, mse_start)
    # it fits each image's own representation, not just their distribution. (The MSE also holds each
    # dimension's mean offset of g, which the final BN's shift learns at most lr a step; the
    # correlation below leaves offsets and scales out.)
    assert mse_fitted < 0.9 * float(((fc(fitted) - shuffled) ** 2).mean())
    assert _per_dimension_correlation(fc(start), g) < 0.2
    assert _per_dimension_correlation(fc(fitted), g) > 0.6
