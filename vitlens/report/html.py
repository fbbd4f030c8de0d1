"""Rendering of report sections as one HTML page and one Markdown file.

A page is a title, an intro paragraph, a table of contents and the sections in order: query
sections (`Section`: description, note, figure, table, test) and sections rendered by their
producer (`RawSection`: provenance, an image gallery, ...).
"""

from __future__ import annotations

import html
from typing import Sequence

import pyarrow as pa

from vitlens.report.queries import format_cell, format_markdown
from vitlens.report.sections import RawSection, Section

__all__ = ["FOLD_ROWS", "RawSection", "Section", "html_table", "render_html", "render_markdown"]

# Tables with more rows are folded (<details>) in the HTML page; the CSV has them all.
FOLD_ROWS = 20


def html_table(table: pa.Table, fold_rows: int = FOLD_ROWS) -> str:
    """An HTML table of `table` (escaped), folded in <details> above `fold_rows` rows."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in table.column_names)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row.values()) + "</tr>"
        for row in table.to_pylist()
    )
    rendered = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if table.num_rows > fold_rows:
        return f"<details><summary>{table.num_rows} rows (show)</summary>{rendered}</details>"
    return rendered


_html_table = html_table  # the name used before

_STYLE = """
body { font-family: sans-serif; font-size: 16px; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f0f0f0; } pre { background: #f7f7f7; padding: 0.5em; font-size: 0.8em; }
img { max-width: 100%; border: 1px solid #eee; } h2 { border-bottom: 1px solid #ddd; }
p.note { background: #fff6e0; border-left: 4px solid #E69F00; padding: 0.4em 0.8em; }
table.kv th, table.kv td { text-align: left; }
p.gallery-note { background: #fff6e0; padding: 0.4em 0.8em; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
"""


def _anchor(section: Section | RawSection, index: int) -> str:
    if isinstance(section, RawSection):
        return section.anchor
    return section.name or f"s{index}"


def _query_section_html(section: Section, anchor: str) -> list[str]:
    parts = [f"<h2 id='{html.escape(anchor)}'>{html.escape(section.title)}</h2>"
             f"<pre>{html.escape(section.description)}</pre>"]
    if section.note:
        parts.append(f"<p class='note'>{html.escape(section.note)}</p>")
    if section.figure_file:
        parts.append(f"<p><img src='{html.escape(section.figure_file)}' alt='{html.escape(section.title)}'></p>")
    parts.append(html_table(section.table))
    parts.append(f"<p><a href='{html.escape(section.table_file)}'>CSV</a></p>")
    if section.test_table is not None:
        parts.append(f"<h3>{html.escape(section.test_title or '')}</h3>{html_table(section.test_table)}")
        parts.append(f"<p><a href='{html.escape(section.test_file or '')}'>CSV</a></p>")
    return parts


def render_html(title: str, intro: str, sections: Sequence[Section | RawSection]) -> str:
    """One HTML page: every section in order; query sections show their description, note,
    table, test and <img> linked by relative path; raw sections their own HTML."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p><ul>"]
    anchors = [_anchor(s, i) for i, s in enumerate(sections)]
    parts += [f"<li><a href='#{html.escape(a)}'>{html.escape(s.title)}</a></li>" for a, s in zip(anchors, sections)]
    parts.append("</ul>")
    for anchor, section in zip(anchors, sections):
        if isinstance(section, RawSection):
            parts.append(f"<h2 id='{html.escape(anchor)}'>{html.escape(section.title)}</h2>")
            parts.append(section.html)
        else:
            parts += _query_section_html(section, anchor)
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, intro: str, sections: Sequence[Section | RawSection]) -> str:
    """The same report as Markdown (tables inline, figures as relative image links)."""
    parts = [f"# {title}", "", intro, ""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        if isinstance(section, RawSection):
            parts += [section.markdown, ""]
            continue
        parts += ["```", section.description, "```", ""]
        if section.note:
            parts += [f"> {section.note}", ""]
        if section.figure_file:
            parts += [f"![{section.title}]({section.figure_file})", ""]
        parts += [format_markdown(section.table), "", f"CSV: [{section.table_file}]({section.table_file})", ""]
        if section.test_table is not None:
            parts += [f"### {section.test_title}", "", format_markdown(section.test_table), ""]
    return "\n".join(parts)
