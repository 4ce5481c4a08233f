"""`--ray`'s refusals that need no cluster (and no ray): ray missing, addresses that are not
addresses or where nothing listens. The runs on a cluster are in test_ray_sweep.py."""
import socket
import sys
import time

import pytest

from actsparse.cli import main
from actsparse.errors import ConfigError
from actsparse.experiments.executors import check_reachable


def test_without_ray_installed_ray_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "q.json"
    assert main(["sweep", "--ray", "auto", "--out", str(out), "--no-progress"]) == 2
    assert "pip install 'actsparse[ray]'" in capsys.readouterr().err
    assert main(["pplp", "--ray", "local", "--json", str(out), "--no-progress"]) == 2
    assert "--ray needs the ray package" in capsys.readouterr().err
    assert not out.exists()


def test_the_default_run_does_not_import_ray():
    import subprocess

    code = ("import sys; from actsparse.cli import build_parser; import actsparse.commands.sweep, "
            "actsparse.commands.pplp, actsparse.experiments.executors; build_parser(); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_address_where_nothing_listens_is_refused_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"--ray 127.0.0.1:{port}: cannot reach a Ray cluster there .*ray start"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("address", ["localhost", "ray://", "host:notaport", ":6379"])
def test_a_malformed_address_is_refused(address):
    with pytest.raises(ConfigError, match="is not a Ray address"):
        check_reachable(address)


def test_a_listening_address_passes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
        check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}")
