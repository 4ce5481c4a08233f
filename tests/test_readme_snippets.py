"""The README's ```python blocks run as written, on the real embedded model.

The blocks run in README order in one temporary working directory, so files a block writes
(``out/prof``, ``plan/``) are there for the blocks after it; names are not shared: every block
defines what it uses. The one change made to the code: every token budget written as a literal
``tokens=<n>`` or ``max_tokens=<n>`` runs with at most ``BUDGET`` tokens, to keep the suite fast.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BUDGET = 1024


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def with_small_budgets(code: str) -> str:
    return re.sub(r"\b(max_tokens|tokens)=(\d+)\b", lambda m: f"{m.group(1)}={min(int(m.group(2)), BUDGET)}", code)


def test_budgets_are_capped_only_where_written_as_tokens():
    assert with_small_budgets('f(tokens=4096, max_tokens=8192, window=1024, x=tokens)') == \
        'f(tokens=1024, max_tokens=1024, window=1024, x=tokens)'
    assert with_small_budgets("g(tokens=512)") == "g(tokens=512)"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks, 1):
        code = compile(with_small_budgets(block), f"README.md, python block {i}", "exec")
        try:
            exec(code, {"__name__": f"readme_block_{i}"})
        except Exception as err:
            pytest.fail(f"README python block {i} failed: {type(err).__name__}: {err}\n{block}")
