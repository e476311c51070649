"""The built-in detectors, one module per fault class. Importing this package registers them."""

from gradscope.detect.rules.accumulating_gradients import AccumulatingGradients
from gradscope.detect.rules.dead_units import DeadUnits
from gradscope.detect.rules.exploding_gradients import ExplodingGradients
from gradscope.detect.rules.exploding_loss import ExplodingLoss
from gradscope.detect.rules.init_scale import InitScale
from gradscope.detect.rules.no_gradient import NoGradient
from gradscope.detect.rules.no_update import NoUpdate
from gradscope.detect.rules.nonfinite import NonFinite
from gradscope.detect.rules.oscillating_loss import OscillatingLoss
from gradscope.detect.rules.saturated_activations import SaturatedActivations
from gradscope.detect.rules.stalled_training import StalledTraining
from gradscope.detect.rules.unshuffled_data import UnshuffledData
from gradscope.detect.rules.vanishing_gradients import VanishingGradients

__all__ = [
    "AccumulatingGradients",
    "DeadUnits",
    "ExplodingGradients",
    "ExplodingLoss",
    "InitScale",
    "NoGradient",
    "NoUpdate",
    "NonFinite",
    "OscillatingLoss",
    "SaturatedActivations",
    "StalledTraining",
    "UnshuffledData",
    "VanishingGradients",
]
