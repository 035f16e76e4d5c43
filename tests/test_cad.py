"""CAD and FedAvg without Spark: preferences, critical paths, real sub-models (their layout, outputs and sizes),
the server's row-weighted merge, and a device's local training."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sparkdl_hetero.distributed.config import TrainConfig
from sparkdl_hetero.nn import FeedForwardModel, FeedForwardTopology
from sparkdl_hetero.nn.cad import (
    ActivationStats,
    check_cad_layers,
    critical_paths,
    decouple,
    default_cad_layers,
    filter_activations,
    preference_scores,
    submodel,
)
from sparkdl_hetero.nn.federated import RoundAggregator, local_update

LENET = "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-affine(10)"
# a small CNN with 2 input channels and every kind of layer CAD maps channels through
SMALL = ("conv(4,3,pad=1)-relu-maxpool(2)-conv(8,3)-relu-avgpool(2)-flatten-affine(16)-tanh-dropout(0.3)-affine(12)-"
         "relu-affine(6)")


def _small(dropout: bool = True) -> FeedForwardTopology:
    """SMALL; without its dropout where a test compares training steps (their random masks would differ)."""
    return FeedForwardTopology.from_spec(SMALL if dropout else SMALL.replace("-dropout(0.3)", ""), (2, 10, 10))


def _rows(topology, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, topology.num_inputs)), rng.integers(0, topology.num_outputs, size=n)


# ---- which layers, which filters --------------------------------------------------------------------------------
def test_default_layers():
    lenet = FeedForwardTopology.from_spec(LENET, (1, 28, 28))
    assert default_cad_layers(lenet) == [3, 7, 9]  # the second of the two convs, both hidden affines
    three = FeedForwardTopology.from_spec("conv(4,3)-relu-conv(4,3)-relu-conv(4,3)-flatten-affine(3)", (1, 9, 9))
    assert default_cad_layers(three) == [4]
    one = FeedForwardTopology.from_spec("conv(4,3)-relu-flatten-affine(5)-relu-affine(3)", (1, 6, 6))
    assert default_cad_layers(one) == [3]  # a single conv layer stays shared
    assert default_cad_layers(FeedForwardTopology.multilayer_perceptron([5, 4, 3, 2])) == [0, 2]
    assert check_cad_layers(lenet, [7, 3, 7]) == [3, 7]


@pytest.mark.parametrize("layers, match", [
    ([99], r"cadLayers: 99 is not a layer index .* \(0 .. 12\)"),
    ([-1], "cadLayers: -1 is not a layer index"),
    ([11], r"cadLayers: layer 11 \(affine\(10\)\) cannot be decoupled; expected one of .*\[0, 3, 7, 9\]"),
    ([1], r"cadLayers: layer 1 \(relu\) cannot be decoupled"),
])
def test_bad_layers(layers, match):
    with pytest.raises(ValueError, match=match):
        check_cad_layers(FeedForwardTopology.from_spec(LENET, (1, 28, 28)), layers)


def test_topology_without_an_affine_output():
    topo = FeedForwardTopology.from_spec("conv(2,3)-flatten", (1, 3, 3))
    with pytest.raises(ValueError, match="last weighted layer is an affine output layer"):
        default_cad_layers(topo)


# ---- preferences and critical paths -----------------------------------------------------------------------------
def _reference_activations(model, x, layer):
    """Mean over positions of the output after the ReLU/tanh following ``layer``, from ``forward``."""
    out = model.forward(x)[layer + 1]
    return out.reshape(len(x), -1, out.shape[-1]).mean(axis=1)


def test_activation_stats_are_per_class_means_and_merge():
    topo = _small()
    model = FeedForwardModel(topo, seed=1, dtype=np.float64)
    x, y = _rows(topo, 90)
    y[y == 4] = 5  # class 4 never seen
    stats = ActivationStats(topo)
    assert stats.layers == (3, 7, 10)
    stats.add(model, x, y)
    for layer in stats.layers:
        a = _reference_activations(model, x, layer)
        m = stats.means(layer)
        for c in range(6):
            if c == 4:
                assert np.all(np.isnan(m[c]))
            else:
                np.testing.assert_allclose(m[c], a[y == c].mean(axis=0), rtol=1e-12, atol=1e-15)
    halves = ActivationStats(topo)
    other = ActivationStats(topo)
    halves.add(model, x[:40], y[:40])
    other.add(model, x[40:], y[40:])
    halves.merge(other)
    for layer in stats.layers:
        np.testing.assert_allclose(halves.means(layer), stats.means(layer), rtol=1e-12)
        np.testing.assert_array_equal(halves.counts[layer], stats.counts[layer])


def test_activation_stats_checkpoint_round_trip():
    topo = _small()
    model = FeedForwardModel(topo, seed=1, dtype=np.float64)
    x, y = _rows(topo, 30)
    stats = ActivationStats(topo)
    stats.add(model, x, y)
    buf = io.BytesIO()
    np.savez(buf, **stats.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as saved:
        back = ActivationStats(topo)
        back.load_state_dict(dict(saved))
    for layer in stats.layers:
        np.testing.assert_array_equal(back.means(layer), stats.means(layer))
    with pytest.raises(ValueError, match=r"must hold the keys \['counts_10', .*got \['sums_3'\]"):
        back.load_state_dict({"sums_3": stats.sums[3]})
    bad = stats.state_dict()
    bad["sums_3"] = bad["sums_3"][:, :2]
    with pytest.raises(ValueError, match=r"sums_3 must have shape \(6, 8\), got \(6, 2\)"):
        back.load_state_dict(bad)


def test_preference_scores_and_critical_paths():
    means = np.array([[4.0, 0.0, 1.0, 2.0],  # class 0
                      [0.0, 4.0, 1.0, 2.0],  # class 1
                      [0.0, 0.0, 1.0, np.nan]])  # class 2 (filter 3: no statistics)
    z0 = np.array([2 / np.sqrt(2), -1 / np.sqrt(2), 0.0, 0.0])  # filter 0: mean 4/3, std sqrt(32/9)
    np.testing.assert_allclose(preference_scores(means, [0]), z0)
    np.testing.assert_allclose(preference_scores(means, [0, 1]), [0.5 / np.sqrt(2), 0.5 / np.sqrt(2), 0, 0])
    topo = FeedForwardTopology.from_spec("affine(4)-relu-affine(3)", 2)
    stats = ActivationStats(topo)
    stats.sums[0][...] = means
    stats.counts[0][...] = np.where(np.isnan(means), 0, 1)
    stats.sums[0][np.isnan(means)] = 0
    assert critical_paths(stats, [0], 0.5)[0].tolist() == [0, 2]  # scores 1.41, -0.71, 0, 0: ties to the lower
    assert critical_paths(stats, [1], 0.25)[0].tolist() == [1]
    assert critical_paths(stats, [2], 0.1)[0].size == 1  # at least one filter
    assert critical_paths(stats, [2], 1.0)[0].tolist() == [0, 1, 2, 3]
    sub = decouple(stats, [0, 2], 0.5)
    assert sub.filters[0].tolist() == [0, 2] and sub.classes.tolist() == [0, 2]


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, np.nan, True])
def test_bad_keep(keep):
    topo = _small()
    with pytest.raises(ValueError, match=rf"cadKeep must be a fraction in \(0, 1\], got {keep!r}"):
        critical_paths(ActivationStats(topo), [0], keep)


def test_bad_classes_and_labels():
    topo = _small()
    model = FeedForwardModel(topo, seed=0, dtype=np.float64)
    x, y = _rows(topo, 8)
    stats = ActivationStats(topo)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 6\) \(the model's classes\); got \[6\]"):
        stats.add(model, x[:2], np.array([1, 6]))
    with pytest.raises(ValueError, match=r"classes must be distinct class labels in \[0, 6\).*got \[1, 7\]"):
        decouple(stats, [1, 7], 0.5)
    with pytest.raises(ValueError, match=r"classes must be .* got \[\]"):
        decouple(stats, [], 0.5)
    sub = decouple(stats, [1, 3], 0.5)
    with pytest.raises(ValueError, match=r"labels \[0, 5\] are not among the sub-model's classes \[1, 3\]"):
        sub.local_labels(np.array([1, 0, 3, 5]))
    with pytest.raises(ValueError, match=r"filters\[3\] must be distinct filter indices in \[0, 8\).*got \[1, 8\]"):
        submodel(topo, [0], {3: [1, 8]})
    with pytest.raises(ValueError, match=r"filters\[3\] .* got \[2, 2\]"):
        submodel(topo, [0], {3: [2, 2]})
    with pytest.raises(ValueError, match="layer 1 \\(relu\\) cannot be decoupled"):
        submodel(topo, [0], {1: [0]})
    with pytest.raises(ValueError, match="layer must be the index of a conv or affine layer .* got 2"):
        ActivationStats(topo, [2])
    with pytest.raises(ValueError, match="layer 9 is not watched"):
        stats.means(9)


def test_label_maps():
    sub = submodel(_small(), [4, 1, 3], {})
    np.testing.assert_array_equal(sub.classes, [1, 3, 4])
    np.testing.assert_array_equal(sub.local_labels(np.array([3, 1, 4, 4])), [1, 0, 2, 2])
    np.testing.assert_array_equal(sub.global_labels(np.array([1, 0, 2, 2])), [3, 1, 4, 4])


# ---- sub-models ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, shape, filters, classes", [
    (SMALL, (2, 10, 10), {0: [1, 3], 3: [0, 2, 5, 7], 7: [3, 4, 9, 15], 10: [0, 11]}, [1, 4, 5]),
    (SMALL, (2, 10, 10), {3: [6], 10: [2, 3, 4]}, [0]),
    ("affine(7)-sigmoid-affine(5)-relu-affine(4)", 6, {0: [0, 6, 2], 2: [1, 4]}, [3, 0]),
])
def test_submodel_outputs_equal_the_full_model_with_the_dropped_filters_zeroed(spec, shape, filters, classes):
    """Zeroing a dropped filter's weights and its outgoing connections (a dropped sigmoid unit still outputs 0.5)."""
    topo = FeedForwardTopology.from_spec(spec, shape)
    w = FeedForwardModel.initial_weights(topo, np.random.default_rng(2))
    sub = submodel(topo, classes, filters)
    assert sub.index.size == sub.num_weights == sub.topology.num_weights
    full = np.zeros_like(w)  # every parameter the sub-model does not hold is zero
    full[sub.index] = w[sub.index]
    x, _ = _rows(topo, 7, seed=3)
    expected = FeedForwardModel(topo, full, dtype=np.float64).predict_raw(x)[:, sub.classes]
    got = FeedForwardModel(sub.topology, sub.weights(w), dtype=np.float64).predict_raw(x)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)
    assert np.abs(got).max() > 1e-3
    for layer, f in filters.items():  # the kept filters' activations are the full model's
        a_sub = filter_activations(FeedForwardModel(sub.topology, sub.weights(w), dtype=np.float64), x, [layer])
        a_full = filter_activations(FeedForwardModel(topo, full, dtype=np.float64), x, [layer])
        np.testing.assert_allclose(a_sub[layer], a_full[layer][:, np.sort(f)], rtol=1e-12, atol=1e-13)


def test_submodel_with_everything_is_the_model():
    topo = _small()
    sub = submodel(topo, range(6), {})
    assert sub.topology == topo
    np.testing.assert_array_equal(sub.index, np.arange(topo.num_weights))


def test_extract_and_merge_back_unchanged_is_exact():
    topo = FeedForwardTopology.from_spec(LENET, (1, 28, 28))
    model = FeedForwardModel(topo, seed=4, dtype=np.float64)
    x, y = _rows(topo, 60)
    stats = ActivationStats(topo)
    stats.add(model, x, y)
    for dtype in (np.float64, np.float32):
        w = (model.get_weights() * np.pi).astype(dtype)  # mantissas that a sloppy mean would round
        agg = RoundAggregator(w)
        for classes, keep, rows in (([0, 1, 2, 3, 4], 0.5, 3), ([5, 9], 0.3, 7), ([2, 5], 0.7, 11)):
            sub = decouple(stats, classes, keep)
            agg.add(sub.weights(w), rows, sub.index)
        merged = agg.result()
        assert merged.dtype == dtype
        np.testing.assert_array_equal(merged, w)
        assert 0 < agg.held.sum() < w.size and agg.devices == 3 and agg.rows == 21


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75, 1.0])
def test_submodel_sizes_follow_keep(keep):
    topo = FeedForwardTopology.from_spec(LENET, (1, 28, 28))
    model = FeedForwardModel(topo, seed=0, dtype=np.float64)
    x, y = _rows(topo, 40)
    stats = ActivationStats(topo)
    stats.add(model, x, y)
    sub = decouple(stats, [0, 2, 4, 6, 8], keep)
    n3, n7, n9 = (int(np.floor(keep * f + 0.5)) for f in (16, 120, 84))
    assert [len(sub.filters[i]) for i in (0, 3, 7, 9, 11)] == [6, n3, n7, n9, 5]
    per_layer = [(25 * 1 + 1) * 6, (25 * 6 + 1) * n3, (25 * n3 + 1) * n7, (n7 + 1) * n9, (n9 + 1) * 5]
    assert sub.num_weights == sum(per_layer)
    full = [156, (25 * 6 + 1) * 16, (400 + 1) * 120, (120 + 1) * 84, (84 + 1) * 10]
    assert per_layer[1] / full[1] == pytest.approx(keep, abs=0.5 / 16)  # a conv whose inputs stay: ~ keep
    decoupled = sum(per_layer[1:4]) / sum(full[1:4])
    assert keep ** 2 - 0.05 <= decoupled <= keep + 0.05  # inputs and outputs both shrink: between keep^2 and keep
    assert sub.weights(model.get_weights()).astype(np.float32).nbytes == 4 * sum(per_layer)


# ---- the server's merge ---------------------------------------------------------------------------------------------
def test_weighted_mean_by_hand():
    agg = RoundAggregator(np.array([0.0, 0.0, 0.0, 0.0, 9.0]))
    agg.add(np.array([1.0, 2.0, 3.0]), 1, np.array([0, 1, 2]))
    agg.add(np.array([4.0, 5.0, 6.0]), 3, np.array([1, 2, 3]))
    np.testing.assert_allclose(agg.result(), [1.0, (2 + 3 * 4) / 4, (3 + 3 * 5) / 4, 6.0, 9.0], rtol=1e-15)
    fedavg = RoundAggregator(np.zeros(2))
    fedavg.add(np.array([1.0, 10.0]), 2)
    fedavg.add(np.array([4.0, -2.0]), 6)
    np.testing.assert_allclose(fedavg.result(), [(2 + 24) / 8, (20 - 12) / 8], rtol=1e-15)


def test_merging_partial_aggregators_equals_one():
    rng = np.random.default_rng(5)
    g = rng.normal(size=50)
    parts = [(rng.normal(size=20), int(rng.integers(1, 9)), rng.permutation(50)[:20]) for _ in range(6)]
    one, left, right = RoundAggregator(g), RoundAggregator(g), RoundAggregator(g)
    for i, (w, n, idx) in enumerate(parts):
        one.add(w, n, idx)
        (left if i % 2 else right).add(w, n, idx)
    left.merge(right)
    np.testing.assert_allclose(left.result(), one.result(), rtol=1e-13)
    assert (left.devices, left.rows) == (one.devices, one.rows)


def test_bad_device_results():
    agg = RoundAggregator(np.zeros(4))
    with pytest.raises(ValueError, match="rows must be an integer >= 1, got 0"):
        agg.add(np.zeros(4), 0)
    with pytest.raises(ValueError, match=r"weights must be a vector of 4 values, got shape \(3,\)"):
        agg.add(np.zeros(3), 1)
    with pytest.raises(ValueError, match=r"distinct parameter indices in \[0, 4\)"):
        agg.add(np.zeros(2), 1, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"distinct parameter indices in \[0, 4\)"):
        agg.add(np.zeros(2), 1, np.array([1, 4]))
    with pytest.raises(ValueError, match="the same length"):
        agg.add(np.zeros(2), 1, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="hold 1 non-finite values"):
        agg.add(np.array([0.0, np.nan, 0.0, 0.0]), 1)
    with pytest.raises(ValueError, match="cannot merge an aggregator of 5 weights into one of 4"):
        agg.merge(RoundAggregator(np.zeros(5)))
    assert agg.devices == 0 and not agg.held.any()


# ---- a device's local training ----------------------------------------------------------------------------------
def _config(**kw):
    return TrainConfig(**{"solver": "sgd", "stepSize": 0.1, "dtype": "float64", **kw})


def test_fedavg_one_device_one_full_batch_is_one_gd_step():
    topo = _small(dropout=False)
    x, y = _rows(topo, 24)
    model = FeedForwardModel(topo, seed=6, dtype=np.float64)
    w = model.get_weights()
    model.zero_grad()
    model.compute_gradient(x, y)
    step = w - 0.1 * model.get_gradient()
    res = local_update(topo, w, x, y, _config(batchSize=len(x)), 1)
    assert res.rows == 24 and res.seconds > 0 and len(res.history) == 1
    agg = RoundAggregator(w)
    agg.add(res.weights, res.rows)
    np.testing.assert_allclose(agg.result(), step, rtol=1e-12, atol=1e-15)


def test_cad_round_trains_only_the_held_parameters():
    topo = _small(dropout=False)
    model = FeedForwardModel(topo, seed=7, dtype=np.float64)
    w = model.get_weights()
    x, y = _rows(topo, 40)
    stats = ActivationStats(topo)
    stats.add(model, x, y)
    sub = decouple(stats, [1, 4], 0.5)
    mine = np.isin(y, sub.classes)
    res = local_update(sub.topology, sub.weights(w), x[mine], sub.local_labels(y[mine]), _config(batchSize=64), 1)
    sub_model = FeedForwardModel(sub.topology, sub.weights(w), dtype=np.float64)
    sub_model.compute_gradient(x[mine], sub.local_labels(y[mine]))
    agg = RoundAggregator(w)
    agg.add(res.weights, res.rows, sub.index)
    merged = agg.result()
    np.testing.assert_allclose(merged[sub.index], sub.weights(w) - 0.1 * sub_model.get_gradient(), rtol=1e-12,
                               atol=1e-15)
    others = np.setdiff1d(np.arange(w.size), sub.index)
    np.testing.assert_array_equal(merged[others], w[others])
    # the device's activations of its kept filters land in the server's statistics at its classes and filters
    back = ActivationStats(topo)
    back.add(FeedForwardModel(sub.topology, sub.weights(w), dtype=np.float64), x[mine], y[mine], sub=sub)
    at = np.ix_(sub.classes, sub.filters[3])  # layer 3's inputs are all kept: the full model's activations
    np.testing.assert_allclose(back.means(3)[at], stats.means(3)[at], rtol=1e-12)
    held = np.zeros_like(back.counts[3], dtype=bool)
    held[at] = True
    assert np.all(back.counts[3][~held] == 0) and np.all(back.counts[3][held] > 0)


@pytest.mark.parametrize("solver", ["sgd", "momentum", "adam"])
def test_local_update_starts_a_fresh_optimizer_each_time(solver):
    topo = FeedForwardTopology.from_spec("affine(5)-relu-affine(3)", 4)
    x, y = _rows(topo, 30)
    model = FeedForwardModel(topo, seed=8, dtype=np.float64)
    w = model.get_weights()
    cfg = _config(solver=solver, stepSize=0.01, batchSize=8)
    first = local_update(model, w, x, y, cfg, 2)
    second = local_update(model, w, x, y, cfg, 2)  # the same model again: no optimizer state carried over
    np.testing.assert_array_equal(first.weights, second.weights)
    assert not np.allclose(first.weights, w) and len(first.history) == 2


def test_bad_local_updates():
    topo = FeedForwardTopology.from_spec("affine(3)", 2)
    w = np.zeros(topo.num_weights)
    with pytest.raises(ValueError, match="localEpochs must be an integer >= 1, got 0"):
        local_update(topo, w, np.zeros((2, 2)), np.zeros(2, dtype=int), _config(), 0)
    with pytest.raises(ValueError, match="a device needs at least one training row"):
        local_update(topo, w, np.zeros((0, 2)), np.zeros(0, dtype=int), _config(), 1)
    with pytest.raises(ValueError, match="solver 'l-bfgs' has no step updater"):
        local_update(topo, w, np.zeros((2, 2)), np.zeros(2, dtype=int), _config(solver="l-bfgs"), 1)


def test_stats_rows_samples_at_most_per_class_rows_of_every_label() -> None:
    from sparkdl_hetero.nn.cad import stats_rows

    y = np.r_[np.zeros(200), np.ones(30), np.full(70, 7)].astype(np.int64)
    np.random.default_rng(3).shuffle(y)
    rows = stats_rows(y, 64, seed=5)
    assert np.all(np.diff(rows) > 0)  # sorted, no repeats
    counts = {int(c): int(n) for c, n in zip(*np.unique(y[rows], return_counts=True), strict=True)}
    assert counts == {0: 64, 1: 30, 7: 64}  # a class with fewer rows gives all of them
    np.testing.assert_array_equal(rows, stats_rows(y, 64, seed=5))
    assert not np.array_equal(rows, stats_rows(y, 64, seed=6))
    np.testing.assert_array_equal(stats_rows(y, 1000, seed=5), np.arange(len(y)))
