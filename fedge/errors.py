"""The one error type shown to users as a message instead of a traceback."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class FedgeError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def validation_problems(error: "ValidationError") -> str:
    """A pydantic error as one line: ``field: problem; field: problem``."""
    problems = []
    for problem in error.errors():
        where, what = ".".join(map(str, problem["loc"])), problem["msg"]
        what = what.removeprefix("Value error, ")  # our own validators' messages
        problems.append(f"{where}: {what}" if where else what)
    return "; ".join(problems)
