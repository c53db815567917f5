"""The thin command line (issue 26 §5): the training flags are built from the TrainConfig fields, their choices
come from the extension tables, and the logic the commands call lives in the library."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from gliograde.cli import build_parser, config_options, main
from gliograde.config import TrainConfig


def sample_value(f, kw) -> list[str]:
    """A command-line value the flag of field `f` takes (none for a switch)."""
    if kw.get("action") == "store_const" or kw.get("nargs") == "?":
        return []
    if kw.get("choices") is not None:
        return [str(next(iter(kw["choices"])))]
    for value in ("3", "0.25", "x"):  # the first that its type takes
        try:
            kw["type"](value)
            return [value]
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            pass
    raise AssertionError(f"no sample value for {f.name}")


def test_every_spelling_of_every_training_flag_sets_its_field():
    """Each spelling (the seeds' aliases among them) of each field's flag lands in that field; the fields without a
    flag are the ones no seed spelled (momentum, augmentation ranges, ...)."""
    options = config_options()
    assert len(options) >= 60
    for f, names, kw in options:
        for name in [*names, *f.metadata.get("off", [])]:
            args = build_parser().parse_args(["train", name, *sample_value(f, kw)])
            assert f.name in vars(args), name
    flagged = {f.name for f, _, _ in options}
    without = {f.name for f in dataclasses.fields(TrainConfig)} - flagged
    assert without == {"momentum", "step_size", "gamma", "flip_prob", "rotate_deg", "scale_range", "intensity_scale",
                       "intensity_shift", "adaptations"}  # fmt: skip
    cv_flags = {f.name for f, _, _ in config_options(for_cv=True)}
    assert flagged - cv_flags == {"fold", "repeat", "resume"}  # cv's --fold is its one-fold list, not the field


def test_the_seeds_learning_rate_spelling_is_an_alias_of_lr():
    """The seeds' command (`--batch_size 8 --learning_rate 1e-4`) was refused: "unrecognized arguments"."""
    args = build_parser().parse_args(["train", "--gpu", "--multi-gpu", "--batch_size", "8", "--learning_rate", "3e-4"])
    assert (args.lr, args.batch_size, args.gpu, args.multi_gpu) == (3e-4, 8, True, True)


def test_loss_and_model_choices_are_the_names_in_their_tables(monkeypatch, capsys):
    from gliograde.networks import ARCHITECTURES
    from gliograde.training.losses import LOSSES

    monkeypatch.setitem(LOSSES, "focal", LOSSES["ce"])
    monkeypatch.setitem(ARCHITECTURES, "tiny3d", ARCHITECTURES["resnet3d"])
    args = build_parser().parse_args(["train", "--loss", "FOCAL", "--model", "tiny3d"])
    assert (args.loss, args.model) == ("focal", "tiny3d")
    args = build_parser().parse_args(["predict", "--model", "tiny3d", "--case", "x"])
    assert args.model == "tiny3d"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cv", "--loss", "hinge"])
    assert "invalid choice: 'hinge' (choose from 'ce', 'focal', 'ldam')" in capsys.readouterr().err


def test_building_the_parser_reads_no_extension_table():
    """The tables live beside torch; `predict --onnx` parses without importing it (the choices are read when a flag
    that takes them is given)."""
    code = (
        "import sys\nfrom gliograde.cli import build_parser\n"
        "build_parser().parse_args(['predict', '--onnx', 'm', '--case', 'c'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('gliograde.training', "
        "'gliograde.networks'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_a_bad_sbatch_option_is_one_line_before_anything_is_made(tiny_cache, tmp_path, capsys):
    """It was a ValueError traceback from dict(), after the cache and split had been planned."""
    out = tmp_path / "res"
    argv = ["cv", "--launcher", "local", "--sbatch", "qos=high", "constraint", "--preset", "cpu-demo", "--size", "16",
            "--cache-dir", str(tiny_cache.path), "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--sbatch 'constraint': give KEY=VALUE" in err
    assert not out.exists()


def test_the_bench_configuration_takes_the_device_defaults_and_refuses_too_few_cases():
    from gliograde.bench import bench_config, defaults
    from gliograde.errors import GliogradeError

    cfg = bench_config("cpu", size=32, workers=0)
    d = defaults("cpu")
    assert (cfg.depth, cfg.size, cfg.batch_size, cfg.steps, cfg.cases, cfg.workers) == (
        d["depth"], 32, d["batch_size"], d["steps"], d["cases"], 0)  # fmt: skip
    with pytest.raises(GliogradeError, match=r"^--cases 5 is too few for batches of 4$"):
        bench_config("cpu", cases=5, batch_size=4)
