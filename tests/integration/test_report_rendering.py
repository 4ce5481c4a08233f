"""Reports render saved JSON faithfully: HTML without literal Markdown, text columns left and
numbers right, plots that draw what their titles promise and survive non-finite values."""
import math

from actsparse.report.decode_report import add_decode_section, plot_frontier
from actsparse.report.document import Report, numeric_columns, pct
from actsparse.report.plots import per_layer_sparsity, per_layer_sparsity_figure
from actsparse.report.quality_report import method_color, thresholds_figure


def test_html_renders_inline_markdown_and_aligns_columns():
    report = Report("t").text("**dense**: uses `FastDecoder` & <b>").table(
        ["plan", "tokens/s", "skipped"], [["**teal 50%**", "61.3 (58.0-63.1)", "q 52%, k 52%"], ["dense", 24.3, "-"]])
    html = report.to_html()
    assert "**" not in html and "`" not in html
    assert "<strong>dense</strong>" in html and "<code>FastDecoder</code>" in html and "&lt;b&gt;" in html
    assert "<td><strong>teal 50%</strong></td><td class='num'>61.3 (58.0-63.1)</td><td>q 52%, k 52%</td>" in html
    assert "text-align:left}td.num{text-align:right" in html
    md = report.to_markdown()
    assert "|---|---:|---|" in md


def test_numeric_columns():
    rows = [["teal", "1.52x", "0.0% (8.9%, layer 0)", "–", 12], ["cats", "1.34x", "2.2%", "attn.q 0.51", 3]]
    assert numeric_columns(rows, 5) == [False, True, True, False, True]


def _kinds(zero, thr):
    layers = [{"layer": i, "zero_sparsity": z, "threshold_sparsity": {"0.1": t}} for i, (z, t) in enumerate(zip(zero, thr))]
    return {"layers": layers}


def test_sparsity_plot_draws_exact_zero_lines_it_promises():
    relu = _kinds([0.5, 0.6, 0.55], [0.7, 0.8, 0.75])
    silu = _kinds([0.0, 0.0, 0.001], [0.2, 0.3, 0.25])
    fig = per_layer_sparsity_figure({"relu act": relu, "silu act": silu})
    ax = fig.axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_label() for line in dashed] == ["relu act exact 0"]
    solid = {line.get_label(): line.get_color() for line in ax.lines if line.get_linestyle() == "-"}
    assert dashed[0].get_color() == solid["relu act |v|<=0.1"]
    assert "dashed: exact zeros" in ax.get_title()
    fig = per_layer_sparsity_figure({"silu act": silu})
    assert "exact zeros below 1% at every layer" in fig.axes[0].get_title()


def test_plots_survive_non_finite_and_missing_values(tmp_path):
    """profile.json stores NaN / inf as strings and missing metrics as null."""
    kinds = {"k": _kinds(["nan", None, 0.2], ["inf", 0.5, None])}
    kinds["k"]["layers"][0]["threshold_sparsity"] = None
    assert per_layer_sparsity(kinds, tmp_path / "p.png").stat().st_size > 0
    assert pct("nan") == "–" and pct(None) == "–" and pct("inf") == "–" and pct(0.5) == "50.0%"


def test_thresholds_plot_gives_every_series_its_own_look():
    kinds_by_method = {"teal": ["attn.q:input", "attn.o:input", "mlp.gate:input", "mlp.down:input"],
                       "cats": ["mlp.act:output"], "chess": ["mlp.act:output"],
                       "wina": ["attn.q:input", "attn.k:input", "attn.v:input", "attn.o:input", "mlp.gate:input",
                                "mlp.up:input", "mlp.down:input"]}
    rows = {m: [{"layer": i, "kind": k, "threshold": 0.1 * (1 + i)} for k in kinds for i in range(3)]
            for m, kinds in kinds_by_method.items()}
    fig = thresholds_figure(rows)
    series = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        looks = [(line.get_color(), line.get_linestyle()) for line in ax.lines]
        assert len(looks) == len(set(looks)), ax.get_title()
        for line in ax.lines:
            method = line.get_label().split()[0]
            assert line.get_color() == method_color(method)
        series += len(ax.lines)
    assert series == 13


def _decode_doc(speedup_teal):
    row = lambda name, tps, sp, ceiling: {  # noqa: E731
        "engine": name, "tokens_per_s": {"median": tps, "p10": tps * 0.95, "p90": tps * 1.05},
        "speedup": {"median": sp, "p10": sp * 0.9, "p90": sp * 1.1}, "amdahl_ceiling": ceiling,
        "above_ceiling": sp > ceiling, "bytes_per_token": 270e6 / ceiling, "weight_skip": {}, "sample": " x"}
    return {"new_tokens": 8, "prompt": "P", "dtype": "bfloat16", "threads": 1, "warmup": 1, "repeats": 5,
            "rows": [row("dense", 40.0, 1.0, 1.0), row("teal 50%", 40 * speedup_teal, speedup_teal, 1.67),
                     row("cats 50%", 52.0, 1.3, 1.3)]}


def test_decode_section_flags_a_speedup_above_its_ceiling():
    report = Report("t")
    add_decode_section(report, _decode_doc(2.5))
    md = report.to_markdown()
    assert "| teal 50% | 100.0 (95.0-105.0) | 2.50x (2.25-2.75) | 1.67x | 1.50 | 162 | above ceiling |" in md
    assert "**teal 50%**: the median speedup is above its Amdahl ceiling" in md
    report = Report("t")
    add_decode_section(report, _decode_doc(1.4))
    assert "above" not in report.to_markdown()


def test_frontier_plot(tmp_path):
    quality = {"model": "m", "dtype": "float32", "protocol": {"data": "wiki", "evaluation": {"split": "test"}},
               "dense": {"ppl": 20.0, "tokens": 2048},
               "results": [{"method": "teal", "target": 0.5, "ratio": 1.5}, {"method": "cats", "target": 0.5,
                                                                             "ratio": math.nan}]}
    assert plot_frontier(quality, _decode_doc(1.4), tmp_path / "f.png").stat().st_size > 0
