"""The one cache directory: converted models, compiled kernels, experiment outputs.

``$ACTSPARSE_CACHE`` if set, else ``~/.cache/actsparse``. Nothing large is written to the repo.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("ACTSPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "actsparse")
    return Path(root)
