"""Fixtures of the evaluation tests."""

import pytest
from eval_synth import StandInBackbone


@pytest.fixture
def stand_in():
    return StandInBackbone()
