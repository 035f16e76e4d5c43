"""The Spark ML API: DeepClassifier / DeepClassificationModel and DeepRegressor / DeepRegressionModel."""

from .classifier import DeepClassificationModel, DeepClassifier
from .regressor import DeepRegressionModel, DeepRegressor
from .summary import (
    DeepClassificationSummary,
    DeepClassificationTrainingSummary,
    DeepRegressionSummary,
    DeepRegressionTrainingSummary,
)

__all__ = ["DeepClassificationModel", "DeepClassificationSummary", "DeepClassificationTrainingSummary",
           "DeepClassifier", "DeepRegressionModel", "DeepRegressionSummary", "DeepRegressionTrainingSummary",
           "DeepRegressor"]
