"""Find BraTS cases on disk: the 2018/2019 layout (HGG/ and LGG/ folders) and the 2020 flat layout.

2018, 2019:  ROOT/HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz   and ROOT/LGG/...
2020:        ROOT/BraTS20_Training_NNN/<case>_{...}.nii[.gz]         grade in ROOT/name_mapping.csv
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gliograde import GRADES, MODALITIES
from gliograde.data.target import GRADE_TARGET, Target
from gliograde.errors import DataError

SUFFIXES = (".nii.gz", ".nii")
MAPPING_FILE = "name_mapping.csv"
HOW_TO_GET_DATA = (
    "Point --data-root (or the GLIOGRADE_DATA variable) at the unpacked BraTS training folder, e.g. "
    "MICCAI_BraTS_2018_Data_Training/ (register at https://www.med.upenn.edu/sbia/brats2018/ to download it), "
    "or run `gliograde demo` / `gliograde synth --out DIR --cases 40` for a synthetic BraTS-like set."
)


DEFAULT_DATA_ROOT = "data/MICCAI_BraTS_2018_Data_Training"
UNKNOWN_GRADE = ""  # a case to predict


def resolve_data_root(value: str | None) -> Path:
    """--data-root, else $GLIOGRADE_DATA, else ./data/MICCAI_BraTS_2018_Data_Training; it must exist."""
    env = os.environ.get("GLIOGRADE_DATA")
    path = Path(value or env or DEFAULT_DATA_ROOT).expanduser()
    if not path.is_dir():
        source = "--data-root" if value else ("GLIOGRADE_DATA" if env else "the default")
        raise DataError(f"data root {path} (from {source}) does not exist. {HOW_TO_GET_DATA}")
    return path


UNKNOWN_SITE = "unknown"  # no site in the id: a missing value, never one site of its own


def site_of(case_id: str) -> str:
    """The acquisition site encoded in a case id: Brats18_2013_3_1 -> '2013', Brats18_TCIA01_425_1 -> 'TCIA01', and
    a raw TCGA barcode names its tissue source site in its second field: TCGA-DU-7294 -> 'TCGA-DU'. Anything else
    (BraTS20_Training_001, an id of your own) is UNKNOWN_SITE: not known, not one site."""
    parts = case_id.split("_")
    if len(parts) >= 3 and parts[0].lower().startswith("brats") and parts[1] != "Training":
        return parts[1]
    m = re.match(r"TCGA-([A-Z0-9]{2})-[A-Z0-9]{4}", case_id, re.IGNORECASE)
    if m:
        return f"TCGA-{m.group(1).upper()}"
    return UNKNOWN_SITE


@dataclass(frozen=True)
class Case:
    """One exam: id, class (`grade`: the BraTS grade, or the class of the cohort's target, one of `classes`), the
    path of each modality (and of the segmentation when present), site, and the patient it belongs to (default:
    the id; a follow-up exam names its patient, and all of a patient's exams share a fold)."""

    id: str
    grade: str
    paths: dict[str, Path]
    seg: Path | None = None
    site: str = ""
    patient: str = ""
    classes: tuple[str, str] = GRADES

    def __post_init__(self):
        if self.grade not in (*self.classes, UNKNOWN_GRADE):
            raise DataError(f"case {self.id}: class {self.grade!r} is neither {self.classes[1]} nor {self.classes[0]}")
        if not self.site:
            object.__setattr__(self, "site", site_of(self.id))
        if not self.patient:
            object.__setattr__(self, "patient", self.id)

    @property
    def label(self) -> int:
        if self.grade == UNKNOWN_GRADE:
            raise DataError(f"case {self.id} has no known {'grade' if self.classes == GRADES else 'class'}")
        return self.classes.index(self.grade)

    @property
    def files(self) -> list[Path]:
        """The image files of the case in channel order (segmentation excluded)."""
        return [self.paths[m] for m in MODALITIES]


@dataclass
class Discovery:
    """What `discover_cases` found, and what it left out and why."""

    root: Path
    layout: str
    cases: list[Case]
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> reason (incomplete or unreadable)
    ungraded: list[str] = field(default_factory=list)  # folders (2020 layout) or rows (table) without a label
    target: Target = GRADE_TARGET
    table: Path | None = None  # the cohort table the cases were read from (None: a folder layout)

    def report(self) -> str:
        neg, pos = self.target.classes
        n_pos = sum(c.grade == pos for c in self.cases)
        patients = len({c.patient for c in self.cases})
        exams = f", {patients} patients" if patients != len(self.cases) else ""
        lines = [
            f"{len(self.cases)} cases ({n_pos} {pos}, {len(self.cases) - n_pos} {neg}{exams}) in "
            f"{self.table or self.root} [{self.layout} layout]"
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} incomplete or unreadable case(s):")
            lines += [f"  {cid}: {why}" for cid, why in sorted(self.skipped.items())]
        if self.ungraded:
            what = f"{neg} or {pos} label in column {self.target.column!r}" if self.table else "grade"
            what += "" if self.table else f" in {MAPPING_FILE}"
            lines.append(f"excluded {len(self.ungraded)} case(s) without a {what}")
        return "\n".join(lines)


def _find_file(folder: Path, case_id: str, key: str) -> Path | None:
    for suffix in SUFFIXES:
        path = folder / f"{case_id}_{key}{suffix}"
        if path.is_file():
            return path
    return None


def _read_case(folder: Path, grade: str, site: str = "") -> tuple[Case | None, str]:
    """A case from its folder, or why it cannot be used: missing modality files, or files that `check_files`
    refuses."""
    case_id = folder.name
    paths = {m: _find_file(folder, case_id, m) for m in MODALITIES}
    missing = [f"{case_id}_{m}.nii.gz" for m, p in paths.items() if p is None]
    if missing:
        return None, f"missing {', '.join(missing)}"
    problem = check_files([paths[m] for m in MODALITIES])
    if problem:
        return None, problem
    return Case(case_id, grade, paths, _find_file(folder, case_id, "seg"), site), ""


# ----------------------------------------------------------------------------------- checks while scanning
_HEADERS: dict[tuple[str, int, int], tuple] = {}  # (path, bytes, mtime) -> (shape, affine) or (problem,): read once


def _header(path: Path) -> tuple:
    """(shape, affine) of a NIfTI file whose data is all there, or (problem,): the header alone is read, and the
    length of the data checked against it: the file size for .nii, the length a gzip stream records in its last
    four bytes for .nii.gz (ISIZE, RFC 1952). About 1 ms a file; nothing is decompressed unless ISIZE disagrees
    (a truncated file, or a stream in several members, which is then read through to tell the two apart)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HEADERS:
        _HEADERS[key] = _read_header(path, st.st_size)
    return _HEADERS[key]


def _read_header(path: Path, size: int) -> tuple:
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        need = int(img.dataobj.offset) + int(np.prod(shape)) * img.get_data_dtype().itemsize
    except Exception as e:  # nibabel raises many types for bad headers
        why = str(e).replace(str(path), path.name)  # nibabel names the file by its full path
        return (f"{path.name} cannot be read as NIfTI ({type(e).__name__}: {why})",)
    if len(shape) == 4 and shape[3] == 1:  # a 3D volume stored with a singleton time axis
        shape = shape[:3]
    if len(shape) != 3:
        return (f"{path.name} is a {len(shape)}D image of shape {shape}; a 3D volume is expected",)
    short = _gzip_short(path, need, size) if path.name.endswith(".gz") else (need - size if size < need else 0)
    if short:
        return (f"{path.name} is truncated: {short} of the {need} bytes its header promises are missing",)
    return shape, np.asarray(img.affine, float)


def _gzip_short(path: Path, need: int, size: int) -> int:
    """Bytes missing from the data of a gzip file (0: complete)."""
    import gzip
    import zlib

    with path.open("rb") as f:
        f.seek(max(size - 4, 0))
        if int.from_bytes(f.read(4), "little") == need % 2**32:
            return 0
    got = 0
    try:
        with gzip.open(path) as g:
            while chunk := g.read(1 << 22):
                got += len(chunk)
    except (EOFError, OSError, zlib.error):
        pass
    return max(need - got, 0)


def grid_difference(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> str | None:
    """How two voxel grids differ, in a few words (None: one grid, within `atol` mm)."""
    import nibabel as nib
    import numpy as np

    def fmt(v) -> str:
        return " x ".join(f"{float(x):.4g}" for x in v)

    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return f"shape {fmt(shape_a[:3])} vs {fmt(shape_b[:3])}"
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    if np.allclose(a, b, atol=atol):
        return None
    za, zb = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0)
    if not np.allclose(za, zb, atol=atol):
        return f"voxel size {fmt(za)} vs {fmt(zb)} mm"
    if nib.aff2axcodes(a) != nib.aff2axcodes(b):
        return f"orientation {''.join(nib.aff2axcodes(a))} vs {''.join(nib.aff2axcodes(b))}"
    if not np.allclose(a[:3, :3], b[:3, :3], atol=atol):
        return "axes rotated against each other"
    shift = a[:3, 3] - b[:3, 3]
    return f"origin {float(np.linalg.norm(shift)):.3g} mm apart"


def check_files(files: list[Path]) -> str | None:
    """Why a case's modality files (channel order) cannot be used, or None: each must have a readable NIfTI header
    of a 3D volume with all its data present, and all must share one voxel grid. Read from the headers only, so that
    a bad file is named while scanning, not after minutes of preprocessing (voxel values, NaN and empty volumes, are
    checked when the case is preprocessed)."""
    grids = []
    for path in files:
        header = _header(path)
        if len(header) == 1:
            return header[0]
        grids.append((path, *header))
    (ref, shape, affine), rest = grids[0], grids[1:]
    for path, other_shape, other_affine in rest:
        diff = grid_difference(other_shape, other_affine, shape, affine)
        if diff:
            return f"{path.name} and {ref.name} are not on one voxel grid ({diff}); the four modalities must share one"
    return None


def _read_mapping(path: Path) -> dict[str, tuple[str, str]]:
    """name_mapping.csv -> {BraTS20 id: (grade, site)}. The site comes from the 2019/2018 id of the same row, else
    from its TCGA barcode (TCGA_TCIA_subject_ID), else it is unknown."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot be read as CSV ({e})") from e
    if not rows or "Grade" not in rows[0]:
        raise DataError(
            f"{path}: expected a 'Grade' column (the BraTS name mapping), found {list(rows[0]) if rows else 'no rows'}"
        )
    id_columns = [c for c in rows[0] if re.fullmatch(r"BraTS_20\d\d_subject_ID", c or "")]
    if not id_columns:
        raise DataError(f"{path}: no BraTS_20XX_subject_ID column")
    newest = max(id_columns)
    mapping = {}
    for row in rows:
        case_id = (row.get(newest) or "").strip()
        grade = (row.get("Grade") or "").strip()
        if not case_id or case_id == "NA":
            continue
        site = UNKNOWN_SITE
        for col in sorted(id_columns, reverse=True):
            other = (row.get(col) or "").strip()
            if other and other != "NA" and site_of(other) != UNKNOWN_SITE:
                site = site_of(other)
                break
        tcga = (row.get("TCGA_TCIA_subject_ID") or "").strip()  # the TCGA barcode, where the row has one
        if site == UNKNOWN_SITE and tcga and site_of(tcga) != UNKNOWN_SITE:
            site = site_of(tcga)
        mapping[case_id] = (grade, site)
    return mapping


def discover_cases(root: str | Path, skip_incomplete: bool = False) -> Discovery:
    """All cases under `root`, in a stable order (grade folder, then id).

    A case lacking a modality is an error naming it and the missing files, unless `skip_incomplete`, which
    leaves it out and records it in `Discovery.skipped`. A case id found twice is always an error.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder. {HOW_TO_GET_DATA}")

    grade_dirs = [root / g for g in ("HGG", "LGG") if (root / g).is_dir()]
    entries: list[tuple[Path, str, str]] = []  # (case folder, grade, site)
    ungraded: list[str] = []
    if grade_dirs:
        layout = "BraTS 2018/2019 (HGG/, LGG/)"
        for gdir in grade_dirs:
            entries += [(d, gdir.name, "") for d in sorted(gdir.iterdir()) if d.is_dir()]
    else:
        layout = "BraTS 2020 (flat, name_mapping.csv)"
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if folders:
            mapping_path = root / MAPPING_FILE
            if not mapping_path.is_file():
                raise DataError(
                    f"{root} has case folders but neither HGG/ and LGG/ sub-folders (BraTS 2018/2019) nor a "
                    f"{MAPPING_FILE} giving each case's grade (BraTS 2020). {HOW_TO_GET_DATA}"
                )
            mapping = _read_mapping(mapping_path)
            for d in folders:
                grade, site = mapping.get(d.name, ("", ""))
                if grade in GRADES:
                    entries.append((d, grade, site))
                else:
                    ungraded.append(d.name)

    cases: list[Case] = []
    skipped: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for folder, grade, site in entries:
        if folder.name in seen:
            raise DataError(f"case id {folder.name} found twice: {seen[folder.name]} and {folder}")
        seen[folder.name] = folder
        case, reason = _read_case(folder, grade, site)
        if case is None:
            if not skip_incomplete:
                what = "is incomplete" if reason.startswith("missing ") else "cannot be used"
                raise DataError(
                    f"case {folder.name} ({folder}) {what}: {reason}. "
                    "Restore the files, or pass --skip-incomplete to leave such cases out."
                )
            skipped[folder.name] = reason
            continue
        cases.append(case)

    if not cases:
        looked_for = "HGG/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz, LGG/... or <case>/ folders with name_mapping.csv"
        extra = f" ({len(skipped)} incomplete, {len(ungraded)} ungraded)" if skipped or ungraded else ""
        raise DataError(f"no BraTS cases found in {root}{extra}; looked for {looked_for}. {HOW_TO_GET_DATA}")
    return Discovery(root, layout, cases, skipped, ungraded)


def read_case_folder(folder: str | Path, grade: str = UNKNOWN_GRADE) -> Case:
    """One case folder to predict: <id>_{t1,t1ce,t2,flair}.nii[.gz], or any single file per modality ending in
    _<modality>.nii[.gz]. A missing or ambiguous modality is an error naming the folder and the file."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"case folder {folder} does not exist")
    paths, problems = {}, []
    for m in MODALITIES:
        path = _find_file(folder, folder.name, m)
        if path is None:
            found = sorted(p for s in SUFFIXES for p in folder.glob(f"*_{m}{s}"))
            if len(found) == 1:
                path = found[0]
            elif len(found) > 1:
                problems.append(f"several {m} files ({', '.join(p.name for p in found)})")
            else:
                problems.append(f"no {m} file (*_{m}.nii.gz)")
        paths[m] = path
    if problems:
        raise DataError(f"case {folder}: {'; '.join(problems)}; the four modalities {', '.join(MODALITIES)} are needed")
    problem = check_files([paths[m] for m in MODALITIES])
    if problem:
        raise DataError(f"case {folder}: {problem}")
    return Case(folder.name, grade, paths, _find_file(folder, folder.name, "seg"))


def cases_to_predict(root: str | Path) -> list[Case]:
    """Every case under a folder: a BraTS training layout (grades known) or plain case folders (grades unknown)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} does not exist or is not a folder")
    if any((root / g).is_dir() for g in GRADES) or (root / MAPPING_FILE).is_file():
        return discover_cases(root).cases
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"--data-root {root} holds no case folders")
    return [read_case_folder(d) for d in folders]
