"""Hashing methods, registered by name. Each turns training features into a hash head.

``create_method("itq", bits=32).fit(features)`` returns the head; :func:`hashindex.train_encoder`
wraps it with the backbone spec into an :class:`~hashindex.encoder.Encoder`.

Every module of this package is imported here, so a method registers itself (``@register_method``)
by existing: adding one is adding a file (plus its config in ``configs/`` for deep methods).
"""
import importlib
import pkgutil

from .base import METHODS, HashMethod, MethodError, create_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "HashMethod", "MethodError", "create_method", "register_method"]
