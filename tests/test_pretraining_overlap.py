"""MedicalNet's pretraining data probably include BraTS patients: loading its weights says so (README, "MedicalNet
weights"; Tencent/MedicalNet issues #15, #47, #65; Chen et al. arXiv:1904.00625)."""

from __future__ import annotations

import logging

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
