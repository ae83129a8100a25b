"""The one way numbers are read from text (CFG lists, file metadata): plain ASCII decimal notation, finite values."""

import math
import numbers
import re

# Python's int()/float() also accept other scripts' digits ("٤", "４"), "1_0", surrounding spaces, "nan" and "inf";
# str.isdigit() accepts superscripts ("²"). These patterns accept only what a person types on an ASCII keyboard.
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_int(text: str, what: str) -> int:
    """A non-negative decimal integer written with the digits 0-9 only, e.g. '1200'; ValueError quotes the text."""
    if not isinstance(text, str) or not _INT.fullmatch(text):
        raise ValueError(f"{what} must be a decimal integer written with the digits 0-9, got {text!r}")
    return int(text)


def parse_float(text: str, what: str) -> float:
    """A finite decimal number such as '7', '-0.5', '.5' or '1e-3' (ASCII only); ValueError quotes the text."""
    if not isinstance(text, str) or not _FLOAT.fullmatch(text):
        raise ValueError(f"{what} must be a decimal number such as 7 or 3.5 (digits 0-9, '.', 'e'), got {text!r}")
    return finite(float(text), what, text)


def finite(value: float, what: str, text: str | None = None) -> float:
    """`value` as a float if it is a finite real number (not NaN, not +-inf, not a bool); ValueError otherwise."""
    shown = repr(text) if text is not None else repr(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {shown}")
    return float(value)
