"""The table of pretrained-weight formats: name -> how a file of that format is recognised, translated into the
network's own keys, and what its pretraining data were (with their overlap with BraTS and TCGA, from the sources).

`--pretrained-format NAME` (TrainConfig.pretrained_format) picks an entry; left unset, the loader recognises the file
by its keys (`sniff`). A new format is one `register_format(PretrainedFormat(...))` in its own small module.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from gliograde.config import register_choices

State = dict[str, torch.Tensor]
# file state (wrappers and 'module.' already removed by read_checkpoint), the model -> (the tensors under the
# target's own key names, {file key: why it is not used})
Translate = Callable[[State, nn.Module], tuple[State, dict[str, str]]]


@dataclass(frozen=True)
class PretrainedFormat:
    """One format of pretrained weights, as its authors saved them.

    `architectures`: the registered networks (`--model`) the file fits; `target`: the submodule of the built
    network that the file loads into ("encoder" for an EncoderClassifier; "" the whole network); `translate`: file
    keys -> target keys, and the file keys left out with the reason; `sniff(state)`: whether a file's keys are this
    format's; `channel_keys`: target tensors whose dimension 1 is the input channels (the one adaptation rule:
    a 1-channel kernel is repeated on C channels and scaled by 1/C, MedicalNet's); `optional(key)`: target keys the
    file may lack, left as built (deterministic buffers, modules unused in the forward pass); `check(state, model)`:
    refusals of the format's own (a modality it has no tokenizer for) -> a message or None; `loader`: a loader of
    its own instead of the common one (MedicalNet's). The rest is provenance: the docs page and the logs say it."""

    name: str
    title: str
    architectures: tuple[str, ...]
    pretraining: str  # what the weights were pretrained on, with the source
    overlap: str | None  # the warning said once per load: which pretraining data include BraTS or TCGA; None: none
    licence: str
    files: tuple[str, ...]  # the file names its authors publish
    where: str  # where to download them
    checksum: str | None = None  # published checksum; None: none published
    target: str = "encoder"
    translate: Translate | None = None
    sniff: Callable[[State], bool] | None = None
    channel_keys: tuple[str, ...] = ()
    optional: Callable[[str], bool] | None = None
    check: Callable[[State, nn.Module], str | None] | None = None
    loader: Callable | None = None
    input_note: str = ""  # input size, channels and normalisation the weights expect


FORMATS: dict[str, PretrainedFormat] = {}


def register_format(spec: PretrainedFormat) -> PretrainedFormat:
    """Add (or replace) a format; `--pretrained-format NAME` may then name it."""
    FORMATS[spec.name] = spec
    return spec


def formats_for(architecture: str) -> list[str]:
    """The formats whose files fit a registered architecture."""
    return [name for name, spec in FORMATS.items() if architecture in spec.architectures]


# The format the training configuration names (--pretrained-format), for the architectures' `initialise`, whose
# signature (model, pretrained_path, log) carries no configuration: `build_for` sets it around the call.
CHOSEN: contextvars.ContextVar[str | None] = contextvars.ContextVar("pretrained_format", default=None)


@contextlib.contextmanager
def chosen_format(name: str | None) -> Iterator[None]:
    token = CHOSEN.set(name)
    try:
        yield
    finally:
        CHOSEN.reset(token)


register_choices("pretrained_format", "pretrained-weight format", FORMATS)
