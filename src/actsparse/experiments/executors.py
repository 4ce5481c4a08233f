"""Where the cells of `sweep` and `pplp` run: in this process (the default), or as Ray tasks.

Both executors take a :class:`~actsparse.eval.cells.Workload` and a list of cells and call
``on_result(cell, out)`` in the driver as each cell finishes; only the driver writes files.
The Ray executor is imported, and imports ``ray``, only when ``--ray`` is given. A worker that
dies is retried (``MAX_RETRIES`` times, by Ray) on another worker; cells that still fail are
reported together, after every other cell has finished, by :class:`CellsFailed`.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from actsparse.errors import ActsparseError, ConfigError, StateError
from actsparse.eval.cells import Workbench, Workload, cell_name, run_cell_here, run_timed

MAX_RETRIES = 2  # Ray reruns a cell whose worker died this many times
CONNECT_TIMEOUT_S = 5.0  # for the reachability probe of a cluster address
INSTALL_HINT = "pip install 'actsparse[ray]'"


class CellsFailed(StateError):
    """Some cells did not finish; ``failures`` is ``[(cell, reason)]``."""

    def __init__(self, failures: list[tuple[dict, str]]):
        self.failures = failures
        listed = "; ".join(f"{cell_name(c)}: {why}" for c, why in failures)
        super().__init__(f"{len(failures)} cell(s) did not finish ({listed})")


class InProcess:
    """The cells one after another on one workbench (model loaded once, calibrated once)."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self.bench = None
        self.record = {"kind": "in-process"}

    def map(self, cells: list[dict], on_result) -> None:
        for cell in cells:
            if self.bench is None:
                self.bench = Workbench.build(self.workload)
            on_result(cell, run_timed(self.bench, cell))

    def close(self) -> None:
        self.bench = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the ray package, which is not installed: {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, option: str = "--ray") -> None:
    """Refuse at once (within ``CONNECT_TIMEOUT_S``) an address where nothing listens: Ray
    itself keeps retrying an unreachable cluster for minutes."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{option} {address!r} is not a Ray address: give auto, local, HOST:PORT (the head node's "
                          "GCS port, 6379 by default) or ray://HOST:PORT (Ray client, 10001 by default)")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(f"{option} {address}: cannot reach a Ray cluster there ({err.strerror or err}). Start one "
                          f"with `ray start --head` on that machine and pass the address it prints, or use "
                          f"--ray local to run on this machine only") from None


class OnRay:
    """The cells as Ray tasks (one CPU each), results gathered in the driver as they finish.

    ``address``: ``auto`` (the running cluster: $RAY_ADDRESS, or one started on this machine
    with `ray start --head`), ``local`` (start a cluster of this machine, for this run only) or
    ``HOST:PORT`` / ``ray://HOST:PORT``. If this process is already connected to a cluster (a
    notebook's, a test's), that one is used as it is and left running. ``cell_fn`` is the
    function a worker runs (``run_cell_here``; tests pass one that kills its worker)."""

    def __init__(self, workload: Workload, address: str, *, cell_fn=run_cell_here, max_retries: int = MAX_RETRIES):
        self.ray = ray = import_ray()
        self.workload, self.address, self.max_retries = workload, address, max_retries
        self.started = False
        if not ray.is_initialized():
            self._connect(address)
            self.started = True
        self.task = ray.remote(cell_fn).options(num_cpus=1, max_retries=max_retries)
        resources = ray.cluster_resources()
        self.record = {"kind": "ray", "address": address,
                       "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                       "resources": {k: resources[k] for k in ("CPU", "GPU", "memory") if k in resources},
                       "max_retries": max_retries}

    def _connect(self, address: str) -> None:
        ray = self.ray
        kw = {"log_to_driver": True, "include_dashboard": False}
        if address == "local":
            ray.init(**kw)
            return
        target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
        if target and target != "auto":
            check_reachable(target, "--ray" if address != "auto" else "--ray auto: RAY_ADDRESS")
        try:
            ray.init(address=address, **kw)
        except ConnectionError as err:
            if address == "auto":
                raise ConfigError("--ray auto: no running Ray cluster was found on this machine "
                                  f"({str(err).splitlines()[0]}). Start one with `ray start --head`, set RAY_ADDRESS, "
                                  "pass its address, or use --ray local") from None
            raise ConfigError(f"--ray {address}: could not connect to a Ray cluster there ({err}). Check that "
                              f"`ray start --head` runs on that machine with the same Ray version "
                              f"({ray.__version__}), or use --ray local") from None

    def map(self, cells: list[dict], on_result) -> None:
        ray = self.ray
        refs = {self.task.remote(self.workload.to_dict(), cell): cell for cell in cells}
        pending, failures = list(refs), []
        try:
            while pending:
                [ref], pending = ray.wait(pending, num_returns=1)
                cell = refs[ref]
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the cell raised: not retried, it would raise again
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, ActsparseError):
                        failures.append((cell, str(cause)))
                    else:
                        failures.append((cell, f"{type(cause or err).__name__}: {cause or err}"))
                    continue
                except ray.exceptions.RayError as err:  # the worker (or its node) died, every try
                    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                    failures.append((cell, f"its worker died in all {self.max_retries + 1} tries "
                                           f"({type(err).__name__}: {first})"))
                    continue
                on_result(cell, out)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if failures:
            raise CellsFailed(failures)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def executor(workload: Workload, ray_address: str | None, *, cell_fn=None):
    """In-process without ``ray_address``; otherwise on the Ray cluster it names."""
    if ray_address is None:
        return InProcess(workload)
    return OnRay(workload, ray_address, cell_fn=cell_fn or run_cell_here)
