"""Peak memory of layer-by-layer calibration against in-memory calibration.

For SmolLM2-135M (its cached fp32 safetensors) and the 1.1B LLaMA shape (TinyLlama's shape,
random weights written once as safetensors under the user cache, not the repository), each
path runs in a fresh process on the same windows of the wiki calibration split:

* ``memory``: ``from_pretrained`` the whole model, then ``calibrate``;
* ``layerwise``: ``calibrate_layerwise`` (one decoder layer resident at a time).

Methods TEAL + CHESS (CHESS adds the second pass). Reported per run: the peak resident set
(``VmHWM`` of /proc/self/status: ``ru_maxrss`` would report the parent's peak, which
Linux carries across ``exec``), the resident set after imports (the interpreter, torch, transformers: the
same for both paths), the resident set after a warm-up run of the same path on a 2-layer LLaMA (numba's
kernels compiled or loaded, lazy imports done: one-time code, not calibration data), and the budget "two layers + activations": 2 x one decoder layer's
fp32 weights + the hidden states of all windows twice (a layer's inputs and outputs) + one
batch's largest intermediates (the MLP's 3 x intermediate and the attention scores).

    .venv/bin/python benchmarks/calibration_layerwise.py --out benchmarks/results/calibration-layerwise.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import transformers
from safetensors.torch import load_file
from actsparse.data.text import Windows
from actsparse.sparsify import CHESS, TEAL
from actsparse.sparsify.api import calibrate
from actsparse.sparsify.layerwise import calibrate_layerwise
def status_kb(field):  # this process's own figures (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
mode, directory, windows_file, threads, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
t = load_file(windows_file)
w = Windows(t["input_ids"], t["attention_mask"])
cfgs = [TEAL(sparsity=0.5), CHESS(sparsity=0.5)]
cold = status_kb("VmRSS")
# the same path once on a 2-layer model: numba's kernels compiled or loaded, lazy imports done
tiny = Windows(w.input_ids % 1000, w.attention_mask)
if mode == "memory":
    calibrate(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[6]).eval(), cfgs, tiny, batch_size=batch)
else:
    calibrate_layerwise(sys.argv[6], cfgs, tiny, batch_size=batch)
import gc; gc.collect()
base = status_kb("VmRSS")
t0 = time.perf_counter()
if mode == "memory":
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    loaded = status_kb("VmHWM")
    stats = calibrate(model, cfgs, w, batch_size=batch)
else:
    loaded = None
    stats = calibrate_layerwise(directory, cfgs, w, batch_size=batch)
peak = status_kb("VmHWM")
thr = {k: v.abs_quantile(0.5) for k, v in stats.items()}
print(json.dumps({"mode": mode, "peak_kb": peak, "after_imports_kb": cold, "after_warmup_kb": base,
                  "after_load_kb": loaded,
                  "seconds": time.perf_counter() - t0, "statistics": len(stats), "median_abs": thr}))
"""


def synthetic_dir(name: str) -> Path:
    """The random-weight model ``name`` as a safetensors directory in the user cache (written once)."""
    from actsparse.bench.decode import build_synthetic
    from actsparse.cache import cache_dir

    target = cache_dir() / "bench" / f"{name}-seed0"
    if not (target / "config.json").is_file():
        model, _ = build_synthetic(name, seed=0)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))  # renamed into place when complete
        model.save_pretrained(tmp)
        del model
        os.replace(tmp, target)
    return target


def tiny_llama_dir(path: Path) -> Path:
    """A 2-layer LLaMA with random weights: the warm-up model of every child."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
                     ).eval().save_pretrained(path)
    return path


def budget(directory: Path, windows, batch: int) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(directory))
    h, inter, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", heads)
    hd = h // heads
    layer = 4 * (h * h * 2 + 2 * h * kv * hd + 3 * h * inter + 2 * h)
    n, t = windows.input_ids.shape
    hidden_all = 4 * n * t * h
    b = min(batch, n)
    per_batch = 4 * max(3 * b * t * inter, b * heads * t * t)
    return {"layer_bytes": layer, "hidden_states_bytes": hidden_all, "batch_intermediate_bytes": per_batch,
            "two_layers_plus_activations_bytes": 2 * layer + 2 * hidden_all + per_batch,
            "embedding_bytes": 4 * c.vocab_size * h, "layers": c.num_hidden_layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,llama-1.1b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="actsparse-out/calibration-layerwise.json", help="JSON output (default: %(default)s)")
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    import actsparse as asp
    from actsparse.bench.decode import SYNTHETIC
    from actsparse.data.text import text, token_windows
    from actsparse.io import write_json
    from actsparse.models.loading import weights_directory
    from actsparse.provenance import git_hash, machine_info

    _, tok = asp.load("smollm2-135m")
    windows = token_windows(tok, text("wiki", "calibration"), window=args.window, max_tokens=args.tokens)
    rows = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        warm_dir = tiny_llama_dir(Path(tmp) / "tiny")
        for name in args.models.split(","):
            directory = synthetic_dir(name) if name in SYNTHETIC else weights_directory(name)
            ids = windows.input_ids
            if name in SYNTHETIC:  # real text's token ids, folded into the random model's vocabulary
                ids = ids % SYNTHETIC[name][2]["vocab_size"]
            wf = Path(tmp) / f"{name}.safetensors"
            save_file({"input_ids": ids.contiguous(), "attention_mask": windows.attention_mask.contiguous()}, str(wf))
            row = {"model": name, "directory": str(directory), **budget(directory, windows, args.batch_size)}
            for mode in ("memory", "layerwise"):
                out = subprocess.run([sys.executable, "-c", CHILD, mode, str(directory), str(wf), str(args.threads),
                                      str(args.batch_size), str(warm_dir)], capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(f"{name} {mode} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                row[mode] = res
                above = (res["peak_kb"] - res["after_imports_kb"]) * 1024
                warm = (res["peak_kb"] - res["after_warmup_kb"]) * 1024
                print(f"{name} {mode}: peak {res['peak_kb'] / 2**20:.2f} GiB, {above / 2**30:.2f} GiB above imports, "
                      f"{warm / 2**30:.2f} GiB above the warmed-up process, {res['seconds']:.0f} s", flush=True)
            mem, lw = row["memory"], row["layerwise"]
            row["same_median_abs"] = mem.pop("median_abs") == lw.pop("median_abs")
            row["layerwise_above_imports_bytes"] = (lw["peak_kb"] - lw["after_imports_kb"]) * 1024
            row["memory_above_imports_bytes"] = (mem["peak_kb"] - mem["after_imports_kb"]) * 1024
            row["layerwise_above_warmup_bytes"] = (lw["peak_kb"] - lw["after_warmup_kb"]) * 1024
            row["memory_above_warmup_bytes"] = (mem["peak_kb"] - mem["after_warmup_kb"]) * 1024
            # the budget bounds the calibration's data (weights, activations), so it is checked against the
            # warmed-up process; the one-time code (numba's kernels, lazy imports) is reported beside it
            row["layerwise_within_budget"] = row["layerwise_above_warmup_bytes"] <= row["two_layers_plus_activations_bytes"]
            rows.append(row)
    write_json(args.out, {"benchmark": "calibration-layerwise", "dtype": "float32", "methods": ["teal", "chess"],
                          "tokens": windows.tokens, "windows": len(windows), "window": args.window,
                          "batch_size": args.batch_size, "threads": args.threads, "machine": machine_info(),
                          "git": git_hash(short=False), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
