"""stages/device.check_device: the devices this torch can run a stage on, and one clear line for those it cannot.
The CUDA facts (a CUDA build or not, how many devices) are patched, so every case runs on any machine."""
from __future__ import annotations

import pytest
import torch

from omni2.engine.config import ConfigError
from omni2.stages.device import check_device


@pytest.fixture
def cuda(monkeypatch):
    """Set what torch reports: cuda(version, count)."""
    def set_(version: str | None, count: int = 0):
        monkeypatch.setattr(torch.version, "cuda", version)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return set_


def test_the_cpu_is_always_there(cuda):
    cuda(None)
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu:0", "cuda:x", ""])
def test_a_name_that_is_no_device(name):
    with pytest.raises(ConfigError, match=r"expected cpu or cuda\[:N\]"):
        check_device(name)


def test_a_torch_built_without_cuda(cuda):
    cuda(None)
    with pytest.raises(ConfigError) as e:
        check_device("cuda")
    assert str(e.value) == (f"device 'cuda': this torch ({torch.__version__}) is built without CUDA; install a CUDA "
                            f"build of torch, or run on cpu")


def test_a_cuda_build_that_sees_no_device(cuda):
    cuda("12.8", 0)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        check_device("cuda:0")


def test_an_index_past_the_visible_devices(cuda):
    cuda("12.8", 2)
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"^device 'cuda:2': only 2 CUDA device\(s\) visible: cuda:0..cuda:1$"):
        check_device("cuda:2")
