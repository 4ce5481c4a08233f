"""A tiny report builder: sections of text, tables and images, rendered to Markdown and HTML.

Reports only render what benchmarks and profiles saved as JSON; they compute nothing.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.io import write_text


@dataclass
class Report:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "Report":
        self.blocks.append(("heading", (level, text)))
        return self

    def text(self, text: str) -> "Report":
        self.blocks.append(("text", text))
        return self

    def table(self, header: list[str], rows: list[list]) -> "Report":
        self.blocks.append(("table", (header, rows)))
        return self

    def image(self, path: str, caption: str) -> "Report":
        self.blocks.append(("image", (path, caption)))
        return self

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "text":
                out += [value, ""]
            elif kind == "table":
                header, rows = value
                numeric = numeric_columns(rows, len(header))
                out.append("| " + " | ".join(_md(h) for h in header) + " |")
                out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
                out += ["| " + " | ".join(_md(_cell(c)) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "image":
                path, caption = value
                out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def to_html(self) -> str:
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}"
            "code{background:#f3f3f3;padding:0 2px}img{max-width:100%}figcaption{color:#555}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "text":
                parts.append(f"<p>{inline_html(value)}</p>")
            elif kind == "table":
                header, rows = value
                numeric = numeric_columns(rows, len(header))
                parts.append("<table><tr>" + "".join(f"<th>{inline_html(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    parts.append("<tr>" + "".join(f"<td class='num'>{inline_html(_cell(c))}</td>" if n
                                                  else f"<td>{inline_html(_cell(c))}</td>"
                                                  for c, n in zip(row, numeric)) + "</tr>")
                parts.append("</table>")
            elif kind == "image":
                path, caption = value
                parts.append(f"<figure><img src='{html.escape(path)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, directory: str | Path, stem: str = "report") -> tuple[Path, Path]:
        directory = Path(directory)
        return (write_text(directory / f"{stem}.md", self.to_markdown()),
                write_text(directory / f"{stem}.html", self.to_html()))


def remove_report(directory: str | Path, stem: str = "report") -> list[Path]:
    """Delete ``stem``.md / .html in ``directory`` (a report that no longer matches the results
    beside it); returns the files removed."""
    removed = []
    for path in (Path(directory) / f"{stem}.md", Path(directory) / f"{stem}.html"):
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
# a number, optionally signed, with a unit suffix (%, x) or a range / spread after it
_NUMBER = re.compile(r"^[-+~]?\d[\d,.]*(e[-+]?\d+)?\s*(%|x|ms|MB|GB)?(\s*[-(/].*)?$|^[–-]$")


def inline_html(text) -> str:
    """Escape ``text`` for HTML and render the inline Markdown the reports use: ``**bold**``
    and ```code```."""
    out = html.escape(str(text))
    out = _CODE.sub(r"<code>\1</code>", out)
    return _BOLD.sub(r"<strong>\1</strong>", out)


def numeric_columns(rows: list[list], width: int) -> list[bool]:
    """Per column: True when every cell is a number (right-aligned), else text (left-aligned)."""
    cols = [[_cell(r[i]).strip("*") for r in rows if i < len(r)] for i in range(width)]
    return [bool(col) and all(_NUMBER.match(c) for c in col) and any(c not in "–-" for c in col)
            for col in cols]


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _cell(c) -> str:
    if c is None:
        return "–"
    if isinstance(c, float):
        if c != c:
            return "nan"
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:.3e}"
    return str(c)


def num(x) -> float:
    """A number read from saved JSON as a float: None and the strings the JSON writer uses for
    non-finite values ("nan", "inf", "-inf") become NaN / inf instead of breaking arithmetic."""
    if x is None:
        return math.nan
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return float(x)


def pct(x) -> str:
    x = num(x)
    return "–" if not math.isfinite(x) else f"{100 * x:.1f}%"
