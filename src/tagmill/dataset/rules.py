"""Label rules: derive new labels from the tags a dataset already has.

A rule is one line, ``NAME = EXPRESSION``, for jobs like "is it a thriller?"::

    thriller = Thriller & Crime & ~Romance & ~Comedy
    thriller = Thriller AND Crime AND NOT Romance       # same thing, in words
    scifi    = "Science Fiction" | (Fantasy & Space)

Grammar (precedence NOT > AND > OR, parentheses group)::

    rule    := name "=" expr
    expr    := and_ ( ("|" | OR) and_ )*
    and_    := not_ ( ("&" | AND) not_ )*
    not_    := ("~" | NOT) not_ | atom
    atom    := name | "(" expr ")"
    name    := bare word | "double quoted" | 'single quoted'

A bare word is letters (any script), digits and ``_ - . / +``. The words AND, OR, NOT
(any case) are operators; quote a tag that is literally called "And". Tags match
case-sensitively, but unknown tags get case-insensitive "did you mean" suggestions,
because a wrong case is the most common way to name a tag the data does not have.

Parsing never evaluates anything: :func:`parse_rule` gives a :class:`Rule`, and
:func:`derive_labels` applies rules to records after checking every tag they name
exists, so a typo fails loudly instead of silently labelling everything "other".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Iterable, Union

from tagmill.errors import InputError, LabelRuleError
from tagmill.formats.base import SourceRecord, TaskName

_BARE_EXTRA = frozenset("_-./+")
_KEYWORDS = {"AND": "and", "OR": "or", "NOT": "not"}
_SYMBOLS = {"&": "and", "|": "or", "~": "not", "(": "(", ")": ")", "=": "="}
_SYMBOL_HINTS = {
    "!": "use ~ or NOT for negation",
    ",": "use & or AND to require several tags, | or OR for any of them",
}


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Tag:
    """A tag name; true when the image carries that tag."""

    name: str

    def evaluate(self, tags: frozenset[str] | set[str]) -> bool:
        return self.name in tags

    def tag_names(self) -> set[str]:
        return {self.name}

    def __str__(self) -> str:
        return _quote(self.name)


@dataclass(frozen=True)
class Not:
    operand: Expr

    def evaluate(self, tags: frozenset[str] | set[str]) -> bool:
        return not self.operand.evaluate(tags)

    def tag_names(self) -> set[str]:
        return self.operand.tag_names()

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"~({inner})" if isinstance(self.operand, (And, Or)) else f"~{inner}"


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]

    def evaluate(self, tags: frozenset[str] | set[str]) -> bool:
        return all(op.evaluate(tags) for op in self.operands)

    def tag_names(self) -> set[str]:
        return set().union(*(op.tag_names() for op in self.operands))

    def __str__(self) -> str:
        return " & ".join(f"({op})" if isinstance(op, Or) else str(op) for op in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]

    def evaluate(self, tags: frozenset[str] | set[str]) -> bool:
        return any(op.evaluate(tags) for op in self.operands)

    def tag_names(self) -> set[str]:
        return set().union(*(op.tag_names() for op in self.operands))

    def __str__(self) -> str:
        return " | ".join(str(op) for op in self.operands)


Expr = Union[Tag, Not, And, Or]


@dataclass(frozen=True)
class Rule:
    """A parsed ``NAME = EXPRESSION`` line."""

    name: str
    expr: Expr
    source: str  #: the text the user wrote, for error messages and reports

    def matches(self, tags: frozenset[str] | set[str]) -> bool:
        """Whether an image carrying exactly ``tags`` satisfies the rule."""
        return self.expr.evaluate(tags)

    def tags(self) -> set[str]:
        """Every tag name the expression refers to (to check they exist)."""
        return self.expr.tag_names()

    def __str__(self) -> str:
        return f"{_quote(self.name)} = {self.expr}"


def _is_bare_char(ch: str) -> bool:
    return ch.isalnum() or ch in _BARE_EXTRA


def _quote(name: str) -> str:
    """``name`` as it would have to be written in a rule (quoted only when needed)."""
    if name and all(_is_bare_char(c) for c in name) and name.upper() not in _KEYWORDS:
        return name
    return f"'{name}'" if '"' in name else f'"{name}"'


# ----------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _Token:
    kind: str  #: "name", "and", "or", "not", "(", ")", "=", "end"
    text: str  #: as written (without quotes for names)
    column: int  #: 1-based position in the rule text


def _error(text: str, message: str, *, hint: str | None = None) -> LabelRuleError:
    return LabelRuleError(f"{message}: {text!r}", hint=hint)


def _tokenize(text: str) -> list[_Token]:
    """Split a rule into tokens; characters that belong to no token are errors."""
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in _SYMBOLS:
            tokens.append(_Token(_SYMBOLS[ch], ch, i + 1))
            i += 1
        elif ch in "\"'":
            end = text.find(ch, i + 1)
            if end < 0:
                raise _error(text, f"unterminated quoted tag name starting at column {i + 1}")
            if end == i + 1:
                raise _error(text, f"empty tag name at column {i + 1}")
            tokens.append(_Token("name", text[i + 1 : end], i + 1))
            i = end + 1
        elif _is_bare_char(ch):
            start = i
            while i < len(text) and _is_bare_char(text[i]):
                i += 1
            word = text[start:i]
            tokens.append(_Token(_KEYWORDS.get(word.upper(), "name"), word, start + 1))
        else:
            hint = _SYMBOL_HINTS.get(ch, 'quote tag names that contain it: "like this"')
            raise _error(text, f"unexpected character {ch!r} at column {i + 1}", hint=hint)
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


# ----------------------------------------------------------------------- parser


class _Parser:
    """Recursive descent over the token list; one method per grammar level."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.pos]

    def advance(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def where(self, token: _Token) -> str:
        if token.kind == "end":
            return f"at column {token.column} (end of rule)"
        return f"at column {token.column}, found {token.text!r}"

    def rule(self) -> Rule:
        if self.current.kind == "end":
            raise LabelRuleError(
                "empty rule", hint="write NAME = EXPRESSION, e.g. thriller = Thriller & ~Comedy"
            )
        name_token = self.current
        if name_token.kind != "name":
            hint = (
                f"{name_token.text!r} is an operator; quote it to use it as a name"
                if name_token.kind in ("and", "or", "not")
                else None
            )
            raise _error(self.text, f"expected a rule name {self.where(name_token)}", hint=hint)
        self.advance()
        if self.current.kind != "=":
            raise _error(
                self.text,
                f"expected '=' after the rule name {name_token.text!r} {self.where(self.current)}",
                hint="write rules as NAME = EXPRESSION, e.g. thriller = Thriller & ~Comedy",
            )
        self.advance()
        expr = self.or_expr()
        self.expect_end()
        return Rule(name=name_token.text, expr=expr, source=self.text.strip())

    def expect_end(self) -> None:
        token = self.current
        if token.kind == "end":
            return
        if token.kind == ")":
            raise _error(self.text, f"unmatched ')' at column {token.column}")
        if token.kind == "=":
            raise _error(self.text, f"unexpected '=' at column {token.column}",
                         hint="give one rule per line / per --derive option")
        raise _error(
            self.text,
            f"expected an operator (&, |, AND, OR) or the end of the rule {self.where(token)}",
            hint='quote tag names that contain spaces: "Science Fiction"',
        )

    def or_expr(self) -> Expr:
        operands = [self.and_expr()]
        while self.current.kind == "or":
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Expr:
        operands = [self.not_expr()]
        while self.current.kind == "and":
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Expr:
        if self.current.kind == "not":
            self.advance()
            return Not(self.not_expr())
        return self.atom()

    def atom(self) -> Expr:
        token = self.current
        if token.kind == "name":
            self.advance()
            return Tag(token.text)
        if token.kind == "(":
            self.advance()
            expr = self.or_expr()
            if self.current.kind != ")":
                raise _error(
                    self.text,
                    f"expected ')' {self.where(self.current)} "
                    f"to close the '(' at column {token.column}",
                )
            self.advance()
            return expr
        raise _error(self.text, f"expected a tag name {self.where(token)}")


def parse_rule(text: str) -> Rule:
    """Parse one ``NAME = EXPRESSION`` rule, or raise :class:`LabelRuleError` saying where."""
    return _Parser(text).rule()


# ---------------------------------------------------------------------- derive


def suggest(name: str, known: Iterable[str]) -> list[str]:
    """Known names close to ``name``: same name in another case first, then look-alikes.

    Matching is done on lowercased names so "thriller" finds "Thriller"; the answer
    uses the known spelling.
    """
    by_lower: dict[str, list[str]] = {}
    for k in sorted(known):
        by_lower.setdefault(k.lower(), []).append(k)
    exact = [k for k in by_lower.get(name.lower(), []) if k != name]
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    found = exact + [k for low in close for k in by_lower[low] if k not in exact and k != name]
    return found[:3]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    matches = suggest(name, known)
    if not matches:
        return ""
    return " — did you mean " + " or ".join(repr(m) for m in matches) + "?"


def _check_rules(rules: list[Rule], known_tags: set[str], otherwise: str) -> None:
    """Refuse rule sets that would produce confusing classes, before touching records."""
    if not rules:
        raise InputError("no label rules given")
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise LabelRuleError(f"two rules are named {rule.name!r}",
                                 hint="each rule names one output class; give them different names")
        seen.add(rule.name)
    if len(rules) == 1 and rules[0].name == otherwise:
        raise LabelRuleError(
            f"rule name {otherwise!r} is also the class for images that do not match it",
            hint="rename the rule or choose another name for the non-matching class",
        )
    problems = [
        f"unknown tag {tag!r} in rule {rule.source!r}{_did_you_mean(tag, known_tags)}"
        for rule in rules
        for tag in sorted(rule.tags() - known_tags)
    ]
    if problems:
        sample = ", ".join(repr(t) for t in sorted(known_tags)[:12])
        more = ", ..." if len(known_tags) > 12 else ""
        raise LabelRuleError("; ".join(problems), hint=f"the data's tags are: {sample}{more}")


def derive_labels(
    records: list[SourceRecord],
    rules: list[Rule],
    known_tags: set[str],
    otherwise: str = "other",
) -> tuple[list[SourceRecord], TaskName, list[str]]:
    """Relabel ``records`` by ``rules``; returns ``(records, task, classes)``.

    * One rule → single-label binary task with classes ``[otherwise, rule.name]``:
      index 1 is the positive class, so a binary model's "probability of class 1"
      reads as "probability the rule holds" (users' SageMaker thriller job had ['Other', 'Thriller/Crime']).
    * Several rules → multi-label task whose tags are the rule names (in rule order);
      an image matching none keeps ``labels=()``. ``otherwise`` is not used.

    ``known_tags`` is every tag the source has (usually the labels of all records);
    rules naming any other tag fail, with suggestions. Records keep id, image, split.
    """
    _check_rules(rules, known_tags, otherwise)
    if len(rules) == 1:
        rule = rules[0]
        out = [
            replace(r, labels=(rule.name,) if rule.matches(frozenset(r.labels)) else (otherwise,))
            for r in records
        ]
        return out, "single", [otherwise, rule.name]
    out = []
    for r in records:
        tags = frozenset(r.labels)
        out.append(replace(r, labels=tuple(rule.name for rule in rules if rule.matches(tags))))
    return out, "multi", [rule.name for rule in rules]


__all__ = ["Rule", "Tag", "Not", "And", "Or", "parse_rule", "derive_labels", "suggest"]
