"""A tiny report builder: sections of text, tables and images, rendered to Markdown and HTML.

Reports only render what benchmarks and profiles saved as JSON; they compute nothing.
"""
from __future__ import annotations

import html
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
                out.append("| " + " | ".join(_md(h) for h in header) + " |")
                out.append("|" + "|".join("---" for _ in header) + "|")
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
            "text-align:right}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555}</style>",
            f"</head><body><h1>{html.escape(self.title)}</h1>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "text":
                parts.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                header, rows = value
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    parts.append("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>")
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


def pct(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"
