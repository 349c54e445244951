"""DPFAH — deep parameter-free attention hashing (seed 001; supervised, needs labels).

The paper's network is ResNet18 with a parameter-free attention module (SimAM) added back to the
stem's feature map (``X + PFA(X)``), then the residual stages, the 512-d pooled feature ``φ(x; θ)``
and two parallel branches on it: a hash layer ``u = Wᵀφ(x) + v`` (k outputs) and a classifier ``o``
(c outputs). Loss ``L = L1 + η L2 + ζ L3``:

- ``L1`` pairwise negative log-likelihood, ``Σ softplus(Θ_ij) − s_ij Θ_ij``, ``Θ_ij = ½ f(u_i)ᵀ f(u_j)``;
- ``L2`` quantization regulation ``Σ_i ‖ReLU(1 − b_i ⊙ f(u_i))‖²``, ``b_i = sign(u_i)``;
- ``L3`` class-wise loss ``Σ_i ℓ(o_i, y_i)``: softmax cross-entropy (int labels) or sigmoid BCE
  summed over the classes (multi-hot labels);

with the piecewise relaxation ``f(u) = clamp(u, −δ, δ)``, ``δ = 1.1`` (our choice, see methods.md).
``L3`` reaches the codes only through the shared trunk ``θ`` (the paper's Eq. 20): ``W`` and ``v``
get no gradient from it (Eq. 19).

Normalisation per mini-batch of ``B`` images (our choice): the three sums of the paper's loss,
``L1`` over the ``B(B−1)`` ordered pairs of distinct images (a self-pair carries no similarity
information), ``L2`` over the ``B·k`` code entries and ``L3`` over the ``B`` images, are all divided
by the same count ``B(B−1)``, which keeps the paper's balance between them (``η`` and ``ζ`` weigh
per-image sums against a per-pair sum; a mean over images for ``L3`` made ``ζ`` act ``B − 1`` times
heavier than the equation says). Measured on 1,000 Fashion-MNIST features, 32 bits: dividing ``L2``
by its own count ``B·k`` instead made ``η = 10`` swamp ``L1`` (the pair loss rose during training;
mAP 0.527 against 0.573).

Two modes, one network each: the backbone spec carries the profile's ``stem_attention``
(:func:`hashindex.build.method_backbone`), so the features head mode trains on come from the network
the encoder later encodes images with. The paper's network, ``X + SimAM(X)`` after the stem, is
that of the ``paper`` and ``head-cpu`` profiles and of finetune mode; the head-mode default
``frozen`` takes the plain pretrained network (see :class:`DPFAH`).

- **head** (the CPU default): on cached pooled features of the frozen backbone of the profile (with
  SimAM its weights are the pretrained ones: SimAM has none to train). The frozen backbone stands in for the
  frozen part of ``θ``; ``adapter`` is the trainable rest of the shared trunk, on which both branches
  sit, so that ``L3`` shapes the codes as in the paper (``paper``: one ReLU layer to 512 wide, the
  paper's ``φ`` size). Without an adapter the classifier shares no parameter with the hash layer
  and ``L3`` cannot change the codes.
- **finetune**: the backbone with ``X + SimAM(X)`` after its stem, trained end to end with both
  branches on its pooled feature (the backbone is the shared trunk: ``adapter`` is not used). With
  ``--backbone resnet18 --weights FILE`` this is the paper's network; with the default
  EfficientNet-Lite0 the attention follows its stem (conv, BN, ReLU6) the same way.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# SimAM and ``X + SimAM(X)`` live with the backbones, as the spec's stem attention "simam", so that
# any process can rebuild the network; re-exported here as the paper's module.
from ..backbones import SimAM  # noqa: F401
from .base import MethodError, register_method
from .common import MLPHead, label_similarity, off_diagonal, sign
from .deep import DeepHashMethod

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- losses
def relax(u: torch.Tensor, delta: float) -> torch.Tensor:
    """The piecewise relaxation ``f(u) = clamp(u, −δ, δ)``."""
    return u.clamp(-delta, delta)


def pairwise_nll(fu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``mean_{i≠j} softplus(Θ_ij) − s_ij Θ_ij`` with ``Θ = ½ f(u) f(u)ᵀ``."""
    theta = 0.5 * fu @ fu.T
    return off_diagonal(F.softplus(theta) - s * theta).mean()


def quantization_regulation(u: torch.Tensor, fu: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖ReLU(1 − b_i ⊙ f(u_i))‖² / (B(B−1))``, ``b = sign(u)`` (a constant): the pairwise loss's
    normaliser, see the module docstring."""
    n = u.shape[0]
    return F.relu(1.0 - sign(u.detach()) * fu).pow(2).sum() / (n * max(n - 1, 1))


def classwise_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Σ_i ℓ(o_i, y_i) / (B(B−1))``: softmax cross-entropy for class indices ``[B]``, sigmoid BCE
    summed over the classes for multi-hot ``[B, c]``; divided by the pairwise loss's count, like
    :func:`quantization_regulation`, so ``ζ`` weighs the paper's per-image sum against its per-pair sum."""
    n = logits.shape[0]
    if target.ndim == 1:
        total = F.cross_entropy(logits, target, reduction="sum")
    else:
        total = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum")
    return total / (n * max(n - 1, 1))


def _class_targets(labels: np.ndarray, n: int, name: str) -> tuple[np.ndarray, int]:
    """Check labels; int labels become indices ``0..c−1`` (any int values), multi-hot stays 0/1."""
    labels = np.asarray(labels)
    if len(labels) != n:
        raise MethodError(f"{name}: {len(labels)} labels for {n} training features")
    if labels.ndim == 1:
        if not np.issubdtype(labels.dtype, np.integer):
            raise MethodError(f"{name}: single labels must be integers, got dtype {labels.dtype}")
        classes, index = np.unique(labels, return_inverse=True)
        return index.astype(np.int64), len(classes)
    if labels.ndim == 2 and np.isin(labels, (0, 1)).all():
        return labels.astype(np.float32), labels.shape[1]
    raise MethodError(f"{name}: labels must be an int vector or a 0/1 multi-hot matrix, got shape "
                      f"{labels.shape}, dtype {labels.dtype}")


def _optimizer(kind: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise MethodError(f"dpfah: unknown optimizer {kind!r}; use 'rmsprop' (the paper) or 'adam'")


# ----------------------------------------------------------------------------- head mode
@register_method("dpfah")
class DPFAH(DeepHashMethod):
    """DPFAH: hash and classifier branches on a shared trunk (see the module docstring for the modes).

    Parameters (profile entries, overridable as keyword arguments)
    ----------
    epochs, batch_size, lr, weight_decay
    optimizer : {"rmsprop", "adam"}
        The paper uses RMSProp.
    delta : float, default 1.1
        Relaxation bound of ``f(u) = clamp(u, −δ, δ)``.
    adapter : list of int
        Head mode: widths of the trainable ReLU stack shared by both branches, the trainable part of
        the paper's trunk ``φ`` (``paper``: ``[512]``; ``[]``: the branches sit directly on the frozen
        feature, the classifier shares no parameter with the hash layer and ``classwise`` cannot
        change the codes). Not used in finetune mode, where the backbone is the trunk.
    standardize : {"none", "center", "scale"}
        Train on features minus the training mean (and divided by the std); folded into the first
        layer after training, so the encoder head takes raw features. ``paper``: none.
    loss_weights : {"pairwise": 1, "quantization": η = 10, "classwise": ζ = 0.1}
        Each term a sum divided by ``B(B−1)`` (see the module docstring).

    stem_attention : {"simam", None}
        The module after the backbone's stem: the paper's ``X + SimAM(X)`` (``paper``, ``head-cpu``,
        and finetune mode), or None for the plain pretrained network (``frozen``, see below).

    The encoder's head is the hash branch (adapter + hash layer) as an ``mlp`` head; bits = sign(u).
    Its backbone spec records the profile's stem attention.

    The head-mode default ``frozen`` trains the paper's losses and trunk on the plain network. SimAM has
    no parameters, but the paper trains the network around it; frozen, an untrained ``X + SimAM(X)``
    changes every activation the pretrained layers after it were fitted to (32-bit ITQ on validation
    0.530 → 0.465). On a 4,000/1,000 validation split of the protocol's training images the same
    profile scored 0.769 / 0.781 (seeds 0 / 1) on the plain network against 0.747 with SimAM, and
    ``head-cpu`` (no trunk, SimAM), the default before it, 0.709.
    """

    needs_labels = True
    loss_names = ("pairwise", "quantization", "classwise")

    @property
    def stem_attention(self) -> str | None:
        attention = self.config.get("stem_attention", "simam")
        if attention not in ("simam", None):
            raise MethodError(f"{self.name}: stem_attention must be 'simam' or null, got {attention!r}")
        return attention

    def build(self, x, y):
        targets, n_classes = _class_targets(y.cpu().numpy(), len(x), self.name)
        self.targets_ = torch.from_numpy(targets).to(x.device)
        adapter = [] if self.finetuning else self.config.get("adapter", [])  # finetune: the backbone is φ
        dims = [x.shape[1], *[int(h) for h in adapter]]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [["linear", a, b], ["relu"]]
        layers.append(["linear", dims[-1], self.bits])
        head = MLPHead(layers)
        # Pooled CNN features are all non-negative: steps on an uncentred input move every code the
        # same way. Train on standardised features; fold the affine map into the first layer at the end.
        mode = self.config.get("standardize", "none")
        if mode not in ("none", "center", "scale"):
            raise MethodError(f"{self.name}: standardize must be 'none', 'center' or 'scale', got {mode!r}")
        xf = x.float()
        self.shift_ = xf.mean(0) if mode != "none" else torch.zeros(x.shape[1], device=x.device)
        self.scale_ = (xf.std(0).clamp_min(1e-6) if mode == "scale"
                       else torch.ones(x.shape[1], device=x.device))
        self.trunk_ = head.net[:-1]        # the trainable part of the shared φ (identity without an adapter)
        self.hash_layer_ = head.net[-1]
        self.classifier_ = nn.Linear(dims[-1], n_classes).to(x.device)
        return head

    def parameters_to_train(self):
        return list(self.head_.parameters()) + list(self.classifier_.parameters())

    def make_optimizer(self, params):
        return _optimizer(self.config.get("optimizer", "rmsprop"), params, float(self.lr),
                          float(self.config.get("weight_decay", 0.0)))

    def phi(self, x):
        """The shared trunk's output ``φ`` on standardised features: what both branches take."""
        return self.trunk_((x.float() - self.shift_) / self.scale_)

    def relaxed_codes(self, x):
        return relax(self.hash_layer_(self.phi(x)), float(self.config.get("delta", 1.1)))

    def loss_terms(self, idx, x, y):
        phi = self.phi(x)
        u = self.hash_layer_(phi)
        fu = relax(u, float(self.config.get("delta", 1.1)))  # relaxed_codes, with u and φ kept for L2 and L3
        s = label_similarity(y)
        return {"pairwise": pairwise_nll(fu, s),
                "quantization": quantization_regulation(u, fu),
                "classwise": classwise_loss(self.classifier_(phi), self.targets_[idx]),
                **self.shared_terms(idx, fu)}

    def _fit(self, features, labels):
        head = super()._fit(features, labels)
        self.classifier_ = self.classifier_.eval().cpu()
        first = head.net[0]
        with torch.no_grad():  # W((x − m)/σ) + b = (W/σ) x + (b − W(m/σ))
            w = first.weight / self.scale_.cpu()
            first.bias -= w @ self.shift_.cpu()
            first.weight.copy_(w)
        return head
