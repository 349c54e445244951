"""The shared pair targets and the bit balance term: their maths, on data where the answer is known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta

from hashindex.methods import MethodError
from hashindex.methods.targets import (Calibrated, Cosine, ManifoldRanked, NeighbourSmoothed, bit_balance, pair_agreement,
                                       make_target, manifold_rank, mutual_knn_graph, nearest_neighbours)


def arcs(n=120, gap_degrees=20.0, span_degrees=100.0):
    """Two clusters of unit vectors on arcs of a circle, each ``span`` wide, ``gap`` apart: the ends
    facing each other across the gap are closer (cos 0.94) than the two ends of one arc (cos −0.17)."""
    a = np.linspace(0, span_degrees, n)
    b = np.linspace(span_degrees + gap_degrees, 2 * span_degrees + gap_degrees, n)
    angles = np.radians(np.concatenate([a, b]))
    x = torch.from_numpy(np.stack([np.cos(angles), np.sin(angles)], 1)).float()
    return x, torch.arange(2 * n) >= n


def test_nearest_neighbours_match_brute_force():
    x = torch.randn(300, 16)
    idx, val = nearest_neighbours(x, 7, batch=64)
    sims = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    sims.fill_diagonal_(-2)
    want = sims.topk(7, dim=1)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(val, want.values, atol=1e-6)
    with pytest.raises(MethodError, match="nearest-neighbour graph"):
        nearest_neighbours(x, 300)


def test_mutual_knn_graph_is_symmetric_and_normalised():
    x = torch.randn(200, 8)
    s = mutual_knn_graph(x, 5).to_dense()
    assert torch.allclose(s, s.T)
    assert (s.diagonal() == 0).all()
    # D^-1/2 W D^-1/2 has spectral radius 1: the fixed-point iteration of manifold ranking converges
    assert float(torch.linalg.eigvalsh(s).abs().max()) == pytest.approx(1.0, abs=1e-6)
    idx, _ = nearest_neighbours(x, 5)
    i, j = torch.nonzero(s, as_tuple=True)
    assert all(int(j_) in idx[int(i_)].tolist() and int(i_) in idx[int(j_)].tolist() for i_, j_ in zip(i[:50], j[:50]))


def test_manifold_ranking_is_the_closed_form():
    x = torch.randn(150, 6)
    alpha = 0.9
    s = mutual_knn_graph(x, 6).to_dense()
    want = (1 - alpha) * torch.linalg.solve(torch.eye(150, dtype=torch.float64) - alpha * s,
                                            F.normalize(x.double(), dim=1))
    assert torch.allclose(manifold_rank(x, 6, alpha, iterations=400).double(), want, atol=1e-6)


def test_manifold_ranking_separates_two_clusters_that_cosine_mixes():
    # the arcs' kNN graph has the two arcs as its components; as alpha -> 1 manifold ranking gives
    # every member of a component nearly its component's stationary representation
    x, second = arcs()
    same = second[:, None] == second[None, :]
    raw = Cosine().fit(x)(torch.arange(len(x)))
    assert float(raw[same].min()) < float(raw[~same].max())  # cosine alone mixes them
    ranked = ManifoldRanked(k=5, alpha=0.999).fit(x)(torch.arange(len(x)))
    assert float(ranked[same].min()) > float(ranked[~same].max()) + 0.3
    # with no diffusion the features stay the raw ones, and the clusters stay mixed
    assert torch.allclose(manifold_rank(x, 5, alpha=0.0), F.normalize(x, dim=1))


def test_smoothed_target_averages_each_row_with_its_neighbours():
    x = torch.randn(100, 12)
    target = NeighbourSmoothed(k=4).fit(x)
    idx, _ = nearest_neighbours(x, 4)
    xn = F.normalize(x, dim=1)
    want = F.normalize(xn + xn[idx].sum(1), dim=1)
    assert torch.allclose(target.z_, want, atol=1e-6)
    rows = torch.tensor([3, 7, 11])
    assert torch.allclose(target(rows), want[rows] @ want[rows].T, atol=1e-6)


def test_calibration_maps_pair_values_onto_beta_quantiles():
    torch.manual_seed(0)
    x = torch.rand(400, 32)  # non-negative like pooled CNN features: raw cosines crowd near +0.75
    raw = Cosine().fit(x)
    target = Calibrated("cosine", a=5, b=5).fit(x)
    rows = torch.arange(len(x))
    off = ~torch.eye(len(x), dtype=torch.bool)
    values = target(rows)[off]
    assert float(raw(rows)[off].min()) > 0.3  # the collapse calibration removes
    # the calibrated pairs follow 2·Beta(5,5) − 1: their quantiles match the distribution's
    probs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    got = np.quantile(values.numpy(), probs)
    want = 2 * beta.ppf(probs, 5, 5) - 1
    assert np.abs(got - want).max() < 0.02
    # order is kept: calibration is monotone in the base value
    base = raw(rows)[off]
    order = torch.argsort(base)
    assert (values[order].diff() >= -1e-6).all()
    # the ends of the range map onto the ends of [-1, 1]
    assert float(target.calibrate(torch.tensor([-1.0, 1.0]))[0]) == pytest.approx(-1, abs=1e-6)
    assert float(target.calibrate(torch.tensor([-1.0, 1.0]))[1]) == pytest.approx(1, abs=1e-6)


def test_targets_compose_from_config():
    target = make_target({"name": "calibrated", "base": {"name": "manifold", "k": 5}, "a": 3, "b": 3})
    assert isinstance(target, Calibrated) and isinstance(target.base, ManifoldRanked) and target.base.k == 5
    with pytest.raises(MethodError, match="unknown similarity target 'nope'"):
        make_target("nope")
    with pytest.raises(MethodError, match="'manifold'"):
        make_target({"name": "manifold", "kk": 3})


def test_bit_balance_is_zero_for_balanced_independent_bits_and_not_for_copies():
    from hashindex.methods.ucsh import hadamard
    balanced = hadamard(16)[1:9].T.contiguous()  # 16 codes × 8 bits: each bit half ±1, bits orthogonal
    assert float(bit_balance(balanced)) == pytest.approx(0.0, abs=1e-7)
    copies = balanced[:, :1].repeat(1, 8)  # balanced but every bit the same
    assert float(bit_balance(copies)) == pytest.approx(1.0)
    constant = torch.ones(16, 8)
    assert float(bit_balance(constant)) == pytest.approx(2.0)  # unbalanced and fully correlated
    h = balanced.clone().requires_grad_(True)
    bit_balance(torch.tanh(h)).backward()
    assert torch.isfinite(h.grad).all()
    assert math.isfinite(float(bit_balance(torch.randn(64, 32))))


def test_pair_agreement_is_the_mean_l1_gap_of_code_cosines_over_distinct_pairs():
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    target = torch.tensor([[1.0, 0.5, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    # code cosines: (0, 1): 0, (0, 2): −1, (1, 2): 0; the diagonal is not a pair
    assert float(pair_agreement(h, target)) == pytest.approx((0.5 + 0.0 + 0.0) * 2 / 6)
    assert float(pair_agreement(h, torch.tensor([[9.0, 0, -1], [0, 9, 0], [-1, 0, 9]]))) == pytest.approx(0.0, abs=1e-6)


def test_shared_terms_are_injected_by_weight_and_read_the_configured_target():
    from hashindex.methods import create_method
    x = torch.randn(40, 6)
    off = create_method("ucsh", 8, profile="head-cpu")
    on = create_method("ucsh", 8, profile="head-cpu", similarity={"name": "calibrated"},
                       loss_weights={"pairs": 1.0, "balance": 0.5})
    assert "pairs" not in off.config["loss_weights"] and on.config["loss_weights"]["pairs"] == 1.0
    on.similarity_ = make_target(on.similarity_target).fit(x)
    idx, h = torch.arange(10), torch.randn(10, 8).tanh()
    terms = on.shared_terms(idx, h)
    assert set(terms) == {"pairs", "balance"}
    assert torch.equal(terms["pairs"], pair_agreement(h, on.similarity_(idx)))
    assert off.shared_terms(idx, h) == {}
    with pytest.raises(MethodError, match="unknown loss terms"):
        create_method("ucsh", 8, loss_weights={"pair": 1.0})
