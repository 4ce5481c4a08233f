"""Capture sessions, streaming accumulators and sparsity metrics."""
from actsparse.measure.accumulators import DEFAULT_EPS, SiteStats
from actsparse.measure import metrics
from actsparse.measure.capture import Probe, capture, resolve_sites, run

__all__ = ["DEFAULT_EPS", "Probe", "SiteStats", "capture", "metrics", "resolve_sites", "run"]
