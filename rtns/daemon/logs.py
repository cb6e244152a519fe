"""The daemon's structured logs: one event per line, as JSON or key=value."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

log = logging.getLogger("rtns.server")


def log_event(event: str, **fields: Any) -> None:
    """Log ``event`` with its fields (the formatters below put them on the same line)."""
    log.info(event, extra={"fields": fields})


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        obj.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class KvLogFormatter(logging.Formatter):
    """``ts=... level=... event=... key=value ...`` (values with spaces quoted)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"level": record.levelname.lower(), "event": record.getMessage()}
        fields |= getattr(record, "fields", {}) or {}
        parts = [f"ts={record.created:.3f}"]
        for k, v in fields.items():
            s = str(v)
            parts.append(f"{k}={s!r}" if (" " in s or "=" in s or not s) else f"{k}={s}")
        return " ".join(parts)


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    """Structured logs of every ``rtns`` logger to stderr: JSON lines or key=value."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else KvLogFormatter())
    root = logging.getLogger("rtns")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
