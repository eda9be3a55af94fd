"""Scheduling of the suite over pytest-xdist workers (`make test` runs `-n 2 --dist loadgroup`).

Each test module is one xdist group, so a module-scoped fixture (the tiny paper of tests/workflow/test_e2e.py, the
trained model of tests/train/test_learning.py) runs once, on one worker. The cluster tests are one group: they
share the session fixtures of tests/cluster/conftest.py and the one local SLURM, whose job counts they assert.
The longest groups are queued first (the end-to-end workflow, then the cluster tests), so that the other worker
runs the rest of the suite beside them; much of their time is spent waiting on SLURM's queue and on loopback
servers, which is what the second worker fills. Without xdist the marks are inert and the order is unchanged.
"""

from __future__ import annotations

import pytest

FIRST = ("tests/workflow/test_e2e.py", "cluster")  # queued in this order, before every other group


def _group(item: pytest.Item) -> str:
    path = item.nodeid.split("::", 1)[0]
    return "cluster" if path.startswith("tests/cluster/") else path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "numprocesses", None):
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {group: i for i, group in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(FIRST)))  # stable: the rest keep collection order
