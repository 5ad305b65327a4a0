"""gptoss-titan: TorchTitan-style training of gpt-oss models in plain PyTorch."""

__version__ = "0.1.0"
