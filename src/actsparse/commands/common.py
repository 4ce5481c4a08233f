"""Options shared by several commands."""
from __future__ import annotations

import argparse

import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m, minilm), a local Hugging Face model directory, "
                        "a .gguf file, or a hub id (needs internet). Default: %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations dtype. Default: %(default)s")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice, usually the number of cores)")


def add_data_options(p: argparse.ArgumentParser, *, split: str = "calibration", tokens: int = 4096) -> None:
    p.add_argument("--data", default="wiki",
                   help="embedded corpus (wiki: gensim's Wikipedia articles; news: the Lee corpus), "
                        "a .txt file (documents separated by blank lines), a .jsonl file (field 'text'), "
                        "or a folder of .txt/.md/.jsonl files. Default: %(default)s")
    p.add_argument("--split", default=split, choices=["calibration", "validation", "test", "all"],
                   help="document split: calibration = first 40%% of documents, validation = next 30%%, "
                        "test = last 30%%. Default: %(default)s")
    p.add_argument("--tokens", type=int, default=tokens, help="tokens to run. Default: %(default)s")
    p.add_argument("--window", type=int, default=512, help="tokens per window (sequence). Default: %(default)s")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward. Default: %(default)s")


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n
