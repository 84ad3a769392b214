"""A `choice` spec as a grammar: the output is exactly one of the given strings."""

from __future__ import annotations


def _quote(text: str) -> str:
    # EBNF and Lark string literals both take backslash escapes for quote and backslash;
    # control characters are escaped the same way so a newline in a choice stays literal.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def choice_ebnf(choices: tuple[str, ...]) -> str:
    """xgrammar's EBNF: `root ::= "yes" | "no"`."""
    return "root ::= " + " | ".join(_quote(c) for c in choices)


def choice_lark(choices: tuple[str, ...]) -> str:
    """llguidance's Lark: `start: "yes" | "no"`."""
    return "start: " + " | ".join(_quote(c) for c in choices)
