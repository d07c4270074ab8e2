"""The one error type shown to users as a message instead of a traceback."""


class FedgeError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
