"""The NumPy engine: layers over one flat weight vector, topologies, models and updaters. No Spark here."""

from .layers import (
    Affine,
    BatchNorm,
    Conv2D,
    Dropout,
    Flatten,
    Functional,
    GlobalAvgPool,
    Layer,
    LayerModel,
    LossLayer,
    Pool2D,
    Residual,
    SigmoidSquaredError,
    SoftmaxCrossEntropy,
    SpecError,
)
from .model import FeedForwardModel, one_hot
from .topology import PRESETS, FeedForwardTopology, parse_layer

__all__ = [
    "PRESETS", "Affine", "BatchNorm", "Conv2D", "Dropout", "FeedForwardModel", "FeedForwardTopology", "Flatten",
    "Functional", "GlobalAvgPool", "Layer", "LayerModel", "LossLayer", "Pool2D", "Residual", "SigmoidSquaredError",
    "SoftmaxCrossEntropy", "SpecError", "one_hot", "parse_layer",
]
