import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TURBO_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random SD-Turbo-shaped base in diffusers layout, shared by the whole session."""
    from tiny import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))
