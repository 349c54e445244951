"""Maths the deep hashing methods share: similarities, binarisation, graph normalisation, heads.

One home for each: a method imports these rather than writing its own copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import register_head


# ----------------------------------------------------------------------------- similarities
def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """``cos(x_i, y_j)`` for all pairs, ``[n, m]``."""
    xn = F.normalize(x, dim=1, eps=eps)
    yn = xn if y is None else F.normalize(y, dim=1, eps=eps)
    return xn @ yn.T


def cosine_distance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``d_ij = 1 − cos(x_i, x_j)`` in [0, 2]."""
    return 1.0 - cosine_similarity(x, y)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The entries of a square matrix that are not on its diagonal, flattened."""
    n = m.shape[0]
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


def label_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """1 where two images share a label, else 0: int class vectors or multi-hot matrices."""
    b = a if b is None else b
    if a.ndim == 1:
        return (a[:, None] == b[None, :]).float()
    return ((a.float() @ b.float().T) > 0).float()


# ----------------------------------------------------------------------------- binarisation
def sign(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1, the convention of the stored bits."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight-through: the gradient of the identity


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binarise in the forward pass, pass gradients straight through in the backward pass."""
    return _SignSTE.apply(x)


# ----------------------------------------------------------------------------- graphs
def normalize_adjacency(a: torch.Tensor, self_loops: bool = True) -> torch.Tensor:
    """Symmetric GCN normalisation ``D^{-1/2} (A + I) D^{-1/2}``."""
    if self_loops:
        a = a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    d = a.sum(1).clamp_min(1e-12).rsqrt()
    return d[:, None] * a * d[None, :]


def row_normalize(a: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to 1 (rows of zeros stay zero)."""
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------- heads
_ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@register_head("mlp")
class MLPHead(nn.Module):
    """Features → real-valued codes through a stack described by plain data, so the encoder file can
    rebuild it: ``layers`` is a list like ``[["linear", 1280, 1024], ["relu"], ["bn", 1024],
    ["dropout", 0.5], ["linear", 1024, 32], ["tanh"]]``. Bits are the signs of the output."""

    def __init__(self, layers: list):
        super().__init__()
        self.kwargs = {"layers": [list(layer) for layer in layers]}
        modules = []
        for kind, *args in layers:
            if kind == "linear":
                modules.append(nn.Linear(int(args[0]), int(args[1])))
            elif kind == "bn":
                modules.append(nn.BatchNorm1d(int(args[0])))
            elif kind == "dropout":
                modules.append(nn.Dropout(float(args[0])))
            elif kind in _ACTIVATIONS:
                modules.append(_ACTIVATIONS[kind]())
            else:
                raise ValueError(f"unknown layer kind {kind!r} in MLPHead")
        self.net = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())
