"""A checkpoint saved by a CPU run resumes on a GPU: the GPU run's generator state has a CUDA part
the checkpoint lacks, which is left as it is (checked here by giving the CPU run's RNG state an
extra part, as a GPU run's has)."""

import torch

from gptoss_titan.train import main
from gptoss_titan.train.state import RNGState

from ..conftest import losses
from ..helpers.training import argv_for


def test_a_checkpoint_without_cuda_rng_state_resumes_on_a_gpu_run(tmp_path, monkeypatch):
    argv = argv_for(
        tmp_path, "--checkpoint.enable=true", "--checkpoint.interval=2", "--validation.enable=false"
    )
    assert main([*argv, "--training.steps=2"]) == 0
    plain_state, plain_load = RNGState.state_dict, RNGState.load_state_dict
    loaded = []

    def gpu_state(self):
        return {**plain_state(self), "cuda": torch.zeros(16, dtype=torch.uint8)}

    def gpu_load(self, state):
        loaded.append(sorted(state))
        plain_load(self, state)

    monkeypatch.setattr(RNGState, "state_dict", gpu_state)
    monkeypatch.setattr(RNGState, "load_state_dict", gpu_load)
    assert main(argv) == 0  # resumed at step 2
    assert loaded == [["cpu"]] and len(losses(tmp_path / "run")) == 4
