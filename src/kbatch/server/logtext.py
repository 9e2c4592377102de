"""Text from requests made safe for a line-oriented log.

A path, a user name or a job name reaches the log as the client sent it
(percent-decoded for a path): a newline in it would start a forged line, an
escape sequence would rewrite the terminal of whoever reads the log.  Every
such character is written as Python writes it in a ``repr`` (``\\n``,
``\\x1b``, ``\\u202e``), and a backslash as ``\\\\`` so that an escaped
character cannot be told from one the client typed as text: one request is
one line, and the line says exactly what was sent.
"""

from __future__ import annotations

__all__ = ["escaped"]

_SPECIAL = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_ESCAPES: dict[int, str] = {
    **{c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]},
    # Line and paragraph separators, bidi overrides and isolates.
    **{c: f"\\u{c:04x}" for c in [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]},
    **_SPECIAL,
}


def escaped(text: object) -> str:
    """``text`` with every control character (and backslash) escaped as in a ``repr``."""
    return str(text).translate(_ESCAPES)
