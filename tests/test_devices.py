"""assign_devices: every row on one device, exactly k classes per device or a Dirichlet split, reproducible,
clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkdl_hetero.data import DeviceAssignment, assign_devices


def _labels(rows_per_class: list[int], seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(rows_per_class)])
    return np.random.default_rng(seed).permutation(y)


def _check_partition(a: DeviceAssignment, y: np.ndarray, num_devices: int) -> None:
    assert a.device.shape == y.shape and np.issubdtype(a.device.dtype, np.integer)
    assert a.device.min() >= 0 and a.device.max() < num_devices
    assert a.num_devices == num_devices
    assert a.counts().sum() == len(y) and a.counts().min() > 0
    for d in range(num_devices):
        assert a.classes[d] == sorted(set(y[a.rows(d)].tolist()))
    assert sorted(np.concatenate([a.rows(d) for d in range(num_devices)]).tolist()) == list(range(len(y)))


def test_poster_split_five_of_ten_classes():
    y = _labels([100] * 10)
    a = assign_devices(y, 20, classes_per_device=5, seed=3)
    _check_partition(a, y, 20)
    assert all(len(c) == 5 for c in a.classes)
    holders = np.bincount(np.concatenate(a.classes), minlength=10)
    np.testing.assert_array_equal(holders, np.full(10, 10))  # 20 * 5 / 10 devices hold each class
    np.testing.assert_array_equal(a.counts(), np.full(20, 50))  # 100 rows of a class over its 10 holders


@settings(max_examples=60, deadline=None)
@given(num_classes=st.integers(1, 8), k=st.integers(1, 8), num_devices=st.integers(1, 12),
       extra=st.lists(st.integers(0, 5), min_size=8, max_size=8), seed=st.integers(0, 2**31))
def test_classes_per_device_properties(num_classes, k, num_devices, extra, seed):
    k = min(k, num_classes)
    num_devices = max(num_devices, -(-num_classes // k))
    holders_max = -(-num_devices * k // num_classes)
    y = _labels([holders_max + e for e in extra[:num_classes]], seed)
    a = assign_devices(y, num_devices, classes_per_device=k, seed=seed)
    _check_partition(a, y, num_devices)
    assert all(len(c) == k for c in a.classes)
    holders = np.bincount(np.concatenate(a.classes), minlength=num_classes)
    assert holders.min() >= 1 and holders.max() - holders.min() <= 1  # all classes, dealt evenly
    for c in range(num_classes):  # a class's rows split as evenly as possible among its holders
        per_holder = [int(np.sum(y[a.rows(d)] == c)) for d in range(num_devices) if c in a.classes[d]]
        assert max(per_holder) - min(per_holder) <= 1
    again = assign_devices(y, num_devices, classes_per_device=k, seed=seed)
    np.testing.assert_array_equal(a.device, again.device)


@settings(max_examples=40, deadline=None)
@given(num_classes=st.integers(2, 6), num_devices=st.integers(1, 8), alpha=st.floats(0.5, 50.0),
       seed=st.integers(0, 2**31))
def test_dirichlet_properties(num_classes, num_devices, alpha, seed):
    # enough rows that a draw leaving a device empty is rare (such draws are redrawn; the errors test has the
    # impossible case)
    y = _labels([100] * num_classes, seed)
    a = assign_devices(y, num_devices, dirichlet_alpha=alpha, seed=seed)
    _check_partition(a, y, num_devices)
    np.testing.assert_array_equal(a.device, assign_devices(y, num_devices, dirichlet_alpha=alpha, seed=seed).device)


def test_dirichlet_alpha_controls_skew_and_seed_matters():
    y = _labels([300] * 10)
    skewed = assign_devices(y, 10, dirichlet_alpha=0.05, seed=1)
    even = assign_devices(y, 10, dirichlet_alpha=1000.0, seed=1)
    assert np.mean([len(c) for c in skewed.classes]) < 5
    assert all(len(c) == 10 for c in even.classes)
    assert not np.array_equal(skewed.device, assign_devices(y, 10, dirichlet_alpha=0.05, seed=2).device)


def test_integer_valued_float_labels_and_gapped_classes():
    y = np.array([3.0, 7.0, 3.0, 7.0, 9.0, 9.0])
    a = assign_devices(y, 3, classes_per_device=1)
    assert sorted(c[0] for c in a.classes) == [3, 7, 9]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_devices": 2}, "exactly one of classes_per_device and dirichlet_alpha"),
    ({"num_devices": 2, "classes_per_device": 2, "dirichlet_alpha": 1.0}, "exactly one of"),
    ({"num_devices": 0, "classes_per_device": 1}, "num_devices must be an integer >= 1, got 0"),
    ({"num_devices": 2.5, "classes_per_device": 1}, "num_devices must be an integer >= 1, got 2.5"),
    ({"num_devices": 2, "classes_per_device": 4}, r"classes_per_device must be an integer in \[1, 3\].*got 4"),
    ({"num_devices": 2, "classes_per_device": 0}, r"classes_per_device .* got 0"),
    ({"num_devices": 2, "classes_per_device": 1}, "2 \\* 1 cannot cover the 3 classes"),
    ({"num_devices": 3, "classes_per_device": 3}, "class 2 has 2 rows but 3 devices hold it"),
    ({"num_devices": 2, "dirichlet_alpha": 0.0}, "dirichlet_alpha must be a number > 0, got 0.0"),
    ({"num_devices": 2, "dirichlet_alpha": -1}, "dirichlet_alpha must be a number > 0, got -1"),
    ({"num_devices": 9, "classes_per_device": 1}, "num_devices=9 devices need at least as many rows, got 8"),
])
def test_bad_requests(kwargs, match):
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=match):
        assign_devices(y, **kwargs)


def test_bad_labels_and_impossible_dirichlet():
    with pytest.raises(ValueError, match=r"labels must be integers, got dtype float64 with values \[0.5"):
        assign_devices(np.array([0.5, 1.0]), 1, classes_per_device=1)
    with pytest.raises(ValueError, match=r"labels must be a non-empty 1-D array, got shape \(0,\)"):
        assign_devices(np.array([], dtype=int), 1, classes_per_device=1)
    with pytest.raises(ValueError, match="Dirichlet draws with dirichlet_alpha=0.001 over 5 devices .* left a device"):
        assign_devices(np.zeros(5, dtype=int), 5, dirichlet_alpha=0.001)
