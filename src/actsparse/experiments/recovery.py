"""The ``actsparse recover`` job: load a model, install a TEAL plan (given, or calibrated
here), distil it against its dense copy (:func:`actsparse.train.recovery.recovery_loop`),
record a held-out PPL-vs-tokens curve, and evaluate the final figure under both protocols.

Outputs in ``out``: ``plan/`` (the plan trained for), ``log.jsonl`` and checkpoints (the
loop's), ``curve.jsonl`` (one line per curve point: step, tokens, PPL, ratio to dense on the
same windows, weight bytes skipped), ``recovery/`` (the trained artefact) and
``summary.json`` (dense, before and after under ``all`` and ``decode``, the curve, the cost).
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

from actsparse.data.text import text, token_windows
from actsparse.eval.perplexity import perplexity
from actsparse.io import read_json, write_json
from actsparse.models.loading import check_window, load, require_causal_lm
from actsparse.sparsify.api import desparsify_, install, sparsity_state, sparsify_
from actsparse.sparsify.plan import load_plan, save_plan
from actsparse.sparsify.teal import TEAL
from actsparse.train.loop import truncate_log
from actsparse.train.recovery import RecoveryConfig, prepare_trainable_, recovery_loop, save_recovery

PROTOCOLS = ("all", "decode")


def _ppl(model, windows, batch_size: int, protocol: str = "all") -> dict:
    r = perplexity(model, windows, batch_size=batch_size, sparse_protocol=protocol)
    return {"ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "protocol": r.protocol,
            "sparse_protocol": protocol, "bytes_skipped": r.bytes_skipped, "reached_sparsity": r.reached_sparsity,
            "seconds": round(r.seconds, 2), "window_nll": r.window_nll, "window_tokens": r.window_tokens}


def _cached(path: Path, key: dict, compute) -> dict:
    """``compute()`` once per ``key`` (the windows it is evaluated on), kept in ``path``."""
    if path.is_file():
        doc = read_json(path)
        if doc.get("key") == key:
            return doc["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def _read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recover(config: RecoveryConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
            dtype: str = "float32") -> dict:
    """Run (or continue) one recovery: see the module docstring for what lands in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load(config.model, dtype=dtype)
    require_causal_lm(model, config.model, "recovery training")
    check_window(model, max(config.window, config.eval_window))
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    plan_dir = out / "plan"
    if config.plan is not None:
        load_plan(model, config.plan)
    elif (plan_dir / "plan.json").is_file() and resume:
        load_plan(model, plan_dir)
    else:
        cal = token_windows(tok, text(config.data, "calibration"), window=config.calib_window,
                            max_tokens=config.calib_tokens)
        sparsify_(model, TEAL(sparsity=config.sparsity), calibration=cal, progress=progress)
    save_plan(model, plan_dir)
    state = sparsity_state(model)
    params = prepare_trainable_(model, config)
    windows = token_windows(tok, text(config.data, config.split), window=config.window)
    key = {"data": config.data, "window": config.eval_window}
    curve_w = token_windows(tok, text(config.data, "test"), window=config.eval_window,
                            max_tokens=config.eval_tokens) if config.eval_tokens else None
    dense_curve = (_cached(out / "dense-curve.json", {**key, "tokens": config.eval_tokens},
                           lambda: _ppl(teacher, curve_w, config.eval_batch_size)) if curve_w else None)
    curve_path = out / "curve.jsonl"

    def add_point(record: dict) -> None:
        if curve_w is None:
            return
        r = _ppl(model, curve_w, config.eval_batch_size)
        point = {"step": record["step"], "tokens": record["tokens"], "ppl": r["ppl"],
                 "ratio": r["ppl"] / dense_curve["ppl"], "bytes_skipped": r["bytes_skipped"],
                 "eval_tokens": r["tokens"], "seconds": r["seconds"], "result": r}
        with open(curve_path, "a") as fh:
            fh.write(json.dumps(point) + "\n")

    def callback(record: dict) -> None:
        if record["step"] % config.eval_every == 0 or record["step"] == config.steps:
            add_point(record)

    start = 0
    if resume and (out / "latest.json").is_file():
        start = int(read_json(out / "latest.json")["step"])
    truncate_log(curve_path, start) if resume else curve_path.unlink(missing_ok=True)
    t_train = time.perf_counter()
    if start == 0 and not any(p["step"] == 0 for p in _read_curve(curve_path)):
        add_point({"step": 0, "tokens": 0})  # the sparsified model before training
    last = recovery_loop(model, teacher, windows, config, params, out, resume=resume, progress=progress,
                         callback=callback)
    if not any(p["step"] == last["step"] for p in _read_curve(curve_path)):
        add_point(last)  # a run resumed at its end, or extended to a step off the grid
    train_seconds = time.perf_counter() - t_train
    save_recovery(model, out / "recovery", params, config, meta={"step": last["step"], "tokens": last["tokens"]})
    log = _read_curve(out / "log.jsonl")
    curve_points = [{k: v for k, v in p.items() if k != "result"} for p in _read_curve(curve_path)]
    summary = {"config": config.to_dict(), "steps": config.steps, "last": last, "curve": curve_points,
               "dense_curve": {k: v for k, v in (dense_curve or {}).items() if not k.startswith("window_")},
               "trained_parameters": int(sum(p.numel() for p in params.values())),
               "train_tokens_available": windows.tokens,
               "cost": training_cost(log), "seconds_this_run": round(time.perf_counter() - t_start, 2),
               "train_seconds_this_run": round(train_seconds, 2)}
    if config.final_tokens:
        final_w = token_windows(tok, text(config.data, "test"), window=config.eval_window,
                                max_tokens=config.final_tokens)
        fkey = {**key, "tokens": config.final_tokens}
        summary["final"] = {"dense": {}, "before": {}, "after": {}}
        curve = _read_curve(curve_path)
        for protocol in PROTOCOLS:
            if protocol == "all" and config.final_tokens == config.eval_tokens and curve and curve[0]["step"] == 0:
                # the curve's windows: its dense, step-0 and last points are these figures
                summary["final"]["dense"]["all"] = dense_curve
                summary["final"]["before"]["all"] = curve[0]["result"]
                summary["final"]["after"]["all"] = curve[-1]["result"]
                continue
            summary["final"]["dense"][protocol] = _cached(
                out / f"dense-final-{protocol}.json", fkey,
                lambda: _ppl(teacher, final_w, config.eval_batch_size, protocol))

            def before():
                install(teacher, state.config, state.assignments)  # the plan on the dense weights: no training
                try:
                    return _ppl(teacher, final_w, config.eval_batch_size, protocol)
                finally:
                    desparsify_(teacher)

            summary["final"]["before"][protocol] = _cached(out / f"before-final-{protocol}.json", fkey, before)
            summary["final"]["after"][protocol] = _ppl(model, final_w, config.eval_batch_size, protocol)
        summary["ratios"] = {f"{when}_{protocol}": summary["final"][when][protocol]["ppl"]
                             / summary["final"]["dense"][protocol]["ppl"]
                             for when in ("before", "after") for protocol in PROTOCOLS}
    write_json(out / "summary.json", summary)
    return summary


def training_cost(log: list[dict]) -> dict:
    """Training cost from the log: seconds per step split into teacher and student parts."""
    if not log:
        return {}
    teacher = sum(r["teacher_s"] for r in log)
    student = sum(r["student_s"] for r in log)
    tokens = log[-1]["tokens"]
    return {"steps": len(log), "tokens": tokens, "teacher_seconds": round(teacher, 2),
            "student_seconds": round(student, 2), "train_seconds": round(teacher + student, 2),
            "tokens_per_second": tokens / (teacher + student) if teacher + student else None,
            "teacher_fraction": teacher / (teacher + student) if teacher + student else None}
