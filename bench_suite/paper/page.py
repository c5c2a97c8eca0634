"""One page gathering the regenerated paper tables and figures: ``<output>/report.html`` and ``report.md``.

Written by ``python -m bench_suite tables`` (:func:`bench_suite.paper.run.make_tables`). The page shows each
table (display headers say which numbers are the paper's and which the suite's), its caption, notes on the
rows the published information does not determine, the commands for missing results, links to the table's
Markdown/CSV/LaTeX files, the figures (or why a figure is missing), and the configuration and versions that
produced it all. Self-contained HTML (inline CSS, images referenced relative to the page, no scripts).
"""
from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_suite.paper.tables import display_frame

__all__ = ["write_report_page", "render_html", "render_markdown"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1500px;
       color: #222; padding: 0 1rem; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.78rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td:first-child, td.text { text-align: left; }
th.paper { background: #fff4d6; } th.suite { background: #dcecff; }
.caption { font-size: 0.85rem; color: #333; max-width: 1300px; }
.notes { font-size: 0.8rem; color: #444; }
.missing { color: #8a4b00; font-size: 0.85rem; }
.bad { color: #b00020; font-weight: bold; }
.ok { color: #1b6e20; }
code { background: #f5f5f5; padding: 0 3px; font-size: 0.8rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; max-width: 1300px; }
.legend span { padding: 0 6px; margin-right: 8px; font-size: 0.8rem; }
"""


def _rel(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _header_class(header: str) -> str:
    if "[paper" in header:
        return "paper"
    if "[suite" in header:
        return "suite"
    return ""


def _cell_class(text: str) -> str:
    if "MISMATCH" in text:
        return "bad"
    if text == "reproduced":
        return "ok"
    return ""


def _html_table(display: Any) -> str:
    head = "".join(f'<th class="{_header_class(h)}">{html.escape(h)}</th>' for h in display.columns)
    body = []
    for _, row in display.iterrows():
        cells = []
        for col, value in zip(display.columns, row):
            text = str(value)
            cls = " ".join(c for c in (_cell_class(text), "text" if not _numeric(text) else "") if c)
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(text: str) -> bool:
    try:
        float(text.split(" ")[0])
        return True
    except ValueError:
        return text == ""


def render_html(run: Any, base: Path) -> str:
    """The report page as HTML (``run`` is a :class:`bench_suite.paper.run.TablesRun`; paths relative to ``base``)."""

    cfg = run.config
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>bench_suite: Sparsifiner paper tables</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(page_title(run))}</h1>",
             "<p class='legend'><span style='background:#fff4d6'>[paper] copied from the paper (data file)</span>"
             "<span style='background:#dcecff'>[suite] recomputed by the suite for this page</span></p>"]
    parts.append(_config_html(cfg))
    for n, res in run.tables.items():
        display = display_frame(res, cfg["profile"], cfg["dataset"])
        links = " · ".join(f"<a href='{_rel(p, base)}'>{p.suffix[1:]}</a>" for p in res.paths)
        parts.append(f"<h2 id='table{n}'>Table {n}</h2>{_html_table(display)}"
                     f"<p class='caption'>{html.escape(res.caption)}</p><p class='notes'>Files: {links}</p>")
        if res.notes:
            parts.append("<p class='notes'>Not reproducible from published information:</p><ul class='notes'>"
                         + "".join(f"<li>{html.escape(t)}</li>" for t in res.notes) + "</ul>")
        if res.missing_commands:
            parts.append("<p class='notes'>[run] Rows without a suite top-1; to produce them (the first command runs "
                         "the whole table, skipping stored configurations):</p><ul class='notes'>"
                         + "".join(f"<li><code>{html.escape(c)}</code></li>" for c in res.missing_commands) + "</ul>")
    for n, res in getattr(run, "proxy", {}).items():  # a proxy profile's results, apart from the paper's rows
        links = " · ".join(f"<a href='{_rel(p, base)}'>{p.suffix[1:]}</a>" for p in res.paths)
        md = res.paths[0].read_text(encoding="utf-8").split("\n\n")[0] if res.paths else ""
        parts.append(f"<h2 id='table{n}-proxy'>Table {n} on {html.escape(cfg['profile'])} / "
                     f"{html.escape(cfg['dataset'])} (proxy)</h2><pre>{html.escape(md)}</pre>"
                     f"<p class='caption'>{html.escape(res.caption)}</p><p class='notes'>Files: {links}</p>")
    drawn = [f for f in run.figures if not f.missing]
    if drawn:
        parts.append("<h2 id='figures'>Figures</h2>")
        for fig in drawn:
            png = next((p for p in fig.paths if p.suffix == ".png"), None)
            others = " · ".join(f"<a href='{_rel(p, base)}'>{p.suffix[1:]}</a>" for p in fig.paths)
            parts.append(f"<figure><h3>{html.escape(fig.title)}</h3>"
                         + (f"<img src='{_rel(png, base)}' alt='{html.escape(fig.title)}'>" if png else "")
                         + f"<figcaption>{html.escape(fig.caption)} ({others})</figcaption></figure>")
    missing = [f for f in run.figures if f.missing]
    if missing:  # not in the title: said once, with what would draw them
        parts.append("<h2 id='not-drawn'>Figures not drawn</h2><ul class='notes'>"
                     + "".join(f"<li>{html.escape(f.title)}: {html.escape(f.missing)}</li>" for f in missing)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _numbers(text: str, items: list[int]) -> str:
    items = sorted(set(items))
    if not items:
        return ""
    if items == list(range(items[0], items[-1] + 1)) and len(items) > 2:
        return f"{text}s {items[0]}-{items[-1]}"
    return f"{text}{'s' if len(items) > 1 else ''} " + ", ".join(map(str, items))


def page_title(run: Any) -> str:
    """The page's title, promising only what the page shows: the tables generated and the figures drawn."""
    import re

    figures = [int(m.group(1)) for f in run.figures if not f.missing for m in [re.search(r"Figure (\d+)", f.title)] if m]
    shown = " and ".join(x for x in (_numbers("Table", list(run.tables)), _numbers("Figure", figures)) if x)
    return f"Sparsifiner (Wei et al., CVPR 2023): {shown}, regenerated by bench_suite"


def _config_rows(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    versions = cfg.get("versions", {})
    rows = [
        ("command", cfg.get("command", "python -m bench_suite tables")),
        ("generated", cfg.get("generated", "")),
        ("wall time", f"{cfg.get('seconds', '?')} s"),
        ("suite top-1 from", f"each row's own backbone profile (deit_s / lvvit_s / deit_t384), dataset {cfg['dataset']}, "
                             f"store {cfg['output']}/results.sqlite" + (f"; proxy tables: profile {cfg['profile']}"
                                                                         if cfg.get("proxy_tables") else "")),
        ("FLOPs counted on", f"profiles deit_s / lvvit_s / deit_t384 (random weights, 1000 classes); {cfg['image_source']}; "
                             f"Sparsifiner's sparse attention ran with the {cfg.get('sparse_attention_impl', 'torch')} "
                             f"implementation (the count does not depend on it)"),
        ("paper numbers from", cfg.get("data_file", "")),
        ("git", versions.get("git", "unknown")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "git")),
    ]
    return rows


def _config_html(cfg: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td class='text'>{html.escape(str(v))}</td></tr>"
                   for k, v in _config_rows(cfg))
    return f"<h2 id='config'>Configuration</h2><table>{body}</table>"


def render_markdown(run: Any, base: Path) -> str:
    """The report page as Markdown (the tables' own Markdown files, figures as image links)."""
    cfg = run.config
    lines = [f"# {page_title(run)}", "",
             "`[paper]` columns are copied from the paper (data file); `[suite]` columns are recomputed by the suite.",
             "", "## Configuration", "", "| | |", "|:--|:--|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in _config_rows(cfg)]
    for n, res in run.tables.items():
        md = next((p for p in res.paths if p.suffix == ".md"), None)
        lines += ["", f"## Table {n}", "", md.read_text(encoding="utf-8") if md else "",
                  "Files: " + ", ".join(f"[{p.suffix[1:]}]({_rel(p, base)})" for p in res.paths)]
    drawn = [f for f in run.figures if not f.missing]
    if drawn:
        lines += ["", "## Figures"]
        for fig in drawn:
            lines += ["", f"### {fig.title}", ""]
            png = next((p for p in fig.paths if p.suffix == ".png"), None)
            if png:
                lines.append(f"![{fig.title}]({_rel(png, base)})")
            lines += ["", fig.caption]
    missing = [f for f in run.figures if f.missing]
    if missing:
        lines += ["", "## Figures not drawn", "", *[f"- {f.title}: {f.missing}" for f in missing]]
    return "\n".join(lines) + "\n"


def write_report_page(output: str | Path, run: Any) -> list[Path]:
    """Write ``<output>/report.html`` and ``<output>/report.md`` for a :class:`bench_suite.paper.run.TablesRun`;
    returns both paths."""
    base = Path(output)
    base.mkdir(parents=True, exist_ok=True)
    run.config.setdefault("generated", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    html_path, md_path = base / "report.html", base / "report.md"
    html_path.write_text(render_html(run, base), encoding="utf-8")
    md_path.write_text(render_markdown(run, base), encoding="utf-8")
    return [html_path, md_path]
