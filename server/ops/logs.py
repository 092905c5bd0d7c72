"""Log set-up for `labelserve serve`: text or one JSON object per line, each record carrying the id of the
request it was logged for."""

from __future__ import annotations

import json
import logging
import logging.handlers

from server.ops.audit import utc_timestamp
from server.ops.request_context import current
from server.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request's id ("-" outside requests: start-up, job threads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = current()
            record.request_id = context.request_id if context is not None else "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry.update(audit)  # an audit line: its fields, not the same again as a JSON string
        else:
            entry["message"] = record.getMessage()
            if getattr(record, "request_id", "-") != "-":
                entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings, level: int = logging.INFO) -> None:
    """The root handler for everything, uvicorn's loggers included (start uvicorn with log_config=None)."""
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if settings.audit_log_file is not None:
        # Watched: logrotate may rename the file; the next line goes to a new one.
        audit_file = logging.handlers.WatchedFileHandler(settings.audit_log_file, encoding="utf-8")
        audit_file.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("labelserve.audit").addHandler(audit_file)
