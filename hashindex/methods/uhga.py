"""UHGA: deep unsupervised hashing with gradient attention (seed 000).

Head mode: a hash layer ``h = tanh(MLP(x))`` on cached backbone features. A pairwise similarity
``S_ij ∈ {+1, −1, 0}`` is thresholded from cosine distances of the features (Eq. 2–3); the codes'
inner products are fitted to it (Eq. 5). With ``gradient_attention`` a small network re-weights, per
pair and per bit, how much of the pair's gradient each of the two codes receives (Eq. 14–17); it is
trained by the virtual step of Algorithm 1. The attention network is a training-time module only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import register_method
from .common import MLPHead, cosine_distance
from .deep import DeepHashMethod


def distance_statistics(x: torch.Tensor, chunk_rows: int = 1024) -> tuple[float, float, float]:
    """Mean, min and max of the cosine distances of all pairs ``i != j``, computed in row blocks so
    no ``n × n`` matrix is held."""
    n = len(x)
    total, low, high = 0.0, float("inf"), float("-inf")
    for start in range(0, n, chunk_rows):
        block = cosine_distance(x[start:start + chunk_rows], x).double()
        rows = torch.arange(start, start + len(block), device=x.device)
        off = torch.ones_like(block, dtype=torch.bool)
        off[torch.arange(len(block), device=x.device), rows] = False
        values = block[off]
        total += float(values.sum())
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return total / (n * (n - 1)), low, high


class GradientAttention(nn.Module):
    """Per (pair, side, bit): ``[h_ik, pair derivative, total derivative] → y`` (Eq. 16–17 input).

    Two fully connected layers with 100 hidden units between them (``3 → 100 → 1``), as in the
    public gradient-attention code the paper builds on; it runs on every pair × bit, so its size
    sets the cost of a training step."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(-1)


@register_method("uhga")
class UHGA(DeepHashMethod):
    """Deep Unsupervised Hashing with Gradient Attention.

    Parameters (config profile keys, overridable as keyword arguments)
    ----------
    eta : float
        Threshold factor of Eq. 3: ``α = η(mean − min)``, ``β = η(max − mean)``.
    hidden : int
        Width of the hidden layer of the hash MLP (``d → hidden → k``, ReLU, tanh); 0 = a single layer.
    dissimilar_target : float
        Target of pairs with ``S_ij = −1``: −1 in the paper; 0 is a remedy against bits becoming
        copies of each other (the pair keeps its weight ``|S_ij| = 1``).
    gradient_attention : bool
        False gives the paper's plain-loss ablation ("Ours" in Table 3).
    optimizer : "sgd" or "adam"
        How θ is updated. With plain SGD (no momentum) the real update equals the virtual step
        ``θ⁺ = θ − α g(φ)`` of Algorithm 1.
    virtual_lr : float or null
        α of the virtual step; null = ``lr``.
    attention_lr, attention_hidden : float, int
        Adam learning rate and width of the attention network φ.

    Training pairs are mini-batch × mini-batch (``S`` of a batch is computed from its features with
    the thresholds of the whole training set), diagonal included as in Eq. 5–6.
    """

    loss_names = ("pairwise",)

    # -- setup ---------------------------------------------------------------------------------
    def build(self, x, y):
        mean, low, high = distance_statistics(x)
        eta = float(self.eta)
        self.similar_below_ = mean - eta * (mean - low)
        self.dissimilar_above_ = mean + eta * (high - mean)
        hidden = int(self.config.get("hidden", 1024))
        d = x.shape[1]
        layers = ([["linear", d, hidden], ["relu"], ["linear", hidden, self.bits]] if hidden
                  else [["linear", d, self.bits]])
        head = MLPHead(layers + [["tanh"]])
        if self.gradient_attention:
            self.attention_ = GradientAttention(int(self.config.get("attention_hidden", 100))).to(x.device)
            self.attention_optimizer_ = torch.optim.Adam(self.attention_.parameters(),
                                                         lr=float(self.config.get("attention_lr", 1e-3)))
        return head

    def make_optimizer(self, params):
        if self.config.get("optimizer", "adam") == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=float(self.config.get("momentum", 0.0)),
                                   weight_decay=self.config.get("weight_decay", 0.0))
        return super().make_optimizer(params)

    # -- loss ----------------------------------------------------------------------------------
    def pair_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3 for a batch: the weight ``|S_ij|`` and the target of every pair."""
        d = cosine_distance(x)
        similar = d < self.similar_below_
        dissimilar = d > self.dissimilar_above_
        weight = (similar | dissimilar).float()
        target = similar.float() + float(self.dissimilar_target) * dissimilar.float()
        return weight, target

    def pairwise_loss(self, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 5: ``1/n² Σ_ij |S_ij| (h_iᵀh_j / k − S_ij)²``."""
        inner = h @ h.T / h.shape[1]
        return (weight * (inner - target) ** 2).mean()

    def loss_terms(self, idx, x, y):
        weight, target = self.pair_targets(self.reference_[idx])  # S from the pretrained features
        return {"pairwise": self.pairwise_loss(self.head_(x), weight, target)}

    # -- gradient attention ----------------------------------------------------------------------
    def attended_code_gradient(self, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∂l/∂h`` with each pair's share re-weighted by the attention network (Eq. 14–17);
        differentiable in φ. ``h`` is detached."""
        n, k = h.shape
        residual = weight * (h @ h.T / k - target)          # ∂l/∂ℑ_ij up to the factor 2/n²
        scale = 4.0 / (n * n * k)                            # both ℑ_ij and ℑ_ji hold h_i: 2 · 2/n² · 1/k
        i, j = torch.triu_indices(n, n, 1, device=h.device)
        pair = residual[i, j][:, None]
        share_i, share_j = pair * h[j], pair * h[i]          # per-pair derivative of h_i, h_j (÷ scale)
        total = residual @ h / n                              # plain derivative (÷ scale·n)
        # inputs kept O(1) whatever the batch size and code length, so φ sees comparable values
        y_i = self.attention_(torch.stack([h[i], share_i, total[i]], -1))
        y_j = self.attention_(torch.stack([h[j], share_j, total[j]], -1))
        xi = torch.softmax(torch.stack([y_i, y_j]), dim=0)   # Eq. 16–17, over the pair's two codes
        weighted = torch.diagonal(residual)[:, None] * h    # a code paired with itself has no rival
        weighted = weighted.index_add(0, i, xi[0] * share_i).index_add(0, j, xi[1] * share_j)
        return scale * weighted

    def train_step(self, idx, x, y):
        if not self.gradient_attention:
            return super().train_step(idx, x, y)
        names, params = zip(*[(name, p) for name, p in self.head_.named_parameters()])
        weight, target = self.pair_targets(self.reference_[idx])
        h = self.head_(x)
        loss_weight = self.config["loss_weights"]["pairwise"]
        loss = self.pairwise_loss(h, weight, target)
        # g(φ): the weighted code derivative back-propagated into θ, kept differentiable in φ
        code_grad = loss_weight * self.attended_code_gradient(h.detach(), weight, target)
        grads = torch.autograd.grad(h, params, grad_outputs=code_grad, create_graph=True,
                                    retain_graph=self.finetuning)
        if self.finetuning:
            # the backbone takes the attended gradient too; the virtual step below looks ahead over the
            # hash layers only (a second-order step through the CNN is out of reach on a CPU)
            backbone = [p for p in self.backbone_.net.parameters()]
            for p, g in zip(backbone, torch.autograd.grad(h, backbone, grad_outputs=code_grad.detach(),
                                                          allow_unused=True)):
                p.grad = g  # None for layers the features do not use (the ImageNet classifier)
        x = x.detach()
        # virtual step θ⁺ = θ − α g(φ), then φ minimises l(θ⁺) (Eq. 18–19)
        step = float(self.config.get("virtual_lr") or self.lr)
        virtual = {name: p.detach() - step * g for name, p, g in zip(names, params, grads)}
        loss_after = self.pairwise_loss(functional_call(self.head_, virtual, (x,)), weight, target)
        self.attention_optimizer_.zero_grad(set_to_none=True)
        attention_params = list(self.attention_.parameters())
        for p, g in zip(attention_params, torch.autograd.grad(loss_weight * loss_after, attention_params)):
            p.grad = g
        self.attention_optimizer_.step()
        # θ ← θ⁺ (exactly so with plain SGD; Adam uses g(φ) as its gradient)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        self.optimizer_.step()
        return {"loss": float(loss_weight * loss.detach()), "pairwise": float(loss.detach()),
                "pairwise_after_step": float(loss_after.detach())}
