"""The reports' templates and the filters that write their numbers.

report.html (summarize), validation's report.html, summary.md, validation.md and compare.md render from the Jinja2
templates beside this file: the Python that calls them prepares plain dicts and lists, the templates lay them out.
HTML templates (*.html.j2) are autoescaped, so every string from a record is escaped unless a macro of
macros.html.j2 writes the markup around it; the Markdown ones (*.md.j2) are not. A number reaches a page through one
of the filters below, the same functions the Python uses where it formats a table cell.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path

import jinja2

from gliograde import GRADES

HERE = Path(__file__).resolve().parent
NA = "n/a"


def is_num(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


# ------------------------------------------------------------------------------------------- the HTML pages' style
def num(x, digits: int = 3) -> str:
    """A number with `digits` decimals (an int as it is); "n/a" for None or NaN; yes/no for a bool; text as text."""
    if _missing(x):
        return NA
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return str(x)


def pct(x, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %" if is_num(x) else NA


def interval(lo, hi, digits: int = 3) -> str:
    """ "LOW–HIGH", or "n/a" where either end is missing."""
    if not (is_num(lo) and is_num(hi)):
        return NA
    return f"{lo:.{digits}f}–{hi:.{digits}f}"


def ci_of(d) -> str:
    """The interval of a Newcombe / DeLong / Wilson record ({ci_low, ci_high}) or of a [low, high] pair."""
    if isinstance(d, dict):
        return interval(d.get("ci_low"), d.get("ci_high"))
    if isinstance(d, list | tuple) and len(d) == 2:
        return interval(d[0], d[1])
    return NA


# ------------------------------------------------------------------------------------- the Markdown files' style
def fixed(x, digits: int = 4, sign: bool = False) -> str:
    """`digits` decimals whatever the type (a sign with `sign`); "n/a" for None or NaN."""
    if _missing(x):
        return NA
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def dashed(d, digits: int = 4) -> str:
    """ "LOW-HIGH" of an interval record or pair, each end `fixed`; "n/a" where there is none."""
    if isinstance(d, dict) and "ci_low" in d:
        return f"{fixed(d['ci_low'], digits)}-{fixed(d['ci_high'], digits)}"
    if isinstance(d, list | tuple) and len(d) == 2:
        return f"{fixed(d[0], digits)}-{fixed(d[1], digits)}"
    return NA


def pvalue(p) -> str:
    """ "= 0.27", "< 0.001" or "= n/a": a p-value after the letter p."""
    if _missing(p):
        return "= n/a"
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"


def yes_no(x) -> str:
    return NA if x is None else "yes" if x else "no"


def plain(v) -> str:
    """A value of a definition list: n/a, yes/no, a float's repr, a flat list joined, anything nested as JSON."""
    if v is None:
        return NA
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return NA if math.isnan(v) else repr(v)
    if isinstance(v, list | tuple):
        if all(not isinstance(x, dict | list | tuple) for x in v):
            return ", ".join(NA if _missing(x) else str(x) for x in v) if v else "(none)"
        return json.dumps(v, default=str)
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    return str(v)


FILTERS = {f.__name__: f for f in (num, pct, interval, ci_of, fixed, dashed, pvalue, yes_no, plain)}


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a key the data lacks is an error, never an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    return env


def class_words(classes=None) -> dict:
    """How a page names the two classes: `pos`, `neg`, what a label is (`what`), the question and the site audit's
    column ("HGG", "LGG", "grade", "Glioma grade (HGG vs LGG)", "Single grade" for the seeds' target; a cohort's own
    names and "class" otherwise)."""
    neg, pos = tuple(classes) if classes else GRADES
    grade = (neg, pos) == GRADES
    return {"neg": neg, "pos": pos, "grade": grade, "what": "grade" if grade else "class",
            "question": "Glioma grade (HGG vs LGG)" if grade else f"{pos} vs {neg}",
            "single": "Single grade" if grade else "Single class"}  # fmt: skip


def relabel(text, classes=None):
    """Our own prose about HGG and LGG (methods, definitions, flag meanings; strings inside dicts and lists too) said
    of a cohort's classes: the words HGG and LGG replaced by the positive and negative class (unchanged for the
    seeds' target). Prose only; never data."""
    neg, pos = tuple(classes) if classes else GRADES
    if (neg, pos) == GRADES:
        return text
    if isinstance(text, dict):
        return {k: relabel(v, classes) for k, v in text.items()}
    if isinstance(text, list):
        return [relabel(v, classes) for v in text]
    if not isinstance(text, str):
        return text
    return re.sub(r"\bHGG\b", pos, re.sub(r"\bLGG\b", neg, text))


def render(name: str, classes=None, **context) -> str:
    """The template `name` of this folder, rendered with `context` and `names` (class_words of `classes`)."""
    return environment().get_template(name).render(names=class_words(classes), **context)


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines (the `table` macro of macros.md.j2), for the command line's own printing."""
    text = environment().get_template("macros.md.j2").module.table(head, rows)
    return str(text).rstrip("\n").split("\n")
