"""UHGA: deep unsupervised hashing with gradient attention (seed 000).

Head mode: a hash layer ``h = tanh(MLP(x))`` on cached backbone features. A pairwise similarity
``S_ij ∈ {+1, −1, 0}`` is thresholded from cosine distances of the features (Eq. 2–3); the codes'
inner products are fitted to it (Eq. 5). With ``gradient_attention`` a small network re-weights, per
pair and per bit, how much of the pair's gradient each of the two codes receives (Eq. 14–17); it is
trained by the virtual step of Algorithm 1: θ⁺ is the very step the optimizer of θ takes next (SGD or
Adam, from its own state), over every parameter that trains (the backbone too in finetune mode), and
θ ← θ⁺ is then that optimizer's real step with the same attended gradient. The attention network is a
training-time module only.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from .base import MethodError, register_method
from .common import MLPHead
from .deep import DeepHashMethod


def distance_statistics(similarity, n: int, chunk_rows: int = 1024) -> tuple[float, float, float]:
    """Mean, min and max of the distances ``1 − S_ij`` of all training pairs ``i != j`` under a fitted
    similarity target (default: cosine), computed in row blocks so no ``n × n`` matrix is held."""
    total, low, high = 0.0, float("inf"), float("-inf")
    every = torch.arange(n)
    for start in range(0, n, chunk_rows):
        rows = every[start:start + chunk_rows]
        block = 1.0 - similarity(rows, every).double()
        off = torch.ones_like(block, dtype=torch.bool)
        off[torch.arange(len(block)), rows] = False
        values = block[off]
        total += float(values.sum())
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return total / (n * (n - 1)), low, high


class GradientAttention(nn.Module):
    """φ: per (pair, side, bit) ``[h_ik, pair derivative, total derivative] → y`` (Eq. 16–17 input).

    Two fully connected hidden layers of ``hidden`` = 100 units each (``3 → 100 → 100 → 1``, ReLU), as
    the paper's Sec. 2.3 gives it ("two fully connection layers, each of which contains 100 hidden
    units"). It runs on every weighted pair × bit, so its size sets the cost of a training step."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(-1)


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """``√v`` whose derivative at ``v = 0`` is 0 instead of ∞ (an entry whose second moment is still
    0, e.g. a zero gradient on Adam's first step, would otherwise turn φ's gradient into NaN)."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def optimizer_lookahead(optimizer: torch.optim.Optimizer, params, grads) -> list[torch.Tensor]:
    """θ⁺: the parameters ``optimizer.step()`` would give if each ``p.grad`` were ``grads[i]``, computed
    without touching the parameters or the optimizer's state, and differentiable in ``grads``.

    The same arithmetic as torch's own step, from the optimizer's state and each parameter's group
    (``lr``, ``weight_decay``, ``maximize``, …): SGD with momentum, dampening and Nesterov (the first
    step starts the momentum buffer at the gradient, as torch does), and Adam / AdamW with the step
    count, both moments, bias corrections, ``eps``, L2 or decoupled weight decay and AMSGrad. A
    gradient that is None leaves its parameter as it is (the optimizer skips it). Other optimizers
    raise :class:`MethodError`, since the virtual step would not be the step taken.
    """
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise MethodError(f"uhga: the virtual step of Algorithm 1 is computed for torch.optim.SGD and "
                          f"torch.optim.Adam/AdamW only, not {kind.__name__}")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for p, g in zip(params, grads):
        theta = p.detach()
        if g is None:
            out.append(theta)
            continue
        if id(p) not in group_of:
            raise MethodError("uhga: a parameter of the virtual step is not one the optimizer updates")
        if torch.is_complex(theta) or g.is_sparse:
            raise MethodError("uhga: the virtual step supports dense real parameters only")
        group, state = group_of[id(p)], optimizer.state.get(p, {})
        lr, weight_decay = _scalar(group["lr"]), _scalar(group["weight_decay"])
        if group.get("maximize", False):
            g = -g
        if kind is torch.optim.SGD:
            if weight_decay != 0:
                g = g.add(theta, alpha=weight_decay)
            momentum = _scalar(group["momentum"])
            if momentum != 0:
                buf = state.get("momentum_buffer")
                buf = g if buf is None else (buf * momentum).add(g, alpha=1 - _scalar(group["dampening"]))
                g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
            out.append(theta.add(g, alpha=-lr))
            continue
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        step = (_scalar(state["step"]) if "step" in state else 0.0) + 1
        exp_avg = state.get("exp_avg", torch.zeros_like(theta))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(theta))
        if weight_decay != 0:
            if group.get("decoupled_weight_decay", kind is torch.optim.AdamW):
                theta = theta * (1 - lr * weight_decay)
            else:
                g = g.add(theta, alpha=weight_decay)
        m = torch.lerp(exp_avg, g, 1 - beta1)
        v = torch.addcmul(exp_avg_sq * beta2, g, g, value=1 - beta2)
        if group["amsgrad"]:
            v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(theta)), v)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (_sqrt(v) / bias_correction2_sqrt) + _scalar(group["eps"])
        out.append(torch.addcdiv(theta, m, denom, value=-lr / bias_correction1))
    return out


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
        How θ is updated (``momentum`` and ``weight_decay`` apply). The virtual step of Algorithm 1 is
        this optimizer's next step computed functionally (:func:`optimizer_lookahead`): with plain SGD
        it is the paper's ``θ⁺ = θ − lr·g(φ)``; with momentum or Adam it is the update they really make
        from their buffers, moments and step count. The real step that follows is equal to it.
    attention_lr, attention_hidden : float, int
        Adam learning rate and width of the two hidden layers of the attention network φ.

    Training pairs are mini-batch × mini-batch (``S`` of a batch is computed from its features with
    the thresholds of the whole training set), diagonal included as in Eq. 5–6.
    """

    loss_names = ("pairwise",)

    # -- setup ---------------------------------------------------------------------------------
    def build(self, x, y):
        mean, low, high = distance_statistics(self.similarity_, len(x))
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
        kind = self.config.get("optimizer", "adam")
        if kind == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=float(self.config.get("momentum", 0.0)),
                                   weight_decay=self.config.get("weight_decay", 0.0))
        if kind == "adam":
            return super().make_optimizer(params)
        raise MethodError(f"uhga: optimizer must be 'sgd' or 'adam', got {kind!r}")

    # -- loss ----------------------------------------------------------------------------------
    def pair_targets(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 3 for the training rows ``idx``: the weight ``|S_ij|`` and the target of every pair, from
        the distances ``1 − similarity`` (the paper's cosine distance unless ``similarity`` says)."""
        d = 1.0 - self.similarity_(idx)
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
        weight, target = self.pair_targets(idx)  # S from the pretrained features
        h = self.head_(x)
        return {"pairwise": self.pairwise_loss(h, weight, target), **self.shared_terms(idx, h)}

    # -- gradient attention ----------------------------------------------------------------------
    def attended_code_gradient(self, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∂l/∂h`` with each pair's share re-weighted by the attention network (Eq. 14–17);
        differentiable in φ. ``h`` is detached. φ runs on the pairs with ``|S_ij| = 1`` only: a pair
        with ``S_ij = 0`` has no derivative to share, whatever its weights."""
        n, k = h.shape
        residual = weight * (h @ h.T / k - target)          # ∂l/∂ℑ_ij up to the factor 2/n²
        scale = 4.0 / (n * n * k)                            # both ℑ_ij and ℑ_ji hold h_i: 2 · 2/n² · 1/k
        i, j = torch.triu_indices(n, n, 1, device=h.device)
        keep = weight[i, j] != 0
        i, j = i[keep], j[keep]
        pair = residual[i, j][:, None]
        share_i, share_j = pair * h[j], pair * h[i]          # per-pair derivative of h_i, h_j (÷ scale)
        total = residual @ h / n                              # plain derivative (÷ scale·n)
        # inputs kept O(1) whatever the batch size and code length, so φ sees comparable values;
        # both sides of every pair in one pass of φ
        y = self.attention_(torch.stack([torch.stack([h[i], share_i, total[i]], -1),
                                         torch.stack([h[j], share_j, total[j]], -1)]))
        xi = torch.softmax(y, dim=0)                         # Eq. 16–17, over the pair's two codes
        weighted = torch.diagonal(residual)[:, None] * h    # a code paired with itself has no rival
        weighted = weighted.index_add(0, i, xi[0] * share_i).index_add(0, j, xi[1] * share_j)
        return scale * weighted

    def train_step(self, idx, x, y):
        """One step of Algorithm 1.

        With ``c(φ)`` the attended code derivative, ``g(φ) = J(θ)ᵀ c(φ)`` where ``J = ∂h/∂θ`` (every
        parameter the optimizer updates: the hash layers, and the backbone when fine-tuning), and
        ``θ⁺ = step(θ, g)`` the optimizer's next step (:func:`optimizer_lookahead`). φ's gradient of
        ``l(θ⁺)`` is taken in the order that keeps it to first-order passes: ``u = ∂l(θ⁺)/∂g`` by a
        backward pass through the network at θ⁺ and the step, ``J(θ) u`` by one forward-mode pass
        (dual numbers) through the network at θ, and then ``∂l/∂φ = (∂c/∂φ)ᵀ J(θ) u``, a
        backward pass through φ alone. It equals differentiating ``l(θ⁺)`` through a
        ``create_graph`` backward pass, without the second derivatives of the backbone's grouped
        convolutions, which torch computes group by group. The real step then takes the same g.
        """
        if not self.gradient_attention:
            return super().train_step(idx, x, y)
        modules = {"head": self.head_}
        if self.finetuning:
            modules["backbone"] = self.backbone_.net
        named = [(part, name, p) for part, module in modules.items() for name, p in module.named_parameters()
                 if p.requires_grad]
        params = [p for _, _, p in named]
        weight, target = self.pair_targets(idx)  # S from the pretrained features
        h = self.head_(x)
        loss_weight = self.config["loss_weights"]["pairwise"]
        loss = self.pairwise_loss(h, weight, target)
        # c(φ) and g = J(θ)ᵀ c: the attended code derivative back-propagated into θ (through the
        # backbone too when fine-tuning); None for layers the codes do not use (the ImageNet classifier)
        code_grad = loss_weight * self.attended_code_gradient(h.detach(), weight, target)
        grads = torch.autograd.grad(h, params, grad_outputs=code_grad.detach(), allow_unused=True, retain_graph=True)
        shared = self.shared_terms(idx, h)
        if shared:  # the shared terms' gradient joins g unattended: φ re-weights pairs only
            extra = torch.autograd.grad(self.total_loss(shared), params, allow_unused=True)
            grads = [e if g is None else g if e is None else g + e for g, e in zip(grads, extra)]
        if self.finetuning:
            pixels = self.backbone_.preprocess(self.images_(idx.cpu().numpy()))  # the batch's images again
        else:
            features = x.detach()

        def network(values: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
            """h of the batch with parameters ``values`` (batch-norm statistics frozen)."""
            inputs = (functional_call(self.backbone_.net, values["backbone"], (pixels,)).float()
                      if self.finetuning else features)
            return functional_call(self.head_, values["head"], (inputs,))

        def nest(tensors) -> dict[str, dict[str, torch.Tensor]]:
            values = {part: {} for part in modules}
            for (part, name, _), tensor in zip(named, tensors):
                values[part][name] = tensor
            return values

        # virtual step (Eq. 18): θ⁺ = the step the optimizer of θ takes next with gradient g
        leaves = [None if g is None else g.detach().requires_grad_() for g in grads]
        virtual = optimizer_lookahead(self.optimizer_, params, leaves)
        loss_after = self.pairwise_loss(network(nest(virtual)), weight, target)
        used = [leaf for leaf in leaves if leaf is not None]
        u = iter(torch.autograd.grad(loss_weight * loss_after, used, allow_unused=True))
        tangents = []
        for p, leaf in zip(params, leaves):
            du = None if leaf is None else next(u)
            tangents.append(torch.zeros_like(p) if du is None else du)
        # J(θ) u by forward mode (dual numbers), then φ minimises l(θ⁺) (Eq. 19) through c(φ)
        with forward_ad.dual_level(), warnings.catch_warnings():
            # the first dual number loads torch's forward-mode decompositions, which script a few
            # functions and warn that torch.jit.script is deprecated: nothing of ours
            warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
            duals = [forward_ad.make_dual(p.detach(), t) for p, t in zip(params, tangents)]
            code_direction = forward_ad.unpack_dual(network(nest(duals))).tangent
        attention_params = list(self.attention_.parameters())
        self.attention_optimizer_.zero_grad(set_to_none=True)
        for p, g in zip(attention_params, torch.autograd.grad(code_grad, attention_params, grad_outputs=code_direction,
                                                                allow_unused=True)):
            p.grad = torch.zeros_like(p) if g is None else g
        self.attention_optimizer_.step()
        # θ ← θ⁺: the optimizer's real step with the same g, which lands on θ⁺
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer_.step()
        shared_loss = float(self.total_loss(shared).detach()) if shared else 0.0
        return {"loss": float(loss_weight * loss.detach()) + shared_loss, "pairwise": float(loss.detach()),
                "pairwise_after_step": float(loss_after.detach()), **{k: float(v.detach()) for k, v in shared.items()}}
