"""One error hierarchy for the whole project.

Every error says whether retrying can help (`retriable`) and whether the caller's input is at
fault (`is_input_error`), as pymilvus's exceptions do, so the job's retry loop and the service's
HTTP mapping (4xx for input, 503 for retriable backend trouble) read one attribute each.
"""

from __future__ import annotations

import re


class ReembedError(Exception):
    """Base class. Subclasses set the two flags below."""

    retriable: bool = False
    is_input_error: bool = False


class ConfigError(ReembedError):
    """A setting is wrong or names something that does not exist. Fails before any work starts."""

    is_input_error = True


class InputDataError(ReembedError):
    """Input files cannot be read or do not hold what the config says they hold."""

    is_input_error = True


class ModelMismatchError(ReembedError):
    """A collection was built with another model identity than the one being used on it."""

    is_input_error = True


class CapabilityError(ReembedError):
    """The Milvus server lacks a feature the requested mode needs."""

    is_input_error = True


class StoreUnavailableError(ReembedError):
    """Milvus cannot be reached or timed out. Retrying later may succeed."""

    retriable = True


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHAIN_MARKERS = (
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
)
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning)\b:?")


def root_cause(exc: BaseException) -> str:
    """`Type: message` of the exception at the bottom of `exc`'s chain, as one line.

    Ray hands a failed remote call back as a RayTaskError whose text holds the remote traceback
    (the original exception's own object does not cross the process boundary) and ends with Ray's
    retry advice. The cause is the exception line that ends the first traceback block of that
    text, or the innermost `__cause__` / `.cause` raised in this process.
    """
    seen: set[int] = set()
    inner = exc
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = inner.__cause__ or getattr(inner, "cause", None)
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = _ANSI.sub("", str(exc))
    first_block = text
    for marker in _CHAIN_MARKERS:
        first_block = first_block.split(marker)[0]
    lines = first_block.rstrip().splitlines()
    if any(line.lstrip().startswith('File "') for line in lines):
        # The traceback's last frame is followed by the exception line (then maybe more message lines).
        last_frame = max(i for i, line in enumerate(lines) if line.lstrip().startswith('File "'))
        for line in lines[last_frame + 1 :]:
            if line and not line.startswith(" ") and _EXCEPTION_LINE.match(line):
                return line.strip()
    message = str(inner).strip().splitlines()
    head = next((m.strip() for m in message if m.strip()), "")
    return f"{type(inner).__name__}: {head}" if head else type(inner).__name__
