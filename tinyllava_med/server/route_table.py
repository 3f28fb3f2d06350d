"""The API's routes by their templates, read from its OpenAPI description, for what must name a
request's route before routing or outside it: the audit of a key refused before the body is read
(`auth`) and the access log's lines (`logs`). FastAPI's included routers do not say which route
they would pick until they run it; the description is public and lists every API route."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.routing import compile_path


@dataclass(frozen=True)
class ApiRoute:
    regex: re.Pattern[str]  # matches a path, a named group per parameter
    methods: frozenset[str]
    template: str  # `/v1/studies/{study_id}`
    int_params: frozenset[str]  # the parameters that are integers (a job's number)


def route_table(app: Any) -> list[ApiRoute]:
    """`app`'s API routes (read once, then kept in `app.state`)."""
    table: list[ApiRoute] | None = getattr(app.state, "route_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            ints = {
                param["name"]
                for op in operations.values()
                for param in op.get("parameters", ())
                if param.get("in") == "path" and param.get("schema", {}).get("type") == "integer"
            }
            methods = frozenset(method.upper() for method in operations)
            table.append(ApiRoute(compile_path(template)[0], methods, template, frozenset(ints)))
        app.state.route_table = table
    return table
