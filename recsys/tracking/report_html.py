"""Self-contained HTML pages: headings, tables and matplotlib figures embedded as base64 PNG.

One file, no external CSS, scripts or images, so a report opens the same from an MLflow artifact, a
Prefect link, an e-mail attachment or a browser with no network. Shared by the training report
(recsys.tracking.training_report) and the export report (recsys.serving.export_report).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #444}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}.ok{color:#1a7f37}.warn{color:#9a6700}.fail{color:#cf222e;font-weight:bold}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt_number(value: Any, digits: int = 4) -> str:
    """Rates with ``digits`` decimals, large numbers with separators, missing values as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 100:  # counts and popularity: whole numbers as such
            return f"{int(value):,}" if value.is_integer() else f"{value:,.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], css: Sequence[str] | None = None) -> str:
    """An HTML table; cells are escaped (numbers formatted); ``css`` gives a class per row."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(css[i])}"' if css is not None and css[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{esc(fmt_number(c))}</td>" for c in row) + "</tr>")
    head_row = f"<tr>{head}</tr>" if any(header) else ""  # a key/value table needs no header
    return f"<table>{head_row}{''.join(body)}</table>"


def figure_img(fig: Any, alt: str) -> str:
    """A matplotlib figure as an embedded PNG ``<img>``; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def png_img(path: Path, alt: str) -> str:
    """An existing PNG file embedded as an ``<img>``."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (servers and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def page(title: str, sections: Iterable[str]) -> str:
    """A complete HTML document: ``title`` as <title> and <h1>, then the section fragments."""
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>")


def write_page(path: Path, title: str, sections: Iterable[str]) -> Path:
    """Write :func:`page` atomically (a reader never sees half a report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(title, sections), encoding="utf-8")
    tmp.replace(path)
    return path
