"""A report as blocks, rendered twice: Markdown (report.md) and self-contained HTML."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Doc:
    """A report as a list of blocks: ('h', level, text), ('p', text), ('ul', items),
    ('table', DataFrame), ('img', file, caption)."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def img(self, file: str, caption: str) -> None:
        self.blocks.append(("img", file, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {item}" for item in b[1]))
            elif b[0] == "table":
                df = b[1].astype(str)
                rows = [list(df.columns), ["---"] * len(df.columns), *df.to_numpy().tolist()]
                out.append("\n".join("| " + " | ".join(r).replace("\n", " ") + " |" for r in rows))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:
            text = html.escape(text)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                out.append(b[1].to_html(index=False, escape=True, border=0))
            elif b[0] == "img":
                out.append(
                    f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}">'
                    f"<figcaption>{inline(b[2])}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
            "img{max-width:100%}figcaption{font-style:italic;font-size:13px}"
        )
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
        )
