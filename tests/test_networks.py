"""ResNet-3D family and MedicalNet weight loading, with checkpoints written in MedicalNet's own formats."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from gliograde.cli import main
from gliograde.networks import build_model
from gliograde.networks.medicalnet import PretrainedError, load_medicalnet_pretrained
from gliograde.networks.profile import profile_model
from gliograde.networks.resnet3d import ResNet3D


def test_parameter_count_of_the_seeds_resnet50():
    model = ResNet3D(50, in_channels=1, num_classes=2)
    assert sum(p.numel() for p in model.parameters()) == 46_159_170  # the seed's "46.16M total params"


@pytest.mark.parametrize(("layout", "side"), [("strided", 4), ("medicalnet", 16)])
def test_feature_map_of_both_layouts_at_128(layout, side):
    p = profile_model(ResNet3D(50, 4, 2, layout=layout), 4, 128)
    assert p.feature_map == (2048, side, side, side)
    assert 280 < p.gflop_train < 320 if layout == "strided" else 1250 < p.gflop_train < 1350


def test_timm_style_api_and_all_depths():
    x = torch.randn(2, 3, 16, 16, 16)  # the API's shapes, not the features' size: the smallest input all depths take
    for depth in (10, 18, 34, 50):
        for shortcut in ("A", "B"):
            m = ResNet3D(depth, 3, 2, shortcut=shortcut, layout="medicalnet", dropout=0.3).eval()
            f, out = m.forward_features(x), m(x)  # m(x) is m.forward(x)
            assert f.shape == (2, m.num_features) and out.shape == (2, 2)
            assert torch.equal(m.forward_head(f), out)
    for depth in (101, 152, 200):  # built on the meta device: the layout without initialising ~100 M weights
        with torch.device("meta"):
            assert ResNet3D(depth).num_features == 2048


def test_no_convolution_has_a_bias():
    m = ResNet3D(50, 4, 2, layout="medicalnet")
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Conv3d))


def _medicalnet_file(path, depth, shortcut, *, module=True, wrapper="state_dict", seg_head=True, counters=True):
    """A checkpoint as MedicalNet wrote them: DataParallel keys, {'state_dict': ...}, conv_seg head."""
    donor = ResNet3D(depth, 1, 2, shortcut=shortcut, layout="medicalnet")
    with torch.no_grad():  # random but sane BatchNorm statistics, so outputs are finite and distinctive
        for k, t in donor.state_dict().items():
            if k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "running_var", "downsample.1.weight")):
                t.uniform_(0.5, 1.5)
            elif k.endswith(("bias", "running_mean")):
                t.normal_(0, 0.1)
    state = {k: v for k, v in donor.state_dict().items() if not k.startswith("fc.")}
    if not counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if seg_head:
        state["conv_seg.0.weight"] = torch.randn(donor.num_features, 32, 2, 2, 2)
        state["conv_seg.6.weight"] = torch.randn(2, 32, 1, 1, 1)
    if module:
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save({"epoch": 200, wrapper: state} if wrapper else state, path)
    return donor


@pytest.mark.parametrize(
    "fmt",
    [
        {"module": True, "wrapper": "state_dict", "seg_head": True, "counters": True},
        {"module": False, "wrapper": None, "seg_head": False, "counters": True},
        {"module": True, "wrapper": "model", "seg_head": True, "counters": False},
        {"module": False, "wrapper": "state_dict", "seg_head": True, "counters": False},
    ],
)
def test_every_backbone_tensor_loads_equal(tmp_path, fmt):
    path = tmp_path / "resnet_10.pth"
    donor = _medicalnet_file(path, 10, "B", **fmt)
    model = ResNet3D(10, 1, 2, shortcut="B")
    head_before = model.fc.weight.clone()
    report = load_medicalnet_pretrained(model, path)
    got, want = model.state_dict(), donor.state_dict()
    for k, v in want.items():
        if not k.startswith("fc.") and not (k.endswith("num_batches_tracked") and not fmt["counters"]):
            assert torch.equal(got[k], v), k
    assert torch.equal(model.fc.weight, head_before)
    n_counters = sum(k.endswith("num_batches_tracked") for k in want)
    assert report.total == len(want) and report.loaded == len(want) - 2 - (0 if fmt["counters"] else n_counters)
    assert len(report.dropped) == (2 if fmt["seg_head"] else 0)


def test_load_log_speaks_the_seeds_words(tmp_path, caplog):
    path = tmp_path / "resnet_50_23dataset.pth"
    _medicalnet_file(path, 50, "B")
    with caplog.at_level(logging.INFO, logger="gliograde"):
        model = build_model(50, 1, 2, pretrained_path=path, dropout=0.4)
    text = caplog.text
    assert "Loading MedicalNet pretrained weights from" in text
    assert "Missing keys (expected for classification head): 2 keys" in text
    assert "Successfully loaded 318/320 pretrained weights from MedicalNet" in text
    assert "Model created: 46.16M total params, 46.16M trainable" in text
    assert model.depth == 50


def test_four_channel_adaptation_gives_the_one_channel_features(tmp_path, caplog):
    path = tmp_path / "resnet_10.pth"
    _medicalnet_file(path, 10, "B")
    one, four = ResNet3D(10, 1, 2).eval(), ResNet3D(10, 4, 2).eval()
    load_medicalnet_pretrained(one, path)
    with caplog.at_level(logging.INFO, logger="gliograde"):
        report = load_medicalnet_pretrained(four, path)
    assert report.adapted_conv1 == (1, 4) and "Adapted conv1 from 1 to 4 input channels" in caplog.text
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            one.forward_features(x), four.forward_features(x.repeat(1, 4, 1, 1, 1)), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    ("file_arch", "model_arch", "message"),
    [
        ((18, "A"), (10, "B"), r"fits ResNet18-3D, shortcut A"),
        ((10, "A"), (10, "B"), r"absent from the file \(first: \['layer2.0.downsample.0.weight'"),
        ((34, "A"), (18, "A"), r"the model lacks .*fits ResNet34-3D"),
    ],
)
def test_a_file_that_does_not_fit_is_an_error(tmp_path, file_arch, model_arch, message):
    path = tmp_path / "w.pth"
    _medicalnet_file(path, *file_arch)
    model = ResNet3D(model_arch[0], 1, 2, shortcut=model_arch[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedError, match=message) as err:
        load_medicalnet_pretrained(model, path)
    assert "Nothing was loaded" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_file_whose_keys_do_not_match_at_all_is_an_error(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({f"backbone.{k}": v for k, v in ResNet3D(10).state_dict().items()}, path)
    with pytest.raises(PretrainedError, match="absent from the file"):
        load_medicalnet_pretrained(ResNet3D(10), path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    with pytest.raises(PretrainedError, match="refused to load"):
        load_medicalnet_pretrained(ResNet3D(10), path)
    assert not marker.exists()


def test_missing_or_unreadable_files(tmp_path, caplog, monkeypatch):
    with pytest.raises(PretrainedError, match="does not exist"):
        build_model(10, pretrained_path=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("<html>404</html>")
    with pytest.raises(PretrainedError, match="cannot be read as a PyTorch checkpoint"):
        build_model(10, pretrained_path=junk)
    monkeypatch.chdir(tmp_path)  # the seeds' default path is relative to the working directory (restored after)
    with caplog.at_level(logging.INFO, logger="gliograde"):
        build_model(10, pretrained_path="pretrained/medicalnet_resnet50_3d.pth")
    assert "Pretrained weights file not found" in caplog.text and "random initialization" in caplog.text


def test_the_seeds_verification_script_runs_from_the_repository_root():
    script = """
import torch
import sys
sys.path.insert(0, '.')
from models.resnet50_3d_fast.model import ResNet50_3D
import logging
logging.basicConfig(level=logging.INFO)
logger = logging.getLogger(__name__)
model = ResNet50_3D(num_classes=2, in_channels=1, pretrained_path='pretrained/medicalnet_resnet50_3d.pth',
                    dropout=0.4, logger=logger)
print(f"Model parameters: {sum(p.numel() for p in model.parameters())/1e6:.2f}M")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Model parameters: 46.16M" in out.stdout
    assert "Model created: 46.16M total params" in out.stderr


def test_model_info_command(capsys):
    assert main(["model-info", "--depth", "50", "--layout", "strided", "--in-channels", "4", "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "46.23 M" in out and "2048 x 4 x 4 x 4" in out and "300.7 GFLOP" in out
