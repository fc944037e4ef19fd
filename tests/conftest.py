"""Shared fixtures: the Phi-3-V reference fixture, a tiny model written once per session, a headless browser."""

import os
from pathlib import Path

import pytest

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "phi3v_reference"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """tests/fixtures/phi3v_reference (tiny_phi3v/, images/, official/, reference.pt)."""
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def reference(fixture_dir) -> dict:
    """reference.pt: outputs of the original hub code on fixture_dir / "tiny_phi3v"."""
    import torch

    return torch.load(fixture_dir / "reference.pt", weights_only=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Phi-3-V checkpoint folder (seed 0, num_crops 4) from `common.tiny_model`; importing it
    registers phi3_v with the Auto classes. Read-only: copy it before changing files."""
    from common.tiny_model import write_tiny_phi3v

    return write_tiny_phi3v(tmp_path_factory.mktemp("tiny_phi3v") / "model", seed=0, num_crops=4)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's, scripts/setup_browser.sh installs it) driven by Playwright; a page test
    opens its own page with `browser.new_page()` and closes it."""
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True,
            # no sandbox as root; no background connections on a machine without network
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        yield chromium
        chromium.close()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: they skip, with the reason, on machines without it."""
    import torch

    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `keywords`, which also holds folder names (a checkout in gpu/)
            item.add_marker(needs_cuda)
