"""LAGNH: lightweight augmented graph network hashing (seed 003).

Each image has a deep feature ``x`` and auxiliary semantics ``y ∈ {0,1}^c`` (default: the backbone's
own top-5 ImageNet predictions above a probability floor; user tags replace them). Cross-modal
attention moves the projected feature towards the embeddings of its concepts (Eq. 1–2); the
augmented graph ``S = η S^v + (1 − η) S^a`` fuses visual and semantic similarity (Eq. 3–5); a
two-layer GCN propagates over it (Eq. 6–7) and its output ``Z`` gives the codes. Training losses:
quantization ``‖sign(Z) − Z‖²``, reconstruction of the auxiliary graph ``‖cos(Z, Z) − γ S^a‖²``,
an adversarial regulariser pulling rows of ``Z`` towards ``N(0, I)`` (discriminator
``k→64→32→1``; the GCN is the generator) and semantic guidance ``‖Y − Z P‖²``.

**One graph operator for training and encoding.** The paper propagates over the dense graph of a
training batch, but a new image cannot join a batch (its code must depend on it alone). So both
training and encoding connect an image to itself and its ``m`` nearest of a fixed, seeded set of
training anchors under ``S``; the anchors' first-layer outputs come from the same rule over the
anchor set (each anchor and its ``m`` nearest other anchors). During training the anchors' nodes
are recomputed from the current weights at every step, with gradients; after training they are
frozen into the encoder, so a training image encoded alone gets the code training gave it. The
losses still compare the images of a batch with each other (``cos(Z, Z)`` against ``S^a``).

**What the graph sees is what an encoder can compute from the image.** The concepts that feed
attention and ``S`` are always predicted from the feature by the head's tagger (the backbone's
ImageNet classifier, or, with user tags, a multi-label linear classifier fitted to them on the
training features), from the network as it is at that step (finetune mode included). The training
images' own auxiliary semantics (user tags, or the pretrained network's predictions) are the
targets of the reconstruction and semantic losses only.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import register_head
from .base import MethodError, register_method
from .common import cosine_similarity, sign
from .deep import DeepHashMethod

TAG_RULES = ("top", "sigmoid")


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


def sigmoid_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Multi-hot ``[n, c]`` of a multi-label classifier: every tag with probability ≥ 0.5, and the most
    probable one always."""
    tags = (logits >= 0).to(torch.uint8)
    tags.scatter_(1, logits.argmax(1, keepdim=True), 1)
    return tags


def fit_tagger(x: torch.Tensor, tags: torch.Tensor, *, seed: int, epochs: int = 300, lr: float = 0.01,
               weight_decay: float = 1e-4) -> nn.Linear:
    """A multi-label linear classifier feature → user tags (binary cross-entropy, full-batch Adam), so
    that an image without tags gets the concepts training would have given it."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = nn.Linear(x.shape[1], tags.shape[1]).to(x.device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    target = tags.float()
    z = (x - mean) / std
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(linear(z), target).backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the layer
        weight = linear.weight / std
        linear.bias.sub_(weight @ mean)
        linear.weight.copy_(weight)
    return linear


def semantic_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S^a_ij = cos(y_i, y_j)`` of multi-hot tag vectors (in [0, 1])."""
    return cosine_similarity(a.double(), b.double())


def visual_similarity(a: torch.Tensor, b: torch.Tensor, sigma2: torch.Tensor | float) -> torch.Tensor:
    """``S^v_ij = exp(−‖a_i − b_j‖² / σ²)``."""
    return torch.exp(-torch.cdist(a, b).pow(2) / sigma2)


def mean_squared_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``‖x_i − x_j‖²`` over pairs ``i ≠ j`` (σ² "auto")."""
    n = len(x)
    centred = x - x.mean(0)
    # Σ_ij ‖x_i − x_j‖² = 2 n Σ_i ‖x_i − x̄‖², without the n × n matrix
    return 2.0 * n * centred.pow(2).sum() / max(n * (n - 1), 1)


def _scatter_rows(values: torch.Tensor, ids: torch.Tensor, columns: int) -> torch.Tensor:
    """Sparse ``[n, columns]`` with ``values[i, j]`` at column ``ids[i, j]``: the rows of ``Â`` towards
    the anchors (a sparse product beats gathering ``[n, m, hidden]`` blocks, above all backwards)."""
    rows = torch.arange(len(values), device=values.device).repeat_interleave(values.shape[1])
    return torch.sparse_coo_tensor(torch.stack([rows, ids.flatten()]), values.flatten(), (len(values), columns),
                                   check_invariants=False)


@register_head("lagnh")
class LAGNHHead(nn.Module):
    """LAGNH's network: attention, the ``m``-nearest-anchor graph, two GCN layers, ``tanh``.

    Training and encoding call the same :meth:`propagate`; encoding reads the anchors' attentive
    features, tags, degrees and first-layer outputs from buffers fixed after training, so the encoder
    file holds them (``kwargs`` are sizes and scalars only). The concepts of an image come from its
    feature through the stored ``tagger``: ``tag_rule`` "top" (an ImageNet classifier: top ``top``
    above ``floor``) or "sigmoid" (a classifier fitted to user tags). Encoders of older versions,
    saved with ``predict_tags`` False, use no concepts at encoding.
    """

    def __init__(self, in_dim: int, bits: int, concepts: int, embed_dim: int, hidden: int, anchors: int,
                 neighbours: int, fusion: float, predict_tags: bool = True, top: int = 5, floor: float = 0.0,
                 tag_rule: str = "top"):
        super().__init__()
        if tag_rule not in TAG_RULES:
            raise MethodError(f"lagnh: unknown tag_rule {tag_rule!r}; use one of {', '.join(TAG_RULES)}")
        self.kwargs = {"in_dim": in_dim, "bits": bits, "concepts": concepts, "embed_dim": embed_dim,
                       "hidden": hidden, "anchors": anchors, "neighbours": neighbours, "fusion": float(fusion),
                       "predict_tags": bool(predict_tags), "top": top, "floor": float(floor), "tag_rule": tag_rule}
        self.neighbours, self.fusion, self.predict_tags = int(neighbours), float(fusion), bool(predict_tags)
        self.top, self.floor, self.tag_rule = int(top), float(floor), tag_rule
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

    # -- the model ---------------------------------------------------------------------------
    @torch.no_grad()
    def tags(self, x: torch.Tensor) -> torch.Tensor | None:
        """The concepts an image's feature predicts (None for an encoder saved without a tagger)."""
        if not self.predict_tags:
            return None
        logits = F.linear(x.double(), self.tagger.weight.double(), self.tagger.bias.double())
        if self.tag_rule == "sigmoid":
            return sigmoid_predictions(logits)
        return top_predictions(logits, self.top, self.floor)

    def attend(self, x: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
        """Eq. 1–2: ``x̃_i = x̂_i + Σ_j A_ij t_j``, ``A_i`` the softmax of ``cos(x̂_i, t_j)`` over i's concepts."""
        projected = F.linear(x, self.project.weight.to(x.dtype), self.project.bias.to(x.dtype))
        if tags is None:
            return projected
        weights, used = self._attention(projected, tags)
        return projected + weights @ self.concept_embedding[used].to(x.dtype)

    def _attention(self, projected: torch.Tensor, tags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # only the concepts some image here has: the others have weight 0 in every row anyway
        used = tags.any(0).nonzero().squeeze(1)
        cos = cosine_similarity(projected, self.concept_embedding[used].to(projected.dtype))
        return torch.softmax(cos.masked_fill(tags[:, used] == 0, float("-inf")), dim=1), used

    def attention(self, x: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """``A [n, c]`` of features ``x``: softmax of ``cos(x̂_i, t_j)`` over image i's concepts, 0 elsewhere."""
        projected = F.linear(x, self.project.weight.to(x.dtype), self.project.bias.to(x.dtype))
        weights, used = self._attention(projected, tags)
        return torch.zeros(len(x), len(tags[0]), dtype=weights.dtype, device=x.device).index_copy(1, used, weights)

    def nearest(self, xa: torch.Tensor, tags_a, xb: torch.Tensor, tags_b, sigma2,
                exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Each node of ``a``'s ``m`` nearest nodes of ``b`` under the augmented graph
        ``S = η S^v + (1 − η) S^a``: (their ``S`` values ``[n, m]``, their ids). The choice is made
        without gradients; the values carry them (only ``S^v`` depends on the weights)."""
        m = min(self.neighbours, len(xb) - int(exclude_self))
        with torch.no_grad():
            s = visual_similarity(xa, xb, sigma2)
            semantic = None
            if tags_a is not None and tags_b is not None:
                semantic = semantic_similarity(tags_a, tags_b).to(xa.dtype)
                s = self.fusion * s + (1.0 - self.fusion) * semantic
            if exclude_self:
                s.fill_diagonal_(float("-inf"))
            ids = s.topk(m, dim=1).indices
        values = torch.exp(-(xa[:, None, :] - xb[ids]).pow(2).sum(2) / sigma2)
        if semantic is not None:
            values = self.fusion * values + (1.0 - self.fusion) * semantic.gather(1, ids)
        return values, ids

    def anchor_nodes(self, anchor_xt: torch.Tensor, anchor_tags, sigma2) -> tuple[torch.Tensor, ...]:
        """The anchors' degrees, ``X̃ W1`` and first-layer outputs ``H = ReLU(Â X̃ W1)``, ``Â`` the rows
        of ``D^{-1/2}(S + I)D^{-1/2}`` over each anchor and its ``m`` nearest other anchors."""
        values, ids = self.nearest(anchor_xt, anchor_tags, anchor_xt, anchor_tags, sigma2, exclude_self=True)
        degree = 2.0 + values.sum(1)  # S_ii = 1 plus the self loop
        a_hat = _scatter_rows(values / torch.sqrt(degree[:, None] * degree[ids]), ids, len(anchor_xt))
        xw = F.linear(self.dropout(anchor_xt), self.gcn1.weight.to(anchor_xt.dtype))
        hidden = torch.relu((2.0 / degree)[:, None] * xw + torch.sparse.mm(a_hat, xw))
        return degree, xw, hidden

    def propagate(self, xt: torch.Tensor, tags, anchor_xt: torch.Tensor, anchor_tags, anchor_degree: torch.Tensor,
                  anchor_xw: torch.Tensor, anchor_hidden: torch.Tensor, sigma2) -> torch.Tensor:
        """Eq. 6–7 for nodes joined to themselves and their ``m`` nearest anchors: ``Z = tanh(Â H W2)``."""
        s, ids = self.nearest(xt, tags, anchor_xt, anchor_tags, sigma2)
        degree = 2.0 + s.sum(1)
        self_weight = (2.0 / degree)[:, None]
        a_hat = _scatter_rows(s / torch.sqrt(degree[:, None] * anchor_degree[ids]), ids, len(anchor_xt))
        w1, w2 = self.gcn1.weight.to(xt.dtype), self.gcn2.weight.to(xt.dtype)
        hidden = torch.relu(self_weight * F.linear(self.dropout(xt), w1) + torch.sparse.mm(a_hat, anchor_xw))
        mixed = self_weight * self.dropout(hidden) + torch.sparse.mm(a_hat, self.dropout(anchor_hidden))
        return torch.tanh(F.linear(mixed, w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 so that an image's neighbours and bits do not depend on the batch around it
        x = x.double()
        tags = self.tags(x)
        anchor_xw = self.anchor_features @ self.gcn1.weight.double().T
        return self.propagate(self.attend(x, tags), tags, self.anchor_features,
                              self.anchor_tags if tags is not None else None, self.anchor_degree, anchor_xw,
                              self.anchor_hidden, self.sigma2)


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
        ``σ²`` of ``S^v``; "auto" = the mean squared distance between the anchors' attentive features
        (re-estimated at every step, the final value stored in the encoder).
    gamma : float
        Scale ``γ`` of the auxiliary graph that ``cos(Z, Z)`` reconstructs.
    embed_dim, hidden : int
        Width of the attentive features (512) and of the GCN hidden layer (1024).
    critic_every : int
        One discriminator step per this many generator steps (the authors' code: 5).
    disc_lr : float
        Adam learning rate of the discriminator.
    anchors, neighbours : int
        The training anchors of the graph (a seeded random subset of the training images) and ``m``,
        the anchors each image is joined to, in training and at encoding alike.

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
    def _imagenet_tagger(self, in_dim: int) -> nn.Linear:
        from ..backbones import create_backbone
        classifier = create_backbone(self.tag_backbone, device="cpu").classifier
        if not isinstance(classifier, nn.Linear) or classifier.in_features != in_dim:
            raise MethodError(f"lagnh: the classifier of {self.tag_backbone!r} does not fit {in_dim}-d features; "
                              "pass tags=... or set tag_backbone to the backbone the features came from")
        return classifier

    def build(self, x, y):
        n, d = x.shape
        user = self.user_tags_
        if user is None:
            tagger, rule = self._imagenet_tagger(d).to(x.device), "top"
        else:
            user = torch.from_numpy((user > 0).astype(np.uint8)).to(x.device)
            tagger, rule = fit_tagger(x, user, seed=self.seed), "sigmoid"
        concepts = tagger.out_features
        head = LAGNHHead(d, self.bits, concepts, int(self.embed_dim), int(self.hidden), min(int(self.anchors), n),
                         int(self.neighbours), float(self.fusion), top=int(self.tag_top),
                         floor=float(self.tag_floor), tag_rule=rule)
        nn.init.normal_(head.concept_embedding, std=1.0 / np.sqrt(int(self.embed_dim)))
        head = head.to(x.device)
        head.tagger.load_state_dict(tagger.state_dict())
        # the training images' auxiliary semantics: targets of L_r and L_s
        self.tags_ = user if user is not None else torch.cat([head.tags(x[i:i + 4096]) for i in range(0, n, 4096)])
        count = head.anchor_features.shape[0]
        self.anchor_rows_ = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 2))[:count].sort().values
        self.semantic_map_ = nn.Linear(self.bits, concepts, bias=False).to(x.device)  # P of Eq. 11
        self.discriminator_ = Discriminator(self.bits).to(x.device)
        self.disc_optimizer_ = torch.optim.Adam(self.discriminator_.parameters(), lr=float(self.disc_lr))
        self.steps_ = 0
        return head

    def parameters_to_train(self):
        return [p for p in [*self.head_.parameters(), *self.semantic_map_.parameters()] if p.requires_grad]

    def on_epoch_start(self, epoch, x, y):
        # finetune mode: the anchors follow the backbone once an epoch (without gradients through it)
        if epoch == 0 or self.finetuning:
            self.anchor_x_ = self.current_features(self.anchor_rows_)
            self.anchor_concepts_ = self.head_.tags(self.anchor_x_)

    def _sigma2(self, xt: torch.Tensor) -> torch.Tensor:
        if self.sigma2 != "auto":
            return torch.tensor(float(self.sigma2), dtype=xt.dtype, device=xt.device)
        return mean_squared_distance(xt.detach()).clamp_min(1e-12)

    # -- training ------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Z`` of a batch through the operator encoding uses, the anchors' nodes from the current weights."""
        head = self.head_
        concepts = head.tags(x.detach())  # what an encoder predicts from the image
        anchor_xt = head.attend(self.anchor_x_, self.anchor_concepts_)
        sigma2 = self._sigma2(anchor_xt)
        degree, anchor_xw, anchor_hidden = head.anchor_nodes(anchor_xt, self.anchor_concepts_, sigma2)
        return head.propagate(head.attend(x, concepts), concepts, anchor_xt, self.anchor_concepts_, degree,
                              anchor_xw, anchor_hidden, sigma2)

    def relaxed_codes(self, x):
        return self._forward(x)

    def loss_terms(self, idx, x, y):
        z = self._forward(x)
        targets = self.tags_[idx]
        semantic = semantic_similarity(targets, targets).float()
        fake = self.discriminator_(z)
        self.batch_codes_ = z  # the discriminator's fake samples of this step
        return {
            "reconstruction": ((cosine_similarity(z) - float(self.gamma) * semantic) ** 2).mean(),
            "quantization": ((sign(z).detach() - z) ** 2).mean(),
            "adversarial": F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)),
            "semantic": ((targets.float() - self.semantic_map_(z)) ** 2).mean(),
            **self.shared_terms(idx, z),
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
        self._fix_anchors(head)
        self.tags_ = self.tags_.cpu()
        return head

    @torch.no_grad()
    def _fix_anchors(self, head: LAGNHHead) -> None:
        """Store the anchors' nodes, from the final network, in the head's buffers."""
        x = self.current_features(self.anchor_rows_).cpu().double()
        concepts = head.tags(x)
        anchor_xt = head.attend(x, concepts)
        head.sigma2.copy_(self._sigma2(anchor_xt))
        degree, _, hidden = head.anchor_nodes(anchor_xt, concepts, head.sigma2)
        head.anchor_features.copy_(anchor_xt)
        head.anchor_tags.copy_(concepts)
        head.anchor_degree.copy_(degree)
        head.anchor_hidden.copy_(hidden)
        self.anchor_x_, self.anchor_concepts_ = x.float(), concepts

    @torch.no_grad()
    def training_codes(self, batch: int = 1024) -> torch.Tensor:
        """``Z`` of every training image as the training graph computes it with the final weights
        (no dropout): what encoding a training image alone must reproduce."""
        head = self.head_.eval()
        x = self.current_features().cpu()
        return torch.cat([self._forward(x[i:i + batch]) for i in range(0, len(x), batch)])
