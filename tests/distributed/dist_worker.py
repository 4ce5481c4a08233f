"""One rank of a data-parallel test run (started by torchrun from test_data_parallel.py).

    dist_worker.py MODE OUT [options]

MODE calibrate: calibrate a tiny random LLaMA (TEAL, CHESS: two passes, TEAL greedy: row
samples, CETT) on fixed windows; each rank writes its merged statistics and the thresholds.
MODE reduce: all-reduce hand-made statistics (counts above 2**53) and write them.
MODE ppl: perplexity of the tiny model; each rank writes its gathered per-window NLLs.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sparsify"))

from sparsify_helpers import random_windows, tiny_llama  # noqa: E402


def configs(sparsity):
    from actsparse.sparsify import CETT, CHESS, TEAL

    return [TEAL(sparsity=sparsity), CHESS(sparsity=sparsity),
            TEAL(sparsity=sparsity, allocation="greedy", greedy_error="linear", greedy_tokens=256), CETT(sample_tokens=300)]


def thresholds(model, cfgs, stats) -> list:
    from actsparse.sparsify.api import plan_assignments

    out = []
    for c in cfgs:
        for a in plan_assignments(model, c, stats):
            thr = a.threshold.tolist() if isinstance(a.threshold, torch.Tensor) else a.threshold
            out.append([c.METHOD, a.path, thr])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-on-rank1", type=int, default=None)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--sparsity-on-rank1", type=float, default=None)
    ap.add_argument("--windows", type=int, default=9)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from actsparse.io import write_json, write_safetensors
    from actsparse.measure import distributed

    world = distributed.init_from_env()
    seed = args.seed_on_rank1 if world.rank == 1 and args.seed_on_rank1 is not None else args.seed
    sparsity = args.sparsity_on_rank1 if world.rank == 1 and args.sparsity_on_rank1 is not None else args.sparsity
    out = args.out / f"rank{world.rank}"
    try:
        if args.mode == "calibrate":
            from actsparse.sparsify.api import calibrate

            model = tiny_llama(seed=seed)
            windows = random_windows(n=args.windows, pad_last=20)
            cfgs = configs(sparsity)
            stats = calibrate(model, cfgs, windows, batch_size=args.batch_size, world=world)
            tensors = {}
            for k, v in stats.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{k}/rows"] = v.contiguous()
                else:
                    tensors.update(v.to_tensors(prefix=f"{k}/"))
            write_safetensors(out.with_suffix(".safetensors"), tensors)
            write_json(out.with_suffix(".json"), {"thresholds": thresholds(model, cfgs, stats)})
        elif args.mode == "reduce":
            from actsparse.measure.accumulators import SiteStats

            g = torch.Generator().manual_seed(100 + world.rank)
            st = SiteStats(16)
            st.update(torch.randn(50 + 7 * world.rank, 16, generator=g))
            st.count += 2 ** 60 + world.rank  # beyond float64's exact integers: an int64 sum stays exact
            st.hist[3] += 2 ** 55 + 1
            merged = distributed.all_reduce_stats({"site": st}, world)["site"]
            write_safetensors(out.with_suffix(".safetensors"), merged.to_tensors())
        elif args.mode == "ppl":
            from actsparse.eval.perplexity import perplexity

            model = tiny_llama(seed=seed)
            res = perplexity(model, random_windows(n=args.windows, pad_last=20), batch_size=args.batch_size,
                             world=world)
            write_json(out.with_suffix(".json"), res.to_dict())
    except Exception as err:  # noqa: BLE001 - the test reads the message
        write_json(out.with_suffix(".error.json"), {"type": type(err).__name__, "message": str(err)})
        return 3
    finally:
        distributed.finish(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
