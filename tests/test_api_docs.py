"""`/docs` is one self-contained page made from the ingress's own OpenAPI schema: it lists every
route and needs nothing from the internet (FastAPI's Swagger page is blank offline)."""

from __future__ import annotations

import re

from deployments.api_docs import render_api_docs
from deployments.ingress import app


def test_docs_page_lists_every_route_and_loads_nothing_from_elsewhere() -> None:
    spec = app.openapi()
    page = render_api_docs(spec, "/prefix/openapi.json")
    for path, operations in spec["paths"].items():
        for method in operations:
            assert f"<code>{method.upper()} {path}</code>" in page
    assert "<a href='/prefix/openapi.json'>" in page
    # No script, stylesheet or image from anywhere: the page works on a machine offline.
    assert "<script" not in page
    assert not re.search(r"(src|href)=['\"]https?://", page)


def test_docs_page_escapes_what_the_schema_says() -> None:
    spec = {
        "info": {"title": "<b>t</b>"},
        "paths": {
            "/x": {
                "post": {
                    "summary": "<script>alert(1)</script>",
                    "requestBody": {
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/B"}}
                        }
                    },
                    "responses": {"200": {}, "400": {}},
                }
            }
        },
        "components": {
            "schemas": {
                "B": {
                    "properties": {"n": {"type": "integer", "description": "a <count>"}},
                    "required": ["n"],
                }
            }
        },
    }
    page = render_api_docs(spec, "/openapi.json")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<td><code>n</code></td><td>integer</td><td>yes</td><td>a &lt;count&gt;</td>" in page
    assert "Responses: 200, 400" in page
