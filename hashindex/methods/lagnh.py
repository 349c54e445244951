"""LAGNH: lightweight augmented graph network hashing (seed 003).

Each image has a deep feature ``x`` and auxiliary semantics ``y ∈ {0,1}^c`` (default: the backbone's
own top-5 ImageNet predictions above a probability floor; user tags replace them). Cross-modal
attention moves the projected feature towards the embeddings of its concepts (Eq. 1–2); the
augmented graph ``S = η S^v + (1 − η) S^a`` fuses visual and semantic similarity (Eq. 3–5); a
two-layer GCN propagates over it (Eq. 6–7) and its output ``Z`` gives the codes. Training losses:
quantization ``‖sign(Z) − Z‖²``, reconstruction of the auxiliary graph ``‖cos(Z, Z) − γ S^a‖²``,
an adversarial regulariser pulling rows of ``Z`` towards ``N(0, I)`` (discriminator
``k→64→32→1``; the GCN is the generator) and semantic guidance ``‖Y − Z P‖²``.

Graphs are per training batch. A new image cannot join a training batch (its code must depend on
it alone), so the encoder keeps a fixed set of training anchors: an image is connected to its ``m``
nearest anchors under ``S`` and propagated through the two trained GCN layers, the anchors'
own first-layer outputs having been computed the same way over their anchor neighbours.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import register_head
from .base import MethodError, register_method
from .common import cosine_similarity, normalize_adjacency, sign
from .deep import DeepHashMethod


def top_predictions(logits: torch.Tensor, top: int, floor: float) -> torch.Tensor:
    """Multi-hot ``[n, c]``: the ``top`` most probable classes whose softmax probability reaches
    ``floor``; the most probable class always counts, so no image is left without a concept."""
    prob = torch.softmax(logits.double(), dim=1)
    values, classes = prob.topk(top, dim=1)
    keep = values >= floor
    keep[:, 0] = True
    tags = torch.zeros_like(prob, dtype=torch.uint8)
    tags.scatter_(1, classes, keep.to(torch.uint8))
    return tags


def semantic_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S^a_ij = cos(y_i, y_j)`` of multi-hot tag vectors (in [0, 1])."""
    return cosine_similarity(a.double(), b.double())


def visual_similarity(a: torch.Tensor, b: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``S^v_ij = exp(−‖a_i − b_j‖² / σ²)``."""
    return torch.exp(-torch.cdist(a, b).pow(2) / sigma2)


def nearest_neighbour_graph(s: torch.Tensor, m: int) -> torch.Tensor:
    """``S`` kept where ``j`` is among the ``m`` most similar other nodes of ``i`` or the reverse, and on
    the diagonal; the rest zeroed (the sparsity an image sees at encoding time)."""
    off = s.detach().clone()
    off.fill_diagonal_(float("-inf"))
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(1, off.topk(min(m, len(s) - 1), dim=1).indices, True)
    keep = keep | keep.T | torch.eye(len(s), dtype=torch.bool, device=s.device)
    return s * keep


@register_head("lagnh")
class LAGNHHead(nn.Module):
    """Encoding-time LAGNH: attention, ``m``-nearest-anchor graph, two GCN layers, ``tanh``.

    The learned weights and the anchors (attentive features, tags, degrees and first-layer outputs
    of the training anchors) are buffers/parameters, so the encoder file holds them; ``kwargs`` are
    sizes and scalars only. With ``predict_tags`` the head derives an image's concepts from its
    feature with a stored classifier (the backbone's ImageNet layer); without it (the method was
    trained on user tags, which a new image does not have) an image uses no concepts: plain
    projection for attention and visual similarity only for its edges to the anchors.
    """

    def __init__(self, in_dim: int, bits: int, concepts: int, embed_dim: int, hidden: int, anchors: int,
                 neighbours: int, fusion: float, predict_tags: bool, top: int = 5, floor: float = 0.0):
        super().__init__()
        self.kwargs = {"in_dim": in_dim, "bits": bits, "concepts": concepts, "embed_dim": embed_dim,
                       "hidden": hidden, "anchors": anchors, "neighbours": neighbours, "fusion": float(fusion),
                       "predict_tags": bool(predict_tags), "top": top, "floor": float(floor)}
        self.neighbours, self.fusion, self.predict_tags = int(neighbours), float(fusion), bool(predict_tags)
        self.top, self.floor = int(top), float(floor)
        self.project = nn.Linear(in_dim, embed_dim)                      # W_x
        self.concept_embedding = nn.Parameter(torch.zeros(concepts, embed_dim))  # t_j = W_t e_j
        self.gcn1 = nn.Linear(embed_dim, hidden, bias=False)              # W1
        self.gcn2 = nn.Linear(hidden, bits, bias=False)                   # W2
        self.dropout = nn.Dropout(0.5)
        if predict_tags:
            self.tagger = nn.Linear(in_dim, concepts)
            self.tagger.requires_grad_(False)
        self.register_buffer("sigma2", torch.ones((), dtype=torch.float64))
        self.register_buffer("anchor_features", torch.zeros(anchors, embed_dim, dtype=torch.float64))
        self.register_buffer("anchor_tags", torch.zeros(anchors, concepts, dtype=torch.uint8))
        self.register_buffer("anchor_degree", torch.ones(anchors, dtype=torch.float64))
        self.register_buffer("anchor_hidden", torch.zeros(anchors, hidden, dtype=torch.float64))

    # -- pieces shared by training and encoding ------------------------------------------------
    def tags(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.predict_tags:
            return None
        logits = F.linear(x.double(), self.tagger.weight.double(), self.tagger.bias.double())
        return top_predictions(logits, self.top, self.floor)

    def attend(self, x: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
        """Eq. 1–2: ``x̃_i = x̂_i + Σ_j A_ij t_j``, ``A_i`` the softmax of ``cos(x̂_i, t_j)`` over i's concepts."""
        projected = F.linear(x, self.project.weight.to(x.dtype), self.project.bias.to(x.dtype))
        if tags is None:
            return projected
        concepts = self.concept_embedding.to(x.dtype)
        cos = cosine_similarity(projected, concepts)
        attention = torch.softmax(cos.masked_fill(tags == 0, float("-inf")), dim=1)
        return projected + attention @ concepts

    def similarity(self, xa: torch.Tensor, tags_a, xb: torch.Tensor, tags_b) -> torch.Tensor:
        """The augmented graph ``S = η S^v + (1 − η) S^a`` between two sets of nodes."""
        visual = visual_similarity(xa, xb, self.sigma2.to(xa.dtype))
        if tags_a is None or tags_b is None:
            return visual
        return self.fusion * visual + (1.0 - self.fusion) * semantic_similarity(tags_a, tags_b).to(xa.dtype)

    def propagate_batch(self, xt: torch.Tensor, graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6–7 over a whole training batch: ``H = ReLU(Â X̃ W1)``, ``Z = tanh(Â H W2)``."""
        a_hat = normalize_adjacency(graph)
        hidden = torch.relu(a_hat @ self.gcn1(self.dropout(xt)))
        return hidden, torch.tanh(a_hat @ self.gcn2(self.dropout(hidden)))

    # -- encoding --------------------------------------------------------------------------------
    def _local_graph(self, s_to_anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each node's ``m`` nearest anchors and the weights of its row of ``D^{-1/2}(S + I)D^{-1/2}``
        restricted to itself and them: returns (anchor ids, self weight, anchor weights)."""
        m = min(self.neighbours, s_to_anchors.shape[1])
        s, ids = s_to_anchors.topk(m, dim=1)
        degree = 2.0 + s.sum(1)  # S_ii = 1 plus the self loop
        self_weight = 2.0 / degree
        anchor_weight = s / torch.sqrt(degree[:, None] * self.anchor_degree[ids])
        return ids, self_weight, anchor_weight

    def anchor_graph(self, s_anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Degrees and first-layer outputs of the anchors, each over its ``m`` nearest other anchors."""
        s = s_anchors.clone()
        s.fill_diagonal_(float("-inf"))
        m = min(self.neighbours, len(s) - 1)
        values, ids = s.topk(m, dim=1)
        degree = 2.0 + values.sum(1)
        weights = values / torch.sqrt(degree[:, None] * degree[ids])
        xw = self.anchor_features @ self.gcn1.weight.double().T
        hidden = torch.relu((2.0 / degree)[:, None] * xw + (weights[:, :, None] * xw[ids]).sum(1))
        return degree, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so that an image's neighbours and bits do not depend on the batch around it
        x = x.double()
        tags = self.tags(x)
        xt = self.attend(x, tags)
        ids, self_weight, anchor_weight = self._local_graph(
            self.similarity(xt, tags, self.anchor_features, self.anchor_tags if tags is not None else None))
        w1, w2 = self.gcn1.weight.double(), self.gcn2.weight.double()
        anchor_xw = self.anchor_features @ w1.T  # once for all anchors, then gathered per neighbour
        hidden = torch.relu(self_weight[:, None] * (xt @ w1.T)
                            + (anchor_weight[:, :, None] * anchor_xw[ids]).sum(1))
        mixed = self_weight[:, None] * hidden + (anchor_weight[:, :, None] * self.anchor_hidden[ids]).sum(1)
        return torch.tanh(mixed @ w2.T)


class Discriminator(nn.Module):
    """``k→64→32→1``: tells samples of ``N(0, I)`` (real) from rows of ``Z`` (fake); logits."""

    def __init__(self, bits: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(bits, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


@register_method("lagnh")
class LAGNH(DeepHashMethod):
    """Lightweight Augmented Graph Network Hashing.

    ``fit(features, labels=None, tags=None)``: ``tags`` is an optional multi-hot ``[n, c]`` array of
    auxiliary semantics (user tags). When it is None the concepts of each image are the backbone's
    ImageNet predictions, computed from its feature with the classifier of ``tag_backbone`` (top
    ``tag_top`` classes with probability ≥ ``tag_floor``). ``labels`` are never used.

    Parameters (config profile keys, overridable as keyword arguments)
    ----------
    fusion : float
        ``η`` of ``S = η S^v + (1 − η) S^a``; 0 = the semantic graph only (the authors' code feeds the
        GCN one graph only), 1 = the visual graph only.
    sigma2 : float or "auto"
        ``σ²`` of ``S^v``; "auto" = the mean squared distance between attentive features of a
        training batch (tracked over the last epoch, stored in the encoder).
    gamma : float
        Scale ``γ`` of the auxiliary graph that ``cos(Z, Z)`` reconstructs.
    embed_dim, hidden : int
        Width of the attentive features (512) and of the GCN hidden layer (1024).
    train_neighbours : int
        0 (the paper): the GCN propagates over the dense batch graph. ``m > 0``: over the batch graph
        cut to each node's ``m`` nearest neighbours (symmetrised), as a new image is at encoding time.
    critic_every : int
        One discriminator step per this many generator steps (the authors' code: 5).
    disc_lr : float
        Adam learning rate of the discriminator.
    anchors, neighbours : int
        Training anchors kept for encoding (a seeded random subset) and ``m``, the anchors a new
        image is connected to.

    Loss weights: ``reconstruction`` (1), ``quantization`` (λ1), ``adversarial`` (λ2), ``semantic`` (λ3).
    """

    loss_names = ("reconstruction", "quantization", "adversarial", "semantic")

    def fit(self, features, labels=None, tags=None, **mode):
        if tags is not None:
            tags = np.asarray(tags)
            if tags.ndim != 2 or len(tags) != len(features):
                raise MethodError(f"lagnh: tags must be a multi-hot [n, c] array with one row per feature, "
                                  f"got shape {tags.shape} for {len(features)} features")
            if (tags.sum(1) == 0).any():
                raise MethodError("lagnh: every image needs at least one tag (rows of zeros found)")
        self.user_tags_ = tags
        return super().fit(features, labels, **mode)

    # -- setup ---------------------------------------------------------------------------------
    def _tagger(self, in_dim: int) -> nn.Linear:
        from ..backbones import create_backbone
        classifier = create_backbone(self.tag_backbone, device="cpu").classifier
        if not isinstance(classifier, nn.Linear) or classifier.in_features != in_dim:
            raise MethodError(f"lagnh: the classifier of {self.tag_backbone!r} does not fit {in_dim}-d features; "
                              "pass tags=... or set tag_backbone to the backbone the features came from")
        return classifier

    def build(self, x, y):
        n, d = x.shape
        user = self.user_tags_
        concepts = user.shape[1] if user is not None else None
        tagger = None
        if user is None:
            tagger = self._tagger(d)
            concepts = tagger.out_features
        head = LAGNHHead(d, self.bits, concepts, int(self.embed_dim), int(self.hidden), min(int(self.anchors), n),
                         int(self.neighbours), float(self.fusion), predict_tags=user is None,
                         top=int(self.tag_top), floor=float(self.tag_floor))
        nn.init.normal_(head.concept_embedding, std=1.0 / np.sqrt(int(self.embed_dim)))
        head = head.to(x.device)
        if tagger is not None:
            head.tagger.load_state_dict(tagger.state_dict())
            with torch.no_grad():
                self.tags_ = torch.cat([head.tags(x[i:i + 4096]) for i in range(0, n, 4096)])
        else:
            self.tags_ = torch.from_numpy((user > 0).astype(np.uint8)).to(x.device)
        self.semantic_map_ = nn.Linear(self.bits, concepts, bias=False).to(x.device)  # P of Eq. 11
        self.discriminator_ = Discriminator(self.bits).to(x.device)
        self.disc_optimizer_ = torch.optim.Adam(self.discriminator_.parameters(), lr=float(self.disc_lr))
        self.steps_ = 0
        self.sigma2_sum_, self.sigma2_count_ = 0.0, 0
        return head

    def parameters_to_train(self):
        return [p for p in [*self.head_.parameters(), *self.semantic_map_.parameters()] if p.requires_grad]

    def on_epoch_start(self, epoch, x, y):
        self.sigma2_sum_, self.sigma2_count_ = 0.0, 0

    def _sigma2(self, xt: torch.Tensor) -> torch.Tensor:
        if self.sigma2 != "auto":
            return torch.tensor(float(self.sigma2), device=xt.device)
        with torch.no_grad():
            sq = torch.cdist(xt, xt).pow(2)
            value = sq.sum() / max(len(xt) * (len(xt) - 1), 1)
        self.sigma2_sum_ += float(value)
        self.sigma2_count_ += 1
        return value.clamp_min(1e-12)

    # -- training ------------------------------------------------------------------------------
    def _forward(self, idx, x):
        head = self.head_
        tags = self.tags_[idx]
        xt = head.attend(x, tags)
        semantic = semantic_similarity(tags, tags).float()
        graph = float(self.fusion) * visual_similarity(xt, xt, self._sigma2(xt)) + (1.0 - float(self.fusion)) * semantic
        if int(self.train_neighbours) > 0:
            graph = nearest_neighbour_graph(graph, int(self.train_neighbours))
        _, z = head.propagate_batch(xt, graph)
        return z, tags, semantic

    def loss_terms(self, idx, x, y):
        z, tags, semantic = self._forward(idx, x)
        fake = self.discriminator_(z)
        self.batch_codes_ = z  # the discriminator's fake samples of this step
        return {
            "reconstruction": ((cosine_similarity(z) - float(self.gamma) * semantic) ** 2).mean(),
            "quantization": ((sign(z).detach() - z) ** 2).mean(),
            "adversarial": F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)),
            "semantic": ((tags.float() - self.semantic_map_(z)) ** 2).mean(),
        }

    def train_step(self, idx, x, y):
        terms = self.loss_terms(idx, x, y)
        codes = self.batch_codes_
        loss = self.total_loss(terms)
        self.optimizer_.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_.step()
        record = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        self.steps_ += 1
        if self.config["loss_weights"]["adversarial"] != 0.0 and self.steps_ % int(self.critic_every) == 0:
            fake = self.discriminator_(codes.detach())
            # real samples drawn on the CPU generator so runs repeat on any device
            real = self.discriminator_(torch.randn(codes.shape, generator=self.noise_).to(codes.device))
            disc_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                         + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
            self.disc_optimizer_.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_optimizer_.step()
        return record

    def _fit(self, features, labels):
        self.noise_ = torch.Generator().manual_seed(self.seed + 1)
        head = super()._fit(features, None)
        self.__dict__.pop("batch_codes_", None)
        if self.sigma2 == "auto" and self.sigma2_count_:
            head.sigma2.fill_(self.sigma2_sum_ / self.sigma2_count_)
        elif self.sigma2 != "auto":
            head.sigma2.fill_(float(self.sigma2))
        # the anchors' features come from the final network, as a new image's will
        self._fix_anchors(head, self.current_features().cpu(), self.tags_.cpu())
        self.tags_ = self.tags_.cpu()
        return head

    @torch.no_grad()
    def _fix_anchors(self, head: LAGNHHead, x: torch.Tensor, tags: torch.Tensor) -> None:
        """Choose the anchors (seeded) and store what encoding needs of them in the head's buffers."""
        count = head.anchor_features.shape[0]
        rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed + 2))[:count].sort().values
        self.anchor_rows_ = rows.numpy()
        anchor_tags = tags[rows] if head.predict_tags else None
        anchor_features = head.attend(x[rows].double(), anchor_tags)
        head.anchor_features.copy_(anchor_features)
        if anchor_tags is not None:
            head.anchor_tags.copy_(anchor_tags)
        # with user tags the anchors' edges are visual only, as a new image's (it has no tags)
        degree, hidden = head.anchor_graph(head.similarity(anchor_features, anchor_tags, anchor_features, anchor_tags))
        head.anchor_degree.copy_(degree)
        head.anchor_hidden.copy_(hidden)
