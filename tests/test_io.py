"""Atomic writes: complete files only, with the usual permissions."""
import os
import stat

import pytest
import torch

from actsparse.io import read_json, write_bytes, write_json, write_safetensors, write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    """Before: every file came out 0600 (mkstemp's mode), whatever the umask."""
    old = os.umask(umask)
    try:
        paths = [write_json(tmp_path / "a.json", {"x": 1}), write_text(tmp_path / "b.md", "text"),
                 write_bytes(tmp_path / "c.bin", b"\x00"),
                 write_safetensors(tmp_path / "d.safetensors", {"t": torch.zeros(2)})]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left

