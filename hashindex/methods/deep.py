"""The skeleton every deep hashing method shares: configs and profiles, seeding, the epoch loop,
switchable weighted loss terms, progress and loss history. A method fills in :meth:`build` and
:meth:`loss_terms` (and overrides :meth:`train_step` or :meth:`on_epoch_start` where its paper
trains differently: meta-steps, adversaries, stages, per-epoch clustering).

Two modes share the loop. **head** (the CPU default): the head trains on cached features of the
frozen backbone. **finetune** (the papers' setting): each mini-batch's images go through the
backbone with gradients, so backbone and head train end to end; the backbone's learning rate is
``lr × backbone_lr_factor`` (0.1 unless configured: the usual 10× rate of a fresh hash layer over
pretrained layers) and its batch-norm statistics stay frozen (eval mode), so small CPU batches do not
disturb them. Either way ``reference_`` holds the pretrained features of every training image, which
methods use where their paper builds targets from pretrained features (UHGA's similarity, NRDH's
graphs, LAGNH's tags); :meth:`current_features` gives the features of the network being trained
(UCSH's per-epoch clustering, LAGNH's anchors).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .base import HashMethod, MethodError, check_feature_blocks, check_switch
from .neighbourhood import neighbourhood_params
from .student import student_params
from .targets import bit_balance, make_target, pair_agreement, view_contrast

log = logging.getLogger(__name__)
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


# parameters every deep method reads, whether or not its profiles set them
GENERIC_PARAMS = {"epochs", "lr", "batch_size", "weight_decay", "loss_weights", "backbone_lr_factor", "similarity",
                  "neighbourhood", "view_count", "view_temperature", "feature_blocks", "student",
                  "mirror_average"}
# loss terms every deep method offers on top of its paper's (targets.py); off unless a profile weights them
SHARED_TERMS = ("balance", "pairs", "views")
# the views term's defaults: views cached per training image, NT-Xent temperature (CIBHash's)
VIEW_COUNT, VIEW_TEMPERATURE = 8, 0.3


def load_config(name: str) -> dict:
    """The method's config file: ``{"default_profile": …, "profiles": {name: {param: value}}, "doc": …}``."""
    path = os.path.join(CONFIG_DIR, f"{name}.json")
    with open(path) as f:
        return json.load(f)


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DeepHashMethod(HashMethod):
    """Base of the five paper methods.

    Parameters
    ----------
    bits : int
    seed : int, default 0
    profile : str, optional
        A named parameter set from the method's config file (``hashindex/methods/configs/NAME.json``);
        default: the file's ``default_profile``, which is the paper's settings.
    config : str, optional
        Path of a JSON file of parameters that override the profile (a copy of the shipped config
        file, edited, also works: its ``profiles[profile]`` is used).
    **params
        Single overrides, e.g. ``epochs=5`` or ``loss_weights={"quantization": 0}`` to switch a loss
        term off.
    """

    loss_names: ClassVar[tuple[str, ...]] = ()
    can_finetune = True

    def __init__(self, bits, *, seed=0, profile: str | None = None, config: str | None = None, **params):
        super().__init__(bits, seed=seed)
        shipped = load_config(self.name)
        self.profile = profile or shipped["default_profile"]
        if self.profile not in shipped["profiles"]:
            raise MethodError(f"{self.name}: unknown profile {self.profile!r}; "
                              f"available: {', '.join(shipped['profiles'])}")
        merged = dict(shipped["profiles"][self.profile])
        weights = dict(merged.get("loss_weights", {}))
        overrides = []
        if config:
            with open(config) as f:
                user = json.load(f)
            overrides.append(user.get("profiles", {}).get(self.profile, user) if "profiles" in user else user)
        overrides.append(params)
        known = {key for profile in shipped["profiles"].values() for key in profile} | GENERIC_PARAMS
        for override in overrides:
            unknown = sorted(set(override) - known)
            if unknown:
                raise MethodError(f"{self.name}: unknown parameter {unknown[0]!r} (it takes: {', '.join(sorted(known))})")
            merged.update(override)
            # an override names only the terms it changes; the others keep the profile's weights
            weights.update(override.get("loss_weights", {}))
        unknown = set(weights) - set(self.loss_names) - set(SHARED_TERMS)
        if unknown:
            raise MethodError(f"{self.name}: unknown loss terms {sorted(unknown)}; "
                              f"terms: {list(self.loss_names) + list(SHARED_TERMS)}")
        merged["loss_weights"] = {name: float(weights.get(name, 1.0)) for name in self.loss_names}
        # shared terms are off unless weighted, and only the weighted ones are recorded
        merged["loss_weights"].update({name: float(weights[name]) for name in SHARED_TERMS if weights.get(name)})
        make_target(merged.get("similarity") or "cosine")  # a bad target spec fails here, not after caching
        self.config = merged
        self.neighbourhood = merged.get("neighbourhood")
        neighbourhood_params(self.neighbourhood)
        self.feature_blocks = check_feature_blocks(merged.get("feature_blocks"), self.name)
        self.student = student_params(merged.get("student"))
        self.mirror_average = check_switch("mirror_average", merged.get("mirror_average"), self.name)

    @classmethod
    def finetune_profile(cls) -> str:
        """The profile finetune mode trains when none is named (``finetune_profile`` of the config
        file; default: its ``default_profile``)."""
        shipped = load_config(cls.name)
        return shipped.get("finetune_profile", shipped["default_profile"])

    def __getattr__(self, item):
        # parameters read as attributes: self.epochs, self.lr, … (only reached when not a real attribute)
        config = self.__dict__.get("config", {})
        if item in config:
            return config[item]
        raise AttributeError(item)

    def params(self) -> dict:
        return {**super().params(), **self.config}

    # -- to implement --------------------------------------------------------------------------
    def build(self, x: torch.Tensor, y: torch.Tensor | None) -> nn.Module:
        """Create the head (a registered head type) and any other modules; return the head."""
        raise NotImplementedError

    def loss_terms(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted loss terms for one mini-batch (``idx`` are the rows of the training set)."""
        raise NotImplementedError

    def relaxed_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The relaxed codes of a batch of inputs, as the method's loss sees them (the ``views`` term
        runs augmented views through this); a method whose codes are not its head's output overrides it."""
        return self.head_(x)

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.head_.parameters())

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.config.get("weight_decay", 0.0))

    def on_epoch_start(self, epoch: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Hook for per-epoch work (re-clustering, re-estimating thresholds); ``x``: pretrained features."""

    # -- the two modes ---------------------------------------------------------------------------
    @property
    def finetuning(self) -> bool:
        return getattr(self, "backbone_", None) is not None

    def batch_features(self, idx: torch.Tensor) -> torch.Tensor:
        """The head's input for training rows ``idx``: cached features, or (finetune) the backbone's
        output on the rows' images, with gradients."""
        if not self.finetuning:
            return self.reference_[idx]
        pixels = self.images_(idx.cpu().numpy())
        return self.backbone_(self.backbone_.preprocess(pixels)).float()

    @torch.no_grad()
    def current_features(self, rows: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        """Features of training rows ``rows`` (default: all) from the network as it is now."""
        if not self.finetuning:
            return self.reference_ if rows is None else self.reference_[rows.to(self.reference_.device)]
        if rows is None:
            rows = torch.arange(len(self.reference_))
        return torch.cat([self.batch_features(rows[i:i + batch]) for i in range(0, len(rows), batch)])

    def _parameter_groups(self) -> list[dict]:
        groups = [{"params": self.parameters_to_train()}]
        if self.finetuning:
            backbone = list(self.backbone_.net.parameters())
            for p in backbone:
                p.requires_grad_(True)
            groups.append({"params": backbone, "lr": float(self.lr) * float(self.config.get("backbone_lr_factor", 0.1))})
        return groups

    # -- shared skeleton -----------------------------------------------------------------------
    @property
    def similarity_target(self) -> str | dict | None:
        """The configured pair target (``similarity``; None: the method's own, as its paper defines it)."""
        return self.config.get("similarity")

    @property
    def uses_views(self) -> bool:
        return bool(self.config["loss_weights"].get("views"))

    @property
    def view_count(self) -> int:
        return int(self.config.get("view_count", VIEW_COUNT))

    def shared_terms(self, idx: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared terms a profile switches on, on the relaxed codes of training rows ``idx``:
        ``balance`` (bit balance and decorrelation), ``pairs`` (the codes' cosines against the
        configured similarity target, SDC's L1 fit) and ``views`` (NT-Xent between the codes and
        those of one cached augmented view of each row, drawn per row and step)."""
        weights = self.config["loss_weights"]
        terms = {}
        if weights.get("balance"):
            terms["balance"] = bit_balance(codes)
        if weights.get("pairs"):
            terms["pairs"] = pair_agreement(codes, self.similarity_(idx))
        if weights.get("views"):
            pick = torch.randint(self.view_features_.shape[1], (len(idx),), generator=self.view_generator_)
            view_codes = self.relaxed_codes(self.view_features_[idx.cpu(), pick].to(codes.device))
            terms["views"] = view_contrast(codes, view_codes, float(self.config.get("view_temperature", VIEW_TEMPERATURE)))
        return terms

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.config["loss_weights"]
        return sum(weights[name] * value for name, value in terms.items() if weights.get(name, 0.0) != 0.0)

    def train_step(self, idx, x, y) -> dict[str, float]:
        terms = self.loss_terms(idx, x, y)
        loss = self.total_loss(terms)
        self.optimizer_.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    def _fit(self, features: np.ndarray, labels: np.ndarray | None) -> nn.Module:
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        device = training_device()
        x = torch.from_numpy(features).to(device)
        self.reference_ = x
        if self.uses_views:
            if self.finetuning:
                raise MethodError(f"{self.name}: the views term is for head mode (its views are features of the "
                                  "frozen backbone); finetune without it")
            if self.view_features_ is None:
                raise MethodError(f"{self.name}: the views term needs augmented views of the training images "
                                  "(fit(..., views=[n, V, d]); train_encoder computes them with cached_views)")
            self.view_generator_ = torch.Generator().manual_seed(self.seed + 1)
        # pair targets come from the pretrained features, like every paper's similarity
        self.similarity_ = make_target(self.similarity_target or "cosine").fit(x)
        if self.finetuning:
            self.backbone_.to(device).eval()  # eval: batch-norm statistics stay the pretrained ones
        y = None if labels is None else torch.from_numpy(np.asarray(labels)).to(device)
        self.head_ = self.build(x, y).to(device)
        self.optimizer_ = self.make_optimizer(self._parameter_groups())
        generator = torch.Generator().manual_seed(self.seed)
        self.history_ = []
        batch = int(self.batch_size)
        mode = "finetune" if self.finetuning else "head"
        bar = tqdm(range(int(self.epochs)), desc=f"train {self.name} {self.bits} bits ({mode})", file=sys.stderr,
                   mininterval=1.0, dynamic_ncols=True)
        for epoch in bar:
            self.head_.train()
            self.on_epoch_start(epoch, x, y)
            order = torch.randperm(len(x), generator=generator).to(device)
            sums: dict[str, float] = {}
            batches = [order[i:i + batch] for i in range(0, len(order), batch)]
            if len(batches) > 1 and len(batches[-1]) < 2:  # a single-row batch has no pairs
                batches = batches[:-1]
            for idx in batches:
                for key, value in self.train_step(idx, self.batch_features(idx), None if y is None else y[idx]).items():
                    sums[key] = sums.get(key, 0.0) + value
            means = {k: v / len(batches) for k, v in sums.items()}
            self.history_.append(means)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            log.info("%s epoch %d: %s", self.name, epoch + 1, means)
        if self.finetuning:
            self.backbone_.requires_grad_(False)
        return self.head_.eval().cpu()

