"""Training-free activation sparsification: method configs, sparse modules, plans.

    sparsify_(model, TEAL(sparsity=0.5), calibration=windows)

Each method is one module here (its config, its registered handler, its math); importing
this package registers them all (see :mod:`actsparse.sparsify.registry`).
"""
from actsparse.sparsify.cats import CATS
from actsparse.sparsify.cett import CETT
from actsparse.sparsify.chess import CHESS
from actsparse.sparsify.rsparse import RSparse
from actsparse.sparsify.teal import TEAL
from actsparse.sparsify.topk import TopK
from actsparse.sparsify.wina import WINA
from actsparse.sparsify.api import calibrate, desparsify_, is_sparsified, sparsify_  # noqa: E402
from actsparse.sparsify.modules import (MaskedLinear, ThresholdedActivation, bytes_skipped,  # noqa: E402
                                        iter_sparse_modules, reached_sparsity, reset_counts)
from actsparse.sparsify.registry import (Handler, SparsityConfig, make_config, method_names,  # noqa: E402
                                         preset_names, register_handler, register_method, register_preset)

__all__ = ["TEAL", "CATS", "CHESS", "TopK", "WINA", "CETT", "RSparse", "sparsify_", "desparsify_", "calibrate",
           "is_sparsified", "MaskedLinear", "ThresholdedActivation", "iter_sparse_modules",
           "reached_sparsity", "reset_counts", "bytes_skipped", "Handler", "SparsityConfig", "make_config",
           "method_names", "preset_names", "register_handler", "register_method", "register_preset"]
