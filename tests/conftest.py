"""Shared test fixtures: the repository root and a quiet, offline, reproducible environment."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Nothing may reach a model hub; keep transformers quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
