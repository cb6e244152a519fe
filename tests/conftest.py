from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repo (CI has it; a user's clone may not)."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"needs the project's shared data at {SHARED} (absent in this checkout)")
    return SHARED


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-frame torch calls are tiny: a thread pool only adds synchronization (and is
    pathologically slow on a loaded machine). Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def passthrough_pack(tmp_path_factory) -> Path:
    from packs import build_passthrough_pack

    return build_passthrough_pack(tmp_path_factory.mktemp("packs") / "passthrough")


@pytest.fixture(scope="session")
def passthrough_stft_pack(tmp_path_factory) -> Path:
    from packs import build_passthrough_pack

    return build_passthrough_pack(
        tmp_path_factory.mktemp("packs") / "passthrough_stft", window="sqrt_hann", mask="complex"
    )


@pytest.fixture(scope="session")
def random_dtln_pack(tmp_path_factory) -> Path:
    """A random-init DTLN exported through the real exporter (needs torch)."""
    pytest.importorskip("torch")
    from packs import build_random_dtln_pack

    return build_random_dtln_pack(tmp_path_factory.mktemp("packs") / "random_dtln")
