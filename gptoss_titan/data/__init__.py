"""Tokenizer (o200k_harmony, offline), corpus preparation and the resumable token loader."""

from ..model.tokens import EOT_ID
from .loader import TokenLoader, open_data, open_split, resolve_dataset
from .prepare import DataError, bundled_dataset, prepare
from .tokenizer import get_tokenizer

__all__ = [
    "EOT_ID",
    "DataError",
    "TokenLoader",
    "bundled_dataset",
    "get_tokenizer",
    "open_data",
    "open_split",
    "prepare",
    "resolve_dataset",
]
