"""Repair of mojibake: UTF-8 text that was decoded as cp1252 once (e.g. "â€œ" for "“")."""

from __future__ import annotations

import re
import unicodedata
from typing import Callable


def _cp1252_char(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8D 0x8F 0x90 0x9D: sloppy decoders keep them as C1 controls
        return chr(b)


_BYTE_OF = {_cp1252_char(b): b for b in range(0x80, 0x100)}
_CONT = "".join(_cp1252_char(b) for b in range(0x80, 0xC0))
_LEAD2 = "".join(_cp1252_char(b) for b in range(0xC2, 0xE0))
_LEAD3 = "".join(_cp1252_char(b) for b in range(0xE0, 0xF0))
_LEAD4 = "".join(_cp1252_char(b) for b in range(0xF0, 0xF5))


def _cls(chars: str) -> str:
    return "[" + "".join(re.escape(c) for c in chars) + "]"


_MOJIBAKE = re.compile(
    f"{_cls(_LEAD2)}{_cls(_CONT)}"
    f"|{_cls(_LEAD3)}{_cls(_CONT)}{{2}}"
    f"|{_cls(_LEAD4)}{_cls(_CONT)}{{3}}"
    # "”" is E2 80 9D; 0x9D is undefined in cp1252, so it is usually lost and "â€" is left.
    f"|\u00e2\u20ac(?!{_cls(_CONT)})"
)
_ANY_LEAD = re.compile("[\u00c2-\u00f4]")
# In a lowercased file "Ã©" (é) became "ã©"; repaired only in files flagged as lowercased.
_MOJIBAKE_LOWER = re.compile(f"\u00e3{_cls(_CONT)}")


def _fix_one(m: re.Match) -> str:
    s = m.group(0)
    if s == "\u00e2\u20ac":
        return "\u201d"
    try:
        fixed = bytes(_BYTE_OF[c] for c in s).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return s
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in fixed):
        return s
    return fixed


def _fix_lower(m: re.Match) -> str:
    s = m.group(0)
    try:
        fixed = bytes([0xC3, _BYTE_OF[s[1]]]).decode("utf-8").lower()
    except (KeyError, UnicodeDecodeError):
        return s
    return s if unicodedata.category(fixed) == "Cc" else fixed


def repair_mojibake(text: str, lowercased: bool = False) -> tuple[str, int]:
    """Undo UTF-8-read-as-cp1252 double encoding (``â€œ`` -> ``“``, ``â€™`` -> ``’``, ``â€`` -> ``”``).

    Only a sequence that re-encodes to valid UTF-8 (and yields no control character) is replaced,
    so clean text is left alone. Returns ``(text, number of sequences repaired)``.
    """
    n = 0

    def count(fix: Callable[[re.Match], str]) -> Callable[[re.Match], str]:
        def f(m: re.Match) -> str:
            nonlocal n
            out = fix(m)
            n += out != m.group(0)
            return out
        return f

    if text.isascii():
        return text, 0
    if _ANY_LEAD.search(text):
        text = _MOJIBAKE.sub(count(_fix_one), text)
    if lowercased and "\u00e3" in text:
        text = _MOJIBAKE_LOWER.sub(count(_fix_lower), text)
    return text, n
