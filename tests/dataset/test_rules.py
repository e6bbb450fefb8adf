"""Label rules: grammar, error messages, unknown-tag suggestions, derive_labels."""

from __future__ import annotations

import pytest

from tagmill.dataset.rules import And, Not, Or, Rule, Tag, derive_labels, parse_rule
from tagmill.errors import InputError, LabelRuleError
from tagmill.formats.base import FileImage, SourceRecord

SEED_RULE = "thriller = Thriller AND Crime AND NOT Romance AND NOT Comedy"


def rec(id: str, *labels: str, split: str | None = None) -> SourceRecord:
    return SourceRecord(id=id, labels=tuple(labels), image=FileImage(f"{id}.jpg"), split=split)


# ------------------------------------------------------------------- grammar


def test_parse_builds_name_expr_and_source():
    rule = parse_rule("  thriller = Thriller & Crime & ~Romance  ")
    assert rule.name == "thriller"
    assert rule.source == "thriller = Thriller & Crime & ~Romance"
    assert rule.expr == And((Tag("Thriller"), Tag("Crime"), Not(Tag("Romance"))))
    assert rule.tags() == {"Thriller", "Crime", "Romance"}


def test_not_binds_tighter_than_and_tighter_than_or():
    rule = parse_rule("r = a | b & ~c")
    assert rule.expr == Or((Tag("a"), And((Tag("b"), Not(Tag("c"))))))
    assert rule.matches({"a", "c"})
    assert rule.matches({"b"})
    assert not rule.matches({"b", "c"})
    assert not rule.matches(set())


def test_parentheses_override_precedence():
    rule = parse_rule("r = (a | b) & ~(c | d)")
    assert rule.matches({"a"}) and rule.matches({"b"})
    assert not rule.matches({"a", "d"})
    assert not rule.matches({"c"})


def test_double_negation_and_nested_parentheses():
    assert parse_rule("r = ~~a").matches({"a"})
    assert parse_rule("r = ((((a))))").matches({"a"})
    assert parse_rule("r = NOT NOT a").matches({"a"})


@pytest.mark.parametrize(
    "text",
    [
        "r = a AND b OR NOT c",
        "r = a and b or not c",
        "r = a And b Or Not c",
        "r = a & b | ~c",
        "r=a&b|~c",
    ],
)
def test_word_operators_in_any_case_equal_symbols(text: str):
    assert parse_rule(text).expr == Or((And((Tag("a"), Tag("b"))), Not(Tag("c"))))


def test_quoted_names_keep_spaces_and_can_be_keywords():
    rule = parse_rule("""scifi = "Science Fiction" | 'Space Opera' & ~"AND" """)
    assert rule.tags() == {"Science Fiction", "Space Opera", "AND"}
    assert rule.matches({"Science Fiction"})
    assert rule.matches({"Space Opera"})
    assert not rule.matches({"Space Opera", "AND"})


def test_quoted_rule_name():
    assert parse_rule('"Sci Fi" = Fantasy').name == "Sci Fi"


def test_bare_names_allow_punctuation_digits_and_non_ascii():
    rule = parse_rule("r = sci-fi & 3D & v1.2 & a/b & c+d & snake_case & Ästhetik & 日本")
    assert rule.tags() == {"sci-fi", "3D", "v1.2", "a/b", "c+d", "snake_case", "Ästhetik", "日本"}


def test_tags_match_case_sensitively():
    rule = parse_rule("r = Thriller")
    assert rule.matches(frozenset({"Thriller"}))
    assert not rule.matches(frozenset({"thriller"}))


def test_str_round_trips():
    rule = parse_rule("""r = ("Science Fiction" | a) & ~(b & c) & 'say "hi"' & "and" """)
    again = parse_rule(str(rule))
    assert again.expr == rule.expr and again.name == rule.name


@pytest.mark.parametrize(
    "genres, expected",
    [
        ({"Thriller", "Crime"}, True),
        ({"Thriller", "Crime", "Drama"}, True),
        ({"Thriller", "Crime", "Romance"}, False),
        ({"Thriller", "Crime", "Comedy"}, False),
        ({"Thriller"}, False),
        ({"Crime"}, False),
        ({"Thriller", "Drama", "Mystery"}, False),
        (set(), False),
    ],
)
def test_seed_rule_on_genre_table(genres: set[str], expected: bool):
    assert parse_rule(SEED_RULE).matches(frozenset(genres)) is expected
    symbols = parse_rule("thriller = Thriller & Crime & ~Romance & ~Comedy")
    assert symbols.matches(genres) is expected


# -------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    "text, message",
    [
        ("thriller = Thriller & & Crime", "expected a tag name at column 23, found '&'"),
        ("r = a |", "expected a tag name at column 8 (end of rule)"),
        ("r = ", "expected a tag name at column 5 (end of rule)"),
        ("r = ~", "expected a tag name at column 6 (end of rule)"),
        ("r = ()", "expected a tag name at column 6, found ')'"),
        ("r = (a | b", "expected ')' at column 11 (end of rule) to close the '(' at column 5"),
        ("r = (a b)", "expected ')' at column 8, found 'b' to close the '(' at column 5"),
        ("r = a )", "unmatched ')' at column 7"),
        ("r = a b", "expected an operator (&, |, AND, OR) or the end of the rule at column 7, found 'b'"),
        ("r = Science Fiction", "at column 13, found 'Fiction'"),
        ("r = a = b", "unexpected '=' at column 7"),
        ("Thriller AND Crime", "expected '=' after the rule name 'Thriller' at column 10, found 'AND'"),
        ("= a", "expected a rule name at column 1, found '='"),
        ("and = a", "expected a rule name at column 1, found 'and'"),
        ('r = "Science Fiction', "unterminated quoted tag name starting at column 5"),
        ("r = ''", "empty tag name at column 5"),
        ("r = a ! b", "unexpected character '!' at column 7"),
        ("r = a, b", "unexpected character ',' at column 6"),
    ],
)
def test_parse_errors_point_at_the_column(text: str, message: str):
    with pytest.raises(LabelRuleError) as info:
        parse_rule(text)
    assert message in info.value.message
    assert info.value.message.endswith(f": {text!r}")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_rule(text: str):
    with pytest.raises(LabelRuleError, match="empty rule"):
        parse_rule(text)


def test_parse_error_hints():
    with pytest.raises(LabelRuleError) as info:
        parse_rule("r = a ! b")
    assert "~ or NOT" in str(info.value)
    with pytest.raises(LabelRuleError) as info:
        parse_rule("Thriller AND Crime")
    assert "NAME = EXPRESSION" in str(info.value)


def test_label_rule_error_is_an_input_error():
    with pytest.raises(InputError):
        parse_rule("r = &")


# ------------------------------------------------------------------- derive

GENRES = [
    rec("1", "Thriller", "Crime"),
    rec("2", "Thriller", "Crime", "Romance"),
    rec("3", "Comedy", split="val"),
    rec("4", "Science Fiction", "Thriller"),
    rec("5"),
]
KNOWN = {"Thriller", "Crime", "Romance", "Comedy", "Science Fiction"}


def test_derive_one_rule_is_binary_with_positive_class_last():
    records, task, classes = derive_labels(GENRES, [parse_rule(SEED_RULE)], KNOWN, otherwise="Other")
    assert task == "single"
    assert classes == ["Other", "thriller"]
    assert [r.labels for r in records] == [("thriller",), ("Other",), ("Other",), ("Other",), ("Other",)]
    # id, image and split survive
    assert [(r.id, r.image, r.split) for r in records] == [(r.id, r.image, r.split) for r in GENRES]


def test_derive_several_rules_is_multi_label_in_rule_order():
    rules = [parse_rule("dark = Thriller | Crime"), parse_rule('scifi = "Science Fiction"')]
    records, task, classes = derive_labels(GENRES, rules, KNOWN)
    assert task == "multi"
    assert classes == ["dark", "scifi"]
    assert [r.labels for r in records] == [("dark",), ("dark",), (), ("dark", "scifi"), ()]
    assert records[2].split == "val"


def test_derive_does_not_modify_input():
    before = list(GENRES)
    derive_labels(GENRES, [parse_rule("x = Comedy")], KNOWN)
    assert GENRES == before


def test_unknown_tag_suggests_the_right_case():
    with pytest.raises(LabelRuleError) as info:
        derive_labels(GENRES, [parse_rule("thriller = thriller & Crime")], KNOWN)
    assert "unknown tag 'thriller'" in info.value.message
    assert "did you mean 'Thriller'?" in info.value.message


def test_unknown_tag_suggests_close_spellings_and_lists_all_unknown():
    rule = parse_rule('x = Thriler & "Science Fictoin" & Zzzz')
    with pytest.raises(LabelRuleError) as info:
        derive_labels(GENRES, [rule], KNOWN)
    msg = info.value.message
    assert "unknown tag 'Thriler'" in msg and "'Thriller'" in msg
    assert "unknown tag 'Science Fictoin'" in msg and "'Science Fiction'" in msg
    assert "unknown tag 'Zzzz'" in msg
    assert "Crime" in (info.value.hint or "")  # lists the data's tags


def test_duplicate_rule_names():
    with pytest.raises(LabelRuleError, match="two rules are named 'a'"):
        derive_labels(GENRES, [parse_rule("a = Crime"), parse_rule("a = Comedy")], KNOWN)


def test_rule_named_like_otherwise():
    with pytest.raises(LabelRuleError, match="'other'"):
        derive_labels(GENRES, [parse_rule("other = Crime")], KNOWN)


def test_no_rules():
    with pytest.raises(InputError):
        derive_labels(GENRES, [], KNOWN)


def test_rule_is_a_plain_dataclass():
    rule = parse_rule("a = b")
    assert isinstance(rule, Rule)
    assert rule == Rule(name="a", expr=Tag("b"), source="a = b")
