"""A cohort table: any list of exams (one row each: id, patient, label, site, the four modality files), and the
binary target asked of it.

The table is CSV or TSV (the delimiter sniffed), UTF-8. Column names need no flag for the usual spellings:

    id        id, case, case_id, subject, subject_id, participant_id, exam, ID
    patient   patient, patient_id, PatientID  (default: the id: one exam per patient)
    label     label, grade, class, target     (or any column: --target COLUMN)
    site      site, site_id, center, centre, institution   (optional: else parsed from the id, else unknown)
    t1        T1, T1w, t1n        t1ce  T1c, T1ce, T1Gd, T1gad, t1c
    t2        T2, T2w, t2w        flair FLAIR, t2f

Modality paths are absolute or relative to the table's folder. The target: `--target COLUMN --positive VALUE
[--negative VALUE]`; without --positive the column must hold two values (HGG/LGG, 1/0, ...; the positive one
said). Rows whose label is empty, or neither value when --negative is given, are excluded and counted, as BraTS
2020's ungraded cases are. Every problem is one DataError naming the row or the column, raised before anything is
written.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from gliograde import GRADES, MODALITIES
from gliograde.data.brats import (
    MAPPING_FILE,
    Case,
    Discovery,
    check_files,
    discover_cases,
    read_case_folder,
    resolve_data_root,
    site_of,
)
from gliograde.data.layouts import find_layout, scan_layout, unlabelled_layout_error
from gliograde.data.target import GRADE_TARGET, column_key, make_target
from gliograde.errors import DataError

MODALITY_ALIASES = {
    "t1": ("t1", "t1w", "t1n"),
    "t1ce": ("t1c", "t1ce", "t1gd", "t1gad", "t1contrast"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair"),
}
ID_ALIASES = ("id", "case", "caseid", "subject", "subjectid", "participantid", "exam", "examid", "session")
PATIENT_ALIASES = ("patient", "patientid", "participant")
LABEL_ALIASES = ("label", "grade", "class", "target")
SITE_ALIASES = ("site", "siteid", "center", "centre", "institution")


# ------------------------------------------------------------------------------------------------ the table
def read_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a CSV or TSV file (delimiter sniffed; UTF-8, a BOM allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"cohort table {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        raise DataError(f"{path} is not UTF-8 (byte {e.start}: {bad!r}); save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"cohort table {path} is empty")
    first = text.splitlines()[0]
    delimiter = max(("\t", ",", ";"), key=first.count)
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}: cannot be read as a table ({e})") from None
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if not rows:
        raise DataError(f"cohort table {path} has a header but no rows")
    return columns, rows


def find_column(
    columns: list[str], asked: str | None, aliases: tuple[str, ...], what: str, flag: str, where: str, required=True
) -> str | None:
    """The column `asked` for (exact, else ignoring case and separators), else the first alias present."""
    by_key = {column_key(c): c for c in columns}
    if asked is not None:
        found = asked if asked in columns else by_key.get(column_key(asked))
        if found is None:
            raise DataError(f"{where}: no column {asked!r} ({flag}); its columns: {', '.join(columns)}")
        return found
    found = next((by_key[a] for a in aliases if a in by_key), None)
    if found is None and required:
        raise DataError(f"{where}: no {what} column (looked for {', '.join(aliases)}; name it with {flag}); "
                        f"its columns: {', '.join(columns)}")  # fmt: skip
    return found


def modality_columns(columns: list[str], where: str) -> dict[str, str]:
    """Modality -> column, by the aliases; a missing modality is one line naming it and its accepted names."""
    by_key = {column_key(c): c for c in columns}
    found, missing = {}, []
    for m in MODALITIES:
        col = next((by_key[a] for a in MODALITY_ALIASES[m] if a in by_key), None)
        if col is None:
            missing.append(f"{m} (one of {'/'.join(MODALITY_ALIASES[m])})")
        found[m] = col
    if missing:
        raise DataError(f"{where}: no column for modality {'; '.join(missing)}; its columns: {', '.join(columns)}")
    return found


@dataclass(frozen=True)
class Columns:
    """Which column is what (None: not asked; the usual spellings are looked for)."""

    id: str | None = None
    patient: str | None = None
    label: str | None = None  # the target column (--target / --label-column)
    site: str | None = None


def read_cohort(
    path: str | Path,
    columns: Columns | None = None,
    positive: str | None = None,
    negative: str | None = None,
    labelled: bool = True,
    skip_incomplete: bool = False,
) -> Discovery:
    """The exams of a cohort table, as `discover_cases` finds the cases of a BraTS folder. `labelled=False`
    (predict): rows without a label are kept, with an unknown class. Raises one DataError naming the row (its line
    in the file) or the column for: a duplicated id, a missing or unusable file (unless `skip_incomplete`), a
    label column with more than two values and no --positive, a single class left, a missing column."""
    path, columns = Path(path).expanduser().resolve(), columns or Columns()
    names, rows = read_table(path)
    where = str(path)
    id_col = find_column(names, columns.id, ID_ALIASES, "id", "--id-column", where)
    patient_col = find_column(names, columns.patient, PATIENT_ALIASES, "patient", "--patient-column", where, False)
    site_col = find_column(names, columns.site, SITE_ALIASES, "site", "--site-column", where, False)
    label_col = find_column(names, columns.label, LABEL_ALIASES, "label", "--target", where, labelled)
    modality = modality_columns(names, where)

    target = None
    if label_col is not None:
        values = [r.get(label_col, "") for r in rows]
        if labelled or any(v.strip() for v in values):
            target = make_target(label_col, values, positive, negative, where)
    seen: dict[str, int] = {}
    cases, skipped, excluded = [], {}, []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        case_id = row.get(id_col, "")
        if not case_id:
            raise DataError(f"{where} line {line}: empty {id_col!r}")
        if case_id in seen:
            raise DataError(f"{where} line {line}: id {case_id!r} already on line {seen[case_id]} (duplicated id)")
        seen[case_id] = line
        label = target.label_of(row.get(label_col, "")) if target is not None else None
        if label is None and labelled:
            excluded.append(case_id)
            continue
        grade = target.classes[label] if label is not None else ""
        paths, problem = _row_files(row, modality, path.parent)
        problem = problem or check_files([paths[m] for m in MODALITIES])
        if problem:
            if not skip_incomplete:
                raise DataError(f"{where} line {line} ({case_id}): {problem}")
            skipped[case_id] = problem
            continue
        site = (row.get(site_col) or "").strip() if site_col else ""
        patient = (row.get(patient_col) or "").strip() if patient_col else ""
        classes = target.classes if target is not None else GRADES
        cases.append(Case(case_id, grade, paths, None, site or site_of(case_id), patient or case_id, classes))
    if labelled and target is not None:
        present = {c.label for c in cases}
        if len(present) < 2:
            only = target.classes[present.pop()] if present else "none"
            raise DataError(f"{where}: after excluding {len(excluded)} row(s) without a {target.column!r} label, one "
                            f"class is left ({only}); a binary target needs both")  # fmt: skip
    if not cases:
        raise DataError(f"{where}: no usable row ({len(skipped)} with unusable files)")
    layout = f"cohort table, target {target.column!r}" if target is not None else "cohort table"
    return Discovery(path.parent, layout, cases, skipped, excluded, target or GRADE_TARGET, path)


def _row_files(row: dict, modality: dict[str, str], base: Path) -> tuple[dict[str, Path], str]:
    paths, problems = {}, []
    for m in MODALITIES:
        cell = row.get(modality[m], "")
        if not cell:
            problems.append(f"column {modality[m]!r} is empty")
            continue
        p = Path(cell).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            problems.append(f"column {modality[m]!r}: {p} does not exist")
        paths[m] = p
    return paths, "; ".join(problems)


# ------------------------------------------------------------------------------------- folder or table, one way in
@dataclass(frozen=True)
class CohortSource:
    """Where a command's cases come from: a cohort table (`table`, with its columns and target), else a folder in a
    known layout (`data_root`: BraTS 2018/2019/2020 carry their grades; BraTS 2021/2023 and UCSF-PDGM need a table).
    """

    data_root: str | Path | None = None
    table: str | Path | None = None
    columns: Columns = field(default_factory=Columns)
    positive: str | None = None
    negative: str | None = None
    bias: bool = False

    @classmethod
    def from_config(cls, cfg) -> CohortSource:
        """From a TrainConfig (or the parsed flags of prepare/validate/predict): --cohort and its column flags."""

        def get(name):
            return getattr(cfg, name, None)

        columns = Columns(get("id_column"), get("patient_column"), get("target"), get("site_column"))
        return cls(get("data_root"), get("cohort"), columns, get("positive"), get("negative"), bool(get("bias")))

    def discover(self, skip_incomplete: bool = False, labelled: bool = True) -> Discovery:
        """Every case with its label (`labelled=False`: labels where known, for predict)."""
        if self.table is not None:
            return read_cohort(self.table, self.columns, self.positive, self.negative, labelled, skip_incomplete)
        if self.columns.label is not None or self.positive is not None:
            raise DataError("--target/--positive choose a column of a cohort table: pass --cohort TABLE "
                            "(`gliograde cohort DIR --out TABLE` writes one from a folder)")  # fmt: skip
        root = resolve_data_root(self.data_root)
        return discover_folder(root, skip_incomplete, labelled, self.bias)

    def cases_to_predict(self) -> list[Case]:
        return self.discover(labelled=False).cases


def discover_folder(root: Path, skip_incomplete: bool = False, labelled: bool = True, bias: bool = False) -> Discovery:
    """The cases of a folder: the BraTS 2018/2019/2020 layouts with their grades, else BraTS 2021/2023 or UCSF-PDGM
    (labels unknown: an error naming `gliograde cohort` when `labelled`), else plain case folders (predict)."""
    has_grades = any((root / g).is_dir() for g in GRADES) or (root / MAPPING_FILE).is_file()
    found = None if has_grades else find_layout(root)
    if found is None:
        if labelled or has_grades:
            return discover_cases(root, skip_incomplete=skip_incomplete)
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise DataError(f"--data-root {root} holds no case folders")
        return Discovery(root, "case folders", [read_case_folder(d) for d in folders])
    layout, folders = found
    if labelled:
        raise unlabelled_layout_error(root, layout)
    cases, problems = scan_layout(layout, folders, bias)
    if problems and not skip_incomplete:
        exam, why = next(iter(sorted(problems.items())))
        raise DataError(f"case {exam} ({root}) cannot be used: {why}. Restore the files, or pass --skip-incomplete")
    if not cases:
        raise DataError(f"no usable {layout.name} case in {root}")
    return Discovery(root, layout.name, cases, problems)
