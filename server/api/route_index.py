"""The app's routes as path templates, routers included, and the one a request will reach: the access check,
the audit log and metric labels need it before routing (and before the body is read)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, compile_path
from starlette.types import Scope


@dataclass(frozen=True)
class RouteTemplate:
    path: str
    methods: frozenset[str]  # empty for what takes every method (a mount)
    regex: re.Pattern[str]


def route_templates(routes: Sequence[BaseRoute]) -> list[RouteTemplate]:
    """Every route, flattened: FastAPI keeps included routers as single entries of `app.routes`."""
    found = []
    for context in iter_route_contexts(routes):
        if context.path is None:
            continue
        regex, _, _ = compile_path(context.path)
        found.append(RouteTemplate(context.path, frozenset(context.methods or ()), regex))
    return found


class RouteIndex:
    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self._routes = routes  # the app's live list, flattened when its length changes
        self._seen = -1
        self._templates: list[RouteTemplate] = []

    def templates(self) -> list[RouteTemplate]:
        if len(self._routes) != self._seen:
            self._templates, self._seen = route_templates(self._routes), len(self._routes)
        return self._templates

    def match(self, scope: Scope) -> tuple[str | None, bool]:
        """The template of the route the router picks, and whether it takes the method (else: 405)."""
        path = _route_path(scope)
        partial = None
        for template in self.templates():
            if template.regex.match(path):
                if not template.methods or scope["method"] in template.methods:
                    return template.path, True
                partial = partial or template.path
        return partial, False


def _route_path(scope: Scope) -> str:
    """The path below the app's root_path, as the router matches it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path
