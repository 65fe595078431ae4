"""`/docs`: the HTTP API described from its own OpenAPI schema, as one self-contained HTML page.

FastAPI's Swagger page loads its script and styles from a CDN, so on a machine without the
internet (a cluster behind a firewall, the GPU machines) it is blank. This page needs nothing
but the schema: every route with its summary, its request body's fields and its responses.
"""

from __future__ import annotations

from html import escape
from typing import Any

_STYLE = """
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
h2 { margin-top: 2.5rem; } code { background: #f3f3f3; padding: 0 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
"""


def render_api_docs(spec: dict[str, Any], openapi_url: str) -> str:
    """The page for the OpenAPI document `spec` (served at `openapi_url`)."""
    info = spec.get("info") or {}
    title = escape(str(info.get("title") or "API"))
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>",
        f"<p>The machine-readable schema: <a href='{escape(openapi_url)}'>"
        f"{escape(openapi_url)}</a>.</p>",
    ]
    schemas = (spec.get("components") or {}).get("schemas") or {}
    for path, operations in sorted((spec.get("paths") or {}).items()):
        for method, operation in operations.items():
            parts.append(f"<h2><code>{escape(method.upper())} {escape(path)}</code></h2>")
            summary = operation.get("summary") or operation.get("description") or ""
            if summary:
                parts.append(f"<p>{escape(str(summary))}</p>")
            body = _body_schema(operation, schemas)
            if body:
                parts.append(_fields_table(body))
            codes = ", ".join(escape(str(code)) for code in (operation.get("responses") or {}))
            if codes:
                parts.append(f"<p>Responses: {codes}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def _body_schema(operation: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any] | None:
    content = ((operation.get("requestBody") or {}).get("content") or {}).get("application/json")
    schema = (content or {}).get("schema") or {}
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        schema = schemas.get(ref.rsplit("/", 1)[-1]) or {}
    return schema if schema.get("properties") else None


def _fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required") or [])
    rows = ["<table><tr><th>field</th><th>type</th><th>required</th><th>about</th></tr>"]
    for name, field in schema["properties"].items():
        kind = field.get("type") or " | ".join(
            str(option.get("type") or option.get("$ref", "").rsplit("/", 1)[-1])
            for option in field.get("anyOf") or []
        )
        rows.append(
            f"<tr><td><code>{escape(name)}</code></td><td>{escape(str(kind))}</td>"
            f"<td>{'yes' if name in required else ''}</td>"
            f"<td>{escape(str(field.get('description') or ''))}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)
