"""UCSH: unsupervised cluster-and-separate hashing (seed 004).

Head mode: a trainable adapter (``d → d``, ReLU, initialised to the identity so training starts from
the backbone's own similarities, as the paper starts from pre-trained fc7) stands in for the
fine-tuned fc7 features ``x``. On top, a binary latent VAE: encoder logits → Bernoulli ``q(b|x)``,
``b ∈ {−1, +1}^k`` by the straight-through estimator, a decoder reconstructing ``x``. Losses:
``L = L_2 + α L_V + β L_C + γ L_S`` (Eq. 7) with the pairwise fit to ``S = 1 − 2d`` (Eq. 3), the VAE
terms (Eq. 1, split into ``reconstruction`` and ``kl``, both weighted α), the Hadamard cluster
targets from K-means every epoch (Eq. 5) and the similarity-separating loss whose threshold comes
from a left half-Gaussian fitted to the distances every epoch (Eq. 6).

The encoder head is one :class:`MLPHead` (adapter + encoder layer) whose outputs are the logits:
``b = +1 ⇔ q(b=+1|x) ≥ ½ ⇔ logit ≥ 0``. The decoder is a training-time module only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MethodError, register_method
from .common import MLPHead, cosine_distance, off_diagonal
from .deep import DeepHashMethod


def hadamard(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix (Eq. 4); ``order`` a power of two."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {order}")
    h = torch.ones(1, 1)
    while len(h) < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_targets(n_clusters: int, bits: int) -> torch.Tensor:
    """Row c = cluster c's target: the first ``bits`` entries of column c of ``H`` of order
    ``2^m ≥ max(n_clusters, bits)``; ``[n_clusters, bits]``."""
    order = 1 << math.ceil(math.log2(max(n_clusters, bits)))
    return hadamard(order)[:bits, :n_clusters].T.contiguous()


def kmeans(x: torch.Tensor, n_clusters: int, *, iterations: int, generator: torch.Generator,
           centers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's K-means, seeded k-means++ start unless ``centers`` are given; returns (centers, assignment).
    An emptied cluster keeps its previous center."""
    x = x.double()
    if centers is None:
        first = int(torch.randint(len(x), (1,), generator=generator))
        chosen = [x[first]]
        nearest = ((x - chosen[0]) ** 2).sum(1)
        for _ in range(1, n_clusters):
            probs = (nearest / nearest.sum()).cpu() if nearest.sum() > 0 else torch.ones(len(x)) / len(x)
            pick = int(torch.multinomial(probs, 1, generator=generator))
            chosen.append(x[pick])
            nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
        centers = torch.stack(chosen)
    centers = centers.double().clone()
    assignment = torch.cdist(x, centers).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centers).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=n_clusters).to(x.dtype)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
        updated = torch.cdist(x, centers).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return centers.float(), assignment


def left_half_gaussian_threshold(distances: torch.Tensor, bins: int = 100, width: float = 2.0) -> float:
    """SSDH's estimate: the distances left of the histogram's peak ``m₁`` are a half Gaussian with
    deviation ``σ₁``; pairs closer than ``m₁ − width·σ₁`` count as similar."""
    d = distances.double()
    low, high = float(d.min()), float(d.max())
    counts = torch.histc(d, bins=bins, min=low, max=high)
    peak = low + (int(counts.argmax()) + 0.5) * (high - low) / bins
    left = d[d < peak]
    sigma = float(((left - peak) ** 2).mean().sqrt()) if len(left) else 0.0
    return peak - width * sigma


@register_method("ucsh")
class UCSH(DeepHashMethod):
    """Unsupervised Cluster and Separate Hashing.

    Parameters (config profile keys, overridable as keyword arguments)
    ----------
    n_clusters : int or "auto"
        N, centroids of the per-epoch K-means. "auto" (the profiles' default): the paper's N = 30 for
        a multi-label source and 10 otherwise, told apart by the training labels passed to ``fit``:
        multi-hot (2-D) labels mean multi-label, 1-D labels or none mean 10. The labels are read for
        their shape only, never as supervision: the codes are the same whatever their values are.
        An integer overrides. The value used is ``n_clusters_`` after ``fit``.
    kmeans_iterations : int
        Lloyd iterations per epoch; from the second epoch K-means starts from the previous centroids,
        so cluster c keeps its Hadamard target from epoch to epoch.
    threshold_pairs_rows : int
        Rows (sampled, seeded) whose distances to all training rows estimate the half Gaussian.
    decoder_hidden : int
        Decoder ``k → hidden → d`` (ReLU).
    stochastic_codes : bool
        Sample ``b`` from ``q(b|x)`` in training (the VAE); false = ``b = sign(logits)``. Gradients
        pass straight through to ``2q − 1`` either way.
    similarity_grad : bool
        Let ``L_2`` back-propagate into the adapter through ``S`` (end to end, as the paper).
    lr_decay_every, lr_decay : int, float
        Step decay of the learning rate (the paper: "step-decayed"; the steps are our choice): every
        parameter group's own initial rate times ``lr_decay ** (epoch // lr_decay_every)``, as
        torch's ``StepLR``, so in finetune mode the backbone keeps its ``backbone_lr_factor``.
        0 = no decay.
    """

    loss_names = ("pairwise", "reconstruction", "kl", "cluster", "separate")

    # -- setup ---------------------------------------------------------------------------------
    def resolve_n_clusters(self, y: torch.Tensor | None) -> int:
        """N: the configured integer, or for "auto" 30 when ``y`` is multi-hot (2-D), else 10. Only
        ``y``'s number of dimensions is read."""
        n = self.n_clusters
        if n == "auto":
            return 30 if y is not None and y.ndim == 2 else 10
        whole = isinstance(n, int) or (isinstance(n, float) and n.is_integer())
        if isinstance(n, bool) or not whole or n < 1:
            raise MethodError(f"ucsh: n_clusters must be a positive integer or 'auto', got {n!r}")
        return int(n)

    def params(self) -> dict:
        # the training record names the N that "auto" resolved to
        used = getattr(self, "n_clusters_", None)
        return {**super().params(), **({} if used is None else {"n_clusters_used": used})}

    def build(self, x, y):
        d = x.shape[1]
        head = MLPHead([["linear", d, d], ["relu"], ["linear", d, self.bits]])
        with torch.no_grad():
            head.net[0].weight.copy_(torch.eye(d))
            head.net[0].bias.zero_()
        hidden = int(self.decoder_hidden)
        self.decoder_ = nn.Sequential(nn.Linear(self.bits, hidden), nn.ReLU(), nn.Linear(hidden, d)).to(x.device)
        self.n_clusters_ = self.resolve_n_clusters(y)
        self.targets_ = hadamard_targets(self.n_clusters_, self.bits).to(x.device)
        self.centers_ = None
        self.cluster_generator_ = torch.Generator().manual_seed(self.seed)
        return head

    def parameters_to_train(self):
        return list(self.head_.parameters()) + list(self.decoder_.parameters())

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_.net[:2](x.float())

    def on_epoch_start(self, epoch, x, y):
        every = int(self.config.get("lr_decay_every") or 0)
        if every:
            # StepLR's rule on each group's own initial rate (StepLR's key: "initial_lr")
            for group in self.optimizer_.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * float(self.lr_decay) ** (epoch // every)
        with torch.no_grad():
            x = self.current_features()  # the paper clusters the features of the network being trained
            features = torch.cat([self.adapt(x[i:i + 2048]) for i in range(0, len(x), 2048)])
            self.centers_, assignment = kmeans(features, self.n_clusters_,
                                               iterations=int(self.kmeans_iterations),
                                               generator=self.cluster_generator_, centers=self.centers_)
            self.cluster_of_ = assignment.to(x.device)
            rows = torch.randperm(len(x), generator=self.cluster_generator_)[:int(self.threshold_pairs_rows)]
            rows = rows.to(x.device)
            d = cosine_distance(features[rows], features)
            not_self = torch.ones_like(d, dtype=torch.bool)
            not_self[torch.arange(len(rows), device=x.device), rows] = False
            self.distance_threshold_ = left_half_gaussian_threshold(d[not_self])
        self.similarity_threshold_ = 1.0 - 2.0 * self.distance_threshold_

    # -- loss ----------------------------------------------------------------------------------
    def relaxed_codes(self, x):
        return 2.0 * torch.sigmoid(self.head_.net[2:](self.adapt(x))) - 1.0

    def loss_terms(self, idx, x, y):
        features = self.adapt(x)
        logits = self.head_.net[2:](features)
        prob = torch.sigmoid(logits)
        relaxed = 2.0 * prob - 1.0  # relaxed_codes, with the features and logits kept for the other terms
        if self.stochastic_codes:
            hard = torch.where(torch.rand_like(prob) < prob, 1.0, -1.0)
        else:
            hard = torch.where(logits >= 0, 1.0, -1.0)
        codes = relaxed + (hard - relaxed).detach()  # straight-through estimator
        similarity = 1.0 - 2.0 * cosine_distance(features)
        if self.similarity_target is not None:  # a shared target of the pretrained features (targets.py)
            pair_similarity = self.similarity_(idx)
        else:  # the paper's Eq. 3 on the adapted features
            pair_similarity = similarity if self.similarity_grad else similarity.detach()
        pairwise = ((self.bits * pair_similarity - codes @ codes.T) ** 2).sum()
        reconstruction = ((self.decoder_(codes) - features) ** 2).sum()
        # KL(q(b|x) ‖ Bernoulli(½)) per bit, in a form stable for large logits
        kl = (prob * (F.logsigmoid(logits) + math.log(2.0))
              + (1.0 - prob) * (F.logsigmoid(-logits) + math.log(2.0))).sum()
        cluster = ((codes - self.targets_[self.cluster_of_[idx]]) ** 2).sum()
        separate = -((off_diagonal(similarity) - self.similarity_threshold_) ** 2).sum()
        return {"pairwise": pairwise, "reconstruction": reconstruction, "kl": kl,
                "cluster": cluster, "separate": separate, **self.shared_terms(idx, relaxed)}
