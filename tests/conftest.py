"""Shared fixtures. Importing ltnet_keras first sets TF_USE_LEGACY_KERAS before TensorFlow loads."""
from pathlib import Path

import ltnet_keras  # noqa: F401  (environment set-up must precede any TensorFlow import)
import pytest

from ltnet_keras.config import default_data_root


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (real data or training)")


@pytest.fixture(scope="session")
def lpba40_root() -> Path:
    """The shared LPBA40 folder (``LTNET_DATA`` or ``../shared/data/lpba40``)."""
    root = default_data_root()
    if not (root / "images").is_dir():
        pytest.skip(f"LPBA40 data not found at {root} (set LTNET_DATA)")
    return root


@pytest.fixture(scope="session")
def lpba40_table(lpba40_root):
    from ltnet_keras.data.labels import LabelTable
    return LabelTable.from_tsv(lpba40_root / "labels.tsv")
