"""`gliograde cohort DIR --out cohort.csv [--labels TABLE --join COLUMN]`: the cohort table of a folder in any known
layout (as GaNDLF's construct-csv does), with the columns of a label table joined on the id.

Ids meet through `layouts.join_key`, so the published tables join as they are: the BraTS 2021 -> TCIA crosswalk
onto BraTS 2021 or BraTS 2023 folders, the UCSF-PDGM metadata (UCSF-PDGM-004) onto its folders (UCSF-PDGM-0004,
and follow-ups such as UCSF-PDGM-0391_FU016d through their patient).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from gliograde import MODALITIES
from gliograde.data.brats import UNKNOWN_GRADE, UNKNOWN_SITE, Case, Discovery
from gliograde.data.cohort import discover_folder, find_column, read_table
from gliograde.data.layouts import join_key
from gliograde.data.target import column_key
from gliograde.errors import DataError
from gliograde.files import write_text_atomic

OWN_COLUMNS = ("id", "patient", "site", "grade", *MODALITIES)


@dataclass
class CohortWritten:
    out: Path
    discovery: Discovery
    n_rows: int
    matched: int = 0
    unmatched_cases: list[str] = field(default_factory=list)  # cases no label row names
    unused_rows: list[str] = field(default_factory=list)  # label rows that name no case

    def report(self, labels: Path | None) -> str:
        d = self.discovery
        lines = [f"{len(d.cases)} case(s) of {len({c.patient for c in d.cases})} patient(s) in {d.root} "
                 f"[{d.layout}] -> {self.out}"]  # fmt: skip
        if d.skipped:
            lines.append(f"left out {len(d.skipped)} incomplete or unreadable case(s): " + _first(sorted(d.skipped)))
        if labels is not None:
            lines.append(f"labels from {labels}: {self.matched} of {len(d.cases)} case(s) matched a row")
            if self.unmatched_cases:
                lines.append(f"{len(self.unmatched_cases)} case(s) matched no row (their label cells are empty): "
                             + _first(self.unmatched_cases))  # fmt: skip
            if self.unused_rows:
                lines.append(f"{len(self.unused_rows)} row(s) of the label table matched no case: "
                             + _first(self.unused_rows))  # fmt: skip
        return "\n".join(lines)


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _label_index(labels: Path, join: str | None) -> tuple[list[str], str, dict[str, dict]]:
    """(the label table's columns, the join column, {join key: row}); a key on two rows is an error naming both."""
    columns, rows = read_table(labels)
    join_col = find_column(columns, join, ("id", "subject", "subjectid", "case"), "id", "--join", str(labels))
    index: dict[str, dict] = {}
    lines: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        value = row.get(join_col, "")
        if not value:
            continue
        key = join_key(value)
        if key in index:
            raise DataError(f"{labels} line {line}: {join_col} {value!r} names the same case as line {lines[key]}")
        index[key], lines[key] = row, line
    return columns, join_col, index


def _path_cell(path: Path, base: Path) -> str:
    """A file as the table names it: relative to the table's folder where it lies below it, else absolute."""
    path = Path(os.path.abspath(path))  # not resolved: a layout of symbolic links stays one
    return os.path.relpath(path, base) if path.is_relative_to(base) else str(path)


def write_cohort(root: str | Path, out: str | Path, labels: str | Path | None = None, join: str | None = None,
                 bias: bool = False, skip_incomplete: bool = False) -> CohortWritten:  # fmt: skip
    """Scan `root`, join `labels` on `join`, write the table to `out` (a new file; .tsv: tab-separated)."""
    out = Path(out).expanduser()
    if out.exists():
        raise DataError(f"--out {out} exists; choose a new file (nothing is overwritten)")
    found = discover_folder(Path(os.path.abspath(Path(root).expanduser())), skip_incomplete, labelled=False, bias=bias)
    extra, join_col, index = ([], None, {})
    if labels is not None:
        extra, join_col, index = _label_index(Path(labels), join)
    graded = any(c.grade != UNKNOWN_GRADE for c in found.cases)
    own = [c for c in OWN_COLUMNS if graded or c != "grade"]
    taken = {column_key(c) for c in own}
    joined = [c for c in extra if c != join_col and column_key(c) not in taken]
    base = Path(os.path.abspath(out)).parent
    rows, used, unmatched = [], set(), []
    for case in found.cases:
        key = join_key(case.id) if join_key(case.id) in index else join_key(case.patient)
        row = index.get(key)
        if row is not None:
            used.add(key)
        elif labels is not None:
            unmatched.append(case.id)
        rows.append(_row(case, own, joined, row or {}, base))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if out.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    writer.writerow(own + joined)
    writer.writerows(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, buf.getvalue())
    unused = [r.get(join_col, "") for k, r in index.items() if k not in used]
    return CohortWritten(out, found, len(rows), len(found.cases) - len(unmatched), unmatched, unused)


def _row(case: Case, own: list[str], joined: list[str], label_row: dict, base: Path) -> list[str]:
    values = {
        "id": case.id,
        "patient": case.patient,
        "site": "" if case.site == UNKNOWN_SITE else case.site,
        "grade": case.grade,
        **{m: _path_cell(case.paths[m], base) for m in MODALITIES},
    }
    return [values[c] for c in own] + [label_row.get(c, "") for c in joined]
