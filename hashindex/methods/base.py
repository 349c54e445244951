"""The one interface every hashing method implements (scikit-learn style: params in __init__, fit returns)."""
from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import HashindexError

METHODS: dict[str, type["HashMethod"]] = {}


class MethodError(HashindexError):
    """Bad method name, parameters or training data."""


def register_method(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def create_method(name: str, bits: int, **params) -> "HashMethod":
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    accepted = set(inspect.signature(METHODS[name].__init__).parameters)
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(METHODS[name].__init__).parameters.values()):
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise MethodError(f"{name} takes no parameter {unknown[0]!r} (it takes: "
                              f"{', '.join(sorted(accepted - {'self', 'bits'}))})")
    return METHODS[name](bits=bits, **params)


def check_switch(name: str, value, method: str) -> bool:
    """A true/false setting as a bool, or a :class:`MethodError` naming it (None counts as false)."""
    if value is None:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise MethodError(f"{method}: {name} must be true or false, got {value!r}")
    return bool(value)


def check_feature_blocks(blocks, method: str) -> tuple[int, ...] | None:
    """``feature_blocks`` as a tuple, or a :class:`MethodError`: the backbone blocks whose pooled
    outputs a method trains and encodes on (:class:`~hashindex.backbones.BackboneSpec` ``blocks``;
    whether the backbone has them is checked with the spec). None: the pooled head."""
    if blocks is None:
        return None
    if (not isinstance(blocks, (list, tuple)) or not blocks
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
        raise MethodError(f"{method}: feature_blocks must be a list of block numbers or null, got {blocks!r}")
    return tuple(blocks)


def switch_settings(name: str, spec, keys) -> dict | None:
    """A config value that switches a stage on with optional settings: None/False = off (None),
    True = on with its defaults (``{}``), a dict = the settings it names, each one of ``keys``."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return {}
    if not isinstance(spec, dict):
        raise MethodError(f"{name} must be true, false or a dict of settings, got {spec!r}")
    unknown = set(spec) - set(keys)
    if unknown:
        raise MethodError(f"{name}: unknown settings {sorted(unknown)}; settings: {', '.join(keys)}")
    return dict(spec)


class HashMethod:
    """Base class: ``fit(features, labels=None) -> head``; the head maps features to real values whose
    signs are the bits. Subclasses implement :meth:`_fit`.

    Parameters
    ----------
    bits : int
        Code length, a multiple of 8.
    seed : int, default 0
        Seeds every random choice, so training is repeatable.
    neighbourhood : bool or dict, optional
        Train and encode on the neighbourhood embedding of the features (neighbourhood.py: the mean
        of the manifold-diffused features of each image's nearest training anchors) instead of the
        raw features; a dict sets ``k``, ``graph_k``, ``alpha``, ``power``, ``max_anchors``. Head
        mode only. Off by default: every paper and baseline trains on the raw features.
    feature_blocks : list of int, optional
        Train and encode on the pooled outputs of these backbone blocks, concatenated, instead of the
        pooled head (:class:`~hashindex.backbones.BackboneSpec` ``blocks``; :func:`hashindex.build.method_backbone`
        puts them in the spec the features are computed with). None by default.
    mirror_average : bool, default False
        Train on the mean of each training image's features and its mirror image's (head mode;
        :func:`hashindex.build.train_encoder` computes the mirror's). Encoding is unchanged: an image
        is encoded from its own features (or, with a student, its pixels). For images whose
        mirror is the same class (not text or digits).
    """

    name: ClassVar[str] = "base"
    needs_labels: ClassVar[bool] = False
    can_finetune: ClassVar[bool] = False
    stem_attention: ClassVar[str | None] = None  # module finetune mode puts after the backbone's stem
    profile: str = "paper"
    uses_views: ClassVar[bool] = False  # trains a term on augmented views (deep methods: the ``views`` term)
    # settings of the student stage that distils the codes into the backbone (student.py; deep
    # methods' ``student`` parameter); None: the encoder is the trained head on frozen features
    student: dict | None = None
    mirror_average: bool = False

    def __init__(self, bits: int, *, seed: int = 0, neighbourhood: bool | dict | None = None,
                 feature_blocks: list[int] | None = None, mirror_average: bool = False):
        self.bits, self.seed = int(bits), int(seed)
        self.mirror_average = check_switch("mirror_average", mirror_average, self.name)
        self.neighbourhood = neighbourhood
        from .neighbourhood import neighbourhood_params  # (neighbourhood.py imports MethodError from here)
        neighbourhood_params(neighbourhood)  # a bad spec fails here, before any feature is computed
        self.feature_blocks = check_feature_blocks(feature_blocks, self.name)

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None, *, images=None, backbone=None,
            views: np.ndarray | None = None) -> nn.Module:
        """Train on ``features`` (one row per training image); returns the head.

        ``views``: features ``[n, V, d]`` of ``V`` augmented views of each training image (the frozen
        backbone's, :func:`hashindex.build.cached_views`), for a method whose profile weights the
        ``views`` term; they go through the neighbourhood embedding as the features do.

        Finetune mode: ``backbone`` (a :class:`~hashindex.backbones.Backbone`, trained in place) and
        ``images`` (a callable from row positions of ``features`` to those images' decoded pixels)
        train the backbone end to end with the head; ``features`` are then the pretrained backbone's,
        which a method uses wherever its paper builds targets from pretrained features.
        """
        if (images is None) != (backbone is None):
            raise MethodError(f"{self.name}: finetune mode needs both the images and the backbone")
        if backbone is not None and not self.can_finetune:
            raise MethodError(f"{self.name} has no backbone to fine-tune: it trains on features only (mode head)")
        self.images_, self.backbone_ = images, backbone
        if self.bits <= 0 or self.bits % 8:
            raise MethodError(f"{self.name}: bits must be a positive multiple of 8, got {self.bits}")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise MethodError(f"{self.name}: need a 2-D array of at least 2 training features, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise MethodError(f"{self.name}: training features contain NaN or infinity")
        if self.needs_labels and labels is None:
            raise MethodError(f"{self.name} is supervised: the training source has no labels")
        if views is not None:
            views = np.asarray(views, dtype=np.float32)
            if not self.uses_views:
                raise MethodError(f"{self.name}: views given, but no term of this profile uses them "
                                  "(weight the shared 'views' term, e.g. loss_weights={'views': 0.1})")
            if views.ndim != 3 or views.shape[0] != len(features) or views.shape[2] != features.shape[1]:
                raise MethodError(f"{self.name}: views must be [n, V, d] for {features.shape} features, "
                                  f"got shape {views.shape}")
        from .neighbourhood import NeighbourhoodEmbedding, neighbourhood_params
        spec = neighbourhood_params(self.neighbourhood)
        if spec is not None:
            if backbone is not None:
                raise MethodError(f"{self.name}: the neighbourhood embedding is for head mode; "
                                  "its anchors are features of the frozen backbone")
            self.neighbourhood_ = NeighbourhoodEmbedding(**spec, seed=self.seed).fit(torch.from_numpy(features))
            features = self.neighbourhood_.transform(torch.from_numpy(features)).numpy()
            if views is not None:  # a view is embedded as its own image would be
                flat = self.neighbourhood_.transform(torch.from_numpy(views.reshape(-1, views.shape[2])))
                views = flat.numpy().reshape(len(features), views.shape[1], -1)
        self.view_features_ = None if views is None else torch.from_numpy(views)
        self.head_ = self._fit(features, labels)
        if spec is not None:  # the encoder embeds each image the way training did
            self.head_ = self.neighbourhood_.wrap(self.head_)
        return self.head_

    def _fit(self, features: np.ndarray, labels: np.ndarray | None) -> nn.Module:
        raise NotImplementedError

    def params(self) -> dict:
        params = {"bits": self.bits, "seed": self.seed, "profile": self.profile}
        if self.neighbourhood not in (None, False):
            params["neighbourhood"] = self.neighbourhood
        if self.feature_blocks is not None:
            params["feature_blocks"] = list(self.feature_blocks)
        if self.mirror_average:
            params["mirror_average"] = True
        return params

    def training_arrays(self) -> dict[str, np.ndarray]:
        """Arrays of the fitted training run worth keeping with the encoder's training record."""
        return {}
