"""Issue 26 §3: the reports render from Jinja2 templates (src/gliograde/templates) and say what the f-string renderers
before them said. tests/fixtures/reports_before holds three cases (see its make.py): the records, and the report.html,
summary.md, compare.md, validation.md and validation report.html that the old renderers made of them. The templates
render the same records here; every section heading, every table (cell by cell, with the row classes that flag a
row) and every line of text must agree. Left out of the comparison: the date and version in the footer, and the
bytes of the embedded PNGs (their number and captions are compared)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gliograde.evaluation import compare, summary
from gliograde.evaluation.report import write_report
from gliograde.inference import validate_report

FIXTURES = Path(__file__).parent / "fixtures" / "reports_before"
TEMPLATES = Path(__file__).resolve().parents[1] / "src" / "gliograde" / "templates"
FIGURES = ("cv_roc_curves.png", "cv_pr_curves.png", "cv_reliability.png", "validation_roc.png", "validation_pr.png",
           "validation_reliability.png")  # fmt: skip
CASES = [
    ("legacy", "report.html"),
    ("legacy", "summary.md"),
    ("legacy", "compare.md"),
    ("legacy", "validation.md"),
    ("legacy", "validation_report.html"),
    ("overlap", "validation.md"),
    ("overlap", "validation_report.html"),
    ("rich", "report.html"),
    ("rich", "summary.md"),
    ("rich", "compare.md"),
]


# ------------------------------------------------------------------------------------------------------ reading
class Page(HTMLParser):
    """What a reader sees of a page: headings, tables (rows of (class, cells)), text, figures, banners."""

    HEADINGS = ("h1", "h2", "h3", "summary")

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.headings: list[tuple[str, str]] = []
        self.tables: list[list[tuple[str, list[tuple[str, str, str]]]]] = []
        self.words: list[str] = []
        self.images: list[tuple[str, str]] = []
        self.banners: list[str] = []
        self.footer = ""
        self._open: list[str] = []
        self._heading: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("br", "img", "meta"):  # void elements
            if tag == "img":
                self.images.append((re.sub(r"base64,.*", "base64,…", a.get("src", "")), a.get("alt", "")))
            return
        self._open.append(tag)
        if tag in self.HEADINGS:
            self._heading = []
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append((a.get("class") or "", []))
        elif tag in ("td", "th"):
            self._cell = []
            self.tables[-1][-1][1].append((tag, a.get("colspan") or "1", ""))
        elif tag == "div" and "banner" in (a.get("class") or "").split():
            self.banners.append(a["class"])

    def handle_endtag(self, tag):
        while self._open and self._open.pop() != tag:
            pass
        if tag in self.HEADINGS and self._heading is not None:
            self.headings.append((tag, squash("".join(self._heading))))
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            row = self.tables[-1][-1][1]
            row[-1] = (*row[-1][:2], squash("".join(self._cell)))
            self._cell = None

    def handle_data(self, data):
        if "style" in self._open or "title" in self._open:
            return
        if "footer" in self._open:
            self.footer += data
            return
        self.words += data.split()
        for part in (self._heading, self._cell):
            if part is not None:
                part.append(data)


def squash(text: str) -> str:
    return " ".join(text.split())


def markdown_parts(text: str) -> tuple[list[str], list[list[list[str]]], list[str]]:
    """(headings, tables as rows of cells, the other lines) of a Markdown file."""
    headings, tables, lines, previous = [], [], [], ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            if not re.fullmatch(r"\|(---\|)+", line):
                tables[-1].append([cell.strip() for cell in line.strip()[1:-1].split("|")])
        else:
            (headings if line.startswith("#") else lines).append(line)
        previous = line
    return headings, tables, lines


# ------------------------------------------------------------------------------------------------------ rendering
def record(case: str, kind: str) -> dict:
    name = {"report.html": "summary", "summary.md": "summary", "compare.md": "compare"}.get(kind, "validation")
    return json.loads((FIXTURES / case / f"{name}.json").read_text())  # NaN tokens kept, as in memory


def render_new(case: str, kind: str, work: Path) -> str:
    """The output of today's renderer on the record the old one rendered."""
    r = record(case, kind)
    if kind == "report.html":
        return write_report(r, work / case, r["provenance"]["shared"], r["configuration"]).read_text()
    if kind == "summary.md":
        return summary.summary_markdown(r)
    if kind == "compare.md":
        return compare.markdown(r)
    if kind == "validation.md":
        validate_report.write_markdown(work / "validation.md", r)
        return (work / "validation.md").read_text()
    validate_report.write_html(work / "report.html", r)
    return (work / "report.html").read_text()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder holding the figures by name (the records name them relative to it)."""
    for name in FIGURES:
        shutil.copy(FIXTURES / "figure.png", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------------ the tests
def assert_same_tables(old: list, new: list, where: str) -> None:
    assert len(new) == len(old), f"{where}: {len(new)} tables, before {len(old)}"
    for t, (a, b) in enumerate(zip(old, new, strict=True)):
        assert len(b) == len(a), f"{where}: table {t} has {len(b)} rows, before {len(a)}"
        for i, (row_a, row_b) in enumerate(zip(a, b, strict=True)):
            assert row_b == row_a, f"{where}: table {t}, row {i}:\n  before {row_a}\n  now    {row_b}"


@pytest.mark.parametrize(("case", "kind"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_the_templates_render_what_the_old_reports_said(case, kind, work):
    old = (FIXTURES / case / kind).read_text()
    new = render_new(case, kind, work)
    where = f"{case}/{kind}"
    if kind.endswith(".md"):
        (h_old, t_old, lines_old), (h_new, t_new, lines_new) = markdown_parts(old), markdown_parts(new)
        assert h_new == h_old, where
        assert_same_tables(t_old, t_new, where)
        assert lines_new == lines_old, where
        return
    a, b = Page(old), Page(new)
    assert b.headings == a.headings, where
    assert_same_tables(a.tables, b.tables, where)
    assert b.words == a.words, where  # every word of text, in order
    assert b.images == a.images and b.banners == a.banners, where
    assert re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", b.footer) == re.sub(
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", "DATE", a.footer
    ), where


def test_the_comparison_sees_a_changed_cell(work):
    """The check above is not blind: one number changed in the record is caught, in its table and row (row 0 is the
    header)."""
    r = record("rich", "summary.md")
    r["folds"][1]["auc"] += 0.01
    old = markdown_parts((FIXTURES / "rich" / "summary.md").read_text())[1]
    with pytest.raises(AssertionError, match=r"table 1, row 2"):
        assert_same_tables(old, markdown_parts(summary.summary_markdown(r))[1], "rich/summary.md")
    html = Page(write_report(record("rich", "report.html") | {"k": 4}, work).read_text())
    assert html.headings != Page((FIXTURES / "rich" / "report.html").read_text()).headings


def test_the_cli_table_is_the_summary_table():
    r = record("rich", "summary.md")
    lines = summary.table_lines(r)
    assert "\n".join(lines) in summary.summary_markdown(r)
    assert lines[0].startswith("| Repeat | Fold | Best epoch") and len(lines) == 2 + len(r["folds"]) + 1


def test_the_validation_page_escapes_every_string_and_stays_self_contained(work):
    evil = '<script>alert("x")</script>'
    r = record("overlap", "validation_report.html")
    r["warnings"].append(f"a {evil} & more")
    r["predictions"][0]["case"] = evil
    r["label"] = evil
    r["cohort"]["qc"]["grid_not_brats"]["meaning"] = evil
    validate_report.write_html(work / "report.html", r)
    text = (work / "report.html").read_text(encoding="ascii")
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; more" in text
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img [^>]*src="([^"]*)"', text))
    md = validate_report.markdown(r)  # Markdown is not HTML: the strings stay as they are
    assert f"> **Warning.** a {evil} & more" in md


def test_every_template_is_packaged():
    """pyproject's package-data ships every file of the templates folder (pip install, not only -e)."""
    pyproject = (TEMPLATES.parents[2] / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    patterns = re.findall(r'"([^"]+)"', re.search(r"^gliograde\s*=\s*\[(.*?)\]", section, re.M | re.S).group(1))
    files = [p for p in TEMPLATES.iterdir() if p.is_file() and p.suffix != ".py"]
    assert {p.suffix for p in files} >= {".j2", ".css"}
    for p in files:
        assert any(fnmatch.fnmatch(f"templates/{p.name}", g) for g in patterns), f"{p.name} is not in package-data"


def test_html_templates_autoescape_and_markdown_ones_do_not():
    from gliograde.templates import environment

    env = environment()
    names = [p.name for p in TEMPLATES.glob("*.j2")]
    assert {n for n in names if env.autoescape(n)} == {n for n in names if n.endswith(".html.j2")}
    assert {"report.html.j2", "validation.html.j2", "macros.html.j2", "summary.md.j2", "macros.md.j2"} <= set(names)
