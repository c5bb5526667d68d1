"""The uninterrupted stage runs the CLI-level reliability tests share (made once per session on first use;
see ``_stages.py``)."""

from __future__ import annotations

import _stages
import pytest


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> _stages.Uninterrupted:
    return _stages.Uninterrupted(tmp_path_factory.mktemp("uninterrupted"))
