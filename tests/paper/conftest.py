"""Fixtures of the paper-stage tests: a fake results tree written once per module."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_results import write_fake_tree


@pytest.fixture(scope="module")
def fake_tree(tmp_path_factory) -> Path:
    return write_fake_tree(tmp_path_factory.mktemp("run"))
