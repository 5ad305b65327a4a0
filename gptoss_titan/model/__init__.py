"""The gpt-oss model: args and flavors, the transformer, and the Hugging Face mapping.

`Transformer` is imported on first use: the config check (run_train.sh's launcher, before any
worker starts) reads ModelArgs and FLAVORS without loading DTensor and sympy (0.75 s).
"""

from .args import FLAVORS, ModelArgs

__all__ = ["FLAVORS", "ModelArgs", "Transformer"]


def __getattr__(name: str):
    if name == "Transformer":
        from .model import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
