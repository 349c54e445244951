"""hashindex: learn compact binary codes for images and search them in Hamming space.

The Python API of the bulk-evaluation users::

    import hashindex
    index = hashindex.open("db.index")          # a published index (folder or fsspec URL)
    D, I = index.search(query_codes, k=10)      # like faiss: int32 distances, int64 row positions
    hashindex.metrics.mean_average_precision(qcodes, index.codes, qlabels, index.labels)
"""
from . import metrics
from .backbones import BackboneSpec, create_backbone
from .build import cached_features, encode, protocol_split, train_encoder
from .encoder import Encoder
from .index import Index, open, write_index
from .sources import open_source
from .update import update

__version__ = "0.1.0"
__all__ = ["Index", "Encoder", "BackboneSpec", "open", "write_index", "encode", "train_encoder",
           "cached_features", "protocol_split", "open_source", "create_backbone", "metrics", "update"]
