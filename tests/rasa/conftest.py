"""Fixtures of the RASA tests."""

import pytest
from rasa_synth import PlantedTokens, StandInBackbone, image_samples


@pytest.fixture
def planted():
    return PlantedTokens()


@pytest.fixture
def stand_in():
    return StandInBackbone()


@pytest.fixture(name="image_samples")
def image_samples_fixture():
    return image_samples()
