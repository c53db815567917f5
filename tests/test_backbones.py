"""MONAI's networks through the architecture table (issue 28 §1): each builds from its description alone, keeps MONAI's
parameter names under `encoder`, round-trips through a checkpoint, trains a tiny fold on the CPU, exports to ONNX
with parity (one network per family), makes a saliency map or says it makes none, and `model-info` profiles it."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny

from gliograde.checkpoints import load_checkpoint
from gliograde.cli import main
from gliograde.config import ConfigError, check_config, resolve
from gliograde.evaluation.scoring import model_from_checkpoint
from gliograde.networks import ArchitectureError, build_from_description, get_architecture, model_kind
from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.gradcam import LAST_MAP, ROLLOUT, saliency
from gliograde.networks.monai_nets import DISPLAY

NETWORKS = sorted(DISPLAY)
# the edge each trains at: the SE-ResNets' 3D bottlenecks take 2-10 s a step on two cores at 32^3, 0.3 s at 16^3; the
# others need 32 (DenseNet: five halvings; ViT: patch 16; Swin: 2 x 4 mergings)
SIZE = {"seresnet50": 16, "seresnet101": 16, **{f"efficientnet-b{i}": 16 for i in range(5)}}
# what MONAI names the first tensor of each (the pretrained loaders map upstream keys onto these)
FIRST_KEY = {
    "densenet": "encoder.features.conv0.weight",
    "seresnet": "encoder.layer0.conv1.weight",
    "efficientnet": "encoder._conv_stem.weight",
    "vit": "encoder.patch_embedding.position_embeddings",
    "swinvit": "encoder.patch_embed.proj.weight",
}
FAMILIES = ("densenet121", "seresnet50", "efficientnet-b0", "vit", "swinvit")


def description(name: str, channels: int = 4) -> dict:
    size = SIZE.get(name, 32)
    cfg = types.SimpleNamespace(dropout=0.3, size=size)
    return get_architecture(name).describe(cfg, channels)


@pytest.fixture(scope="module")
def caches(small_root, small_cache, tmp_path_factory):
    """conftest's twelve phantoms at 16^3 and at 32^3 (16^3 is below what DenseNet, ViT and Swin take): edge -> cache.
    These folds prove that a network trains, exports and is evaluated, not that it learns, and a Swin's or a ViT's
    epoch at 32^3 costs seconds a case on one core."""
    from gliograde.data.cache import open_cache, prepare_cache

    out = tmp_path_factory.mktemp("backbones") / "cache-s32"
    return {16: small_cache, 32: open_cache(prepare_cache(small_root, out, size=32, workers=1, progress=False).path)}


@pytest.mark.parametrize("name", NETWORKS)
def test_each_network_rebuilds_from_its_description_alone(name):
    desc = description(name)
    json.dumps(desc)  # plain values: the checkpoint's `arch` record
    model = build_from_description(desc).eval()
    assert isinstance(model, EncoderClassifier) and model_kind(model) == name
    assert model.describe().startswith(DISPLAY[name]) and get_architecture(name).network_name(desc) == DISPLAY[name]
    family = next(f for f in FIRST_KEY if name.startswith(f))
    assert next(iter(model.state_dict())) == FIRST_KEY[family]
    assert type(model.encoder).__module__.startswith("monai.networks.nets.")
    # the optimizer's groups and the layer-wise decay's groups hold every parameter once
    backbone = {id(p) for p in model.backbone_parameters()}
    assert backbone.isdisjoint(id(p) for p in model.head_parameters())
    assert len(backbone) + len(model.head_parameters()) == len(list(model.parameters()))
    groups = [id(p) for g in model.layer_groups() for p in g]
    assert len(groups) == len(set(groups)) and set(groups) == backbone and len(model.layer_groups()) >= 5
    side = SIZE.get(name, 32)
    x = torch.randn(2, 4, side, side, side)
    with torch.no_grad():
        logits = model(x)
        again = build_from_description(desc, model.state_dict()).eval()(x)
    assert logits.shape == (2, 2) and torch.equal(logits, again)


def test_a_checkpoint_of_another_network_is_one_line():
    vit, swin = description("vit"), description("swinvit")
    weights = build_from_description(swin).state_dict()
    with pytest.raises(ArchitectureError, match=r"do not fit the recorded vit .*encoder\.") as e:
        build_from_description(vit, weights)
    assert "\n" not in str(e.value)


def test_unknown_names_and_sizes_that_do_not_fit_are_one_line(capsys):
    with pytest.raises(ConfigError, match=r"--model densnet121 is not a registered architecture .*did you mean "
                       r"'densenet121'\?"):  # fmt: skip
        check_config(resolve("cpu-demo", model="densnet121"))
    with pytest.raises(ArchitectureError, match=r"model vitt is not a registered architecture .*did you mean 'vit'"):
        build_from_description({"model": "vitt"})
    patch = r"^--model vit: --size 40 is not divisible by 16 \(the ViT's patch size 16\)$"
    with pytest.raises(ConfigError, match=patch):
        check_config(resolve("cpu-demo", model="vit", size=40))
    with pytest.raises(ConfigError, match=r"--model swinvit: --size 48 is not divisible by 32"):
        check_config(resolve("cpu-demo", model="swinvit", size=48))
    with pytest.raises(ConfigError, match=r"--model densenet121: --size 16 is below 32"):
        check_config(resolve("cpu-demo", model="densenet121", size=16))
    with pytest.raises(ArchitectureError, match=r"^the vit description cannot be built \(the input size 40 is not "
                       r"divisible by the patch size 16\)$"):  # fmt: skip
        build_from_description({**description("vit"), "size": 40})
    assert main(["train", "--model", "vit", "--size", "40", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--size 40 is not divisible by 16" in err and "Traceback" not in err
    assert main(["bench", "--model", "vit", "--device", "cpu"]) == 2  # a network is timed by --trainer
    assert "pass --trainer" in capsys.readouterr().err


def test_the_seeds_names_and_folders_are_unchanged_and_monai_networks_name_theirs():
    assert resolve("final").output_dir == "results/ResNet50-3D" and resolve("cpu-demo").output_dir.endswith("10-3D")
    assert resolve("final", model="mil2d").output_dir == "results/MIL2D-ResNet18"
    vit = resolve("final", model="vit")
    assert vit.output_dir == "results/ViT-B16-3D" and vit.pretrained_path is None  # MedicalNet's file is not its
    assert resolve("final", model="swinvit", pretrained_path="w.pt").pretrained_path == "w.pt"
    assert get_architecture("resnet3d").channels_last and get_architecture("resnet3d").batchnorm_per_volume
    assert not get_architecture("vit").batchnorm_per_volume and get_architecture("mil2d").slice_attention


def test_saliency_of_each_kind_and_none_where_a_network_has_neither():
    x = torch.randn(1, 4, 32, 32, 32)
    x[..., :4] = 0  # background
    cam, used = saliency(build_from_description(description("densenet121")), x)
    assert used == LAST_MAP and cam.shape == (1, 32, 32, 32) and 0 <= float(cam.min()) <= float(cam.max()) <= 1
    assert float(cam[..., :4].abs().max()) == 0  # (a 1^3 map of an untrained network may be all negative: 0)
    cam, used = saliency(build_from_description(description("vit")), x)
    assert used == ROLLOUT and cam.shape == (1, 32, 32, 32) and float(cam.max()) == pytest.approx(1.0)
    tokens = EncoderClassifier(torch.nn.Linear(4, 8), lambda enc, v: enc(v.flatten(2).transpose(1, 2)), 8)
    cam, why = saliency(tokens, x)
    assert cam is None and why.startswith("no saliency map:")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NETWORKS if n not in FAMILIES])
def test_each_network_trains_a_tiny_fold(name, caches, tmp_path):
    from gliograde.training.trainer import train_fold

    cache = caches[SIZE.get(name, 32)]
    result = train_fold(tiny(cache, tmp_path, model=name, size=cache.size, epochs=1, min_epochs=1, folds=3))
    ckpt_path = result.run_dir / "checkpoints" / "best.pt"
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["arch"]["model"] == name and model_kind(model_from_checkpoint(ckpt, ckpt_path, name)) == name


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_network_of_each_family_trains_exports_and_is_evaluated_with_attention(name, caches, small_root, tmp_path):
    from gliograde.data.brats import discover_cases
    from gliograde.evaluation.evaluate import evaluate_run
    from gliograde.export import export
    from gliograde.inference.predict import load_ensemble, output_dir, predict_cases
    from gliograde.training.trainer import train_fold

    pytest.importorskip("onnxruntime")
    cache = caches[SIZE.get(name, 32)]
    result = train_fold(tiny(cache, tmp_path, model=name, size=cache.size, epochs=1, min_epochs=1, folds=3))
    files = export(result.run_dir, tmp_path / "onnx", "onnx")  # refused unless |onnx - torch| <= 1e-4 on 2 volumes
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["model_kind"] == name and meta["parity"]["max_abs_logit_diff"] <= 1e-4
    evaluation = evaluate_run(result.run_dir, attention=True)
    attention = json.loads((Path(evaluation.out_dir) / "metrics.json").read_text())["final"]["attention"]
    # at 32^3 a last map of 1^3 (DenseNet, Swin) may be all negative evidence: no mass anywhere (null), not an error
    mass = attention["mean_mass_in_mask"]
    assert attention["n"] > 0 and (mass is None or 0 <= mass <= 1) and len(attention["cam_grid"]) == 3
    assert attention["layer"] == (ROLLOUT if name == "vit" else LAST_MAP)
    if name in ("densenet121", "vit"):  # predict --saliency: the map on the case's own grid, saying how it was made
        case = discover_cases(small_root).cases[:1]
        record = predict_cases(case, load_ensemble([result.run_dir]), output_dir(tmp_path / "pred"), saliency=True)[0]
        assert record["saliency"]["layer"] == attention["layer"] and Path(record["saliency"]["nifti"]).is_file()


@pytest.mark.parametrize("name", ["vit", "swinvit"])
def test_model_info_profiles_the_network(name, capsys):
    assert main(["model-info", "--model", name]) == 0
    out = capsys.readouterr().out
    assert DISPLAY[name] in out and "4 x 128^3" in out and "batch of 8" in out
    assert ("none" if name == "vit" else "768 x 4 x 4 x 4") in out and "meta device" in out
    figures = {"vit": ("98.03 M", "315.7 GFLOP"), "swinvit": ("8.06 M", "409.4 GFLOP")}[name]
    assert all(f in out for f in figures)


def test_model_info_of_a_size_a_network_cannot_take_is_one_line(capsys):
    assert main(["model-info", "--model", "swinvit", "--size", "48"]) == 2
    assert "not divisible by 32" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_times_a_network_beside_the_resnet50_baseline(tmp_path):
    from gliograde.bench import run_trainer_bench, trainer_table

    r = run_trainer_bench("cpu", size=16, batch_size=4, epochs=2, cases=24, workdir=tmp_path, log=lambda *a: None,
                          min_steps=1, model="efficientnet-b0")  # fmt: skip
    assert r["network"] == "EfficientNet-B0-3D" and r["baseline"]["network"] == "ResNet50-3D" and r["mil2d"] is None
    assert r["speed_vs_baseline"] == pytest.approx(r["train_volumes_per_s"] / r["baseline"]["train_volumes_per_s"])
    assert r["gflop_per_volume_train"] < r["baseline"]["gflop_per_volume_train"]
    assert "beside ResNet50-3D" in trainer_table(r) and np.isfinite(r["projected_cv_s"])
