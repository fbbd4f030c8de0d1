"""Rendering of report sections as one HTML page and one Markdown file."""

from __future__ import annotations

import html
from dataclasses import dataclass

import pyarrow as pa

from vitlens.report.queries import format_cell, format_markdown

# Tables with more rows are folded (<details>) in the HTML page; the CSV has them all.
FOLD_ROWS = 20


@dataclass(frozen=True)
class Section:
    """One report entry: a title, the query's header text, its result, an optional figure and test table."""

    title: str
    description: str
    table: pa.Table
    table_file: str
    figure_file: str | None = None
    test_title: str | None = None
    test_table: pa.Table | None = None
    test_file: str | None = None


def _html_table(table: pa.Table) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in table.column_names)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row.values()) + "</tr>"
        for row in table.to_pylist()
    )
    rendered = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if table.num_rows > FOLD_ROWS:
        return f"<details><summary>{table.num_rows} rows (show)</summary>{rendered}</details>"
    return rendered


_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } pre { background: #f7f7f7; padding: 0.5em; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #eee; } h2 { border-bottom: 1px solid #ddd; }
"""


def render_html(title: str, intro: str, sections: list[Section]) -> str:
    """One HTML page: every section's description, table, test and <img> linked by relative path."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p><ul>"]
    parts += [f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)]
    parts.append("</ul>")
    for i, section in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(section.title)}</h2><pre>{html.escape(section.description)}</pre>")
        if section.figure_file:
            parts.append(f"<p><img src='{html.escape(section.figure_file)}' alt='{html.escape(section.title)}'></p>")
        parts.append(_html_table(section.table))
        parts.append(f"<p><a href='{html.escape(section.table_file)}'>CSV</a></p>")
        if section.test_table is not None:
            parts.append(f"<h3>{html.escape(section.test_title or '')}</h3>{_html_table(section.test_table)}")
            parts.append(f"<p><a href='{html.escape(section.test_file or '')}'>CSV</a></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, intro: str, sections: list[Section]) -> str:
    """The same report as Markdown (tables inline, figures as relative image links)."""
    parts = [f"# {title}", "", intro, ""]
    for section in sections:
        parts += [f"## {section.title}", "", "```", section.description, "```", ""]
        if section.figure_file:
            parts += [f"![{section.title}]({section.figure_file})", ""]
        parts += [format_markdown(section.table), "", f"CSV: [{section.table_file}]({section.table_file})", ""]
        if section.test_table is not None:
            parts += [f"### {section.test_title}", "", format_markdown(section.test_table), ""]
    return "\n".join(parts)
