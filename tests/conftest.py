"""Fixtures shared by every test package."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The checkout's top-level kernels/ (installed as omni2.kernels) has the import name of PyPI's `kernels`, which
# transformers (>= 5.25) imports: with the checkout root first on sys.path (`python -m pytest` puts the working
# directory there, pytest's default import mode the root of the `tests` package) `import kernels` finds ours and
# transformers fails. The root goes to the end instead, where `tests.*` still resolve. Set before anything imports
# transformers; worker processes inherit this sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT] + [_ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors in triton's interpreter. triton reads TRITON_INTERPRET when a
# kernel is decorated, i.e. when omni2.kernels.* is first imported (by whichever test module comes first), so it
# is set here, before any test module is collected. Kernel tests then force the Triton path (kernels/dispatch.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Thread policy of the suite: torch reduces in a different order with a different number of threads, and HiFT's
# phase integration turns that rounding into PCM differences, so a bit-exact comparison of the reference (in this
# process) with the engine (in worker processes) holds only when both use the same count. This process uses one
# thread whatever OMP_NUM_THREADS says, and every Engine / daemon a test starts passes threads=1 / --threads 1.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root holding the `tiny` model dir (omni2-tiny/), written once per session; `tiny_vocoder`
    writes cosy2_decoder/ beside it, as `omni2-engine make-checkpoint` lays them out. Read-only."""
    from omni2.engine.checkpoints.model_writer import write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(root, "tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_root: Path) -> Path:
    """The `tiny` random checkpoint's model dir (…/omni2-tiny). Read-only."""
    return tiny_root / "omni2-tiny"


@pytest.fixture(scope="session")
def tiny_vocoder(tiny_root: Path) -> Path:
    """The `tiny` random cosy2_decoder/ (beside omni2-tiny/), written once per session. Read-only: tests that add
    voices copy it or pass their own voices_dir."""
    from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint

    return write_vocoder_checkpoint(tiny_root, "tiny", seed=0)


@pytest.fixture
def force_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route omni2.kernels calls through their Triton kernels, also on CPU tensors (interpreted); the test is
    skipped where triton is not importable."""
    from omni2.kernels import dispatch

    if not dispatch.HAS_TRITON:
        pytest.skip("triton is not importable: the Triton kernels cannot run here (the references still do)")
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
