"""Downstream accuracy through lm-eval-harness: BLiMP and a cloze task, on the model object.

The adapter is lm-eval's own ``HFLM`` built over the in-memory model (``HFLM(pretrained=model,
tokenizer=tok)``): a sparsified model carries its sparse modules in place, so every forward
lm-eval runs is sparse, context and continuation alike (the ``all`` protocol of
:func:`~actsparse.eval.perplexity.perplexity`). Sparse modules act token by token, so
lm-eval's batching and right padding change nothing for the real tokens. The ``decode``
protocol (dense context, sparse continuation) is not offered for downstream tasks.

Task data is read locally: the YAMLs in ``lmeval_tasks/`` (shipped with the package) get their
``data_files`` here, one task per BLiMP paradigm (``<dir>/<paradigm>.jsonl``) and one cloze task
(passages from :func:`~actsparse.eval.cloze.cloze_passages`, written as JSON lines to a
temporary folder). ``limit`` caps the items per task: the first ``limit`` pairs of each
paradigm (copied to the temporary folder), ``limit`` cloze passages spread over the split.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from actsparse.errors import ConfigError, DataError, StateError, UnsupportedError

TASKS = ("blimp", "cloze")
BLIMP_ENV = "ACTSPARSE_BLIMP_DIR"
TASK_DIR = Path(__file__).with_name("lmeval_tasks")
INSTALL_HINT = "pip install 'actsparse[lmeval]'"


@dataclass
class TaskResult:
    """One task's accuracy on one model, with every item's outcome (for paired comparisons)."""

    task: str
    accuracy: float
    items: int
    correct: list[int]  # 1/0 per item, in ``item_ids`` order
    item_ids: list[str]
    loglikelihoods: list = field(default_factory=list)  # per item: BLiMP [good, bad], cloze [target]
    per_field: dict = field(default_factory=dict)  # BLiMP: field -> {"accuracy", "items"}
    per_paradigm: dict = field(default_factory=dict)  # BLiMP: UID -> {"accuracy", "items", "field", "term"}
    details: dict = field(default_factory=dict)  # where the items came from, how they were built

    def to_dict(self) -> dict:
        return asdict(self)


def require_lm_eval():
    """Import lm-eval, or say how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise UnsupportedError(f"downstream tasks run through lm-eval-harness, which is not installed ({err}): "
                               f"{INSTALL_HINT}") from None
    return lm_eval


def check_tasks(tasks) -> list[str]:
    """``tasks`` (a list, or a comma-separated string) as a list of known task names."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError(f"no task given; choose from {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}; the tasks are {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a task is named twice in {', '.join(names)}")
    return names


def _repo_blimp_dir() -> Path:
    """``../shared/data/blimp`` beside the repository (src/actsparse/eval -> repo root)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "blimp"


def resolve_blimp_dir(path=None) -> Path:
    """The BLiMP folder: ``path``, else ``$ACTSPARSE_BLIMP_DIR``, else ``../shared/data/blimp``
    next to the repository if it exists. It must hold ``<paradigm>.jsonl`` files."""
    if path is None:
        path = os.environ.get(BLIMP_ENV) or None
    if path is None:
        default = _repo_blimp_dir()
        if not default.is_dir():
            raise DataError(f"BLiMP needs its data: give the folder of its <paradigm>.jsonl files with --blimp-dir "
                            f"(or ${BLIMP_ENV}); get them from the data folder of "
                            f"https://github.com/alexwarstadt/blimp (CC BY 4.0)")
        path = default
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"BLiMP folder {path} does not exist (--blimp-dir / ${BLIMP_ENV})")
    if not any(path.glob("*.jsonl")):
        raise DataError(f"BLiMP folder {path} holds no <paradigm>.jsonl file (--blimp-dir / ${BLIMP_ENV})")
    return path


def _template(name: str) -> dict:
    import yaml

    return yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())


def blimp_task_configs(directory, cache: Path, *, limit: int | None = None, folder: Path | None = None
                       ) -> dict[str, dict]:
    """lm-eval task configs, one per paradigm file of ``directory`` (task name -> config). With
    ``limit``, the first ``limit`` lines of each file are copied to ``folder`` and read from
    there (lm-eval builds a task from every document of its file, 0.3 s per 1000-pair paradigm)."""
    from actsparse.io import write_text

    base = _template("blimp")
    configs = {}
    for f in sorted(Path(directory).glob("*.jsonl")):
        name = f"actsparse_blimp_{f.stem}"
        if limit is not None:
            lines = [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
            f = write_text(Path(folder) / "blimp" / f.name, "".join(line + "\n" for line in lines))
        configs[name] = {**base, "task": name,
                         "dataset_kwargs": {"data_files": {"test": str(f)}, "cache_dir": str(cache)}}
    return configs


def cloze_task_config(passages: list[dict], folder: Path, cache: Path) -> dict:
    """The lm-eval config of the cloze task over ``passages`` (written to ``folder``)."""
    from actsparse.io import write_text

    path = Path(folder) / "cloze.jsonl"
    write_text(path, "".join(json.dumps(p) + "\n" for p in passages))
    return {**_template("cloze"), "task": "actsparse_cloze",
            "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(cache)}}


def _check_model(model) -> int:
    """The number of sparse modules; refuses a model whose sparse modules are bypassed."""
    from actsparse.models.loading import require_causal_lm
    from actsparse.sparsify.modules import iter_sparse_modules

    require_causal_lm(model, what="downstream tasks")
    mods = [m for _, m in iter_sparse_modules(model)]
    if any(m.bypass for m in mods):
        raise StateError("the model's sparse modules are bypassed (inside dense_forward): its accuracy would be the "
                         "dense model's; evaluate it outside dense_forward, or desparsify_ it for the dense baseline")
    return len(mods)


def evaluate_tasks(model, tokenizer, tasks=TASKS, *, blimp_dir=None, limit: int | None = 100,
                   cloze_data="wiki", cloze_split: str = "test", cloze_context_words: int = 64,
                   text_options: dict | None = None, batch_size: int = 32) -> dict[str, TaskResult]:
    """Accuracy of ``model`` (as it is: dense, or sparsified in place) on ``tasks`` ("blimp",
    "cloze") through lm-eval's ``HFLM`` adapter. ``limit``: items per task (pairs per BLiMP
    paradigm, cloze passages; None: all). BLiMP is read from ``blimp_dir`` (see
    :func:`resolve_blimp_dir`); the cloze passages come from ``cloze_data`` (a corpus name, path
    or list of documents, as :func:`~actsparse.data.text.text` reads it, with
    ``text_options``) split ``cloze_split``. ``batch_size``: requests per forward (lm-eval sorts
    them by length and pads on the right). lm-eval shows its own progress bars. Returns one
    :class:`TaskResult` per task."""
    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of items per task (or None for all), got {limit}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n_sparse = _check_model(model)
    directory = resolve_blimp_dir(blimp_dir) if "blimp" in tasks else None
    passages = None
    if "cloze" in tasks:
        from actsparse.data.text import text

        from actsparse.eval.cloze import cloze_passages

        docs = (text(cloze_data, cloze_split, **(text_options or {})) if isinstance(cloze_data, (str, Path))
                else list(cloze_data))
        passages = cloze_passages(docs, context_words=cloze_context_words, limit=limit)
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="actsparse-lmeval-") as tmp:
        cache = Path(tmp) / "datasets"
        configs = {}
        if directory is not None:
            configs.update(blimp_task_configs(directory, cache, limit=limit, folder=Path(tmp)))
        if passages is not None:
            configs["actsparse_cloze"] = cloze_task_config(passages, Path(tmp), cache)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(configs.values()),
                                      task_manager=TaskManager(include_defaults=False),
                                      bootstrap_iters=0, log_samples=True, random_seed=None,
                                      numpy_random_seed=None, torch_random_seed=None)
    if n_sparse != _check_model(model):
        raise StateError("the model's sparse modules changed during the evaluation")
    samples = out["samples"]
    results = {}
    if directory is not None:
        results["blimp"] = _blimp_result(samples, [n for n in configs if n != "actsparse_cloze"], directory, limit)
    if passages is not None:
        rows = sorted(samples["actsparse_cloze"], key=lambda s: s["doc_id"])
        correct = [int(s["acc"]) for s in rows]
        results["cloze"] = TaskResult(
            "cloze", float(np.mean(correct)), len(correct), correct, [f"cloze/{s['doc_id']}" for s in rows],
            loglikelihoods=[[float(r[0]) for r in s["filtered_resps"]] for s in rows],
            details={"data": str(cloze_data) if isinstance(cloze_data, (str, Path)) else "documents",
                     "split": cloze_split, "context_words": cloze_context_words, "limit": limit,
                     "construction": "sentence-final words (3+ letters and a full stop) with the preceding "
                                     "context words of the same document; non-overlapping; evenly spread subset",
                     "metric": "greedy match of every token of ' ' + target after the context"})
    for r in results.values():
        r.details.update({"sparse_modules": n_sparse, "adapter": "lm_eval HFLM (in-memory model)",
                          "lm_eval": getattr(lm_eval, "__version__", None), "protocol": "all"})
    return results


def _blimp_result(samples: dict, names: list[str], directory: Path, limit) -> TaskResult:
    correct, ids, lls, per_field, per_paradigm = [], [], [], {}, {}
    for name in names:
        rows = sorted(samples[name], key=lambda s: s["doc_id"])
        if not rows:
            raise DataError(f"BLiMP task {name} has no item ({directory})")
        doc = rows[0]["doc"]
        uid = doc.get("UID", name.removeprefix("actsparse_blimp_"))
        fld = str(doc.get("field", "unknown")).replace("/", "_")  # the data spells both syntax_semantics and syntax/semantics
        acc = [int(s["acc"]) for s in rows]
        per_paradigm[uid] = {"accuracy": float(np.mean(acc)), "items": len(acc), "field": fld,
                             "term": doc.get("linguistics_term")}
        f = per_field.setdefault(fld, {"correct": 0, "items": 0})
        f["correct"] += sum(acc)
        f["items"] += len(acc)
        correct += acc
        lls += [[float(r[0]) for r in s["filtered_resps"]] for s in rows]
        ids += [f"{uid}/{s['doc'].get('pairID', s['doc_id'])}" for s in rows]
    per_field = {k: {"accuracy": v["correct"] / v["items"], "items": v["items"]} for k, v in sorted(per_field.items())}
    return TaskResult("blimp", float(np.mean(correct)), len(correct), correct, ids, lls, per_field=per_field,
                      per_paradigm=per_paradigm,
                      details={"data": str(directory), "paradigms": len(names), "limit_per_paradigm": limit,
                               "metric": "good sentence has the higher total log-probability (after BOS)",
                               "overall": "mean over all pairs"})


def paired_difference(sparse: TaskResult | dict, dense: TaskResult | dict, *, level: float = 0.95,
                      samples: int = 2000, seed: int = 0) -> dict:
    """Accuracy of ``sparse`` minus ``dense`` on the same items, with its standard error
    (of the mean per-item difference) and a paired bootstrap interval (resampling items)."""
    s, d = (r if isinstance(r, dict) else r.to_dict() for r in (sparse, dense))
    if s["item_ids"] != d["item_ids"]:
        raise DataError(f"a paired difference needs both results on the same items ({s['task']}: "
                        f"{len(s['item_ids'])} vs {len(d['item_ids'])} items, or other items)")
    diff = np.asarray(s["correct"], float) - np.asarray(d["correct"], float)
    n = diff.size
    se = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, n, size=(samples, n))].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(diff.mean()), "stderr": se, "ci": [float(lo), float(hi)], "level": level,
            "items": n, "discordant": int((diff != 0).sum())}


def format_results(runs: dict[str, dict[str, TaskResult]]) -> str:
    """A plain-text table: one row per run (e.g. dense, sparse), a column per task and BLiMP field."""
    fields = sorted({f for r in runs.values() if "blimp" in r for f in r["blimp"].per_field})
    head = ["run"] + [t for t in TASKS if any(t in r for r in runs.values())]
    head += [f"blimp:{f}" for f in fields]
    lines = ["  ".join(f"{h:>18}" for h in head)]
    for label, res in runs.items():
        cells = [label]
        for t in head[1:]:
            if t.startswith("blimp:"):
                v = res.get("blimp").per_field.get(t[6:]) if "blimp" in res else None
                cells.append(f"{100 * v['accuracy']:.1f} (n={v['items']})" if v else "-")
            else:
                v = res.get(t)
                cells.append(f"{100 * v.accuracy:.1f} (n={v.items})" if v else "-")
        lines.append("  ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)
