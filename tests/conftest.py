import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny import save_tiny  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "embedded: uses the real embedded SmolLM2 model (slow)")
    config.addinivalue_line("markers", "browser: drives Debian's chromium through selenium")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-policy"))
