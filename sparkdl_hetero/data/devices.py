"""Split labelled rows over simulated federated devices: a fixed number of classes per device, or Dirichlet."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Dirichlet draws that leave a device without rows are redrawn (as the usual non-IID benchmarks do) this many times
# before the request is called impossible.
_DIRICHLET_DRAWS = 100


@dataclass(frozen=True)
class DeviceAssignment:
    """``device[i]``: the device (0 .. num_devices - 1) of row ``i``; ``classes[d]``: the sorted labels of device
    ``d``'s rows."""

    device: np.ndarray
    classes: list[list[int]]

    @property
    def num_devices(self) -> int:
        return len(self.classes)

    def rows(self, device: int) -> np.ndarray:
        """The indices of ``device``'s rows, ascending."""
        return np.flatnonzero(self.device == device)

    def counts(self) -> np.ndarray:
        """The number of rows of every device."""
        return np.bincount(self.device, minlength=self.num_devices)


def assign_devices(labels: np.ndarray, num_devices: int, classes_per_device: int | None = None,
                   dirichlet_alpha: float | None = None, seed: int = 0) -> DeviceAssignment:
    """A device for every row of integer ``labels``; give exactly one of ``classes_per_device`` and
    ``dirichlet_alpha``.

    ``classes_per_device=k`` (the CAD poster: 5 of 10): every device holds rows of exactly ``k`` classes. The classes
    are dealt device by device, each device taking the ``k`` classes held by the fewest devices so far (ties broken
    at random), so every class is held by ``floor`` or ``ceil(num_devices * k / classes)`` devices and all classes
    are covered; the rows of a class are shuffled and split as evenly as possible among the devices holding it.
    Needs ``k <=`` the number of classes, ``num_devices * k >=`` it, and at least as many rows of each class as
    devices hold it.

    ``dirichlet_alpha=a`` (the usual non-IID benchmark): the rows of each class are split over all devices in
    proportions drawn from Dirichlet(a, ..., a); small ``a`` gives devices few dominant classes. A draw that leaves
    some device without rows is redrawn (a bounded number of times). Same ``seed``, same assignment.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                     and np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
        raise ValueError(f"labels must be integers, got dtype {y.dtype} with values {y[:5].tolist()}")
    y = y.astype(np.int64)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer >= 1, got {num_devices!r}")
    num_devices = int(num_devices)
    if (classes_per_device is None) == (dirichlet_alpha is None):
        raise ValueError(f"give exactly one of classes_per_device and dirichlet_alpha, got "
                         f"classes_per_device={classes_per_device!r}, dirichlet_alpha={dirichlet_alpha!r}")
    if len(y) < num_devices:
        raise ValueError(f"num_devices={num_devices} devices need at least as many rows, got {len(y)}")
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    if classes_per_device is not None:
        device = _by_classes(by_class, classes, num_devices, classes_per_device, rng)
    else:
        device = _by_dirichlet(by_class, len(y), num_devices, dirichlet_alpha, rng)
    held = [sorted(int(c) for c in np.unique(y[device == d])) for d in range(num_devices)]
    return DeviceAssignment(device, held)


def _by_classes(by_class: list[np.ndarray], classes: np.ndarray, num_devices: int, k: object,
                rng: np.random.Generator) -> np.ndarray:
    num_classes = len(classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_classes:
        raise ValueError(f"classes_per_device must be an integer in [1, {num_classes}] (the labels' classes), "
                         f"got {k!r}")
    k = int(k)
    if num_devices * k < num_classes:
        raise ValueError(f"num_devices * classes_per_device = {num_devices} * {k} cannot cover the "
                         f"{num_classes} classes of the labels; every row must belong to a device")
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    load = np.zeros(num_classes, dtype=np.int64)
    for d in range(num_devices):
        order = np.lexsort((rng.random(num_classes), load))  # fewest holders first, random among equals
        for c in order[:k]:
            holders[c].append(d)
        load[order[:k]] += 1
    device = np.empty(sum(len(r) for r in by_class), dtype=np.int64)
    for c, rows in enumerate(by_class):
        if len(rows) < len(holders[c]):
            raise ValueError(f"class {classes[c]} has {len(rows)} rows but {len(holders[c])} devices hold it; "
                             f"use fewer devices or fewer classes_per_device")
        for d, part in zip(holders[c], np.array_split(rng.permutation(rows), len(holders[c])), strict=True):
            device[part] = d
    return device


def _by_dirichlet(by_class: list[np.ndarray], n: int, num_devices: int, alpha: object,
                  rng: np.random.Generator) -> np.ndarray:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) or not 0 < alpha < np.inf:
        raise ValueError(f"dirichlet_alpha must be a number > 0, got {alpha!r}")
    device = np.empty(n, dtype=np.int64)
    for _ in range(_DIRICHLET_DRAWS):
        for rows in by_class:
            share = rng.dirichlet(np.full(num_devices, float(alpha)))
            cuts = np.round(np.cumsum(share)[:-1] * len(rows)).astype(np.int64)
            for d, part in enumerate(np.split(rng.permutation(rows), cuts)):
                device[part] = d
        if np.bincount(device, minlength=num_devices).min() > 0:
            return device
    raise ValueError(f"{_DIRICHLET_DRAWS} Dirichlet draws with dirichlet_alpha={alpha} over {num_devices} devices "
                     f"({n} rows) all left a device without rows; use a larger alpha or fewer devices")
