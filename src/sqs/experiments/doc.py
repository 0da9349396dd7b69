"""A small document model rendered both as Markdown (images beside it) and as one
self-contained HTML file (images embedded as base64): the reports' output format."""

from __future__ import annotations

import base64
import html
from pathlib import Path


class Doc:
    """A few block types rendered both as Markdown and as self-contained HTML."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def link(self, before: str, text: str, target: str | Path, after: str = ""):
        """A sentence with one link (a relative path for local files)."""
        self.blocks.append(("link", before, text, str(Path(target).as_posix()), after))

    def img(self, path: str | Path, caption: str = ""):
        self.blocks.append(("img", Path(path), caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "link":
                out.append(f"{b[1]}[{b[2]}]({b[3]}){b[4]}")
            elif b[0] == "table":
                header, rows = b[1], b[2]
                cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731 - a pipe would end the cell
                out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]))
            elif b[0] == "img":
                rel = b[1].relative_to(self.root) if b[1].is_relative_to(self.root) else b[1]
                out.append(f"![{b[2]}]({rel.as_posix()})" + (f"\n\n*{b[2]}*" if b[2] else ""))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{esc(b[1])}</p>")
            elif b[0] == "link":
                body.append(f'<p>{esc(b[1])}<a href="{esc(b[3])}">{esc(b[2])}</a>{esc(b[4])}</p>')
            elif b[0] == "table":
                head = "".join(f"<th>{esc(str(c))}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(b[2])}">'
                            f"<figcaption>{esc(b[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{font-style:italic;color:#555;font-size:90%}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
