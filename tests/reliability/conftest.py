"""The uninterrupted stage runs the CLI-level reliability tests share (made once per test run on first use,
also across pytest-xdist workers; see ``_stages.py``)."""

from __future__ import annotations

import os

import _stages
import pytest


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> _stages.Uninterrupted:
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _stages.Uninterrupted(tmp_path_factory.mktemp("uninterrupted"))
    root = tmp_path_factory.getbasetemp().parent / "shared" / "uninterrupted"  # one for all workers
    root.mkdir(parents=True, exist_ok=True)
    return _stages.Uninterrupted(root)
