"""Render a saved profile (profile.json) into report.md / report.html with plots."""
from __future__ import annotations

from pathlib import Path

from actsparse.errors import DataError
from actsparse.io import read_json
from actsparse.measure.profile import FORMAT as PROFILE_FORMAT
from actsparse.report import plots
from actsparse.report.document import Report, pct


# sites whose values are the input of the MLP activation
PRE_ACTIVATION_KINDS = ("mlp.act:input", "mlp.gate:output")


def add_profile_section(report: Report, doc: dict, out_dir: Path, plot_dir: str = "plots") -> Report:
    meta, kinds = doc["meta"], doc["kinds"]
    data = meta["data"]
    report.heading("Activation profile")
    report.text(
        f"Model `{meta['model']}` ({meta['family']} site map, {meta['dtype']}, "
        f"{meta['identity']['num_parameters'] / 1e6:.1f}M parameters) on {data['tokens']} tokens of "
        f"`{data['source']}` ({data['split']} split, {data['windows']} windows of {data['window']}); "
        f"{meta['seconds']:.1f} s, {meta['tokens_per_s']:.0f} tokens/s on {meta['environment']['processor']} "
        f"with {meta['environment']['torch_threads']} threads. Padding is excluded from every statistic."
    )
    if meta.get("nonfinite_values"):
        report.text(f"**Warning**: {meta['nonfinite_values']} non-finite (NaN / inf) activation values were seen; "
                    "they are counted, then excluded from every statistic. " + _nonfinite_layers(kinds))
    rows = []
    for kind, t in kinds.items():
        a = t["over_layers"]
        ts = a["threshold_sparsity"]
        flow = a.get("activation_flow") or {}
        rows.append([
            kind, _layers_cell(t), a["width"], pct(a["zero_sparsity"]), pct(ts.get("0.01")), pct(ts.get("0.1")),
            pct((a.get("temporal_sparsity_eps") or {}).get("0.1")), _dormant_cell(a), a["static_dead"],
            pct(flow.get("shared_frac")), pct(flow.get("specialised_frac")),
        ])
    report.table(["site kind", "layers", "width", "exact 0", "|v|<=0.01", "|v|<=0.1", "|Δv|<=0.1 (temporal)",
                  "dormant τ=0.1: mean (worst layer)", "static dead (v<=0), sum", "flow: shared dims",
                  "flow: specialised dims"], rows)
    report.text(
        "Every figure is computed per layer, then aggregated over the layers of the kind: fractions of entries "
        "(exact 0, |v|, temporal) are means over layers weighted by entries, fractions of neurons (dormant, flow) "
        "means weighted by width (all layers of a kind have the same width and tokens, so both are plain means "
        "over layers), static dead is the sum over layers; the rule of every field is in profile.json "
        "(`aggregation`). "
        f"Dormant: ReDo score E|v_i| / layer mean <= τ. Static dead: never positive over all tokens. "
        f"Activation flow: a neuron is active when |v| > {meta['flow_threshold']}; shared = mean active run "
        f">= 4 tokens, specialised = mean run < 1.5 tokens."
    )
    balance = [(k, t["over_layers"].get("relu_balance")) for k, t in kinds.items()
               if t["over_layers"].get("relu_balance") and k.endswith(PRE_ACTIVATION_KINDS)]
    if balance:
        report.text("ReLU-state balance of the pre-activations (1 = balanced active and inactive states; "
                    "r_mean, r_var: means over layers, active: mean over layers weighted by entries):")
        report.table(["pre-activation site", "r_mean", "r_var", "active (z>0)"],
                     [[k, b["r_mean"], b["r_var"], pct(b["active_frac"])] for k, b in balance])
    quant_rows = [[k] + [t["quantiles"].get(q) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")]
                  for k, t in kinds.items() if t["quantiles"]]
    report.text("Quantiles of |v| over all values of a kind (all its layers pooled):")
    report.table(["site kind", "q10 |v|", "q25", "q50", "q75", "q90"], quant_rows)
    pdir = out_dir / plot_dir
    plots.per_layer_sparsity(kinds, pdir / "sparsity_per_layer.png")
    report.image(f"{plot_dir}/sparsity_per_layer.png", "Per-layer sparsity per site kind")
    plots.abs_histograms(kinds, pdir / "abs_histograms.png")
    report.image(f"{plot_dir}/abs_histograms.png", "|v| histograms per site kind")
    plots.per_layer_metric(kinds, "dormant_ratio_0.1", pdir / "dormant_per_layer.png",
                           "Dormant ratio per layer (ReDo, τ = 0.1)", "dormant fraction")
    report.image(f"{plot_dir}/dormant_per_layer.png", "Dormant ratio per layer")
    return report


def _layers_cell(table: dict) -> str:
    n, bad = len(table["layers"]), len(table.get("layers_without_finite_values", []))
    return f"{n - bad} of {n}" if bad else str(n)


def _dormant_cell(agg: dict) -> str:
    worst = agg.get("dormant_ratio_0.1_max")
    mean = pct(agg["dormant_ratio_0.1"])
    return f"{mean} ({pct(worst['value'])}, layer {worst['layer']})" if worst and worst["value"] > 0 else mean


def _nonfinite_layers(kinds: dict) -> str:
    bad = {k: t["layers_without_finite_values"] for k, t in kinds.items() if t.get("layers_without_finite_values")}
    if not bad:
        return ""
    return ("Layers without any finite value (left out of the aggregates, blank in the plots): "
            + "; ".join(f"{k}: {_ranges(v)}" for k, v in bad.items()) + ".")


def _ranges(layers: list) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    if not layers or not all(isinstance(x, int) for x in layers):
        return ", ".join(map(str, layers))
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = x
    return ", ".join(out)


def write_profile_report(profile_dir: str | Path, out_dir: str | Path | None = None,
                         title: str = "actsparse profile") -> tuple[Path, Path]:
    profile_dir = Path(profile_dir)
    out_dir = Path(out_dir or profile_dir)
    doc = read_json(profile_dir / "profile.json")
    if doc.get("format") != PROFILE_FORMAT:
        raise DataError(f"{profile_dir / 'profile.json'} has format {doc.get('format')!r}; this report renders "
                        f"{PROFILE_FORMAT!r} (format 1 summarised a site kind on neurons pooled across layers). "
                        f"Re-save it: actsparse.Profile.load({str(profile_dir)!r}).save({str(profile_dir)!r})")
    report = Report(title)
    add_profile_section(report, doc, out_dir)
    return report.write(out_dir)
