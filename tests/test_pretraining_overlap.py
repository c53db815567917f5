"""MedicalNet's pretraining data probably include BraTS patients: loading its weights says so (README, "MedicalNet
weights"; Tencent/MedicalNet issues #15, #47, #65; Chen et al. arXiv:1904.00625). So does every other pretrained
encoder whose pretraining saw BraTS or TCGA (docs/pretrained-weights.md)."""

from __future__ import annotations

import logging

import pytest
import torch

from gliograde.networks.medicalnet import PRETRAINING_OVERLAP, load_medicalnet_pretrained
from gliograde.networks.resnet3d import ResNet3D


def test_loading_medicalnet_weights_warns_of_the_brats_overlap(tmp_path, caplog):
    donor = ResNet3D(10, 1, 2, shortcut="B", layout="medicalnet")
    path = tmp_path / "resnet_10.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items() if not k.startswith("fc.")}}, path
    )
    with caplog.at_level(logging.INFO, logger="gliograde"):
        report = load_medicalnet_pretrained(ResNet3D(10, 4, 2, shortcut="B"), path)
    assert report.loaded > 0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "BraTS" in r.getMessage()]
    assert len(warned) == 1 and warned[0].getMessage() == PRETRAINING_OVERLAP
    assert "Decathlon" in PRETRAINING_OVERLAP and "#15" in PRETRAINING_OVERLAP


# Every pretrained format states which of its pretraining data include BraTS or TCGA, with the source, and its loader
# says it once per load (networks/pretrained/formats.py; docs/pretrained-weights.md)
BRATS_PRETRAINED = {"medicalnet", "sam-med3d-turbo", "bm-mae", "bm-mae-notcga", "brainsegfounder", "brainiac"}


def test_every_format_states_its_overlap_with_brats_and_tcga():
    from gliograde.networks.pretrained import FORMATS

    assert FORMATS["medicalnet"].overlap is PRETRAINING_OVERLAP  # the one text, not a copy
    assert {name for name, spec in FORMATS.items() if spec.overlap} >= BRATS_PRETRAINED
    for name, spec in FORMATS.items():
        if spec.overlap:
            assert "BraTS" in spec.overlap and ("arXiv" in spec.overlap or "/" in spec.overlap), name
        else:  # none: its pretraining data, with their source, name no BraTS or TCGA set
            assert "BraTS" not in spec.pretraining and "TCGA" not in spec.pretraining and "(" in spec.pretraining
    assert "TCGA stays external" in FORMATS["bm-mae-notcga"].overlap
    assert "bm-mae-notcga" in FORMATS["bm-mae"].overlap  # the overlapping variant points at the other


@pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")  # MONAI's sin-cos table, in upstream BM-MAE's
@pytest.mark.parametrize(("fmt", "writer"), [("sam-med3d-turbo", "write_sam"), ("bm-mae", "write_bmmae"),
                                             ("models-genesis", "write_genesis")])  # fmt: skip
def test_loading_an_encoder_warns_once_when_its_pretraining_saw_brats(tmp_path, caplog, fmt, writer):
    import test_pretrained_encoders as files

    from gliograde.networks.pretrained import FORMATS, load_pretrained

    path = tmp_path / FORMATS[fmt].files[0]
    getattr(files, writer)(path)
    model = {"sam-med3d-turbo": files.sam, "bm-mae": files.bmmae, "models-genesis": files.genesis}[fmt]()
    with caplog.at_level(logging.INFO, logger="gliograde"):
        assert load_pretrained(model, path).format == fmt
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if FORMATS[fmt].overlap:
        assert warned == [FORMATS[fmt].overlap]
    else:
        assert warned == [] and "no BraTS or TCGA patients" in caplog.text
