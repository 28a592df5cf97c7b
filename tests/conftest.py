import os
import tempfile

import pytest

# Prefect state of the test session lives in a throw-away folder (ephemeral API, SQLite).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="ditto-prefect-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# a loaded machine can take minutes to start the ephemeral server; the default 20 s fails such runs
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.pop("PREFECT_API_URL", None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = [
    "tests.plugins.core",
    "tests.plugins.engines",
    "tests.plugins.characters",
    "tests.plugins.filters",
    "tests.plugins.training",
    "tests.plugins.ops",
    "tests.plugins.reliability",
]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
