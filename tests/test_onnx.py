"""ONNX export: the exported graph, run by onnxruntime, gives FeedForwardModel.predict's probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.onnx_export import export_onnx, to_onnx

onnx = pytest.importorskip("onnx")  # the 'onnx' extra
ort = pytest.importorskip("onnxruntime")

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
CASES = {
    "spark-mlp": FeedForwardTopology.multilayer_perceptron([20, 12, 7, 4]),
    "mlp-activations": FeedForwardTopology.from_spec(
        "affine(16)-relu-dropout(0.5)-affine(12)-leaky_relu(0.2)-affine(9)-tanh-affine(8)-identity-affine(5)", 20),
    "mlp-sigmoid-mse": FeedForwardTopology.multilayer_perceptron([20, 6, 3], softmax_on_top=False),
    "lenet": FeedForwardTopology.from_spec(LENET, (1, 28, 28)),
    "cnn-mixed": FeedForwardTopology.from_spec(
        "conv(5,3,stride=2,pad=1)-leaky_relu(0.1)-avgpool(2)-conv(4,2,pad=1)-tanh-maxpool(3,stride=2)"
        "-dropout(0.2)-flatten-affine(7)-sigmoid-affine(6)", (3, 17, 15)),
}


def _run(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["probability"], {"features": x})[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_matches_predict(name: str, tmp_path) -> None:
    topology = CASES[name]
    rng = np.random.default_rng(0)
    weights = FeedForwardModel.initial_weights(topology, rng)  # Spark's init: outputs far from saturation
    model = FeedForwardModel(topology, weights)
    x = rng.normal(size=(13, topology.num_inputs)).astype(np.float32)
    path = tmp_path / f"{name}.onnx"
    export_onnx(topology, model.get_weights(), path)
    got = _run(str(path), x)
    want = model.predict(x)
    assert got.shape == want.shape == (13, topology.num_outputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.ptp(want, axis=0).max() > 0.05  # outputs differ across rows: a layout error would show
    # the batch axis is free: one row at a time gives the same answer
    np.testing.assert_allclose(_run(str(path), x[:1]), want[:1], atol=1e-5, rtol=0)


def test_flatten_order_is_the_engines_not_nchw(tmp_path) -> None:
    """A graph without the NHWC transpose before Flatten would disagree: check the transpose is there and
    matters for a multi-channel image."""
    topology = FeedForwardTopology.from_spec("conv(3,3)-flatten-affine(4)", (2, 5, 5))
    rng = np.random.default_rng(1)
    weights = FeedForwardModel.initial_weights(topology, rng)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    proto = to_onnx(topology, weights)
    assert [n.op_type for n in proto.graph.node] == ["Reshape", "Conv", "Transpose", "Flatten", "Gemm", "Softmax"]
    path = tmp_path / "t.onnx"
    onnx.save(proto, str(path))
    want = FeedForwardModel(topology, weights).predict(x)
    np.testing.assert_allclose(_run(str(path), x), want, atol=1e-5, rtol=0)
    proto.graph.node[2].attribute[0].ints[:] = [0, 1, 2, 3]  # NCHW flatten instead
    onnx.save(proto, str(path))
    assert np.abs(_run(str(path), x) - want).max() > 1e-3


def _trained_state_model(topology: FeedForwardTopology, seed: int) -> FeedForwardModel:
    """A model whose batch-norm running statistics and scales are far from their initial values."""
    rng = np.random.default_rng(seed)
    model = FeedForwardModel(topology, FeedForwardModel.initial_weights(topology, rng))
    w = model.get_weights()
    w += rng.normal(scale=0.2, size=w.shape).astype(np.float32)
    model.set_weights(w)
    for _ in range(3):
        x = (rng.normal(size=(16, topology.num_inputs)) * 2 + 0.5).astype(np.float32)
        model.compute_gradient(x, rng.integers(0, topology.num_outputs, 16))
    return model


@pytest.mark.parametrize("spec, shape", [
    ("resnet8", (3, 32, 32)),
    ("affine(12)-batchnorm(momentum=0.5,eps=0.001)-relu-res(affine(7)-batchnorm-tanh)-affine(4)", 9),
    ("conv(4,3)-avgpool(3,stride=2,pad=1)-maxpool(3,stride=1,pad=1)-res(conv(4,3,pad=1)-relu)-gap-affine(3)",
     (2, 9, 8)),
])
def test_onnx_with_batchnorm_residual_blocks_and_padded_pools_matches_the_engine(spec, shape, tmp_path) -> None:
    topology = FeedForwardTopology.from_spec(spec, shape)
    model = _trained_state_model(topology, 4)
    assert topology.num_state == 0 or not np.array_equal(model.get_state(),
                                                         FeedForwardModel.initial_state(topology))
    x = np.random.default_rng(5).normal(size=(9, topology.num_inputs)).astype(np.float32)
    path = tmp_path / "m.onnx"
    export_onnx(topology, model.get_weights(), path, state=model.get_state())
    want = model.predict(x)
    np.testing.assert_allclose(_run(str(path), x), want, atol=1e-5, rtol=0)
    assert np.ptp(want, axis=0).max() > 1e-3  # outputs differ across rows: a layout error would show


def test_a_topology_with_state_needs_the_state(tmp_path) -> None:
    topology = FeedForwardTopology.from_spec("affine(3)-batchnorm-affine(2)", 4)
    weights = FeedForwardModel.initial_weights(topology, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"has 6 values of state .* pass state=model.get_state\(\)"):
        to_onnx(topology, weights)
    with pytest.raises(ValueError, match=r"state must be a vector of 6 values for .* got shape \(5,\)"):
        to_onnx(topology, weights, state=np.zeros(5))


def test_wrong_weight_count_is_rejected(tmp_path) -> None:
    topology = FeedForwardTopology.multilayer_perceptron([4, 3])
    with pytest.raises(ValueError, match=r"weights must be a vector of 15 values for 'affine\(3\)-softmax', "
                                         r"got shape \(14,\)"):
        export_onnx(topology, np.zeros(14), tmp_path / "x.onnx")


@pytest.mark.parametrize("name", ["spark-mlp", "cnn-mixed"])
def test_export_onnx_of_a_model_matches_transform(spark, name: str, tmp_path) -> None:
    """DeepClassificationModel.exportOnnx: onnxruntime's probabilities equal transform's (float32, 1e-5)."""
    from pyspark.ml.linalg import Vectors

    from sparkdl_hetero.ml.classifier import DeepClassificationModel

    topology = CASES[name]
    rng = np.random.default_rng(3)
    model = DeepClassificationModel(topology, FeedForwardModel.initial_weights(topology, rng))
    x = rng.normal(size=(20, topology.num_inputs)).astype(np.float32)
    df = spark.createDataFrame([(i, Vectors.dense(row.tolist())) for i, row in enumerate(x)], ["id", "features"])
    rows = sorted(model.transform(df).select("id", "probability").collect())
    want = np.array([r.probability.toArray() for r in rows])
    path = str(tmp_path / "model.onnx")
    model.exportOnnx(path)
    np.testing.assert_allclose(_run(path, x), want, atol=1e-5, rtol=0)
    assert np.ptp(want, axis=0).max() > 0.05
