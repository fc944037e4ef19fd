"""Fixtures of the end-to-end tests of the four finetuning scripts (helpers: tests/scripts/e2e.py)."""

from __future__ import annotations

import pytest

from tests.scripts.e2e import Launcher


@pytest.fixture(scope="session")
def launcher(tmp_path_factory) -> Launcher:
    launcher = Launcher(tmp_path_factory.mktemp("launcher"))
    yield launcher
    launcher.close()
