"""Speed benchmarks: kernels (``kernel``), end-to-end decoding (``decode``), one timing
harness (``timing``). Provenance records come from :mod:`actsparse.provenance`. Results
are JSON; :mod:`actsparse.report` only renders them."""
