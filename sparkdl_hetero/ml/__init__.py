"""The Spark ML API: DeepClassifier and DeepClassificationModel."""

from .classifier import DeepClassificationModel, DeepClassifier
from .summary import DeepClassificationSummary, DeepClassificationTrainingSummary

__all__ = ["DeepClassificationModel", "DeepClassificationSummary", "DeepClassificationTrainingSummary",
           "DeepClassifier"]
