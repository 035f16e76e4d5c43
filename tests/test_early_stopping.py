"""Early stopping on a validation loss: the one rule (solvers.EarlyStopping), the full-batch solvers stopping on a
hook's reason, and gd / l-bfgs fits with validation rows in treeAggregate and barrier modes."""

from __future__ import annotations

import numpy as np
import pytest

from sparkdl_hetero.nn.config import TrainConfig
from sparkdl_hetero.nn.solvers import EarlyStopping, Hooks, SolverState, gd, lbfgs


def test_patience_counts_points_without_an_improvement_of_tol_and_keeps_the_best() -> None:
    config = TrainConfig(patience=2, tol=0.1)
    early = EarlyStopping()
    seen = []
    for i, loss in enumerate([3.0, 2.0, 1.95, 1.5, 1.45, 1.6]):
        seen.append(early.update(loss, config, np.full(2, float(i)), np.array([10.0 * i]), "validations"))
        if i == 3:
            assert early.best() is None  # the last point is the best: nothing to restore
    # 1.95 is not below 2.0 - tol; 1.45 is not below 1.5 - tol; 1.6 neither: two in a row after 1.5
    assert seen == ["", "", "", "", "", "early stopping: validation loss did not improve for 2 validations"]
    assert early.best_loss == 1.5 and early.bad_points == 2
    weights, state = early.best()
    assert weights.tolist() == [3.0, 3.0] and state.tolist() == [30.0]


def test_the_best_point_is_a_copy_of_the_weights() -> None:
    early = EarlyStopping()
    w = np.zeros(3)
    early.update(1.0, TrainConfig(), w, np.zeros(0), "epochs")
    w += 5.0  # the solver updates its weights in place
    early.update(2.0, TrainConfig(), w, np.zeros(0), "epochs")
    assert early.best()[0].tolist() == [0.0, 0.0, 0.0]


def _rosenbrock(w: np.ndarray, _iteration: int | None) -> tuple[float, np.ndarray, float]:
    """Loss, gradient and count 1 of the Rosenbrock function: many iterations for either solver."""
    a, b = w[:-1], w[1:]
    g = np.zeros_like(w)
    g[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2)), g, 1.0


@pytest.mark.parametrize("solve", [gd, lbfgs], ids=["gd", "l-bfgs"])
def test_full_batch_solvers_stop_on_the_hooks_reason(solve) -> None:
    """epoch_end runs after each full-batch iteration with its 0-based index; a reason stops the solver there."""
    seen = []

    def epoch_end(iteration: int, _loss: float) -> str:
        seen.append(iteration)
        return "stop here" if iteration == 2 else ""

    state = SolverState(np.full(5, -1.0))
    config = TrainConfig(solver=solve.__name__.replace("lbfgs", "l-bfgs"), maxIter=50, stepSize=1e-4, tol=0.0)
    assert solve(state, config, _rosenbrock, Hooks(epoch_end=epoch_end)) == "stop here"
    assert seen == [0, 1, 2] and state.iteration == 3


# ---- Spark: l-bfgs / gd with validation rows, both modes ----------------------------------------------------
def _noise_df(spark, n: int = 48, seed: int = 11):
    """Labels that are pure noise: a wide network fits the training rows' noise, the validation loss goes up."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 3))
    y = rng.normal(size=n)
    val = np.arange(n) % 2 == 0
    rows = [(Vectors.dense(r), float(t), bool(v)) for r, t, v in zip(x, y, val, strict=True)]
    return spark.createDataFrame(rows, ["features", "label", "isVal"]).repartition(2), x, y, val


@pytest.mark.parametrize("mode", ["treeAggregate", "barrier"])
@pytest.mark.parametrize("solver", ["l-bfgs", "gd"])
def test_full_batch_early_stopping_returns_the_best_validated_weights(spark, mode, solver) -> None:
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.ml import DeepRegressor

    df, x, y, val = _noise_df(spark)
    patience, max_iter = 2, 200
    model = DeepRegressor(topology="affine(32)-tanh-affine(1)", mode=mode, numWorkers=2, solver=solver,
                          stepSize=0.5, maxIter=max_iter, tol=0.0, validationInterval=1, patience=patience, seed=3,
                          verbose=False, dtype="float64", validationIndicatorCol="isVal").fit(df)
    summary = model.summary
    history = summary.validationHistory
    assert summary.trainingStats["converged"] == \
        f"early stopping: validation loss did not improve for {patience} validations"
    assert summary.totalIterations < max_iter and len(history) == summary.totalIterations  # one per iteration
    losses = [h[0] for h in history]
    best = int(np.argmin(losses))
    assert best == len(history) - 1 - patience  # the last `patience` points did not improve on it
    # the returned weights are the best point's: its loss and RMSE again, computed directly on the validation
    # rows (the executors hold the features as float32: predict the same rounded rows here)
    err = np.array([model.predict(Vectors.dense(r.astype(np.float32))) for r in x[val]]) - y[val]
    assert history[best][0] == pytest.approx(0.5 * np.mean(err ** 2), rel=1e-9)
    assert history[best][1] == pytest.approx(np.sqrt(np.mean(err ** 2)), rel=1e-9)
