"""DataFrame -> resident blocks: every bad input is a ValueError naming column and values; good input arrives
intact (dense, sparse and array features, empty partitions)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.distributed.data import Handle, prepare, resident_blocks
from sparkdl_hetero.distributed.fit import fit
from sparkdl_hetero.nn.objective import Objective
from sparkdl_hetero.nn.topology import FeedForwardTopology

ROWS = [([0.5, -1.0, 2.0, 0.0], 0.0), ([1.0, 0.0, 0.0, 3.0], 1.0), ([0.0, 0.25, 1.5, -2.0], 2.0),
        ([4.0, 1.0, -1.0, 0.5], 1.0), ([0.0, 0.0, 0.0, 1.0], 0.0)]


def _vec_df(spark, rows, partitions: int = 2, sparse: bool = False):
    from pyspark.ml.linalg import Vectors

    def vec(v):
        if v is None:
            return None
        if sparse:
            idx = [i for i, a in enumerate(v) if a != 0]
            return Vectors.sparse(len(v), idx, [v[i] for i in idx])
        return Vectors.dense(v)

    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType

    schema = StructType([StructField("features", VectorUDT()), StructField("label", DoubleType())])
    return spark.createDataFrame([(vec(v), y) for v, y in rows], schema).repartition(partitions)


def _blocks(data) -> tuple[np.ndarray, np.ndarray]:
    """Every partition's resident blocks, fetched through a Spark job (what the trainer's tasks see)."""
    fit_id = data.fit_id

    def fetch(batches):
        for batch in batches:
            for row in batch.to_pylist():
                h = Handle(**row)
                if h.n:
                    x, y = resident_blocks(fit_id, h)
                    yield pa.RecordBatch.from_pylist([{"x": x.tobytes(), "y": y.tobytes()}])

    rows = data.handles_df.mapInArrow(fetch, "x binary, y binary").collect()
    x = np.concatenate([np.frombuffer(r["x"], np.float32) for r in rows]).reshape(-1, data.num_features)
    return x, np.concatenate([np.frombuffer(r["y"], np.int32) for r in rows])


def _sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a = np.column_stack([x, y])
    return a[np.lexsort(a.T[::-1])]


def _expect(rows) -> np.ndarray:
    return _sorted_rows(np.array([r[0] for r in rows], np.float32), np.array([r[1] for r in rows]))


@pytest.mark.parametrize("sparse", [False, True])
def test_vectors_arrive_as_float32_blocks(spark, sparse):
    data = prepare(_vec_df(spark, ROWS, 2, sparse), "features", "label", 4, 3)
    try:
        x, y = _blocks(data)
        assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (5, 4)
        np.testing.assert_array_equal(_sorted_rows(x, y), _expect(ROWS))
        assert data.count == 5 and data.num_partitions == 2
    finally:
        data.release()


def test_array_features_and_integer_labels(spark):
    df = spark.createDataFrame([(r[0], int(r[1])) for r in ROWS], "features array<double>, label int")
    data = prepare(df, "features", "label", 4, 3)
    try:
        x, y = _blocks(data)
        np.testing.assert_array_equal(_sorted_rows(x, y), _expect(ROWS))
    finally:
        data.release()


def test_empty_partitions_are_skipped(spark):
    df = _vec_df(spark, ROWS, 1).repartition(8)  # 5 rows over 8 partitions: some empty
    data = prepare(df, "features", "label", 4, 3)
    try:
        assert data.num_partitions == 8 and sorted(data.partition_sizes()).count(0) >= 3
        x, y = _blocks(data)
        np.testing.assert_array_equal(_sorted_rows(x, y), _expect(ROWS))
    finally:
        data.release()
    # and a fit over them trains
    topo = FeedForwardTopology.multilayer_perceptron([4, 3], softmax_on_top=True)
    res = fit(df, "features", "label", Objective(topo), TrainConfig(maxIter=3, verbose=False))
    assert res.iterations >= 1 and res.objectiveHistory[-1] < res.objectiveHistory[0]


def _raises(df, match: str, features: str = "features", label: str = "label", d: int = 4, k: int = 3):
    with pytest.raises(ValueError, match=match):
        prepare(df, features, label, d, k)


def test_missing_columns(spark):
    df = _vec_df(spark, ROWS)
    _raises(df, r"features column 'pixels' not found in the DataFrame; it has columns \['features', 'label'\]",
            features="pixels")
    _raises(df, r"label column 'target' not found", label="target")


def test_features_of_wrong_type(spark):
    df = spark.createDataFrame([("a b", 1.0)], "features string, label double")
    _raises(df, r"features column 'features' must be a Vector \(VectorUDT\) or an array of numbers, got string")
    df = spark.createDataFrame([(["a"], 1.0)], "features array<string>, label double")
    _raises(df, r"got array<string>")


def test_label_of_wrong_type(spark):
    df = spark.createDataFrame([([1.0, 2.0, 3.0, 4.0], "cat")], "features array<double>, label string")
    _raises(df, r"label column 'label' must be numeric \(integer class indices\), got string")


def test_vector_size_differs_from_model_input(spark):
    _raises(_vec_df(spark, ROWS), r"features column 'features' has 5 rows of size 4 \(first found\); "
                                  r"the model takes 6 inputs", d=6)
    rows = ROWS[:2] + [([1.0, 2.0], 0.0)]
    _raises(_vec_df(spark, rows), r"has 1 rows of size 2 \(first found\); the model takes 4 inputs")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features(spark, bad):
    rows = ROWS + [([1.0, bad, 0.0, 0.0], 1.0)]
    _raises(_vec_df(spark, rows), rf"features column 'features' has 1 non-finite values \(first found: {bad}\)")


def test_huge_doubles_overflow_float32(spark):
    df = spark.createDataFrame([([1e300, 0.0, 0.0, 0.0], 1.0)], "features array<double>, label double")
    _raises(df, r"1 non-finite values \(first found: inf\).*after conversion to float32")


def test_null_rows(spark):
    _raises(_vec_df(spark, ROWS + [(None, 1.0)]), r"features column 'features' has 1 null rows; expected none")
    _raises(_vec_df(spark, ROWS + [([1.0, 0.0, 0.0, 0.0], None)]),
            r"label column 'label' has 1 null rows; expected none")
    df = spark.createDataFrame([([1.0, None, 0.0, 0.0], 1.0)], "features array<double>, label double")
    _raises(df, r"features column 'features' has 1 null values inside its arrays")


@pytest.mark.parametrize("label, shown", [(-1.0, "-1.0"), (1.5, "1.5"), (3.0, "3.0"), (7.0, "7.0")])
def test_bad_labels(spark, label, shown):
    rows = ROWS + [([1.0, 0.0, 0.0, 0.0], label)]
    _raises(_vec_df(spark, rows), rf"label column 'label' has 1 values that are not integer class indices in "
                                  rf"\[0, 3\) \(first found: {shown}\)")


def test_empty_dataframe(spark):
    df = _vec_df(spark, ROWS).limit(0)
    _raises(df, r"the DataFrame is empty: no rows in columns 'features', 'label'")


def test_fit_validates_before_training(spark, tmp_path):
    topo = FeedForwardTopology.multilayer_perceptron([4, 3], softmax_on_top=True)
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(maxIter=2, verbose=False, checkpointDir=str(ckpt), checkpointInterval=1)
    with pytest.raises(ValueError, match=r"label column 'label' has 1 values that are not integer"):
        fit(_vec_df(spark, ROWS + [([1.0, 0.0, 0.0, 0.0], 5.0)]), "features", "label", Objective(topo), cfg)
    assert not ckpt.exists()  # nothing trained, nothing checkpointed
    with pytest.raises(ValueError, match=r"initialWeights must hold 15 values for this model, got 3"):
        fit(_vec_df(spark, ROWS), "features", "label", Objective(topo), cfg, initial_weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"stepSize must be > 0, got -1.0"):
        fit(_vec_df(spark, ROWS), "features", "label", Objective(topo), TrainConfig(stepSize=-1.0))
