"""Render a saved profile (profile.json) into report.md / report.html with plots."""
from __future__ import annotations

from pathlib import Path

from actsparse.io import read_json
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
        report.text(f"WARNING: {meta['nonfinite_values']} non-finite activation values were seen "
                    f"(counted, then excluded from the statistics).")
    rows = []
    for kind, t in kinds.items():
        p = t["pooled"]
        ts = p["threshold_sparsity"]
        flow = p.get("activation_flow") or {}
        rows.append([
            kind, len(t["layers"]), p["width"], pct(p["zero_sparsity"]), pct(ts.get("0.01")), pct(ts.get("0.1")),
            pct(p.get("temporal_sparsity_eps", {}).get("0.1")), pct(p["dormant_ratio_0.1"]),
            sum(r["static_dead"] for r in t["layers"]), pct(flow.get("shared_frac")),
            pct(flow.get("specialised_frac")),
        ])
    report.table(["site kind", "layers", "width", "exact 0", "|v|<=0.01", "|v|<=0.1", "|Δv|<=0.1 (temporal)",
                  "dormant τ=0.1", "static dead (v<=0)", "flow: shared dims", "flow: specialised dims"], rows)
    report.text(
        f"Dormant: ReDo score E|v_i| / layer mean <= τ. Static dead: never positive over all tokens. "
        f"Activation flow: a neuron is active when |v| > {meta['flow_threshold']}; shared = mean active run "
        f">= 4 tokens, specialised = mean run < 1.5 tokens."
    )
    balance = [(k, t["pooled"].get("relu_balance")) for k, t in kinds.items()
               if t["pooled"].get("relu_balance") and k.endswith(PRE_ACTIVATION_KINDS)]
    if balance:
        report.text("ReLU-state balance of the pre-activations (1 = balanced active and inactive states):")
        report.table(["pre-activation site", "r_mean", "r_var", "active (z>0)"],
                     [[k, b["r_mean"], b["r_var"], pct(b["active_frac"])] for k, b in balance])
    quant_rows = [[k] + [t["quantiles"].get(q) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")]
                  for k, t in kinds.items() if t["quantiles"]]
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


def write_profile_report(profile_dir: str | Path, out_dir: str | Path | None = None,
                         title: str = "actsparse profile") -> tuple[Path, Path]:
    profile_dir = Path(profile_dir)
    out_dir = Path(out_dir or profile_dir)
    doc = read_json(profile_dir / "profile.json")
    report = Report(title)
    add_profile_section(report, doc, out_dir)
    return report.write(out_dir)
