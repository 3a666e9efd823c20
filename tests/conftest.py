import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from core.net import free_port  # noqa: E402
from tiny import save_tiny  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # tests run offline
# Every "auto" precision setting in fp32, here and in the processes tests start: results must not depend
# on whether the CPU has bf16 instructions. tests/test_precision.py covers the detection and the bf16 plan.
os.environ["TUTOR_PRECISION"] = "fp32"


def pytest_configure(config):
    config.addinivalue_line("markers", "embedded: uses the real embedded SmolLM2 model (slow)")
    config.addinivalue_line("markers", "browser: drives Debian's chromium through selenium")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-policy"))


@contextlib.contextmanager
def _serve_tutor(root: Path, model: Path | None, **settings):
    from dataclasses import replace

    from app.config import ServeConfig
    from app.engine import SamplingConfig
    from app.server import create_app

    # Seeded: a client that asks one thing at a time gets the same replies every run. The tiny model
    # writes random tokens, and about one reply in seventy of those trips the profanity list; a fixed
    # seed makes that the same every run instead of a random failure.
    sampling = settings.pop("sampling", SamplingConfig())
    settings["sampling"] = sampling if sampling.seed is not None else replace(sampling, seed=0)
    config = ServeConfig(host="127.0.0.1", port=free_port(), db=root / "c.db", models_dir=root / "models",
                         model=model, **settings)
    tutor = create_app(config, say=lambda *_: None)
    try:
        url = tutor.launch(block=False)
        yield tutor, url
    finally:
        tutor.close()


@pytest.fixture(scope="session")
def serve_tutor():
    """The whole app on a free loopback port, in this process, for fixtures of any scope:

        with serve_tutor(tmp_dir, model_dir, sampling=SamplingConfig(...)) as (tutor, url): ...

    `settings` are further ServeConfig fields; the database is tmp_dir/c.db, versions go to tmp_dir/models.
    """
    return _serve_tutor
