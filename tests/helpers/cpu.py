"""Facts of the CPU the tests run on."""

import platform

import torch

# MKL's batched GEMM is expected where torch ships MKL: Linux x86_64 builds
MKL_EXPECTED = (
    platform.system() == "Linux" and platform.machine() == "x86_64" and torch.backends.mkl.is_available()
)
