"""The web console (docs/console.md): its page at `/` and its static files at `/console/{name}`, served as
they are in server/api/console/ (plain ES modules, no build step). The files hold no data and no secret: the
page calls the public /v1 API with the user's API key, like any other client, so these routes need no key."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import ApiError

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Listed once: a request can only name one of these files, never a path.
FILES = {path.name: path for path in CONSOLE_DIR.iterdir() if path.suffix in MEDIA_TYPES}
HEADERS = {
    # Revalidated each time (FileResponse answers If-None-Match with 304): an upgrade shows at once.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Nothing from elsewhere runs in the page. Images: the server's own replies as blob: URLs, an uploaded
    # file (blob:), or an http(s) URL that the user typed in.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data: http: https:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"The console has no file {name!r}; open / for the console.")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
def console_page() -> FileResponse:
    return _file("index.html")


@router.get("/console/{name}")
def console_file(name: str) -> FileResponse:
    return _file(name)
