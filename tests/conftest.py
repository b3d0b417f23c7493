import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# ../shared/data beside the checkout (CI lays a copy of shared/ there too).
SHARED_DATA = Path(os.environ.get("HANDLOOM_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared(path: str) -> Path:
    p = SHARED_DATA / path
    if not p.exists():
        pytest.fail(f"test data {p} is missing (set HANDLOOM_SHARED_DATA to the shared/data folder)")
    return p


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
