from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside the repo; RTNS_TEST_SHARED points elsewhere (tests of this rule use it).
SHARED = Path(os.environ.get("RTNS_TEST_SHARED") or REPO.parent / "shared")
SR = 16_000


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repo. A user's clone may not have it: the tests that need it
    skip. CI must (the headline quality tests need it): with CI=true they fail instead."""
    if not (SHARED / "data").is_dir():
        why = f"needs the project's shared data at {SHARED} (absent in this checkout)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the test {why}", pytrace=False)
        pytest.skip(why)
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


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> dict[str, str]:
    """Train and valid speech (voiced tones) and noise folders of wav files, and a cache dir."""
    import soundfile as sf
    from packs import voiced

    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    folders = {}
    for split, n_speech, n_noise in (("train", 8, 3), ("valid", 3, 2)):
        sp, nz = root / split / "speech", root / split / "noise"
        sp.mkdir(parents=True)
        nz.mkdir(parents=True)
        for i in range(n_speech):
            sf.write(sp / f"s{i}.wav", voiced(2.0, rng.uniform(100, 250), rng), SR)
        for j in range(n_noise):
            white = rng.standard_normal(3 * SR)
            pink = np.cumsum(rng.standard_normal(3 * SR)) * 0.05
            pink -= np.convolve(pink, np.ones(201) / 201, mode="same")
            sf.write(nz / f"n{j}.wav", (0.05 * white + pink * (j % 2)).astype(np.float32), SR)
        folders[f"{split}_speech"], folders[f"{split}_noise"] = str(sp), str(nz)
    folders["cache_dir"] = str(root / "cache")
    return folders
