"""The kinds of failure the command line turns into one line (``mixmim <verb>: error: ...``, exit 2).

Every expected failure is the user's to fix (a wrong path, a damaged file, a config key, data that is
too broken to train on) and says which file, key or value is wrong; :class:`UserError` marks them.
``OSError`` (a missing file, a permission, a full disk) and ``ValueError`` are treated the same way by
the command line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure: the message names what to fix, and the command line prints only it."""


def one_line(exc: BaseException) -> str:
    """The message of an expected failure as one line: an ``OSError`` as "<what>: <path>", an error
    re-raised from a DataLoader worker without the worker's traceback, any newline folded."""
    if isinstance(exc, OSError) and exc.strerror:
        paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        text = exc.strerror[:1].lower() + exc.strerror[1:]
        return f"{text}: {' -> '.join(paths)}" if paths else text
    text = str(exc) if str(exc) else exc.__class__.__name__
    if "Original Traceback" in text:  # torch's ExceptionWrapper: the worker's traceback, then "Type: message"
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, _, message = last.partition(": ")
        text = message if message and name.replace(".", "").replace("_", "").isalnum() else last
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = f"missing key {text}"
    return " ".join(text.split())
