import os

import pytest

# keep tests off the user's cache unless one is configured; the converted SmolLM2 is reused
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (fp32) and tokenizer, loaded once per session."""
    import actsparse as asp

    return asp.load("smollm2-135m")
