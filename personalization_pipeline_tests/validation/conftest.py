import pytest

from personalization_pipeline.validation import ValidationConfig


@pytest.fixture(scope="session")
def config() -> ValidationConfig:
    return ValidationConfig.load()
