"""Mentor-guided training params of :class:`~sparkdl_hetero.ml.classifier.DeepClassifier`.

With ``mentor`` set, the estimator trains a :class:`~sparkdl_hetero.nn.distill.DistillationObjective` instead of
the plain objective: the mentor's topology and weights travel inside the objective to the executors, where the
mentor runs forward beside the mentee, batch by batch, and is never updated. Both training modes use it
through the Objective interface only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pyspark.ml.param import Param, Params, TypeConverters

from ..nn.config import ConfigError
from ..nn.distill import DistillationObjective
from ..nn.objective import Objective
from ..nn.topology import FeedForwardTopology

# the settings jobs/mentor.py uses (the best of a small search on Fashion-MNIST, LeNet-5 mentor, MLP mentees)
DEFAULT_DISTILL_ALPHA = 0.5
DEFAULT_TEMPERATURE = 2.0

# DistillationObjective's argument -> the param that sets it (the engine's errors name the argument)
_PARAM_OF_ARGUMENT = {"alpha": "distillAlpha", "temperature": "temperature", "hint_weights": "hintWeights"}


def _to_hint_layers(value: Any) -> list[list[int]]:
    """Pairs of layer indices ``[[mentee, mentor], ...]``."""
    try:
        pairs = [TypeConverters.toListInt(pair) for pair in TypeConverters.toList(value)]
    except TypeError:
        raise TypeError(f"hintLayers must be a list of [mentee layer, mentor layer] index pairs, got {value!r}") \
            from None
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise TypeError(f"hintLayers must be a list of [mentee layer, mentor layer] index pairs, got {value!r}")
    return pairs


def _mentor_network(mentor: Any) -> tuple[FeedForwardTopology, np.ndarray]:
    """(topology, weights) of a DeepClassificationModel or a Spark MultilayerPerceptronClassificationModel."""
    from pyspark.ml.classification import MultilayerPerceptronClassificationModel

    from .classifier import DeepClassificationModel

    if isinstance(mentor, MultilayerPerceptronClassificationModel):
        mentor = DeepClassificationModel.fromSpark(mentor)
    if not isinstance(mentor, DeepClassificationModel):
        raise TypeError(f"mentor must be a DeepClassificationModel or a Spark "
                        f"MultilayerPerceptronClassificationModel, got {type(mentor).__name__}")
    return mentor.network, mentor.weights.toArray()


class _MentorParams(Params):
    """The mentor and the weights of the distillation loss terms (see :mod:`sparkdl_hetero.nn.distill`)."""

    mentor: Param[Any] = Param(
        Params._dummy(), "mentor", "A trained DeepClassificationModel (or Spark MLP model) that guides training: "
        "soft targets and hints. Unset: plain training.", TypeConverters.identity)
    distillAlpha: Param[float] = Param(
        Params._dummy(), "distillAlpha", "With a mentor: weight a of the label loss; the mentor's soft targets "
        "get 1 - a. In [0, 1].", TypeConverters.toFloat)
    temperature: Param[float] = Param(
        Params._dummy(), "temperature", "With a mentor: softmax temperature T of the soft targets (the term is "
        "scaled by T^2). > 0.", TypeConverters.toFloat)
    hintLayers: Param[list[list[int]]] = Param(
        Params._dummy(), "hintLayers", "With a mentor: pairs [mentee layer, mentor layer] of layer indices "
        "(0: the first layer) whose outputs are tied by an RMSE term; a trainable linear adapter maps the mentee "
        "layer to the mentor's width when they differ.", _to_hint_layers)
    hintWeights: Param[list[float]] = Param(
        Params._dummy(), "hintWeights", "With a mentor: the weight of each hint pair's RMSE term (empty: 1.0 "
        "each).", TypeConverters.toListFloat)

    #: persisted through _state_metadata/_state_arrays (a model is not a JSON value)
    _state_params: tuple[str, ...] = ("mentor",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._setDefault(distillAlpha=DEFAULT_DISTILL_ALPHA, temperature=DEFAULT_TEMPERATURE, hintLayers=[],
                         hintWeights=[])

    def setMentor(self, value: Any) -> Any:
        return self._set(mentor=value)

    def getMentor(self) -> Any:
        return self.getOrDefault(self.mentor)

    def setDistillAlpha(self, value: float) -> Any:
        return self._set(distillAlpha=value)

    def getDistillAlpha(self) -> float:
        return self.getOrDefault(self.distillAlpha)

    def setTemperature(self, value: float) -> Any:
        return self._set(temperature=value)

    def getTemperature(self) -> float:
        return self.getOrDefault(self.temperature)

    def setHintLayers(self, value: list[list[int]]) -> Any:
        return self._set(hintLayers=value)

    def getHintLayers(self) -> list[list[int]]:
        return self.getOrDefault(self.hintLayers)

    def setHintWeights(self, value: list[float]) -> Any:
        return self._set(hintWeights=value)

    def getHintWeights(self) -> list[float]:
        return self.getOrDefault(self.hintWeights)

    def _has_mentor(self) -> bool:
        return self.isSet(self.mentor) and self.getMentor() is not None

    def _objective(self, topology: FeedForwardTopology) -> Objective:
        """What the fit minimizes: plain training, or distillation from the mentor when one is set."""
        if not self._has_mentor():
            return Objective(topology)
        mentor_topology, mentor_weights = _mentor_network(self.getMentor())
        weights = self.getHintWeights()
        try:
            return DistillationObjective(topology, mentor_topology, mentor_weights, alpha=self.getDistillAlpha(),
                                         temperature=self.getTemperature(), hint_layers=self.getHintLayers(),
                                         hint_weights=weights if weights else None)
        except ConfigError as e:
            if e.name not in _PARAM_OF_ARGUMENT:
                raise
            raise e.renamed(_PARAM_OF_ARGUMENT[e.name]) from None

    # ---- persistence (PersistentParams hooks) ----
    def _state_metadata(self) -> dict[str, Any]:
        if not self._has_mentor():
            return {}
        return {"mentor": _mentor_network(self.getMentor())[0].to_dict()}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        if not self._has_mentor():
            return {}
        return {"mentorWeights": _mentor_network(self.getMentor())[1]}

    def _restore_state(self, metadata: dict[str, Any], arrays: dict[str, np.ndarray], path: str) -> None:
        from .classifier import DeepClassificationModel

        if "mentor" not in metadata:
            return
        if "mentorWeights" not in arrays:
            raise ValueError(f"cannot load {type(self).__name__} from {path}: the metadata names a mentor but "
                             f"there is no mentorWeights array")
        topology = FeedForwardTopology.from_dict(metadata["mentor"])
        self._set(mentor=DeepClassificationModel(topology, arrays["mentorWeights"]))
