"""The gpt-oss model: args and flavors, the transformer, and the Hugging Face mapping."""

from .args import FLAVORS, ModelArgs
from .model import Transformer

__all__ = ["FLAVORS", "ModelArgs", "Transformer"]
