"""UCSH on real Fashion-MNIST backbone features: it learns, beats LSH, and its encoder is a clean artifact."""
import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import create_method
from hashindex.methods.ucsh import UCSH, hadamard, hadamard_targets, kmeans, left_half_gaussian_threshold

QUICK = {"profile": "head-cpu"}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("ucsh", 32, epochs=8, **QUICK)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_loss_goes_down_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    losses = [epoch["loss"] for epoch in method.history_]
    assert losses[-1] < losses[0]
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features) + 0.03


def test_encoder_round_trip_and_batch_independence(trained, fmnist_features):
    _, head = trained
    encoder = Encoder(method="ucsh", bits=32, backbone=BackboneSpec(), head=head)
    loaded = Encoder.from_bytes(encoder.to_bytes())
    queries = fmnist_features["query"]
    codes = encoder.encode_features(queries)
    assert codes.shape == (len(queries), 4)
    np.testing.assert_array_equal(loaded.encode_features(queries), codes)
    alone = np.concatenate([encoder.encode_features(queries[i:i + 1]) for i in range(len(queries))])
    np.testing.assert_array_equal(alone, codes)


def test_hadamard_targets_are_orthogonal_columns():
    h = hadamard(16)
    assert torch.equal(h @ h.T, 16 * torch.eye(16))
    targets = hadamard_targets(10, 32)  # order 32 ≥ max(10, 32)
    assert targets.shape == (10, 32)
    assert torch.equal(targets @ targets.T, 32 * torch.eye(10))
    assert torch.equal(hadamard_targets(10, 8), hadamard(16)[:8, :10].T)


def test_kmeans_and_threshold_helpers():
    rng = np.random.default_rng(0)
    blobs = torch.from_numpy(np.concatenate([rng.normal(c, 0.1, (50, 2)) for c in (0.0, 5.0)])).float()
    _, assignment = kmeans(blobs, 2, iterations=10, generator=torch.Generator().manual_seed(0))
    assert len(set(assignment[:50].tolist())) == 1 and len(set(assignment[50:].tolist())) == 1
    assert assignment[0] != assignment[50]
    distances = torch.from_numpy(np.abs(rng.normal(0.0, 1.0, 20000))) + 0.5
    # peak near 0.5, left side is empty: the threshold sits at the peak
    assert left_half_gaussian_threshold(distances) == pytest.approx(0.5, abs=0.1)


@pytest.fixture(scope="module")
def small(fmnist_features):
    return fmnist_features["train"][:300]


def test_same_seed_same_codes_and_each_term_switches_off(small):
    def run(**params):
        method = create_method("ucsh", 16, epochs=1, seed=5, **{**QUICK, **params})
        head = method.fit(small)
        with torch.inference_mode():
            return method, head(torch.from_numpy(small)).numpy() >= 0

    full, codes_a = run()
    _, codes_b = run()
    np.testing.assert_array_equal(codes_a, codes_b)
    for term in UCSH.loss_names:
        off, _ = run(loss_weights={term: 0})
        assert off.history_[0]["loss"] != full.history_[0]["loss"], term
