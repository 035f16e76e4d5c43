"""TrainConfig: one definition per knob, every knob checked on construction with one message format."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkdl_hetero.distributed import config as distributed_config
from sparkdl_hetero.nn.config import (
    KNOBS,
    KNOBS_BY_NAME,
    ConfigError,
    Indices,
    Knob,
    OneOf,
    Range,
    RankFactors,
    TrainConfig,
    check_knob,
)

# every knob of the TrainConfig that the distributed layer and the estimator always knew
KNOWN = ("solver maxIter tol stepSize regParam blockSize batchSize epochs miniBatchFraction momentum nesterov beta1 "
         "beta2 epsilon lrSchedule lrDecay lrDecaySteps seed dtype backend mode numWorkers taskGpus taskCpus "
         "checkpointDir checkpointInterval verbose syncEvery allReduce balance validationFraction patience "
         "validationInterval commTimeout straggler rounds clientFraction localEpochs federatedAlgorithm cadKeep "
         "cadLayers cadWarmupRounds").split()


def test_the_table_is_the_dataclass() -> None:
    assert [k.name for k in KNOBS] == [f.name for f in dataclasses.fields(TrainConfig)] == KNOWN
    defaults = TrainConfig()
    for k in KNOBS:
        assert getattr(defaults, k.name) == k.default
        assert k.doc and k.doc.endswith(".")
        assert k.type in (int, float, bool, str, dict, list)


def test_the_distributed_layer_re_exports_the_same_names() -> None:
    assert distributed_config.TrainConfig is TrainConfig
    assert distributed_config.SOLVERS == ("l-bfgs", "gd", "sgd", "momentum", "adam")
    assert distributed_config.MODES == ("auto", "treeAggregate", "barrier", "federated")
    assert distributed_config.DTYPES == ("float32", "float64")


def test_a_config_is_frozen_and_its_straggler_map_is_its_own() -> None:
    a, b = TrainConfig(), TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stepSize = -1.0  # type: ignore[misc]
    a.straggler[1] = 3.0
    assert b.straggler == {} and KNOBS_BY_NAME["straggler"].default == {}


CASES = [
    ("solver", "newton", "solver must be one of l-bfgs, gd, sgd, momentum, adam, got 'newton'"),
    ("maxIter", -1, "maxIter must be >= 0, got -1"),
    ("tol", -1e-3, "tol must be >= 0, got -0.001"),
    ("stepSize", 0.0, "stepSize must be > 0, got 0.0"),
    ("regParam", -1.0, "regParam must be >= 0, got -1.0"),
    ("blockSize", 0, "blockSize must be >= 1, got 0"),
    ("batchSize", 0, "batchSize must be >= 1, got 0"),
    ("epochs", -2, "epochs must be >= 0, got -2"),
    ("miniBatchFraction", 0.0, "miniBatchFraction must be in (0, 1], got 0.0"),
    ("miniBatchFraction", 1.5, "miniBatchFraction must be in (0, 1], got 1.5"),
    ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("nesterov", "yes", "nesterov must be true or false, got 'yes'"),
    ("beta1", -0.1, "beta1 must be in [0, 1), got -0.1"),
    ("beta2", 1.5, "beta2 must be in [0, 1), got 1.5"),
    ("epsilon", 0.0, "epsilon must be > 0, got 0.0"),
    ("lrSchedule", "linear", "lrSchedule must be one of constant, step, cosine, got 'linear'"),
    ("lrDecay", 0.0, "lrDecay must be > 0, got 0.0"),
    ("lrDecaySteps", -1, "lrDecaySteps must be >= 0, got -1"),
    ("seed", -5, "seed must be >= 0, got -5"),
    ("dtype", "float16", "dtype must be one of float32, float64, got 'float16'"),
    ("backend", "tpu", "backend must be one of numpy, opencl, cupy, auto, got 'tpu'"),
    ("mode", "gossip", "mode must be one of auto, treeAggregate, barrier, federated, got 'gossip'"),
    ("numWorkers", -1, "numWorkers must be >= 0, got -1"),
    ("taskGpus", -2, "taskGpus must be >= -1, got -2"),
    ("taskCpus", 1.5, "taskCpus must be an integer, got 1.5"),
    ("checkpointDir", None, "checkpointDir must be a string, got None"),
    ("checkpointInterval", 2.5, "checkpointInterval must be an integer, got 2.5"),
    ("verbose", 1, "verbose must be true or false, got 1"),
    ("syncEvery", 0, "syncEvery must be >= 1, got 0"),
    ("allReduce", "tree", "allReduce must be one of auto, hub, ring, got 'tree'"),
    ("balance", None, "balance must be true or false, got None"),
    ("validationFraction", 1.0, "validationFraction must be in [0, 1), got 1.0"),
    ("patience", 0, "patience must be >= 1, got 0"),
    ("validationInterval", 0, "validationInterval must be >= 1, got 0"),
    ("commTimeout", 0.0, "commTimeout must be > 0, got 0.0"),
    ("straggler", {1: 0.5}, "straggler must be a map of worker rank (an integer >= 0) to slow-down factor (>= 1), "
                            "got {1: 0.5}"),
    ("straggler", {-1: 2.0}, "straggler must be a map of worker rank (an integer >= 0) to slow-down factor (>= 1), "
                             "got {-1: 2.0}"),
    ("straggler", [1, 2], "straggler must be a map, got [1, 2]"),
    ("maxIter", "10", "maxIter must be an integer, got '10'"),
    ("maxIter", True, "maxIter must be an integer, got True"),
    ("stepSize", float("nan"), "stepSize must be > 0, got nan"),
    ("rounds", 0, "rounds must be >= 1, got 0"),
    ("clientFraction", 0.0, "clientFraction must be in (0, 1], got 0.0"),
    ("localEpochs", 0, "localEpochs must be >= 1, got 0"),
    ("federatedAlgorithm", "fedprox", "federatedAlgorithm must be one of fedavg, cad, got 'fedprox'"),
    ("cadKeep", 1.5, "cadKeep must be in (0, 1], got 1.5"),
    ("cadLayers", [3, 3], "cadLayers must be a list of distinct integers >= 0, got [3, 3]"),
    ("cadLayers", [-1], "cadLayers must be a list of distinct integers >= 0, got [-1]"),
    ("cadLayers", 3, "cadLayers must be a list, got 3"),
    ("cadWarmupRounds", -1, "cadWarmupRounds must be >= 0, got -1"),
]


@pytest.mark.parametrize(("name", "value", "message"), CASES)
def test_every_knob_is_checked_with_one_message_format(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$") as e:
        TrainConfig(**{name: value})
    assert isinstance(e.value, ValueError) and e.value.name == name


def test_every_knob_has_a_case_above() -> None:
    assert {name for name, _, _ in CASES} == set(KNOWN)


def test_knobs_that_depend_on_each_other() -> None:
    with pytest.raises(ConfigError, match=re.escape("lrDecaySteps must be >= 1 with lrSchedule='step', got 0")):
        TrainConfig(lrSchedule="step")
    assert TrainConfig(lrSchedule="step", lrDecaySteps=5).lrDecaySteps == 5
    with pytest.raises(ConfigError, match=re.escape("checkpointInterval must be >= 1 when checkpointDir is set, "
                                                    "got 0")):
        TrainConfig(checkpointDir="/tmp/ck", checkpointInterval=0)
    assert TrainConfig(checkpointInterval=0).checkpointInterval == 0  # no checkpoints: the interval is unused


def test_check_knob_and_renamed_errors() -> None:
    check_knob("dtype", "float64")
    with pytest.raises(ConfigError, match="^dtype must be one of float32, float64, got 'int8'$") as e:
        check_knob("dtype", "int8")
    assert str(e.value.renamed("predictionDtype")) == "predictionDtype must be one of float32, float64, got 'int8'"


# ---- properties: any value a knob's check allows constructs, any other raises naming the knob ----

_FINITE = dict(allow_nan=False, allow_infinity=False)


def _valid(k: Knob) -> st.SearchStrategy:
    c = k.check
    if isinstance(c, OneOf):
        return st.sampled_from(c.choices)
    if isinstance(c, RankFactors):
        return st.dictionaries(st.integers(0, 64), st.floats(1.0, 1e3, **_FINITE), max_size=4)
    if isinstance(c, Indices):
        return st.lists(st.integers(0, 64), unique=True, max_size=4)
    if k.type is bool:
        return st.booleans()
    if k.type is str:
        return st.text(max_size=8)
    if isinstance(c, Range) and k.type is int:
        return st.integers(min_value=int(c.lo) + c.lo_open, max_value=None if c.hi is None else int(c.hi) - c.hi_open)
    if isinstance(c, Range):
        return st.floats(min_value=c.lo, max_value=c.hi, exclude_min=c.lo_open, exclude_max=c.hi_open, **_FINITE)
    return st.integers(-1000, 1000)  # checkpointInterval: any integer without a checkpointDir


def _invalid(k: Knob) -> st.SearchStrategy:
    c = k.check
    if isinstance(c, OneOf):
        return st.text(max_size=12).filter(lambda s: s not in c.choices)
    if isinstance(c, RankFactors):
        return st.one_of(st.dictionaries(st.integers(-64, -1), st.floats(1.0, 1e3, **_FINITE), min_size=1),
                         st.dictionaries(st.integers(0, 64), st.floats(-1e3, 1.0, exclude_max=True, **_FINITE),
                                         min_size=1))
    if isinstance(c, Indices):
        return st.one_of(st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                         st.lists(st.integers(0, 9), min_size=2, max_size=4).filter(lambda v: len(set(v)) < len(v)))
    assert isinstance(c, Range) and c.lo is not None
    below = (st.integers(max_value=int(c.lo) - 1 + c.lo_open) if k.type is int
             else st.floats(max_value=c.lo, exclude_max=not c.lo_open, **_FINITE))
    if c.hi is None:
        return below
    return st.one_of(below, st.floats(min_value=c.hi, exclude_min=not c.hi_open, **_FINITE))


_CHECKED = [k for k in KNOBS if k.check is not None]


@given(data=st.data())
@pytest.mark.parametrize("k", KNOBS, ids=lambda k: k.name)
def test_any_allowed_value_constructs(k: Knob, data: st.DataObject) -> None:
    value = data.draw(_valid(k))
    others = {} if k.name == "lrDecaySteps" else {"lrDecaySteps": 1}  # lrSchedule='step' needs it
    assert getattr(TrainConfig(**{**others, k.name: value}), k.name) == value


@given(data=st.data())
@pytest.mark.parametrize("k", _CHECKED, ids=lambda k: k.name)
def test_any_other_value_raises_naming_the_knob(k: Knob, data: st.DataObject) -> None:
    value = data.draw(_invalid(k))
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{k.name: value})
    assert e.value.name == k.name
    assert str(e.value) == f"{k.name} must be {k.check.expected}, got {value!r}"


@pytest.mark.parametrize("solver, mode", [("l-bfgs", "treeAggregate"), ("gd", "treeAggregate"), ("sgd", "barrier"),
                                          ("momentum", "barrier"), ("adam", "barrier")])
def test_mode_auto_picks_by_solver_and_says_why(solver: str, mode: str) -> None:
    assert TrainConfig().mode == "auto"
    ran, why = TrainConfig(solver=solver).resolved_mode()
    assert ran == mode and f"mode='auto' with the {'full' if mode == 'treeAggregate' else 'mini'}-batch solver " \
                           f"{solver!r}" in why
    assert TrainConfig(solver=solver, mode="treeAggregate").resolved_mode() == ("treeAggregate",
                                                                               "mode='treeAggregate' was set")
    assert TrainConfig(solver=solver, mode="barrier").resolved_mode()[0] == "barrier"
    assert TrainConfig(solver=solver, mode="federated").resolved_mode() == ("federated", "mode='federated' was set")
