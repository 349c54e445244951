"""Pair similarity targets any method's pairwise term can take in place of raw cosine, and the bit
balance term: one home for each, injected by name the way pytorch-metric-learning injects distances.

A target is fitted once on the training features and then answers ``target(rows_a, rows_b)``: the
``[len(rows_a), len(rows_b)]`` matrix of pair targets in ``[-1, 1]`` between training rows. Targets
compose: ``calibrated`` wraps any other one.

- ``cosine``: ``cos(x_i, x_j)``, what the papers use.
- ``smoothed``: cosine of neighbour-smoothed features, each feature averaged with its ``k`` nearest
  training neighbours (the IMH idea: a neighbourhood is a steadier description than one image).
- ``manifold``: cosine of manifold-ranked features, ``F = (1 − α)(I − αS)⁻¹ X`` over the mutual kNN
  graph of the training set (weights ``cos^power``, symmetric normalisation), computed by the
  fixed-point iteration ``F ← αSF + (1 − α)X`` over a sparse ``S`` (memory O(n k), not O(n²)).
- ``calibrated``: the values of another target re-mapped through their own empirical distribution
  onto the quantiles of Beta(a, b) stretched to ``[-1, 1]`` (SDC's distribution calibration): a pair
  at the q-th quantile of the training pairs gets ``2·Beta⁻¹(q) − 1``, so the targets spread over
  ``[-1, 1]`` instead of collapsing onto the moderately positive cosines most pairs share.

Targets are training-time only: the encoder never sees them, so encoding stays per image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import betaincinv

from .base import MethodError

TARGETS: dict[str, type["SimilarityTarget"]] = {}


def register_target(name: str):
    def wrap(cls):
        cls.name = name
        TARGETS[name] = cls
        return cls
    return wrap


class SimilarityTarget:
    """Pair targets between training rows; :meth:`fit` on the training features first."""

    name = "?"

    def fit(self, x: torch.Tensor) -> "SimilarityTarget":
        self.z_ = F.normalize(self.represent(x.float()), dim=1)
        return self

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """The per-row representation whose cosines are the targets."""
        return x

    def __call__(self, rows_a: torch.Tensor, rows_b: torch.Tensor | None = None) -> torch.Tensor:
        za = self.z_[rows_a]
        return za @ (za if rows_b is None else self.z_[rows_b]).T


@register_target("cosine")
class Cosine(SimilarityTarget):
    """``cos(x_i, x_j)``."""


def nearest_neighbours(x: torch.Tensor, k: int, batch: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` nearest other rows by cosine: (indices ``[n, k]``, cosines ``[n, k]``), in
    blocks of ``batch`` rows so memory stays O(batch · n)."""
    if not 0 < k < len(x):
        raise MethodError(f"need 0 < k < {len(x)} training rows for a {k}-nearest-neighbour graph")
    xn = F.normalize(x.float(), dim=1)
    idx, val = [], []
    for start in range(0, len(xn), batch):
        sims = xn[start:start + batch] @ xn.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -float("inf")
        top = sims.topk(k, dim=1)
        idx.append(top.indices)
        val.append(top.values)
    return torch.cat(idx), torch.cat(val)


@register_target("smoothed")
class NeighbourSmoothed(SimilarityTarget):
    """Cosine of each feature averaged with its ``k`` nearest training neighbours."""

    def __init__(self, k: int = 20):
        self.k = int(k)

    def represent(self, x):
        idx, _ = nearest_neighbours(x, self.k)
        xn = F.normalize(x, dim=1)
        return (xn + xn[idx].sum(1)) / (self.k + 1)


def mutual_knn_graph(x: torch.Tensor, k: int, power: float = 3.0) -> torch.Tensor:
    """The symmetrically normalised mutual kNN graph ``D^{-1/2} W D^{-1/2}`` as a sparse ``[n, n]``
    tensor: ``W_ij = max(cos, 0)^power`` where i and j are each among the other's k nearest."""
    n = len(x)
    idx, val = nearest_neighbours(x, k)
    rows = torch.arange(n).repeat_interleave(k)
    cols = idx.flatten()
    keys = rows * n + cols
    mutual = torch.isin(keys, cols * n + rows)  # j lists i too
    rows, cols = rows[mutual], cols[mutual]
    weights = val.flatten()[mutual].clamp_min(0).double() ** power
    degree = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, weights)
    norm = degree.clamp_min(1e-12).rsqrt()
    weights = norm[rows] * weights * norm[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), weights, (n, n), check_invariants=False).coalesce()


def manifold_rank(x: torch.Tensor, k: int = 10, alpha: float = 0.9, power: float = 3.0,
                  iterations: int | None = None) -> torch.Tensor:
    """``(1 − α)(I − αS)⁻¹ X`` over the mutual kNN graph ``S`` of ``x`` (rows L2-normalised first),
    by the fixed-point iteration, which converges as ``α^t`` (``iterations`` default: until
    ``α^t < 1e-4``). A row with no mutual neighbour keeps its own feature."""
    if not 0.0 <= alpha < 1.0:
        raise MethodError(f"manifold ranking needs 0 <= alpha < 1, got {alpha}")
    s = mutual_knn_graph(x, k, power)
    x0 = F.normalize(x.double(), dim=1)
    steps = iterations if iterations is not None else int(np.ceil(np.log(1e-4) / np.log(alpha))) if alpha > 0 else 0
    f = x0
    for _ in range(steps):
        f = alpha * torch.sparse.mm(s, f) + (1 - alpha) * x0
    return f.float()


@register_target("manifold")
class ManifoldRanked(SimilarityTarget):
    """Cosine of manifold-ranked features over the training set's mutual kNN graph."""

    def __init__(self, k: int = 10, alpha: float = 0.9, power: float = 3.0):
        self.k, self.alpha, self.power = int(k), float(alpha), float(power)

    def represent(self, x):
        return manifold_rank(x, self.k, self.alpha, self.power)


@register_target("calibrated")
class Calibrated(SimilarityTarget):
    """Another target's values mapped onto Beta(a, b) quantiles in ``[-1, 1]`` (SDC)."""

    def __init__(self, base: "SimilarityTarget | str | dict" = "cosine", a: float = 5.0, b: float = 5.0,
                 sample_pairs: int = 200_000, seed: int = 0, table: int = 1001):
        self.base = make_target(base)
        self.a, self.b = float(a), float(b)
        self.sample_pairs, self.seed, self.table = int(sample_pairs), int(seed), int(table)

    def fit(self, x):
        self.base.fit(x)
        n = len(x)
        g = torch.Generator().manual_seed(self.seed)
        i = torch.randint(n, (self.sample_pairs,), generator=g)
        j = torch.randint(n - 1, (self.sample_pairs,), generator=g)
        j = j + (j >= i)  # distinct pairs only: self-similarity is not part of the distribution
        # in blocks: gathering all sampled rows at once would hold 2 × pairs × d floats (2 GB at d = 1,280)
        z = self.base.z_
        values = torch.cat([(z[i[s:s + 8192]] * z[j[s:s + 8192]]).sum(1) for s in range(0, len(i), 8192)])
        q = torch.linspace(0, 1, self.table, dtype=torch.float64)
        # the empirical quantile function of the base values, and the Beta quantiles it maps onto
        self.knots_ = torch.quantile(values.double(), q).float()
        self.levels_ = torch.from_numpy(2 * betaincinv(self.a, self.b, q.numpy()) - 1).float()
        return self

    def calibrate(self, values: torch.Tensor) -> torch.Tensor:
        """Map base values onto the Beta quantiles, piecewise linearly between the table's knots."""
        knots, levels = self.knots_.to(values.device), self.levels_.to(values.device)
        pos = torch.searchsorted(knots, values.contiguous()).clamp(1, len(knots) - 1)
        lo, hi = knots[pos - 1], knots[pos]
        frac = ((values - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        return levels[pos - 1] + frac * (levels[pos] - levels[pos - 1])

    def __call__(self, rows_a, rows_b=None):
        return self.calibrate(self.base(rows_a, rows_b))


def make_target(spec: "SimilarityTarget | str | dict") -> SimilarityTarget:
    """A target from its config form: a name (``"manifold"``), or ``{"name": …, **kwargs}`` where a
    ``calibrated`` target's ``base`` is itself such a form."""
    if isinstance(spec, SimilarityTarget):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TARGETS:
        raise MethodError(f"unknown similarity target {name!r}; available: {', '.join(sorted(TARGETS))}")
    try:
        return TARGETS[name](**spec)
    except TypeError as exc:
        raise MethodError(f"similarity target {name!r}: {exc}") from None


# ----------------------------------------------------------------------------- bit balance
def bit_balance(h: torch.Tensor) -> torch.Tensor:
    """Bit balance and decorrelation of a batch of relaxed codes ``h`` ``[B, k]``: the squared mean of
    each bit (0 when half the batch is +1) plus the squared off-diagonal correlations ``hᵀh / B``
    (0 when bits are independent), both averaged over bits. Bits that copy each other, a common
    failure of pairwise losses with −1 targets, carry no extra information."""
    b, k = h.shape
    balance = h.mean(0).pow(2).mean()
    corr = h.T @ h / b
    decorrelation = (corr - torch.diag(torch.diagonal(corr))).pow(2).sum() / (k * (k - 1))
    return balance + decorrelation


def pair_agreement(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the cosines of the relaxed codes ``h`` ``[B, k]`` and the pair
    targets ``target`` ``[B, B]`` over pairs ``i != j`` (SDC's L1 fit: robust to the few pairs a
    target gets wrong, where a squared error lets them dominate)."""
    hn = F.normalize(h, dim=1)
    off = ~torch.eye(len(h), dtype=torch.bool, device=h.device)
    return ((hn @ hn.T - target)[off]).abs().mean()


# ----------------------------------------------------------------------------- augmented views
def view_contrast(codes: torch.Tensor, view_codes: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """NT-Xent between the relaxed codes of ``B`` images and those of one augmented view of each
    (CIBHash, τ = 0.3): each of the ``2B`` codes must pick its partner out of the other ``2B − 1`` by
    cosine / τ. Low when a view keeps its image's code and other images' codes differ from it."""
    n = len(codes)
    both = F.normalize(torch.cat([codes, view_codes]), dim=1)
    logits = both @ both.T / float(temperature)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=codes.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(codes.device)
    return F.cross_entropy(logits, partner)
