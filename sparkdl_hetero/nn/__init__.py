"""The NumPy engine: layers over one flat weight vector, topologies, models and updaters. No Spark here."""

from .layers import (
    Affine,
    Conv2D,
    Dropout,
    Flatten,
    Functional,
    Layer,
    LayerModel,
    LossLayer,
    Pool2D,
    SigmoidSquaredError,
    SoftmaxCrossEntropy,
    SpecError,
)
from .model import FeedForwardModel, one_hot
from .topology import FeedForwardTopology, parse_layer

__all__ = [
    "Affine", "Conv2D", "Dropout", "FeedForwardModel", "FeedForwardTopology", "Flatten", "Functional", "Layer",
    "LayerModel", "LossLayer", "Pool2D", "SigmoidSquaredError", "SoftmaxCrossEntropy", "SpecError", "one_hot",
    "parse_layer",
]
