"""NRDH: unsupervised deep hashing with node representation (seed 002).

Two stages. Stage 1 treats images as nodes of small graphs of ``M`` nodes: the cosine similarities
of their features are binarised at ``ρ`` and re-weighted (``U'_ii = p``, the rest ``1 − p`` shared by
the connected neighbours), and a GCN auto-encoder ``d→64→64→g→64→64→d`` learns to reconstruct the
features through that graph. Its ``g``-dimensional codes ``g(x)`` are the node representations.
Stage 2 fits the hash network ``fc`` (``out→256→64→g``, LeakyReLU+BN) to them: ``MSE(fc(x), g(x))``
plus a BCE term pushing ``tanh(fc(x))`` to its own signs. Only stage 2 is needed to encode an image,
so the encoder holds a plain :class:`~hashindex.methods.common.MLPHead`.

Stage 1 runs on the pretrained backbone features in both modes; in finetune mode stage 2 trains the
backbone with the hash network. The stage-1 representations are kept on the method object
(``node_representations_``) and saved in the encoder file beside its training record
(``encoder.training_arrays["node_representations"]``, one row per training image).
"""
from __future__ import annotations

import logging
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .base import MethodError, register_method
from .common import MLPHead, cosine_similarity, sign
from .deep import DeepHashMethod, training_device

log = logging.getLogger(__name__)


def reweighted_correlation(x: torch.Tensor, rho: float, p: float) -> torch.Tensor:
    """NRDH's correlation matrix of each graph in a stack ``x`` ``[G, M, d]`` → ``[G, M, M]``.

    ``U_ij = 1`` where ``cos(x_i, x_j) > ρ`` (``i ≠ j``); ``U'_ii = p`` and ``U'_ij = (1 − p) / Σ_j U_ij``
    for connected ``j``. A node with no neighbour keeps all its weight: ``U'_ii = 1``.
    """
    m = x.shape[1]
    xn = F.normalize(x, dim=2, eps=1e-12)
    eye = torch.eye(m, dtype=torch.bool, device=x.device)
    connected = ((xn @ xn.transpose(1, 2)) > rho) & ~eye
    neighbours = connected.sum(2, keepdim=True)
    off = connected.to(x.dtype) * (1.0 - p) / neighbours.clamp_min(1).to(x.dtype)
    self_weight = torch.where(neighbours.squeeze(2) > 0, torch.full_like(neighbours.squeeze(2), p, dtype=x.dtype),
                              torch.ones_like(neighbours.squeeze(2), dtype=x.dtype))
    return off + torch.diag_embed(self_weight)


class GCNAutoEncoder(nn.Module):
    """``X^{l+1} = f(U' X^l W^l)``: encoder ``d→64→64→g`` (ReLU, ReLU, linear), decoder mirrored."""

    def __init__(self, in_dim: int, code_dim: int, hidden: int = 64):
        super().__init__()
        dims = [in_dim, hidden, hidden, code_dim]
        self.encoder = nn.ParameterList(self._weights(dims))
        self.decoder = nn.ParameterList(self._weights(dims[::-1]))

    @staticmethod
    def _weights(dims):
        weights = []
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(a, b)
            nn.init.xavier_uniform_(w)
            weights.append(nn.Parameter(w))
        return weights

    @staticmethod
    def _propagate(u, x, weights):
        for layer, w in enumerate(weights):
            x = u @ (x @ w)
            if layer < len(weights) - 1:
                x = torch.relu(x)
        return x

    def encode(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._propagate(u, x, self.encoder)

    def forward(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(u, x)
        return code, self._propagate(u, code, self.decoder)

    def weight_norm(self) -> torch.Tensor:
        """``½ Σ_l ‖W^l‖_F² + ‖Ŵ^l‖_F²`` (Eq. 7)."""
        return 0.5 * sum((w * w).sum() for w in [*self.encoder, *self.decoder])


@register_method("nrdh")
class NRDH(DeepHashMethod):
    """Unsupervised Deep Hashing with Node Representation.

    Parameters (config profile keys, overridable as keyword arguments)
    ----------
    nodes : int
        ``M``, nodes per graph (10).
    rho, p : float
        Binarisation threshold of the cosine correlations (0.4) and self weight of a node (0.8).
    graph_batching : "random" or "neighbours"
        How stage 1 forms its graphs. "random" (the paper): each epoch the training set is shuffled
        and cut into graphs of ``M`` nodes; final representations come from one seeded partition.
        "neighbours": every node gets the graph of itself and its ``M − 1`` nearest training
        neighbours (cosine), and its representation is its row of that graph — a remedy for random
        10-node graphs, whose members rarely share a class.
    graphs_per_step : int
        Graphs whose losses are averaged per optimizer step of stage 1 (the paper: 1).
    node_epochs, node_lr : int, float
        Epochs and Adam learning rate of stage 1.
    gcn_hidden : int
        Width of the GCN layers (64).
    epochs, lr, batch_size : int, float, int
        Stage 2 (the hash network): Adam.

    The LeakyReLU slope ``λ`` of Eq. 10 is not given in the paper: PyTorch's default 0.01.

    Loss weights: ``reconstruction`` (α), ``weight_regularizer`` (β) for stage 1; ``fit`` (μ) and
    ``quantization`` (ω) for stage 2.
    """

    loss_names = ("reconstruction", "weight_regularizer", "fit", "quantization")
    stage1_terms = ("reconstruction", "weight_regularizer")

    # -- stage 1 -------------------------------------------------------------------------------
    def _neighbour_graphs(self, x: torch.Tensor, rows: int = 1024) -> torch.Tensor:
        """Row ``i``: ``i`` followed by its ``M − 1`` nearest other training nodes by cosine."""
        m = int(self.nodes)
        groups = []
        for start in range(0, len(x), rows):
            sim = cosine_similarity(x[start:start + rows], x)
            own = torch.arange(start, start + len(sim), device=x.device)
            sim[torch.arange(len(sim), device=x.device), own] = float("inf")
            groups.append(sim.topk(m, dim=1).indices)
        return torch.cat(groups)

    def _random_graphs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        m = int(self.nodes)
        order = torch.randperm(n, generator=generator)
        full = (n // m) * m
        graphs = order[:full].view(-1, m)
        if full < n:  # the remainder joins a graph filled up with already-seen nodes
            rest = order[full:]
            graphs = torch.cat([graphs, torch.cat([rest, order[:m - len(rest)]])[None]])
        return graphs

    def _stage1_terms(self, gae: GCNAutoEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
        u = reweighted_correlation(x, float(self.rho), float(self.p))
        _, recon = gae(u, x)
        return {"reconstruction": ((recon - x) ** 2).sum(2).mean(), "weight_regularizer": gae.weight_norm()}

    def learn_node_representations(self, x: torch.Tensor) -> torch.Tensor:
        """Train the GCN auto-encoder (Eq. 5–8) and return ``g(x)`` for every training row, ``[n, g]``."""
        device = x.device
        gae = GCNAutoEncoder(x.shape[1], self.bits, int(self.gcn_hidden)).to(device)
        optimizer = torch.optim.Adam(gae.parameters(), lr=float(self.node_lr))
        generator = torch.Generator().manual_seed(self.seed + 1)
        neighbours = self.graph_batching == "neighbours"
        if not neighbours and self.graph_batching != "random":
            raise MethodError(f"nrdh: graph_batching must be 'random' or 'neighbours', got {self.graph_batching!r}")
        if len(x) < int(self.nodes):
            raise MethodError(f"nrdh: need at least M = {self.nodes} training features, got {len(x)}")
        fixed_graphs = self._neighbour_graphs(x).cpu() if neighbours else None
        per_step = int(self.graphs_per_step)
        weights = self.config["loss_weights"]
        self.node_history_ = []
        bar = tqdm(range(int(self.node_epochs)), desc=f"train nrdh stage 1 {self.bits} bits", file=sys.stderr,
                   mininterval=1.0, dynamic_ncols=True)
        for epoch in bar:
            if neighbours:
                graphs = fixed_graphs[torch.randperm(len(fixed_graphs), generator=generator)]
            else:
                graphs = self._random_graphs(len(x), generator)
            sums: dict[str, float] = {}
            steps = range(0, len(graphs), per_step)
            for start in steps:
                terms = self._stage1_terms(gae, x[graphs[start:start + per_step].to(device)])
                loss = sum((weights[k] * v for k, v in terms.items() if weights[k] != 0.0), torch.zeros((), device=device))
                optimizer.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    optimizer.step()
                for key, value in {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}.items():
                    sums[key] = sums.get(key, 0.0) + value
            means = {k: v / len(steps) for k, v in sums.items()}
            self.node_history_.append(means)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            log.info("nrdh stage 1 epoch %d: %s", epoch + 1, means)

        with torch.no_grad():
            if neighbours:
                graphs = fixed_graphs
            else:
                graphs = self._random_graphs(len(x), torch.Generator().manual_seed(self.seed + 2))
            outputs = []
            for start in range(0, len(graphs), 256):
                block = graphs[start:start + 256].to(device)
                outputs.append(gae.encode(reweighted_correlation(x[block], float(self.rho), float(self.p)), x[block]))
            outputs = torch.cat(outputs)
            codes = torch.empty(len(x), self.bits, device=device)
            if neighbours:
                codes[graphs[:, 0].to(device)] = outputs[:, 0]
            else:
                owned = torch.ones(graphs.shape, dtype=torch.bool)
                if len(x) % graphs.shape[1]:  # the fillers of the last graph keep their first value
                    owned[-1, len(x) % graphs.shape[1]:] = False
                codes[graphs[owned].to(device)] = outputs[owned.to(device)]
        self.node_autoencoder_ = gae.cpu()
        return codes

    # -- stage 2 -------------------------------------------------------------------------------
    def build(self, x, y):
        layers = [["linear", x.shape[1], 256], ["leaky_relu"], ["bn", 256],
                  ["linear", 256, 64], ["leaky_relu"], ["bn", 64],
                  ["linear", 64, self.bits], ["bn", self.bits], ["tanh"]]
        return MLPHead(layers)

    def loss_terms(self, idx, x, y):
        fc = self.head_.net[:-1](x)  # everything but the final tanh
        fch = torch.tanh(fc)
        target_bits = (0.5 * (sign(fch) + 1.0)).detach()
        return {"fit": F.mse_loss(fc, self.targets_[idx]),
                "quantization": F.binary_cross_entropy(((fch + 1.0) / 2.0).clamp(1e-6, 1 - 1e-6), target_bits),
                **self.shared_terms(idx, fch)}

    def _fit(self, features: np.ndarray, labels):
        torch.manual_seed(self.seed)
        x = torch.from_numpy(features).to(training_device())
        codes = self.learn_node_representations(x)
        self.node_representations_ = codes.cpu().numpy()
        self.targets_ = codes
        try:
            return super()._fit(features, labels)
        finally:
            del self.targets_

    def training_arrays(self) -> dict[str, np.ndarray]:
        """Stage 1's node representation of every training image (row order of the training features):
        saved in the encoder file with its training record."""
        reps = getattr(self, "node_representations_", None)
        return {} if reps is None else {"node_representations": np.ascontiguousarray(reps, np.float32)}
