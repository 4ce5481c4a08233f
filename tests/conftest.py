import atexit
import os
import shutil
import tempfile

import pytest

# Tests never write into the user's cache: a temporary cache for the session (converted
# models and compiled kernels land there), removed at exit. ACTSPARSE_TEST_CACHE names a
# persistent test cache instead (a developer's shortcut: the converted SmolLM2 and the
# compiled kernels are then reused across runs).
_persistent = os.environ.get("ACTSPARSE_TEST_CACHE")
_cache = _persistent or tempfile.mkdtemp(prefix="actsparse-test-cache-")
os.environ["ACTSPARSE_CACHE"] = _cache
os.environ.pop("NUMBA_CACHE_DIR", None)  # numba's cache goes under the test cache too
if not _persistent:
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (fp32) and tokenizer: assembled from its GGUF parts and converted
    into the test cache on first use (about 4 minutes on 2 cores), then loaded in seconds."""
    import actsparse as asp

    return asp.load("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (fp32) and tokenizer, loaded once per session."""
    import actsparse as asp

    return asp.load("smollm2-135m")


@pytest.fixture(scope="session")
def teal_plan(tmp_path_factory):
    """A TEAL 50% plan of the embedded model, written by `actsparse calibrate` (512 calibration
    tokens), once per session for every CLI test that reads one."""
    from actsparse.cli import main

    out = tmp_path_factory.mktemp("plan") / "teal"
    assert main(["calibrate", "--method", "teal", "--sparsity", "0.5", "--tokens", "512", "--window", "256",
                 "--out", str(out), "--no-progress"]) == 0
    return out
