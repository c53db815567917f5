"""Issue 28 §3, fine-tuning with few patients: --probe, --freeze-epochs, --layer-decay; the default two groups
unchanged; the refusals; config.json and `gliograde compare` name the options."""

from __future__ import annotations

import copy
import json
import logging
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import DDP_REFERENCE, fake_run, logged, tiny

from gliograde.cli import main
from gliograde.config import ConfigError, check_config, resolve
from gliograde.evaluation.compare import compare
from gliograde.networks.classifier import EncoderClassifier
from gliograde.networks.mil import MILResNet2D
from gliograde.networks.resnet3d import ResNet3D
from gliograde.training import finetune, trainer
from gliograde.training.optim import make_optimizer, make_scheduler


class TinyEncoder(nn.Module):
    """A conv encoder with a stem outside its named stages (it lands in the first layer group) and a Dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                                    nn.Dropout3d(0.2))  # fmt: skip
        self.stage2 = nn.Sequential(nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16), nn.ReLU())

    def forward(self, x):
        return self.stage2(self.stage1(self.stem(x)))


def encoder_classifier() -> EncoderClassifier:
    return EncoderClassifier(TinyEncoder(), lambda enc, x: enc(x), 16, dropout=0.3, stages=("stage1", "stage2"),
                             name="tiny encoder", in_channels=4)  # fmt: skip


NETWORKS = {
    "resnet10": lambda: ResNet3D(10, in_channels=4, dropout=0.2),
    "mil": lambda: MILResNet2D(18, in_channels=4, k=4),
    "encoder": encoder_classifier,
}


def ids(params) -> list[int]:
    return [id(p) for p in params]


def cfg_of(**kw):
    return resolve("cpu-demo", **kw)


# ------------------------------------------------------------------------------------------------ the groups
@pytest.mark.parametrize("preset", ["final", "ldam-drw", "cpu-demo"])
def test_without_the_options_the_optimizer_is_todays_two_groups(preset):
    """The groups the optimizer had before these options, key for key (the presets train exactly as before)."""
    cfg = resolve(preset, depth=10)
    assert (cfg.probe, cfg.freeze_epochs, cfg.layer_decay) == (False, 0, 1.0)
    model = ResNet3D(10, in_channels=len(cfg.modalities))
    made = make_optimizer(model, cfg)
    today = [{"params": model.backbone_parameters(), "lr": cfg.lr, "name": "backbone"},
             {"params": model.head_parameters(), "lr": cfg.lr * cfg.classifier_lr_mult, "name": "head"}]  # fmt: skip
    reference = torch.optim.Adam(today, weight_decay=cfg.weight_decay, fused=True)
    assert type(made) is torch.optim.Adam and made.state_dict() == reference.state_dict()
    assert [ids(g["params"]) for g in made.param_groups] == [ids(g["params"]) for g in reference.param_groups]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("net", NETWORKS)
def test_each_option_gives_its_groups_and_learning_rates(net):
    model = NETWORKS[net]()
    backbone, head = ids(model.backbone_parameters()), ids(model.head_parameters())
    base = cfg_of(lr=1e-3, classifier_lr_mult=3.0)
    # the default and --freeze-epochs: backbone at lr, head at lr x mult (the frozen backbone is in from the start)
    for cfg in (base, cfg_of(lr=1e-3, classifier_lr_mult=3.0, freeze_epochs=2)):
        groups = make_optimizer(model, cfg).param_groups
        assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-3), ("head", pytest.approx(3e-3))]
        assert [ids(g["params"]) for g in groups] == [backbone, head]
    # --probe: the head alone
    (group,) = make_optimizer(model, cfg_of(lr=1e-3, classifier_lr_mult=3.0, probe=True)).param_groups
    assert group["name"] == "head" and group["lr"] == pytest.approx(3e-3) and ids(group["params"]) == head
    # --layer-decay: the layer groups (input first) at lr x F^(n-1-i), each backbone parameter once, the head kept
    groups = make_optimizer(model, cfg_of(lr=1e-3, classifier_lr_mult=3.0, layer_decay=0.5)).param_groups
    layers = [ids(g) for g in model.layer_groups()]
    n = len(layers)
    assert n == {"resnet10": 5, "mil": 5, "encoder": 3}[net]
    assert [g["name"] for g in groups] == [f"backbone.{i}" for i in range(n)] + ["head"]
    assert [g["lr"] for g in groups[:-1]] == pytest.approx([1e-3 * 0.5 ** (n - 1 - i) for i in range(n)])
    assert groups[-1]["lr"] == pytest.approx(3e-3) and ids(groups[-1]["params"]) == head
    assert [ids(g["params"]) for g in groups[:-1]] == layers
    assert sorted(i for g in layers for i in g) == sorted(backbone)


def test_the_layer_groups_run_from_the_input_to_the_last_stage():
    r = ResNet3D(10, in_channels=4)
    assert ids(r.layer_groups()[0]) == ids([*r.conv1.parameters(), *r.bn1.parameters()])
    assert ids(r.layer_groups()[-1]) == ids(r.layer4.parameters())
    m = MILResNet2D(18, in_channels=4, k=4)
    assert ids(m.layer_groups()[0]) == ids([*m.backbone.conv1.parameters(), *m.backbone.bn1.parameters()])
    e = encoder_classifier()
    assert ids(e.layer_groups()[0]) == ids(e.encoder.stem.parameters())  # what no stage holds: at the input


def test_the_schedule_keeps_the_layer_ratios():
    model = ResNet3D(10, in_channels=4)
    cfg = cfg_of(layer_decay=0.75, warmup_epochs=1, epochs=4)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=3)
    for _ in range(5):
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[:-1] == pytest.approx([lrs[4] * 0.75 ** (4 - i) for i in range(5)])
        assert lrs[-1] == pytest.approx(lrs[4] * cfg.classifier_lr_mult)


def test_the_step_of_the_loop_skips_a_frozen_backbone_and_takes_it_once_unfrozen():
    """The optimizer step as train_epoch takes it (GradScaler with unscale_ for clipping, the fused optimizer, grads
    set to None), on groups made once: nothing of the frozen backbone moves, weight decay included; after the
    unfreeze it trains, with the head's Adam state kept."""
    torch.manual_seed(0)
    model = encoder_classifier()
    cfg = cfg_of(optimizer="adamw", weight_decay=0.1, freeze_epochs=1)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    x, y = torch.randn(2, 4, 8, 8, 8), torch.tensor([0, 1])

    def step():
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    before = copy.deepcopy(model.state_dict())
    for epoch in (1, 2):
        finetune.enter_epoch(model, cfg, epoch, logging.getLogger("test"))
        model.train()
        finetune.hold_frozen(model, cfg, epoch)
        step()
        if epoch == 1:
            frozen = copy.deepcopy(model.state_dict())
            body = [k for k in before if not k.startswith("fc.")]
            assert same(before, frozen, body) and differ(before, frozen, ["fc.weight"])
            assert all(p not in opt.state for p in model.backbone_parameters())
    assert differ(frozen, model.state_dict(), ["encoder.stem.0.weight", "encoder.stage2.0.weight"])
    assert differ(frozen, model.state_dict(), ["encoder.stem.1.running_mean"])
    stem = model.encoder.stem[0].weight
    assert int(opt.state[model.fc.weight]["step"]) == 2 and int(opt.state[stem]["step"]) == 1


def test_a_network_without_layer_groups_is_refused_in_one_line():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(3, 3), nn.Linear(3, 2)

        def backbone_parameters(self):
            return list(self.body.parameters())

        def head_parameters(self):
            return list(self.fc.parameters())

    with pytest.raises(ConfigError, match=r"--layer-decay: Plain has no layer_groups\(\)"):
        make_optimizer(Plain(), cfg_of(layer_decay=0.8))


@pytest.mark.parametrize("net", NETWORKS)
def test_a_frozen_backbone_keeps_its_batchnorm_and_dropout_in_eval_mode(net):
    model = NETWORKS[net]()
    backbone = {id(p) for p in model.backbone_parameters()}
    for epoch, cfg, frozen in ((1, cfg_of(probe=True), True), (5, cfg_of(probe=True), True),
                               (2, cfg_of(freeze_epochs=2), True), (3, cfg_of(freeze_epochs=2), False),
                               (1, cfg_of(), False)):  # fmt: skip
        model.train()
        finetune.hold_frozen(model, cfg, epoch)
        norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout3d))]
        inside = [m for m in norms if any(id(p) in backbone for p in m.parameters()) or isinstance(m, nn.Dropout3d)]
        assert inside and all(m.training != frozen for m in inside), (net, epoch)
        assert model.training and model.dropout.training and model.fc.training  # the head trains


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"probe": True, "layer_decay": 0.75}, "--probe freezes the backbone for the whole run: --layer-decay gives"),
        ({"probe": True, "freeze_epochs": 3}, "--probe freezes the backbone for the whole run: --freeze-epochs gives"),
        ({"layer_decay": 0.0}, "--layer-decay must lie in (0, 1] (1 = off), got 0.0"),
        ({"layer_decay": 1.5}, "--layer-decay must lie in (0, 1] (1 = off), got 1.5"),
        ({"layer_decay": -0.5}, "--layer-decay must lie in (0, 1] (1 = off), got -0.5"),
        ({"freeze_epochs": 12}, "--freeze-epochs 12 must be below --epochs 12"),
        ({"freeze_epochs": 20}, "--freeze-epochs 20 must be below --epochs 12"),
        ({"freeze_epochs": -1}, "--freeze-epochs must be >= 0, got -1"),
    ],
)
def test_bad_fine_tuning_options_are_one_line(kw, message, capsys):
    with pytest.raises(ConfigError) as e:
        check_config(cfg_of(**kw))
    assert message in str(e.value) and "\n" not in str(e.value)
    argv = ["train", "--preset", "cpu-demo", "--dry-run"]
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_flags_resolve_and_a_late_unfreeze_warns(caplog):
    from gliograde.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--freeze-epochs", "4", "--layer-decay", "0.75"])
    cfg = config_from_args(args)
    assert (cfg.freeze_epochs, cfg.layer_decay, cfg.probe) == (4, 0.75, False)
    assert config_from_args(build_parser().parse_args(["cv", "--probe"])).probe is True
    check_config(cfg)
    assert "may never be unfrozen" not in caplog.text
    check_config(resolve("cpu-demo", freeze_epochs=9))  # min epochs 6 + patience 4 = 10 >= 10: fine
    assert "may never be unfrozen" not in caplog.text
    check_config(resolve("cpu-demo", freeze_epochs=9, patience=2))
    assert "The backbone may never be unfrozen: early stopping can end the run at epoch 8" in caplog.text


# ------------------------------------------------------------------------------------------------ training
def spy_on_the_model(stack):
    """Patch trainer.build_parts to keep the model; returns (states, on_epoch_end): states[0] the weights before
    training, states[e] after epoch e (parameters and buffers)."""
    states, held = [], {}
    original = trainer.build_parts

    def spy(*args, **kwargs):
        parts = original(*args, **kwargs)
        held["model"] = parts.model
        states.append(copy.deepcopy(parts.model.state_dict()))
        return parts

    stack.enter_context(mock.patch.object(trainer, "build_parts", spy))
    return states, lambda epoch, run_dir: states.append(copy.deepcopy(held["model"].state_dict()))


def same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def differ(a: dict, b: dict, keys) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys if a[k].is_floating_point())


@pytest.mark.slow
def test_probe_trains_the_head_alone_and_keeps_the_batchnorm_statistics(tiny_cache, tmp_path):
    import contextlib

    with contextlib.ExitStack() as stack:
        states, on_epoch_end = spy_on_the_model(stack)
        with logged() as log:
            result = trainer.train_fold(tiny(tiny_cache, tmp_path, probe=True, epochs=2, min_epochs=2),
                                        on_epoch_end=on_epoch_end)  # fmt: skip
    assert len(states) == 3
    keys = list(states[0])
    head = [k for k in keys if k.startswith("fc.")]
    body = [k for k in keys if not k.startswith("fc.")]
    stats = [k for k in body if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) > 20 and head
    for e in (1, 2):
        assert same(states[0], states[e], body), f"the backbone moved in epoch {e}"  # BatchNorm statistics included
        assert differ(states[e - 1], states[e], head), f"the head did not train in epoch {e}"
    assert [h["lr_backbone"] for h in result.history] == [0.0, 0.0]
    assert result.history[0]["lr_head"] > 0  # (the cosine ends at 0 after the last epoch)
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert [g["name"] for g in last["optimizer_state_dict"]["param_groups"]] == ["head"]
    config = json.loads((result.run_dir / "config" / "config.json").read_text())["config"]
    assert (config["probe"], config["freeze_epochs"], config["layer_decay"]) == (True, 0, 1.0)
    assert "Linear probing (--probe): the backbone" in log.getvalue()


FROZEN = {**DDP_REFERENCE, "epochs": 3, "min_epochs": 3, "freeze_epochs": 1, "layer_decay": 0.5}  # epoch 1 frozen


@pytest.fixture(scope="module")
def frozen_run(tiny_cache, tmp_path_factory):
    """One process, --freeze-epochs 1 --layer-decay 0.5 over 2 epochs: (result, weights before and after each
    epoch, the log)."""
    import contextlib

    with contextlib.ExitStack() as stack:
        states, on_epoch_end = spy_on_the_model(stack)
        with logged() as log:
            result = trainer.train_fold(tiny(tiny_cache, tmp_path_factory.mktemp("frozen"), **FROZEN),
                                        on_epoch_end=on_epoch_end)  # fmt: skip
    return result, states, log.getvalue()


@pytest.mark.slow
def test_freeze_epochs_keep_the_backbone_then_unfreeze_it(frozen_run):
    result, states, log = frozen_run
    assert len(states) == 4
    keys = list(states[0])
    head = [k for k in keys if k.startswith("fc.")]
    body = [k for k in keys if not k.startswith("fc.")]
    assert same(states[0], states[1], body), "the backbone moved while frozen"  # BatchNorm statistics included
    assert differ(states[0], states[1], head)
    for e in (2, 3):
        assert differ(states[e - 1], states[e], [k for k in body if "running" not in k]), "the backbone is frozen"
        assert differ(states[e - 1], states[e], [k for k in body if "running_mean" in k]), "its statistics are"
        assert differ(states[e - 1], states[e], head)
    assert "Backbone unfrozen at epoch 2 (frozen for epochs 1-1)" in log
    h = result.history
    assert h[0]["lr_backbone"] == 0.0 < h[0]["lr_head"] and h[1]["lr_head"] == pytest.approx(2 * h[1]["lr_backbone"])
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    groups = last["optimizer_state_dict"]["param_groups"]
    assert [g["name"] for g in groups] == [f"backbone.{i}" for i in range(5)] + ["head"]
    base = [g["initial_lr"] for g in groups]  # the schedule scales these
    assert base == pytest.approx([3e-4 * 0.5 ** (4 - i) for i in range(5)] + [6e-4])
    config = json.loads((result.run_dir / "config" / "config.json").read_text())["config"]
    assert (config["probe"], config["freeze_epochs"], config["layer_decay"]) == (False, 1, 0.5)


@pytest.mark.slow
def test_a_run_resumed_across_the_unfreeze_gives_the_uninterrupted_weights(frozen_run, tiny_cache, tmp_path):
    """The optimizer holds the same groups before and after the unfreeze: last.pt of a frozen epoch resumes."""
    full, _, _ = frozen_run

    def stop_after_one(epoch, run_dir):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.train_fold(tiny(tiny_cache, tmp_path, **FROZEN), on_epoch_end=stop_after_one)
    (run,) = (tmp_path / "res" / "runs" / "fold_0").iterdir()
    resumed = trainer.train_fold(tiny(tiny_cache, tmp_path, **FROZEN, resume=str(run)))
    a = torch.load(full.run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    b = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.mark.slow
def test_freeze_epochs_under_ddp_give_the_one_process_weights(frozen_run, tiny_cache, tmp_path):
    """Two gloo processes: the frozen backbone gets no gradient on any rank (DDP finds the unused parameters and
    leaves their .grad None), and once unfrozen its gradients are all-reduced: the weights of one process."""
    single, _, _ = frozen_run
    ddp = trainer.train_fold(tiny(tiny_cache, tmp_path, multi_gpu=True, nproc=2, **FROZEN))
    assert len(ddp.history) == 3 and ddp.history[0]["lr_backbone"] == 0.0 < ddp.history[1]["lr_backbone"]
    a = torch.load(single.run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    b = torch.load(ddp.run_dir / "checkpoints" / "last.pt", weights_only=True)["model_state_dict"]
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------ compare
N, K = 30, 3
PIDS = [f"Brats18_TCIA0{i % 9}_{i:03d}_1" for i in range(N)]
LABELS = np.array([1, 0] * (N // 2))


def fake_results(root, probs, config):
    split = {"split_seed": 42, "repeats": 1, "group_by": None, "leave_site_out": False, "inner_fraction": 0.2}
    for f in range(K):
        sel = np.flatnonzero(np.arange(N) % K == f)
        fake_run(root, f, K, [PIDS[i] for i in sel], LABELS[sel], probs[sel], final={"auc": 0.5, "threshold": 0.5,
                 "checkpoint": "best.pt"}, metrics={"selection": {"protocol": "inner"}},
                 config={**split, **config})  # fmt: skip
    return root


def test_compare_names_the_fine_tuning_options_that_differ(tmp_path, capsys):
    rng = np.random.default_rng(0)
    probs = np.clip(0.3 + 0.4 * LABELS + rng.normal(0, 0.2, N), 0, 1)
    a = fake_results(tmp_path / "full", probs, {})  # recorded before these options: their defaults
    b = fake_results(tmp_path / "probe", probs[::-1].copy(), {"probe": True, "classifier_lr_mult": 2.0})
    c = fake_results(tmp_path / "decay", probs, {"freeze_epochs": 5, "layer_decay": 0.75, "lr": 1e-4})
    report = compare([a, b, c], out=tmp_path / "out", n_boot=50)
    first, second = report["pairs"]
    assert [(d["key"], d["a"], d["b"]) for d in first["settings"]] == [("probe", False, True)]
    assert first["settings"][0]["setting"] == "linear probing: backbone frozen (--probe)"
    assert {d["key"]: d["b"] for d in second["settings"]} == {"freeze_epochs": 5, "layer_decay": 0.75}
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| linear probing: backbone frozen (--probe) | off | on |" in md
    assert "| backbone frozen for the first epochs (--freeze-epochs) | 0 | 5 |" in md
    assert "| layer-wise learning-rate decay (--layer-decay) | 1 | 0.75 |" in md
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["pairs"][1]["settings"] == second["settings"]
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cli"), "--bootstrap", "50"]) == 0
    assert "B differs from A in: linear probing: backbone frozen (--probe) off -> on" in capsys.readouterr().out


def test_compare_of_one_configuration_shows_no_settings(tmp_path):
    probs = np.linspace(0, 1, N)
    a = fake_results(tmp_path / "a", probs, {"layer_decay": 0.75})
    b = fake_results(tmp_path / "b", probs, {"layer_decay": 0.75})
    report = compare([a, b], out=tmp_path / "out", n_boot=50)
    assert report["pairs"][0]["settings"] == []
    assert "How B's configuration differs" not in (tmp_path / "out" / "compare.md").read_text()
