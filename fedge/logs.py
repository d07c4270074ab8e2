"""fedge's log lines for people (text) or for a log collector (one JSON object a line)."""

import logging
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                             rename_fields={"asctime": "time", "levelname": "level",
                                            "name": "logger"},
                             datefmt="%Y-%m-%dT%H:%M:%S%z")
    return logging.Formatter(TEXT)


def show_fedge_logs(log_format: LogFormat = "text") -> None:
    """Send fedge's INFO and above to stderr in ``log_format``."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    fedge_log = logging.getLogger("fedge")
    fedge_log.handlers = [handler]
    fedge_log.setLevel(logging.INFO)
    fedge_log.propagate = False
