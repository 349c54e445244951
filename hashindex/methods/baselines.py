"""The two anchors every deep method is compared with: LSH and ITQ, both a linear head."""
from __future__ import annotations

import numpy as np
import torch

from ..encoder import LinearHead
from .base import HashMethod, MethodError, register_method


def _linear_head(mean: np.ndarray, projection: np.ndarray) -> LinearHead:
    """Head computing ``(x - mean) @ projection`` as ``x W + b``."""
    head = LinearHead(projection.shape[0], projection.shape[1])
    head.weight.data = torch.from_numpy(projection.astype(np.float64))
    head.bias.data = torch.from_numpy(-(mean.astype(np.float64) @ projection))
    return head


@register_method("lsh")
class LSH(HashMethod):
    """Random hyperplanes through the training mean (Charikar 2002)."""

    def _fit(self, features, labels):
        rng = np.random.default_rng(self.seed)
        projection = rng.standard_normal((features.shape[1], self.bits))
        return _linear_head(features.mean(0, dtype=np.float64), projection)


@register_method("itq")
class ITQ(HashMethod):
    """Iterative quantization (Gong & Lazebnik 2011): PCA to ``bits`` dimensions, then a rotation that
    minimises the quantization loss ``||B - V R||``, by alternating ``B = sign(V R)`` and orthogonal
    Procrustes for R.

    Parameters
    ----------
    n_iter : int, default 50
    """

    def __init__(self, bits, *, seed=0, n_iter: int = 50, neighbourhood=None, feature_blocks=None, mirror_average=False):
        super().__init__(bits, seed=seed, neighbourhood=neighbourhood, feature_blocks=feature_blocks,
                         mirror_average=mirror_average)
        self.n_iter = int(n_iter)

    def _fit(self, features, labels):
        x = features.astype(np.float64)
        if self.bits > min(x.shape):
            raise MethodError(f"itq: {self.bits} bits need at least {self.bits} training images and "
                              f"feature dimensions, got {x.shape[0]} × {x.shape[1]}")
        mean = x.mean(0)
        x -= mean
        # principal directions from the covariance (d × d): cheaper than an SVD of n × d for n >> d
        eigval, eigvec = np.linalg.eigh(x.T @ x)
        pca = eigvec[:, np.argsort(eigval)[::-1][: self.bits]]
        v = x @ pca
        rng = np.random.default_rng(self.seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        self.quantization_loss_ = []
        for _ in range(self.n_iter):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            u, _, wt = np.linalg.svd(v.T @ b)
            rotation = u @ wt
            self.quantization_loss_.append(float(((b - v @ rotation) ** 2).mean()))
        return _linear_head(mean, pca @ rotation)

    def params(self):
        return {**super().params(), "n_iter": self.n_iter}
