"""The units of work of `sweep` and `pplp` as plain functions, so that one process or many
(Ray tasks) run the very same code.

A :class:`Workload` is what travels to a worker: the model's name, dtype, data and token
budgets (names and numbers, never a model object). A :class:`Workbench` is what a worker
builds from it: the loaded model, the calibration and evaluation windows, and the calibration
statistics (computed on first use, for the same set of methods the in-process run calibrates
together, so every worker's thresholds are the in-process ones). A *cell* is one piece of
work on a workbench:

* ``{"kind": "describe"}``: the model's identity and the windows actually cut (the sweep
  header, the --into check);
* ``{"kind": "dense"}``: dense perplexity on the evaluation windows;
* ``{"kind": "sparse", "method": m, "target": s}``: one sweep point (method at a sparsity);
* ``{"kind": "pplp", "method": m, "dense_ppl": x, "p": .., "hi": .., "steps": ..}``: one
  family's PPL-p% bisection.

:func:`run_cell` returns plain JSON-able dicts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Workload:
    model: str
    dtype: str
    data: str
    text_options: dict
    sampling: str
    calib_tokens: int
    calib_window: int
    tokens: int
    window: int
    split: str  # the evaluation split: "test" (sweep) or "validation" (pplp)
    methods: tuple = ()  # calibrated together once (sweep); empty: per family (pplp)
    sparse_protocol: str = "all"  # which evaluated tokens are sparse (eval.perplexity)
    threads: int | None = None
    what: str = "`actsparse sweep`"  # the command, for a model without a causal-LM head
    progress: bool = False

    def key(self) -> str:
        """Identity of the work (progress bars aside): a worker reuses its workbench for it."""
        d = asdict(self)
        d.pop("progress")
        return json.dumps(d, sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(**{**d, "methods": tuple(d.get("methods") or ())})


@dataclass
class Workbench:
    """A loaded model with its windows; calibration statistics on first use."""
    workload: Workload
    model: object = None
    tokenizer: object = None
    calibration: object = None
    evaluation: object = None
    stats: dict = field(default_factory=dict)  # methods tuple -> statistics
    calibrations: int = 0  # calibration passes so far
    calibration_seconds: float | None = None  # of the latest

    @classmethod
    def build(cls, w: Workload) -> "Workbench":
        from actsparse.data.text import text, token_windows
        from actsparse.models.loading import check_window, load, require_causal_lm

        if w.threads is not None:
            import torch

            torch.set_num_threads(w.threads)
        model, tok = load(w.model, dtype=w.dtype)
        require_causal_lm(model, w.model, w.what)
        check_window(model, w.calib_window, option="--calib-window" if w.split == "test" else "--window")
        check_window(model, w.window)
        cal = token_windows(tok, text(w.data, "calibration", **w.text_options), window=w.calib_window,
                            max_tokens=w.calib_tokens, sampling=w.sampling)
        ev = token_windows(tok, text(w.data, w.split, **w.text_options), window=w.window, max_tokens=w.tokens,
                           sampling=w.sampling)
        return cls(w, model, tok, cal, ev)

    def stats_for(self, methods: tuple) -> dict:
        """Calibration statistics for ``methods`` together (the configs at 0.5 name what to
        collect; the target only picks a quantile later). Kept for the next cell."""
        from actsparse.sparsify.api import calibrate
        from actsparse.sparsify.registry import make_config

        if methods not in self.stats:
            self.stats.clear()  # one set at a time: every family's statistics together can be large
            t0 = time.perf_counter()
            self.stats[methods] = calibrate(self.model, [make_config(m, 0.5) for m in methods], self.calibration,
                                            progress=self.workload.progress)
            self.calibration_seconds = time.perf_counter() - t0
            self.calibrations += 1
        return self.stats[methods]


def describe(bench: Workbench) -> dict:
    from actsparse.models.loading import weights_identity

    cal, ev = bench.calibration, bench.evaluation
    return {"identity": weights_identity(bench.model),
            "calibration": {"tokens": cal.tokens, "sampling": cal.sampling, "windows_available": cal.available},
            "evaluation": {"windows": len(ev), "sampling": ev.sampling, "windows_available": ev.available}}


def dense(bench: Workbench) -> dict:
    from actsparse.eval.perplexity import perplexity

    desc = "perplexity" if bench.workload.split == "test" else "perplexity, dense"
    return perplexity(bench.model, bench.evaluation, progress=bench.workload.progress, desc=desc,
                      sparse_protocol=bench.workload.sparse_protocol).to_dict()


def sparse_point(bench: Workbench, method: str, target: float) -> dict:
    """One sweep point, before it is set against the dense run (see :func:`sweep_entry`)."""
    from actsparse.eval.perplexity import perplexity
    from actsparse.sparsify.api import desparsify_, sparsify_
    from actsparse.sparsify.modules import bytes_skipped
    from actsparse.sparsify.registry import make_config

    model, config = bench.model, make_config(method, target)
    sparsify_(model, config, stats=bench.stats_for(bench.workload.methods))
    try:
        nominal = bytes_skipped(model, nominal={a.path: a.target for a in model._actsparse_sparsity.assignments
                                                if a.target is not None})
        r = perplexity(model, bench.evaluation, progress=bench.workload.progress,
                       sparse_protocol=bench.workload.sparse_protocol)
    finally:
        desparsify_(model)
    return {"method": method, "target": target, "config": config.to_dict(), "ppl": r.ppl,
            "reached_sparsity": r.reached_sparsity, "bytes_skipped": r.bytes_skipped,
            "nominal_bytes_skipped": nominal, "seconds": r.seconds, "window_nll": r.window_nll,
            "window_tokens": r.window_tokens, "sparse_protocol": r.sparse_protocol}


def sweep_entry(point: dict, dense_result: dict) -> dict:
    """A sweep file's result entry: the point with its ratio to dense and the ratio's 95%
    paired bootstrap interval over the evaluation windows."""
    from actsparse.eval.perplexity import bootstrap_ratio

    ci = bootstrap_ratio(point, dense_result)
    head = {k: point[k] for k in ("method", "target", "config", "ppl")}
    rest = {k: v for k, v in point.items() if k not in head}
    return {**head, "ratio": point["ppl"] / dense_result["ppl"], "ratio_ci95": list(ci), **rest}


# default upper end of pplp's bisection range: the CETT value for cett (PPL-1% lies near 0.03 on
# SmolLM2), the uniform sparsity (0.6) for the other families (PPL-1% lies below 0.4 for all of them)
HI = {"cett": 0.25}


def pplp_family(bench: Workbench, method: str, dense_ppl: float, *, p: float, hi: float | None,
                steps: int) -> dict:
    """One family's PPL-p% bisection, with its own calibration (one family's statistics at a
    time: all families together held > 11 GB on SmolLM2)."""
    from actsparse.eval.perplexity import ppl_p_search
    from actsparse.sparsify.registry import make_config

    w = bench.workload
    stats = bench.stats_for((method,))
    hi = hi if hi is not None else HI.get(method, 0.6)
    r = ppl_p_search(bench.model, lambda x: make_config(method, x), stats, bench.evaluation, dense_ppl, p=p, hi=hi,
                     steps=steps, progress=w.progress, desc=f"pplp {method}", sparse_protocol=w.sparse_protocol)
    bench.stats.clear()
    r["protocol"].update({"data": w.data, "text_options": w.text_options, "split": w.split,
                          "sampling": bench.evaluation.sampling, "calibration_tokens": bench.calibration.tokens,
                          "calibration_sampling": bench.calibration.sampling})
    r["config"] = make_config(method, r["knob"]).to_dict()
    return r


def run_cell(bench: Workbench, cell: dict) -> dict:
    """Run one cell (see the module docstring) on ``bench``."""
    kind = cell["kind"]
    if kind == "describe":
        return describe(bench)
    if kind == "dense":
        return dense(bench)
    if kind == "sparse":
        return sparse_point(bench, cell["method"], cell["target"])
    if kind == "pplp":
        return pplp_family(bench, cell["method"], cell["dense_ppl"], p=cell["p"], hi=cell.get("hi"),
                           steps=cell["steps"])
    raise ValueError(f"unknown cell kind {kind!r}")


def cell_name(cell: dict) -> str:
    """How messages name a cell: ``teal @ 0.5``, ``dense``, ``pplp cett``."""
    if cell["kind"] == "sparse":
        return f"{cell['method']} @ {cell['target']:g}"
    if cell["kind"] == "pplp":
        return f"pplp {cell['method']}"
    return cell["kind"]


def run_timed(bench: Workbench, cell: dict) -> dict:
    """:func:`run_cell`, as ``{"result": ..., "calibration_seconds": ...}`` (the time of the
    calibration pass this cell made, None when it reused the statistics)."""
    before = bench.calibrations
    out = run_cell(bench, cell)
    return {"result": out, "calibration_seconds": bench.calibration_seconds if bench.calibrations > before else None}


# ---------------------------------------------------------------- one workbench per worker process
_BENCH: dict[str, Workbench] = {}


def run_cell_here(workload: dict, cell: dict) -> dict:
    """What a worker runs: :func:`run_timed` on this process's workbench for ``workload`` (a
    dict, as it travels), built on first use and kept (one at a time), so a worker that runs
    several cells of one sweep loads the model and calibrates once."""
    w = Workload.from_dict(workload)
    key = w.key()
    if key not in _BENCH:
        _BENCH.clear()
        _BENCH[key] = Workbench.build(w)
    return run_timed(_BENCH[key], cell)
