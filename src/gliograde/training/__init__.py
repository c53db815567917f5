"""Training: the loop of one fold (trainer), its parts, the cross-validation and its launchers.

Importing the package registers the tables of the names a training configuration takes (training.losses.LOSSES,
networks.ARCHITECTURES) with config.check_config, wherever training is entered (plan, cv, the trainer): config sits
on the floor below them and cannot import them itself."""

from gliograde.networks import ARCHITECTURES
from gliograde.training.losses import LOSSES

__all__ = ["ARCHITECTURES", "LOSSES"]
