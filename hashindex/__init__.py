"""hashindex: learn compact binary codes for images and search them in Hamming space.

The Python API of the bulk-evaluation users::

    import hashindex
    index = hashindex.open("db.index")          # a published index (folder or fsspec URL)
    D, I = index.search(query_codes, k=10)      # like faiss: int32 distances, int64 row positions
    hashindex.metrics.mean_average_precision(qcodes, index.codes, qlabels, index.labels)
"""
import importlib

# Loaded on first use, so that `hashindex query` and `hashindex.open` do not import torch and dask
# (seconds of a cold start) to search codes.
_HOMES = {"Index": "index", "open": "index", "write_index": "index", "Encoder": "encoder",
          "BackboneSpec": "backbones", "create_backbone": "backbones", "cached_features": "build",
          "encode": "indexing", "method_backbone": "build", "protocol_split": "build", "train_encoder": "build",
          "open_source": "sources", "update": "update"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "metrics":
        return importlib.import_module(".metrics", __name__)
    raise AttributeError(f"module 'hashindex' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["Index", "Encoder", "BackboneSpec", "open", "write_index", "encode", "train_encoder",
           "cached_features", "method_backbone", "protocol_split", "open_source", "create_backbone", "metrics",
           "update"]
