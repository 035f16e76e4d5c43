"""The gradient of an inner activation with respect to the input, activation maximization, filter preferences."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import numeric_grad

from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.cad import ActivationStats, filter_activations
from sparkdl_hetero.nn.visualize import filter_preferences, visualize_filters

CNN = "conv(4,3,pad=1)-tanh-maxpool(2)-conv(6,3)-relu-flatten-affine(8)-sigmoid-affine(3)"


def _cnn(shape=(2, 8, 8)) -> FeedForwardTopology:
    return FeedForwardTopology.from_spec(CNN, shape)


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4, 6, 7, 8])
def test_input_gradient_against_finite_differences(layer):
    topo = _cnn((2, 6, 6))
    model = FeedForwardModel(topo, seed=0, dtype=np.float64)
    rng = np.random.default_rng(layer)
    x = rng.normal(size=(3, topo.num_inputs))
    direction = rng.normal(size=model.forward(x)[layer].shape)
    model.gradient[...] = rng.normal(size=model.num_weights)  # a caller's accumulated gradient
    before = model.get_gradient()
    g = model.input_gradient(x, layer, direction)
    np.testing.assert_array_equal(model.get_gradient(), before)  # nothing leaks into training

    def f(v):
        return float(np.sum(direction * model.forward(v)[layer]))

    numeric = numeric_grad(lambda v: f(v.reshape(x.shape)), x.ravel()).reshape(x.shape)
    assert g.shape == x.shape and np.abs(g).max() > 1e-4
    np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


def test_input_gradient_of_a_flat_model():
    topo = FeedForwardTopology.from_spec("affine(4)-tanh-affine(2)", 3)
    model = FeedForwardModel(topo, seed=1, dtype=np.float64)
    x = np.array([[0.5, -1.0, 2.0]])
    w = model.get_weights()
    w1, b1 = w[:12].reshape(3, 4), w[12:16]  # W transposed (inputs x units), then the bias
    direction = np.array([[1.0, 0.0, -2.0, 0.5]])
    expected = ((1 - np.tanh(x @ w1 + b1) ** 2) * direction) @ w1.T
    np.testing.assert_allclose(model.input_gradient(x, 1, direction), expected, rtol=1e-13)


def test_input_gradient_errors():
    model = FeedForwardModel(_cnn(), seed=0)
    x = np.zeros((2, model.topology.num_inputs))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 9\), got 9"):
        model.input_gradient(x, 9, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"direction must have the shape of layer 0's output \(2, 8, 8, 4\), got "
                                         r"\(2, 4, 8, 8\)"):
        model.input_gradient(x, 0, np.zeros((2, 4, 8, 8)))


@pytest.mark.parametrize("layer, kw", [(0, {}), (3, {}), (6, {}), (3, {"blur": 0.5, "jitter": 1})])
def test_activation_maximization_raises_the_filter_well_above_random_inputs(layer, kw):
    topo = _cnn()
    model = FeedForwardModel(topo, seed=2)
    images = visualize_filters(model, layer, **kw)
    k = images.shape[0]
    assert images.shape == (k, 2, 8, 8) and k == topo.shapes[layer + 1][-1]
    got = filter_activations(model, images.reshape(k, -1), [layer])[layer][np.arange(k), np.arange(k)]
    rng = np.random.default_rng(0)  # random inputs of the same size (root mean square) as the results
    noise = rng.normal(size=(500, topo.num_inputs)) * np.sqrt(np.mean(images ** 2))
    random = filter_activations(model, noise, [layer])[layer]
    assert np.all(got > random.max(axis=0)), (got, random.max(axis=0))
    assert np.all(got - random.mean(axis=0) > 5 * random.std(axis=0)), (got, random.mean(axis=0), random.std(axis=0))


def test_visualize_chosen_filters_reproducibly_and_flat_inputs():
    model = FeedForwardModel(_cnn(), seed=3)
    two = visualize_filters(model, 3, filters=[5, 1], iterations=20, seed=7)
    assert two.shape == (2, 2, 8, 8)
    np.testing.assert_array_equal(two, visualize_filters(model, 3, filters=[5, 1], iterations=20, seed=7))
    assert not np.array_equal(two, visualize_filters(model, 3, filters=[5, 1], iterations=20, seed=8))
    mlp = FeedForwardModel(FeedForwardTopology.from_spec("affine(5)-relu-affine(2)", 7), seed=0)
    assert visualize_filters(mlp, 0, iterations=5).shape == (5, 7)


@pytest.mark.parametrize("kw, match", [
    ({"layer": 1}, r"layer must be the index of a conv or affine layer .*\[0, 3, 6, 8\]; got 1"),
    ({"layer": 3, "filters": [6]}, r"filters must be filter indices in \[0, 6\) of layer 3.*got \[6\]"),
    ({"layer": 3, "filters": []}, r"filters must be .* got \[\]"),
    ({"layer": 3, "iterations": -1}, "iterations must be an integer >= 0, got -1"),
    ({"layer": 3, "step_size": 0.0}, "step_size must be a finite number > 0, got 0.0"),
    ({"layer": 3, "l2": -1.0}, "l2 must be a finite number >= 0, got -1.0"),
    ({"layer": 3, "blur_every": 0}, "blur_every must be an integer >= 1, got 0"),
])
def test_visualize_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        visualize_filters(FeedForwardModel(_cnn(), seed=0), **kw)


def test_blur_needs_images():
    mlp = FeedForwardModel(FeedForwardTopology.from_spec("affine(5)-relu-affine(2)", 7), seed=0)
    with pytest.raises(ValueError, match=r"blur and jitter need an image input; the model's input shape is \(7,\)"):
        visualize_filters(mlp, 0, blur=1.0)


def test_filter_preferences_is_cads_matrix():
    topo = _cnn()
    model = FeedForwardModel(topo, seed=4, dtype=np.float64)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, topo.num_inputs)), rng.integers(0, 2, size=50)  # class 2: no rows
    pref = filter_preferences(model, x, y, 3)
    out = model.forward(x)[4]  # the ReLU after conv 3
    a = out.reshape(50, -1, 6).mean(axis=1)
    np.testing.assert_allclose(pref[:2], [a[y == 0].mean(axis=0), a[y == 1].mean(axis=0)], rtol=1e-12)
    assert pref.shape == (3, 6) and np.all(np.isnan(pref[2]))
    stats = ActivationStats(topo, [3])
    stats.add(model, x, y)
    np.testing.assert_array_equal(pref, stats.means(3))
    out_pref = filter_preferences(model, x, y, 8)  # the output layer: its logits, no activation after it
    logits = model.predict_raw(x)
    np.testing.assert_allclose(out_pref[0], logits[y == 0].mean(axis=0), rtol=1e-12)
