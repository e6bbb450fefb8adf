"""Markdown for the reports a person reads (``report.md`` of runs and of ``tagmill doctor``).

Images are linked by paths relative to the report's folder, so the folder can be
copied, zipped or browsed on GitHub and still show its pictures. Text from the data
(ids, class names) is escaped: it can hold pipes, newlines or HTML.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any
from urllib.parse import quote

from tagmill import storage



def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def text(value: str) -> str:
    """Text safe inside a table cell or heading: no pipes, newlines or raw HTML."""
    return (
        value.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def labels(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return text(", ".join(str(v) for v in value)) or "(none)"
    return text(str(value))


def image(run_dir: str, path: str, alt: str) -> str:
    return f"![{text(alt)}]({link(run_dir, path)})"


def link(run_dir: str, path: str) -> str:
    """``path`` relative to ``run_dir`` where it lies inside it, URL-quoted for markdown."""
    if storage.is_local(path) and os.path.isabs(path) and storage.is_local(run_dir):
        relative = os.path.relpath(path, run_dir)
        if not relative.startswith(".."):
            path = relative.replace(os.sep, "/")
    elif path.startswith(run_dir.rstrip("/") + "/"):
        path = posixpath.relpath(path, run_dir)
    return quote(path, safe="/:.-_~")


def to_html(markdown: str, title: str) -> str:
    """A standalone HTML page of ``markdown`` (CommonMark with tables), for a browser."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle}"
             "th{background:#f4f4f4}img{max-width:128px;max-height:128px}code{background:#f4f4f4;padding:1px 3px}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{text(title)}</title>"
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


__all__ = ["image", "labels", "link", "table", "text", "to_html"]
