"""Folder layouts that carry no labels, found by themselves: BraTS 2021, BraTS 2023+ (glioma) and UCSF-PDGM.

    BraTS 2021:  ROOT/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair}.nii.gz
    BraTS 2023:  ROOT/BraTS-GLI-NNNNN-TTT/BraTS-GLI-NNNNN-TTT-{t1n,t1c,t2w,t2f}.nii.gz   (TTT: the time point)
    UCSF-PDGM:   ROOT/UCSF-PDGM-NNNN[_FUxxx]_nifti/UCSF-PDGM-NNNN[_FUxxx]_{T1,T1c,T2,FLAIR}[_bias].nii.gz

Their labels come from a table joined on the id (`gliograde cohort DIR --labels TABLE --join COLUMN`). `join_key`
makes the published tables meet the folders: BraTS-GLI-00000-000 is BraTS2021_00000 (the same images, per the
BraTS 2023 release), and UCSF-PDGM's metadata writes UCSF-PDGM-004 where the folders write UCSF-PDGM-0004.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gliograde import MODALITIES
from gliograde.data.brats import SUFFIXES, UNKNOWN_GRADE, Case, check_files
from gliograde.errors import DataError


@dataclass(frozen=True)
class Layout:
    name: str
    folder: re.Pattern  # a case folder's name; group "id": the exam id, group "patient": the patient id
    keys: dict[str, str]  # modality -> the file's key
    separator: str  # between the id and the key
    seg: str
    site: str = ""  # one site for the whole cohort (UCSF-PDGM: one institution), else parsed or joined


LAYOUTS = (
    Layout("BraTS 2021", re.compile(r"^(?P<id>(?P<patient>BraTS2021_\d{5}))$"),
           {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, "_", "seg"),
    Layout("BraTS 2023+ glioma", re.compile(r"^(?P<id>(?P<patient>BraTS-GLI-\d{5})-\d{3})$"),
           {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, "-", "seg"),
    Layout("UCSF-PDGM", re.compile(r"^(?P<id>(?P<patient>UCSF-PDGM-\d{3,4})(?:_FU\w+?)?)_nifti$"),
           {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "FLAIR"}, "_", "tumor_segmentation", "UCSF"),
)  # fmt: skip


def find_layout(root: Path) -> tuple[Layout, list[Path]] | None:
    """The layout most of root's sub-folders follow, with those folders (sorted); None: none of these."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    best = max(LAYOUTS, key=lambda lay: sum(bool(lay.folder.match(d.name)) for d in folders))
    matched = [d for d in folders if best.folder.match(d.name)]
    return (best, matched) if matched else None


def _file(folder: Path, exam: str, layout: Layout, key: str, bias: bool) -> Path | None:
    for suffix in SUFFIXES:
        for tail in (f"{key}_bias", key) if bias else (key,):
            path = folder / f"{exam}{layout.separator}{tail}{suffix}"
            if path.is_file():
                return path
    return None


def scan_layout(layout: Layout, folders: list[Path], bias: bool = False) -> tuple[list[Case], dict[str, str]]:
    """(cases without labels, {exam id: why it cannot be used}). `bias`: UCSF-PDGM's bias-corrected `_bias` files
    where they exist (only when asked)."""
    cases, problems = [], {}
    for folder in folders:
        m = layout.folder.match(folder.name)
        exam, patient = m.group("id"), m.group("patient")
        paths = {mod: _file(folder, exam, layout, layout.keys[mod], bias) for mod in MODALITIES}
        missing = [f"{exam}{layout.separator}{layout.keys[mod]}.nii.gz" for mod, p in paths.items() if p is None]
        problem = f"missing {', '.join(missing)}" if missing else check_files([paths[mod] for mod in MODALITIES])
        if problem:
            problems[exam] = problem
            continue
        seg = _file(folder, exam, layout, layout.seg, False)
        cases.append(Case(exam, UNKNOWN_GRADE, paths, seg, layout.site, patient))
    return cases, problems


def join_key(value: str) -> str:
    """The key on which a table row meets a case: BraTS2021_00042, BraTS-GLI-00042-000 and BraTS-GLI-00042-001
    meet as 'brats21:00042'; UCSF-PDGM-0042, UCSF-PDGM-042, UCSF-PDGM-0042_FU016d and UCSF-PDGM-0042_nifti as
    'ucsf-pdgm:42'; anything else as itself without case or surrounding spaces."""
    value = value.strip()
    m = re.fullmatch(r"(?:BraTS2021_|BraTS-GLI-)(\d{5})(?:-\d{3})?", value, re.IGNORECASE)
    if m:
        return f"brats21:{m.group(1)}"
    m = re.fullmatch(r"UCSF-PDGM-0*(\d+)(?:_FU\w+?)?(?:_nifti)?", value, re.IGNORECASE)
    if m:
        return f"ucsf-pdgm:{int(m.group(1))}"
    return value.lower()


def unlabelled_layout_error(root: Path, layout: Layout) -> DataError:
    return DataError(
        f"{root} holds {layout.name} case folders, which carry no labels: write a cohort table with "
        f"`gliograde cohort {root} --out cohort.csv --labels TABLE --join COLUMN`, then pass --cohort cohort.csv "
        "(--target COLUMN --positive VALUE for the question)"
    )
