"""The ``actsparse finetune`` job: load a model, ReLU-fy it, train it with the reference loop
(:func:`actsparse.train.loop.train_loop`: ProSparse L1, resumable), evaluate held-out
perplexity and sparsity (again after FATReLU when asked), save the model and a summary.

An end-to-end job above the library layers: the training loop itself knows nothing of
evaluation, which lives in :mod:`actsparse.eval`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from actsparse.data.text import text, token_windows
from actsparse.eval.perplexity import perplexity
from actsparse.io import write_json
from actsparse.models.loading import check_window, load, require_causal_lm
from actsparse.train.fatrelu import fatrelu_
from actsparse.train.loop import FinetuneConfig, train_loop
from actsparse.train.losses import ActivationL1
from actsparse.train.relufy import relufy_


def evaluate(model: nn.Module, windows, sites: str = "mlp.down:input", batch_size: int = 4) -> dict:
    """Held-out perplexity plus the exact-zero sparsity of ``sites`` over the real tokens of
    the same windows."""
    model.eval()
    with ActivationL1(model, sites) as l1:
        res = perplexity(model, windows, batch_size=batch_size).to_dict()
        res["protocol"] = "non-overlapping windows (actsparse.eval.perplexity)"
        res["sparsity"] = l1.total_sparsity
    return res


# --------------------------------------------------------------------- command
def finetune(config: FinetuneConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
             evaluate_at_end: bool = True, save_model: bool = True, dtype: str = "float32") -> dict:
    """Load ``config.model``, relufy it, train with :func:`train_loop`, evaluate held-out
    perplexity and sparsity (before and after FATReLU when ``config.fatrelu`` is set),
    save the final model to ``out/model`` and a summary to ``out/summary.json``."""
    out = Path(out)
    model, tok = load(config.model, dtype=dtype)
    require_causal_lm(model, config.model, "fine-tuning with the LM loss")
    check_window(model, config.window)
    changes = relufy_(model, after_norms=config.after_norms) if config.relufy else []
    windows = token_windows(tok, text(config.data, config.split), window=config.window, max_tokens=config.max_tokens)
    t0 = time.perf_counter()
    last = train_loop(model, windows, config, out, resume=resume, progress=progress)
    summary = {"config": config.to_dict(), "schedule": config.build_schedule().to_dict(),
               "train_windows": len(windows), "train_tokens": windows.tokens,
               "changes": [c._asdict() for c in changes], "last": last,
               "seconds_this_run": round(time.perf_counter() - t0, 2)}
    if evaluate_at_end and config.eval_tokens > 0:
        ev = token_windows(tok, text(config.data, config.eval_split), window=config.window,
                           max_tokens=config.eval_tokens)
        summary["eval"] = {"relu": evaluate(model, ev, config.sites, config.eval_batch_size)}
        if config.fatrelu is not None:
            summary["changes"] += [c._asdict() for c in fatrelu_(model, config.fatrelu)]
            summary["eval"]["fatrelu"] = evaluate(model, ev, config.sites, config.eval_batch_size)
    elif config.fatrelu is not None:
        summary["changes"] += [c._asdict() for c in fatrelu_(model, config.fatrelu)]
    if save_model and hasattr(model, "save_pretrained"):
        target = out / "model"
        model.save_pretrained(target, safe_serialization=True)
        tok.save_pretrained(target)
        write_json(target / "actsparse-train.json", {
            "relufy": config.relufy, "after_norms": config.after_norms, "fatrelu": config.fatrelu,
            "note": "the MLP activation is ReLU in config.json; re-apply relufy_(model, after_norms=True) and "
                    "fatrelu_(model, t) after loading when those were used"})
        summary["model_dir"] = str(target)
    write_json(out / "summary.json", summary)
    return summary
