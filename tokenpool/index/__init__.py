"""Multi-vector retrieval built in: `MultiVectorIndex` (tokenpool/index/multivector.py)."""

from tokenpool.index.multivector import CODECS, RESIDUAL_TRAIN_TOKENS, MultiVectorIndex

__all__ = ["CODECS", "RESIDUAL_TRAIN_TOKENS", "MultiVectorIndex"]
