"""Loading a pretrained file of any registered format: read it (MedicalNet's `read_checkpoint`: weights_only, the
wrappers, DataParallel's 'module.'), recognise its format, translate its keys, check everything, then copy.

Nothing is copied until every tensor the target needs is found with its shape: a file made for another network,
size, dimensionality or channel count is one line naming the expected and the found key prefixes and the first
differing shape, and the network is left as it was. The one channel rule is MedicalNet's: a kernel pretrained on
one channel is repeated on the C input channels and scaled by 1/C, so a volume repeated on C channels gives the
features the 1-channel network gives.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.nn as nn

from gliograde.errors import unknown_name
from gliograde.networks.medicalnet import DEFAULT_PRETRAINED, LoadReport, PretrainedError, read_checkpoint
from gliograde.networks.pretrained.formats import CHOSEN, FORMATS, PretrainedFormat, State, formats_for
from gliograde.networks.registry import log_parameters

# The presets name MedicalNet's file, which fits the ResNet-3D only: an encoder's own file must be named
NO_MEDICALNET = {"pretrained_path": None}


def strip_prefix(state: State, *prefixes: str) -> State:
    """The state without the first of `prefixes` that every key carries (an SSL head's 'swin_vit.', BrainIAC's
    Lightning 'backbone.'), or the state as it is."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def key_prefixes(keys, limit: int = 8) -> str:
    """'patch_embed., layers1., layers2.' -- the top-level names of a set of keys, for the one-line refusals."""
    tops = sorted({k.split(".")[0] + ("." if "." in k else "") for k in keys})
    return ", ".join(tops[:limit]) + (f" and {len(tops) - limit} more" if len(tops) > limit else "") if tops else "none"


def key_group(keys: list[str]) -> str:
    """What a group of keys has in common: 'decoder.*', 'tokenizers.t2.*', or 'up_tr256.*, out_tr.*'."""
    tops = sorted({k.split(".")[0] for k in keys})
    if len(tops) > 1:
        return ", ".join(f"{t}.*" for t in tops[:4]) + (", ..." if len(tops) > 4 else "")
    common = os.path.commonprefix(keys)
    return common[: common.rfind(".") + 1] + "*" if "." in common else common


def sniff_format(state: State, path: str | Path) -> PretrainedFormat:
    """The registered format whose keys the file has (the first in the table that claims it)."""
    matches = [spec for spec in FORMATS.values() if spec.sniff and spec.sniff(state)]
    if not matches:
        first = ", ".join(list(state)[:3])
        raise PretrainedError(
            f"{path}: its keys ({first}, ...; {key_prefixes(state)}) are those of no known pretrained format; "
            f"name one with --pretrained-format ({', '.join(sorted(FORMATS))}) or re-save the file as its authors' "
            "code saves it"
        )
    name = Path(path).name.lower()  # two formats with the same keys (BM-MAE and its no-TCGA variant): the file name
    named = [s for s in matches if name in {f.lower() for f in s.files}]
    return (named or matches)[0]


def load_pretrained(
    model: nn.Module, path: str | Path, log: logging.Logger | None = None, fmt: str | None = None
) -> LoadReport:
    """Load the pretrained file `path` into `model` (in place) and report what was loaded. `fmt`: a registered
    format's name; None: the one `--pretrained-format` chose (`chosen_format`), else recognised from the keys.
    Refused in one line, with nothing loaded, where the file does not fit."""
    log = log or logging.getLogger("gliograde")
    fmt = fmt or CHOSEN.get()
    if fmt is not None and fmt not in FORMATS:
        raise PretrainedError(unknown_name("--pretrained-format", fmt, FORMATS, "pretrained-weight format"))
    if fmt is not None and FORMATS[fmt].loader is not None:
        report = FORMATS[fmt].loader(model, path, log)
        return report
    state, wrapper = read_checkpoint(path)
    spec = FORMATS[fmt] if fmt is not None else sniff_format(state, path)
    if fmt is None and spec.loader is not None:
        return spec.loader(model, path, log)
    log.info("Loading %s weights from %s (%s; format %s%s)", spec.title, path, wrapper, spec.name,
             "" if fmt else ", recognised from its keys")  # fmt: skip
    return load_into(model, path, state, wrapper, spec, log)


def _target(model: nn.Module, spec: PretrainedFormat, path) -> nn.Module:
    try:
        return model.get_submodule(spec.target) if spec.target else model
    except AttributeError:
        raise PretrainedError(
            f"{path}: {spec.title} weights load into a network's {spec.target}, and "
            f"{_describe(model)} has none (they fit --model {', '.join(spec.architectures)}). Nothing was loaded."
        ) from None


def _position(key: str) -> bool:
    return "pos_embed" in key or "position_embeddings" in key


def _describe(model: nn.Module) -> str:
    return model.describe() if hasattr(model, "describe") else type(model).__name__


def load_into(
    model: nn.Module, path, state: State, wrapper: str, spec: PretrainedFormat, log: logging.Logger
) -> LoadReport:
    """The common loader: translate, adapt the input channels, check every tensor, then copy (all or nothing)."""
    target = _target(model, spec, path)
    own = target.state_dict()
    fits = f"{spec.title} weights fit --model {', '.join(spec.architectures)}"

    def refuse(problem: str) -> PretrainedError:
        return PretrainedError(f"{path} ({spec.name}) does not fit {_describe(model)}: {problem}. {fits}. "
                               "Nothing was loaded.")  # fmt: skip

    if spec.check is not None:
        problem = spec.check(state, model)
        if problem:
            raise refuse(problem)
    kept, dropped = spec.translate(state, model) if spec.translate else (dict(state), {})

    flat = [k for k in own if k in kept and kept[k].ndim == own[k].ndim - 1 and own[k].ndim >= 4]
    if flat:
        k = flat[0]
        raise PretrainedError(
            f"{path} holds 2D weights: {k} is {tuple(kept[k].shape)} in the file, {tuple(own[k].shape)} in "
            f"{_describe(model)}; a 2D network's checkpoint cannot initialise a 3D network. {fits} (3D). "
            "Nothing was loaded."
        )

    adapted = adapted_key = None
    for k in spec.channel_keys:
        f, t = kept.get(k), own.get(k)
        if f is None or t is None or f.ndim != t.ndim or f.shape[1] == t.shape[1]:
            continue
        if f.shape[0] != t.shape[0] or f.shape[2:] != t.shape[2:]:
            continue  # another size altogether: the shape check below names it
        if f.shape[1] != 1:
            raise refuse(f"{k} takes {f.shape[1]} input channels in the file, {t.shape[1]} in the model; only "
                         "1-channel weights can be adapted to another number of channels")  # fmt: skip
        kept[k] = f.repeat(1, t.shape[1], *([1] * (f.ndim - 2))) / t.shape[1]
        adapted, adapted_key = (1, int(t.shape[1])), k

    def optional(k: str) -> bool:
        return k.endswith("num_batches_tracked") or bool(spec.optional and spec.optional(k))

    missing = sorted(k for k in own if k not in kept and not optional(k))
    unexpected = sorted(k for k in kept if k not in own)
    wrong = sorted((k for k in own if k in kept and tuple(kept[k].shape) != tuple(own[k].shape)),
                   key=lambda k: (not _position(k), k))  # an absolute position embedding says the size: first
    if missing or unexpected or wrong:
        problems = []
        if wrong:
            k = wrong[0]
            hint = " (the position embedding: the file was made for another input size, --size)" if _position(k) else ""
            problems.append(f"{len(wrong)} shape mismatches (first: {k} {tuple(kept[k].shape)} in the file, "
                            f"{tuple(own[k].shape)} in the model{hint})")  # fmt: skip
        if missing:
            problems.append(f"{len(missing)} model tensors absent from the file (first: {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} file tensors the model lacks (first: {unexpected[:3]})")
        flat_file = any(v.ndim == 4 for v in kept.values()) and not any(v.ndim == 5 for v in kept.values())
        if missing or unexpected:
            problems.append(f"expected keys under {key_prefixes(own)}, found {key_prefixes(kept)}"
                            + ("; the file's kernels are 2D, a 2D network's" if flat_file else ""))  # fmt: skip
        raise refuse("; ".join(problems))

    full = {**own, **kept}
    target.load_state_dict(full, strict=True)  # everything checked: all or nothing

    total = model.state_dict()
    prefix = f"{spec.target}." if spec.target else ""
    loaded = {prefix + k for k in kept}
    not_loaded = sorted(k for k in total if k not in loaded)
    why: dict[str, str] = {}
    for reason in sorted(set(dropped.values())):
        keys = sorted(k for k, r in dropped.items() if r == reason)
        why[f"file {key_group(keys)} ({len(keys)} tensors)"] = reason
    head = [k for k in not_loaded if not k.startswith(prefix)] if prefix else []
    if head:
        why[f"model {key_group(head)} ({len(head)} tensors)"] = "the new classification head, initialised here"
    left = [k for k in not_loaded if k not in head and not k.endswith("num_batches_tracked")]
    if left:
        why[f"model {key_group(left)} ({len(left)} tensors)"] = "not in the file; left as built (unused, or rebuilt)"

    if adapted:
        log.info("Adapted %s from 1 to %d input channels (kernel repeated, scaled by 1/%d)", adapted_key, adapted[1],
                 adapted[1])  # fmt: skip
    for group, reason in why.items():
        log.info("Not loaded: %s: %s", group, reason)
    log.info("Loaded %d/%d pretrained tensors of %s from %s", len(kept), len(total), _describe(model), spec.title)
    warn_overlap(spec, log)
    return LoadReport(str(path), wrapper, len(kept), len(total), not_loaded, sorted(dropped), adapted,
                      format=spec.name, adapted_key=adapted_key, why=why)  # fmt: skip


def warn_overlap(spec: PretrainedFormat, log: logging.Logger) -> None:
    """Once per load: which of the pretraining data include BraTS or TCGA patients (a warning), or that none do."""
    if spec.overlap:
        log.warning(spec.overlap)
    else:
        log.info("%s was pretrained on %s: no BraTS or TCGA patients", spec.title, spec.pretraining)


def resolve_weights(path: str | Path | None, architecture: str, log: logging.Logger) -> Path | None:
    """The file an encoder loads, or None for random initialisation. The presets' MedicalNet file fits the
    ResNet-3D only: for another network it is skipped, said; a path the user gave must exist."""
    if path is None or str(path) == "":
        return None
    if Path(path) == Path(DEFAULT_PRETRAINED):
        log.warning("--pretrained-path %s is the presets' MedicalNet file, which fits --model resnet3d only: "
                    "--model %s trains from random initialisation (give --pretrained-path for its own weights: "
                    "formats %s)", path, architecture, ", ".join(formats_for(architecture)) or "none")  # fmt: skip
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise PretrainedError(f"--pretrained-path {path} does not exist (--model {architecture} takes the formats "
                              f"{', '.join(formats_for(architecture)) or 'none'}; docs/pretrained-weights.md says "
                              "where to download each), or omit the flag to train from random "
                              "initialisation")  # fmt: skip
    return p


def check_weights_for(architecture: str):
    """An `ArchSpec.check_weights`: before any work, a --pretrained-path that does not exist, cannot be read safely,
    or is recognised as another network's file is refused in one line (its shapes are checked when it loads)."""

    def check_weights(path: str) -> None:
        found = resolve_weights(path, architecture, logging.getLogger("gliograde.quiet"))
        if found is None:
            return
        state, _ = read_checkpoint(found)
        spec = next((s for s in FORMATS.values() if s.sniff and s.sniff(state)), None)
        if spec is not None and architecture not in spec.architectures:
            raise PretrainedError(f"--pretrained-path {path} is a {spec.title} file ({spec.name}), which fits --model "
                                  f"{', '.join(spec.architectures)}; --model {architecture} takes the formats "
                                  f"{', '.join(formats_for(architecture)) or 'none'}")  # fmt: skip

    return check_weights


def size_check(architecture: str, multiple: int, why: str):
    """An `ArchSpec.check`: one line when --size does not fit the network, before any data is read."""

    def check(cfg) -> str | None:
        if cfg.size % multiple:
            return f"--model {architecture}: --size {cfg.size} is not divisible by {multiple} ({why})"
        return None

    return check


def initialise_encoder(architecture: str):
    """An `ArchSpec.initialise` for an encoder network: its pretrained file loaded (any registered format that fits
    it, recognised or named with --pretrained-format), then its parameter counts, logged."""

    def initialise(model: nn.Module, pretrained_path, log: logging.Logger) -> nn.Module:
        log.info("Model architecture: %s", _describe(model))
        path = resolve_weights(pretrained_path, architecture, log)
        if path is not None:
            load_pretrained(model, path, log)
        log_parameters(model, log)
        return model

    return initialise
