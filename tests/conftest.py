import gzip
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Third-party test files: the small ones ship in tests/assets/ (origins in its README); larger optional sets come
# from shared/data beside the checkout, or wherever HANDLOOM_SHARED_DATA points.
ASSETS = ROOT / "tests" / "assets"
SHARED_DATA = Path(os.environ.get("HANDLOOM_SHARED_DATA", ROOT.parent / "shared" / "data"))
# Where the shipped .gz files are decompressed, once; pytest's own cache folder, so git ignores it.
ASSET_CACHE = ROOT / ".pytest_cache" / "d" / "handloom-assets"

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared(path: str) -> Path:
    """The third-party file or folder at `path` (relative to shared/data): the copy in tests/assets/ if shipped,
    else the one under HANDLOOM_SHARED_DATA (default ../shared/data). Missing from both, the calling test is
    skipped (a whole module when called at import), and `-ra` lists the reason at the end of the run."""
    shipped = _shipped(path)
    if shipped is not None:
        return shipped
    p = SHARED_DATA / path
    if p.exists():
        return p
    pytest.skip(f"needs {path}: not shipped in tests/assets/ and not in {SHARED_DATA}; download it (origins in "
                f"tests/assets/README.md) into a folder and set HANDLOOM_SHARED_DATA to it", allow_module_level=True)


def _shipped(path: str) -> Path | None:
    """tests/assets/<path>, with every .gz file in it also decompressed (a copy in ASSET_CACHE); None if not shipped."""
    p = ASSETS / path
    gz = p.with_name(p.name + ".gz")
    one_file = gz.is_file()
    if p.is_file():
        return p
    if one_file:
        sources = [gz]
    elif p.is_dir():
        sources = sorted(f for f in p.rglob("*") if f.is_file())
        if not any(f.suffix == ".gz" for f in sources):
            return p
    else:
        return None
    # The copy's folder is named by the sources' sizes and times, so an edited asset gets a fresh copy.
    stamp = hashlib.sha256("\n".join(f"{f.relative_to(ASSETS)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                      for f in sources).encode()).hexdigest()[:16]
    out = ASSET_CACHE / stamp / path
    if out.exists():
        return out
    # Build in a temporary folder beside it and rename into place: concurrent test processes never see half a file.
    ASSET_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ASSET_CACHE))
    root = gz.parent if one_file else p
    for f in sources:
        target = tmp / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not one_file:  # the .gz too, for a test that reads a file gzip'd upstream (hh-rlhf's test.jsonl.gz)
            shutil.copyfile(f, target)
        if f.suffix == ".gz":
            with gzip.open(f) as src, open(target.with_suffix(""), "wb") as dst:
                shutil.copyfileobj(src, dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp / p.name if one_file else tmp, out)
    except OSError:  # another process renamed its copy there first
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
