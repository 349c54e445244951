"""The neighbourhood embedding: an input any method (and ITQ) can train and encode on in place of
the raw backbone feature, so the graph signal of the training set reaches every code.

Fitted once on the training features ``X`` (rows L2-normalised): the anchors are the training rows
(a seeded sample of ``max_anchors`` of them when there are more), and each anchor's *diffused*
feature is its manifold-ranked row ``(1 − α)(I − αS)⁻¹ X`` over the anchors' mutual kNN graph
(:func:`~hashindex.methods.targets.manifold_rank`), scaled so that the embedded training rows keep
the raw features' mean norm. An image's embedding is the mean of the
diffused features of its ``k`` nearest anchors by cosine: inductive manifold hashing's
out-of-sample rule (IMH), and the measurement in ../shared/methods.md (ITQ 0.515 → 0.602 at 64 px,
32 bits). Training images and new images go through the same rule, so a training image encoded
alone gets the input it was trained on.

Encoding stays per image: the embedding of a row depends on that row and the fixed anchors only,
and :class:`NeighbourhoodHead` carries the anchors and their diffused features in the encoder file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import HEADS, register_head
from .base import MethodError, switch_settings
from .targets import manifold_rank

# rows of queries ranked against the anchors at once: memory O(block · anchors)
EMBED_BLOCK_ROWS = 4096


def neighbourhood_params(spec) -> dict | None:
    """A ``neighbourhood`` config value as keyword arguments: None/False = off, True = defaults,
    a dict = its keys (``k``, ``graph_k``, ``alpha``, ``power``, ``max_anchors``)."""
    return switch_settings("neighbourhood", spec, ("k", "graph_k", "alpha", "power", "max_anchors"))


def embed(x: torch.Tensor, anchors: torch.Tensor, diffused: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of ``diffused`` over each row's ``k`` nearest ``anchors`` (cosine; anchors L2-normalised)."""
    out = []
    for start in range(0, len(x), EMBED_BLOCK_ROWS):
        # float64 ranking: which anchors are nearest must not depend on the batch's BLAS blocking
        block = F.normalize(x[start:start + EMBED_BLOCK_ROWS].double(), dim=1)
        nearest = (block @ anchors.double().T).topk(k, dim=1).indices
        out.append(diffused[nearest].mean(1))
    return torch.cat(out) if out else x.new_zeros((0, diffused.shape[1]))


class NeighbourhoodEmbedding:
    """Fit on training features, then :meth:`transform` any features; :meth:`wrap` puts a trained
    head behind the embedding for the encoder."""

    # defaults chosen on a validation split of the protocol's training images (1,000 of the 5,000 held
    # out, 32-bit ITQ on the embedding: graph_k 20, alpha 0.95 gave 0.623 where 10 / 0.9 gave 0.617)
    def __init__(self, k: int = 10, graph_k: int = 20, alpha: float = 0.95, power: float = 3.0,
                 max_anchors: int = 5000, seed: int = 0):
        self.k, self.graph_k, self.alpha, self.power = int(k), int(graph_k), float(alpha), float(power)
        self.max_anchors, self.seed = int(max_anchors), int(seed)
        if self.k < 1 or self.graph_k < 1:
            raise MethodError(f"neighbourhood: k and graph_k must be at least 1, got {self.k}, {self.graph_k}")

    def fit(self, x: torch.Tensor) -> "NeighbourhoodEmbedding":
        x = x.float()
        if len(x) > self.max_anchors:  # anchors bound the encoder's size and each image's cost
            rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[:self.max_anchors]
            x = x[rows.sort().values.to(x.device)]
        if len(x) <= max(self.k, self.graph_k):
            raise MethodError(f"neighbourhood: need more than {max(self.k, self.graph_k)} training rows, got {len(x)}")
        self.anchors_ = F.normalize(x, dim=1)
        self.diffused_ = manifold_rank(x, self.graph_k, self.alpha, self.power).float()
        # keep the features' scale (mean row norm), so a method's learning rates and classifiers
        # (LAGNH's ImageNet tagger) see inputs of the size they were set for
        embedded = embed(x, self.anchors_, self.diffused_, self.k)
        self.diffused_ *= x.norm(dim=1).mean() / embedded.norm(dim=1).mean().clamp_min(1e-12)
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return embed(x, self.anchors_.to(x.device), self.diffused_.to(x.device), self.k)

    def wrap(self, head: nn.Module) -> "NeighbourhoodHead":
        wrapped = NeighbourhoodHead(anchors=len(self.anchors_), dim=self.anchors_.shape[1], k=self.k,
                                    inner={"type": head.head_type, "kwargs": head.kwargs})
        wrapped.inner.load_state_dict(head.state_dict())
        with torch.no_grad():
            wrapped.anchors.copy_(self.anchors_)
            wrapped.diffused.copy_(self.diffused_)
        return wrapped.eval()


@register_head("neighbourhood")
class NeighbourhoodHead(nn.Module):
    """Features → neighbourhood embedding (fixed anchors and diffused features) → a trained head of
    any registered type (``inner``)."""

    def __init__(self, anchors: int, dim: int, k: int, inner: dict):
        super().__init__()
        self.kwargs = {"anchors": int(anchors), "dim": int(dim), "k": int(k), "inner": inner}
        self.k = int(k)
        self.register_buffer("anchors", torch.zeros(int(anchors), int(dim)))
        self.register_buffer("diffused", torch.zeros(int(anchors), int(dim)))
        self.inner = HEADS[inner["type"]](**inner["kwargs"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(embed(x.float(), self.anchors, self.diffused, self.k))
