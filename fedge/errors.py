"""The one error type shown to users as a message instead of a traceback."""

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class FedgeError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def validation_problems(error: "ValidationError",
                        place: Callable[[tuple], str] | None = None) -> str:
    """A pydantic error as one line: ``field: problem; field: problem``; ``place`` names
    a problem's location (default: its path, ``a.b``)."""
    problems = []
    for problem in error.errors():
        location = tuple(problem["loc"])
        where = place(location) if place else ".".join(map(str, location))
        what = problem["msg"]
        what = what.removeprefix("Value error, ")  # our own validators' messages
        problems.append(f"{where}: {what}" if where else what)
    return "; ".join(problems)
