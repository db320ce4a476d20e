"""Multi-vector retrieval built in: `MultiVectorIndex` (tokenpool/index/multivector.py)."""

from tokenpool.index.multivector import CODECS, MultiVectorIndex

__all__ = ["CODECS", "MultiVectorIndex"]
