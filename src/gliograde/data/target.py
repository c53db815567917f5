"""The binary question asked of a cohort: which column, which value is positive, and the class names every output
carries (negative first: index = label). The seeds' question, the BraTS grade, is `GRADE_TARGET` (LGG = 0, HGG = 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gliograde import GRADES
from gliograde.errors import DataError

# two-valued columns whose positive value goes without saying (else the sorted second value, said)
KNOWN_POSITIVE = {frozenset({"lgg", "hgg"}): "hgg", frozenset({"0", "1"}): "1", frozenset({"false", "true"}): "true",
                  frozenset({"no", "yes"}): "yes", frozenset({"negative", "positive"}): "positive"}  # fmt: skip


def column_key(name: str) -> str:
    """A column name compared without case, spaces, underscores, hyphens or slashes."""
    return re.sub(r"[\s_\-/]", "", name).lower()


def same_value(a: str, b: str) -> bool:
    """Two cell values are one label: equal without case and surrounding spaces, or as numbers (4 and 4.0)."""
    a, b = a.strip(), b.strip()
    if a.lower() == b.lower():
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """The binary question: the column, the positive value, the negative value(s), and the class names every output
    uses (negative first: index = label). The seeds' target is the BraTS grade, classes ("LGG", "HGG")."""

    column: str
    positive: str
    negative: tuple[str, ...]
    classes: tuple[str, str]

    @property
    def is_grade(self) -> bool:
        return self.classes == GRADES

    def label_of(self, value: str) -> int | None:
        """1, 0, or None: excluded (empty, or neither value)."""
        value = (value or "").strip()
        if not value or value.upper() == "NA":
            return None
        if same_value(value, self.positive):
            return 1
        if not self.negative or any(same_value(value, n) for n in self.negative):
            return 0
        return None

    def to_dict(self) -> dict:
        return {"column": self.column, "positive": self.positive, "negative": list(self.negative),
                "classes": list(self.classes)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict | None) -> Target:
        if not d:
            return GRADE_TARGET
        return cls(d["column"], d["positive"], tuple(d["negative"]), tuple(d["classes"]))


GRADE_TARGET = Target("grade", "HGG", ("LGG",), GRADES)


def _class_name(column: str, values: list[str], other: str | None = None) -> str:
    """'IDH wildtype', 'WHO CNS Grade 2/3', 'IDH not wildtype' (more than three values: not `other`); a label or grade
    column's own values name themselves ('HGG')."""
    shown = "/".join(values) if len(values) <= 3 or other is None else f"not {other}"
    return shown if column_key(column) in ("grade", "label", "class", "target") else f"{column} {shown}"


def make_target(column: str, values: list[str], positive: str | None, negative: str | None, where: str) -> Target:
    """The Target of `column` given the values it holds (non-empty cells), checked: --positive/--negative must occur,
    and without --positive the column must be two-valued."""
    distinct: list[str] = []  # first spelling of each value, without case (co-deletion = Co-deletion)
    for v in sorted((v.strip() for v in values if v.strip() and v.strip().upper() != "NA"), key=str.lower):
        if not any(same_value(v, d) for d in distinct):
            distinct.append(v)
    if len(distinct) < 2:
        only = f"only {distinct[0]!r}" if distinct else "no value"
        raise DataError(f"{where}: column {column!r} holds {only} once the empty cells are left out: a binary target "
                        "needs two classes")  # fmt: skip
    if positive is None:
        if len(distinct) != 2:
            raise DataError(f"{where}: column {column!r} holds {len(distinct)} values ({', '.join(distinct[:8])}); "
                            f"choose the positive class with --positive VALUE [--negative VALUE]")  # fmt: skip
        known = KNOWN_POSITIVE.get(frozenset(v.lower() for v in distinct))
        positive = next((v for v in distinct if v.lower() == known), distinct[1])
    for name, value in (("--positive", positive), ("--negative", negative)):
        if value is not None and not any(same_value(v, value) for v in distinct):
            raise DataError(f"{where}: {name} {value!r} does not occur in column {column!r} "
                            f"(its values: {', '.join(distinct[:8])})")  # fmt: skip
    pos = next(v for v in distinct if same_value(v, positive))
    negs = [v for v in distinct if not same_value(v, pos) and (negative is None or same_value(v, negative))]
    if not negs:
        raise DataError(f"{where}: column {column!r} holds only {pos!r}: a binary target needs a second class")
    pair = frozenset(v.lower() for v in (*negs, pos))
    if pair == frozenset({"lgg", "hgg"}):
        return GRADE_TARGET  # the seeds' question, whatever the column is called
    classes = (_class_name(column, negs, other=pos), _class_name(column, [pos]))
    return Target(column, pos, tuple(negs) if negative is not None else (), classes)
