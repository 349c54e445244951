"""Hashing methods, registered by name. Each turns training features into a hash head.

``create_method("itq", bits=32).fit(features)`` returns the head; :func:`hashindex.train.train_encoder`
wraps it with the backbone spec into an :class:`~hashindex.encoder.Encoder`.
"""
from .base import METHODS, HashMethod, create_method, register_method
from . import baselines  # noqa: F401 - registers itq, lsh

__all__ = ["METHODS", "HashMethod", "create_method", "register_method"]
