"""UHGA on real Fashion-MNIST backbone features: it learns, beats LSH, and its encoder is a clean artifact."""
import numpy as np
import pytest
import torch

from conftest import held_out_map
from hashindex.backbones import BackboneSpec
from hashindex.encoder import Encoder
from hashindex.methods import create_method
from hashindex.methods.uhga import distance_statistics

# small batches keep the per-pair × per-bit attention network cheap on CPU
QUICK = {"profile": "head-cpu", "batch_size": 32}


@pytest.fixture(scope="module")
def trained(fmnist_features):
    method = create_method("uhga", 32, epochs=4, **QUICK)
    head = method.fit(fmnist_features["train"])
    return method, head


def test_loss_goes_down_and_beats_lsh(trained, fmnist_features):
    method, head = trained
    losses = [epoch["loss"] for epoch in method.history_]
    assert losses[-1] < 0.5 * losses[0]
    lsh = create_method("lsh", 32).fit(fmnist_features["train"])
    assert held_out_map(head, fmnist_features) > held_out_map(lsh, fmnist_features) + 0.03


def test_encoder_round_trip_and_batch_independence(trained, fmnist_features):
    _, head = trained
    encoder = Encoder(method="uhga", bits=32, backbone=BackboneSpec(), head=head)
    loaded = Encoder.from_bytes(encoder.to_bytes())
    queries = fmnist_features["query"]
    codes = encoder.encode_features(queries)
    assert codes.shape == (len(queries), 4)
    np.testing.assert_array_equal(loaded.encode_features(queries), codes)
    alone = np.concatenate([encoder.encode_features(queries[i:i + 1]) for i in range(len(queries))])
    np.testing.assert_array_equal(alone, codes)


def test_similarity_thresholds_exclude_the_diagonal():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mean, low, high = distance_statistics(x, chunk_rows=2)
    d = 1 - np.array([[1, 0, 0.5 ** 0.5], [0, 1, 0.5 ** 0.5], [0.5 ** 0.5, 0.5 ** 0.5, 1]])
    off = d[~np.eye(3, dtype=bool)]
    assert mean == pytest.approx(off.mean()) and low == pytest.approx(off.min()) and high == pytest.approx(off.max())


@pytest.fixture(scope="module")
def small(fmnist_features):
    return fmnist_features["train"][:256]


def test_plain_loss_ablation_trains(small):
    # gradient_attention false: the paper's "Ours" row; true is covered by the module fixture
    method = create_method("uhga", 16, epochs=3, gradient_attention=False, **QUICK)
    method.fit(small)
    assert method.history_[-1]["loss"] < method.history_[0]["loss"]
    attended = create_method("uhga", 16, epochs=3, **QUICK)
    attended.fit(small)
    assert attended.history_[-1]["loss"] < attended.history_[0]["loss"]
    assert "pairwise_after_step" in attended.history_[0]


def test_same_seed_same_codes_and_switching_off_the_loss(small):
    def codes(**params):
        method = create_method("uhga", 16, epochs=1, seed=3, **{**QUICK, **params})
        head = method.fit(small)
        with torch.inference_mode():
            return method, head(torch.from_numpy(small)).numpy() >= 0

    first, codes_a = codes()
    _, codes_b = codes()
    np.testing.assert_array_equal(codes_a, codes_b)
    off, _ = codes(loss_weights={"pairwise": 0})
    assert off.history_[0]["loss"] == 0.0 != first.history_[0]["loss"]


def test_even_attention_gives_half_of_each_pair_gradient():
    # ξ = ½ on both codes of every pair (Eq. 16–17 with y = 0): the attended derivative is half the
    # plain one for the pair terms, while a code's pair with itself keeps its full derivative
    from hashindex.methods.uhga import GradientAttention
    torch.manual_seed(0)
    method = create_method("uhga", 8)
    method.attention_ = GradientAttention()
    for p in method.attention_.parameters():
        torch.nn.init.zeros_(p)
    h = torch.randn(6, 8).tanh().requires_grad_()
    weight = (torch.rand(6, 6) > 0.3).float()
    weight = torch.maximum(weight, weight.T)
    target = torch.sign(torch.randn(6, 6))
    target = torch.triu(target) + torch.triu(target, 1).T
    plain, = torch.autograd.grad(method.pairwise_loss(h, weight, target), h)
    n, k = h.shape
    self_pair = 4 / (n * n * k) * torch.diagonal(weight * (h @ h.T / k - target))[:, None] * h
    attended = method.attended_code_gradient(h.detach(), weight, target)
    torch.testing.assert_close(attended - self_pair, 0.5 * (plain - self_pair))
