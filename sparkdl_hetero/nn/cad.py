"""Context-aware decoupling (CAD): per-class filter preferences, critical paths and real sub-models.

A *filter* is an output channel of a :class:`~.layers.Conv2D` layer or an output unit of an :class:`~.layers.Affine`
layer. The *decoupled* layers are those whose filters a device may lose: by default the deeper half of the conv
layers (the shallow ones are the shared feature extractor) and every hidden affine layer; the output affine layer is
context-aware instead and keeps the units of the device's classes. Layers are named by their index in the
topology (``topology.layers[i]``). Nothing here knows Spark: the federated mode ships what these functions build.

The *activation* of a filter on a row is the mean over positions of its output after the element-wise layer that
follows it (a ReLU, ...), or of its own output when none follows: what the next layer sees, so a silent filter
(ReLU-zero everywhere) scores nothing, where a pre-activation mean would rank it by a bias the next layer never
gets. A filter's *preference* for class ``c`` is its mean activation over the rows of ``c``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .layers import Affine, Conv2D, Dropout, Flatten, Functional, Layer, LossLayer, Pool2D
from .model import FeedForwardModel
from .topology import FeedForwardTopology

_PASS_THROUGH = (Functional, Dropout, Pool2D)  # layers that keep the channels (features) of their input


def filter_layers(topology: FeedForwardTopology) -> list[int]:
    """The indices of the layers that have filters: the conv and affine layers."""
    return [i for i, layer in enumerate(topology.layers) if isinstance(layer, (Conv2D, Affine))]


def output_layer(topology: FeedForwardTopology) -> int:
    """The index of the output affine layer: the last layer with weights, which only element-wise layers may
    follow (its units are the classes)."""
    params = filter_layers(topology)
    last = params[-1] if params else -1
    if last < 0 or not isinstance(topology.layers[last], Affine) or not all(
            isinstance(layer, (Functional, Dropout)) for layer in topology.layers[last + 1:-1]):
        raise ValueError(f"CAD needs a topology whose last weighted layer is an affine output layer followed only "
                         f"by element-wise layers, got {topology.spec!r}")
    return last


def default_cad_layers(topology: FeedForwardTopology) -> list[int]:
    """The deeper ``floor(n / 2)`` of the ``n`` conv layers (LeNet-5: the second; a single conv layer stays shared)
    and every hidden affine layer."""
    out = output_layer(topology)
    convs = [i for i in filter_layers(topology) if isinstance(topology.layers[i], Conv2D)]
    hidden = [i for i in filter_layers(topology) if isinstance(topology.layers[i], Affine) and i != out]
    return convs[(len(convs) + 1) // 2:] + hidden


def check_cad_layers(topology: FeedForwardTopology, layers: Iterable[int] | None) -> list[int]:
    """``layers`` as sorted unique layer indices, each a conv or hidden affine layer; None: the default."""
    if layers is None:
        return default_cad_layers(topology)
    out = output_layer(topology)
    checked = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(topology.layers):
            raise ValueError(f"cadLayers: {i!r} is not a layer index of {topology.spec!r} "
                             f"(0 .. {len(topology.layers) - 1})")
        if i == out or not isinstance(topology.layers[i], (Conv2D, Affine)):
            allowed = [j for j in filter_layers(topology) if j != out]
            raise ValueError(f"cadLayers: layer {i} ({topology.layers[i].spec()}) cannot be decoupled; expected "
                             f"one of the conv or hidden affine layers {allowed}")
        checked.add(int(i))
    return sorted(checked)


def num_filters(topology: FeedForwardTopology, layer: int) -> int:
    """The number of filters (output channels or units) of conv or affine layer ``layer``."""
    _filter_layer(topology, layer)
    return topology.shapes[layer + 1][-1]


def activation_output(topology: FeedForwardTopology, layer: int) -> int:
    """The index of the output (in :meth:`FeedForwardModel.forward`'s list) that holds the activations of
    ``layer``'s filters: the element-wise layer right after it, else the layer itself."""
    _filter_layer(topology, layer)
    nxt = layer + 1
    return nxt if nxt < len(topology.layers) - 1 and isinstance(topology.layers[nxt], Functional) else layer


def _filter_layer(topology: FeedForwardTopology, layer: object) -> None:
    if (isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(topology.layers)
            or not isinstance(topology.layers[layer], (Conv2D, Affine))):
        raise ValueError(f"layer must be the index of a conv or affine layer of {topology.spec!r}, one of "
                         f"{filter_layers(topology)}; got {layer!r}")


def filter_activations(model: FeedForwardModel, x: np.ndarray, layers: Sequence[int],
                       batch: int = 256) -> dict[int, np.ndarray]:
    """For each of ``layers``: a (rows, filters) float64 matrix, the activation of every filter on every row of
    ``x`` (inference mode, ``batch`` rows at a time)."""
    outs = {layer: activation_output(model.topology, layer) for layer in layers}
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for lo in range(0, len(x), batch):
        a = model.forward(x[lo:lo + batch])
        for layer, k in outs.items():
            h = model.backend.to_host(a[k]).astype(np.float64)
            parts[layer].append(h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1))
    return {layer: (np.concatenate(p) if p else np.zeros((0, num_filters(model.topology, layer))))
            for layer, p in parts.items()}


@dataclass(frozen=True)
class SubModel:
    """A device's smaller model: ``topology`` keeps only the critical-path filters of the decoupled layers (with
    their incoming and outgoing connections) and, on top, the output units of ``classes``.

    ``index[j]`` is the global parameter index of sub-model parameter ``j`` (so the sub-model's weights are
    ``global_weights[index]``); ``classes[k]`` is the global class of output unit ``k`` (ascending); ``filters[i]``
    the global filters of conv/affine layer ``i`` the sub-model keeps, in its order (all of a layer that is not
    decoupled; :attr:`classes` for the output layer). The sub-model's layer ``i`` is the global layer ``i``,
    narrower."""

    topology: FeedForwardTopology
    index: np.ndarray
    classes: np.ndarray
    filters: dict[int, np.ndarray]

    @property
    def num_weights(self) -> int:
        return self.topology.num_weights

    def weights(self, global_weights: np.ndarray) -> np.ndarray:
        """The sub-model's weight vector out of the global one."""
        return np.asarray(global_weights)[self.index]

    def local_labels(self, labels: np.ndarray) -> np.ndarray:
        """Global class labels -> the sub-model's output indices (int64); every label must be one of
        :attr:`classes`."""
        y = np.asarray(labels)
        pos = np.searchsorted(self.classes, y)
        ok = (pos < len(self.classes)) & (self.classes[np.minimum(pos, len(self.classes) - 1)] == y)
        if not np.all(ok):
            raise ValueError(f"labels {np.unique(y[~ok])[:5].tolist()} are not among the sub-model's classes "
                             f"{self.classes.tolist()}")
        return pos.astype(np.int64)

    def global_labels(self, local: np.ndarray) -> np.ndarray:
        """The sub-model's output indices -> global class labels."""
        return self.classes[np.asarray(local, dtype=np.int64)]


def submodel(topology: FeedForwardTopology, classes: Iterable[int], filters: Mapping[int, Iterable[int]]
             ) -> SubModel:
    """The sub-model of ``topology`` that keeps, in each layer ``i`` of ``filters``, the filters ``filters[i]``
    (a conv or hidden affine layer), and the output units of ``classes``. Channels dropped before a ``flatten``
    drop their flattened features from the affine layer that reads them."""
    out = output_layer(topology)
    k = topology.num_outputs
    cls = _classes(classes, k)
    kept: dict[int, np.ndarray] = {}
    for i in check_cad_layers(topology, filters.keys()):
        f = np.asarray(list(filters[i]))
        n = num_filters(topology, i)
        if f.size == 0 or f.ndim != 1 or not np.issubdtype(f.dtype, np.integer) or f.min() < 0 or f.max() >= n \
                or len(np.unique(f)) != f.size:
            raise ValueError(f"filters[{i}] must be distinct filter indices in [0, {n}) of layer {i} "
                             f"({topology.layers[i].spec()}), at least one; got {f.tolist()}")
        kept[i] = np.sort(f).astype(np.int64)
    kept[out] = cls
    layers: list[Layer] = []
    index: list[np.ndarray] = []
    all_filters: dict[int, np.ndarray] = {}
    alive = np.arange(topology.shapes[0][-1])  # the global channels (features) of the current input, in order
    for i, layer in enumerate(topology.layers):
        shape, off = topology.shapes[i], topology.offsets[i]
        if isinstance(layer, (Conv2D, Affine)):
            n_in, n_out = shape[-1], topology.shapes[i + 1][-1]
            keep = kept.get(i, np.arange(n_out))
            fan = layer.kernel * layer.kernel if isinstance(layer, Conv2D) else 1
            w = np.arange(off, off + fan * n_in * n_out).reshape(fan, n_in, n_out)
            index += [w[:, alive][:, :, keep].ravel(), off + fan * n_in * n_out + keep]
            layers.append(Conv2D(len(keep), layer.kernel, layer.stride, layer.pad) if isinstance(layer, Conv2D)
                          else Affine(len(keep)))
            all_filters[i] = keep
            alive = keep
        elif isinstance(layer, Flatten):
            if len(shape) == 3:  # (h, w, c) flattens as position * c + channel
                alive = (np.arange(shape[0] * shape[1])[:, None] * shape[2] + alive[None, :]).ravel()
            layers.append(layer)
        elif isinstance(layer, (*_PASS_THROUGH, LossLayer)):
            layers.append(layer)
        else:
            raise ValueError(f"layer {i} ({layer.spec()}): CAD does not know how this layer maps channels")
    idx = np.concatenate(index).astype(np.int64) if index else np.zeros(0, dtype=np.int64)
    return SubModel(FeedForwardTopology(layers, topology.input_shape), idx, cls, all_filters)


def _classes(classes: Iterable[int], k: int) -> np.ndarray:
    c = np.asarray(list(classes))
    if c.size == 0 or c.ndim != 1 or not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() >= k \
            or len(np.unique(c)) != c.size:
        raise ValueError(f"classes must be distinct class labels in [0, {k}) of the model, at least one; "
                         f"got {c.tolist()}")
    return np.sort(c).astype(np.int64)


class ActivationStats:
    """Per decoupled layer, per class and filter: the sum of the filter's activations over rows of the class and
    the number of those rows. Devices fill one each (:meth:`add`); the server adds them up (:meth:`merge`)."""

    def __init__(self, topology: FeedForwardTopology, layers: Iterable[int] | None = None) -> None:
        """``layers``: the conv/affine layers to watch (default: :func:`default_cad_layers`)."""
        self.topology = topology
        self.num_classes = topology.num_outputs
        if layers is None:
            layers = default_cad_layers(topology)
        for i in layers:
            _filter_layer(topology, i)
        self.layers: tuple[int, ...] = tuple(sorted({int(i) for i in layers}))
        shape = {i: (self.num_classes, num_filters(topology, i)) for i in self.layers}
        self.sums = {i: np.zeros(shape[i]) for i in self.layers}
        self.counts = {i: np.zeros(shape[i]) for i in self.layers}

    def add(self, model: FeedForwardModel, x: np.ndarray, y: np.ndarray, sub: SubModel | None = None) -> None:
        """Add the activations of ``model`` on rows ``x`` with global class labels ``y``. ``model`` is the global
        topology's, or, with ``sub``, the sub-model's: its rows and filters land at ``sub``'s classes and kept
        filters."""
        y = np.asarray(y)
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)} labels")
        if sub is None:
            rows = _classes_of(y, self.num_classes)
            cls, topology = np.arange(self.num_classes), self.topology
        else:
            rows, cls, topology = sub.local_labels(y), sub.classes, sub.topology
        if model.topology != topology:
            raise ValueError(f"the model's topology {model.topology.spec!r} is not the expected {topology.spec!r}")
        acts = filter_activations(model, x, self.layers)
        one_hot = np.zeros((len(cls), len(y)))
        one_hot[rows, np.arange(len(y))] = 1.0
        per_class = one_hot.sum(axis=1)
        for i in self.layers:
            cols = np.arange(self.sums[i].shape[1]) if sub is None else sub.filters[i]
            at = np.ix_(cls, cols)
            self.sums[i][at] += one_hot @ acts[i]
            self.counts[i][at] += per_class[:, None]

    def merge(self, other: ActivationStats) -> None:
        """Add ``other``'s sums and counts (same topology and layers) into this one."""
        if other.topology != self.topology or other.layers != self.layers:
            raise ValueError(f"cannot merge statistics of layers {other.layers} of {other.topology.spec!r} into "
                             f"layers {self.layers} of {self.topology.spec!r}")
        for i in self.layers:
            self.sums[i] += other.sums[i]
            self.counts[i] += other.counts[i]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The statistics as arrays (``.npz``-able, for checkpoints): ``sums_<layer>`` and ``counts_<layer>``."""
        d = {f"sums_{i}": self.sums[i].copy() for i in self.layers}
        d.update({f"counts_{i}": self.counts[i].copy() for i in self.layers})
        return d

    def load_state_dict(self, d: Mapping[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict` of the same topology and layers."""
        expected = set(self.state_dict())
        if set(d) != expected:
            raise ValueError(f"activation statistics must hold the keys {sorted(expected)}, got {sorted(d)}")
        for i in self.layers:
            for name, target in (("sums", self.sums[i]), ("counts", self.counts[i])):
                a = np.asarray(d[f"{name}_{i}"], dtype=np.float64)
                if a.shape != target.shape:
                    raise ValueError(f"{name}_{i} must have shape {target.shape}, got {a.shape}")
                target[...] = a

    def means(self, layer: int) -> np.ndarray:
        """The (classes, filters) preference matrix of ``layer``: mean activation of each filter over the rows of
        each class; NaN where no row of the class was seen."""
        if layer not in self.sums:
            raise ValueError(f"layer {layer!r} is not watched; watched layers: {list(self.layers)}")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts[layer] > 0, self.sums[layer] / self.counts[layer], np.nan)


#: rows of each class a device measures its activation statistics on: a class's mean activation per filter only
#: ranks filters, and the server adds the statistics over devices and rounds, so a sample ranks them as every row
#: would, for a fraction of a forward pass over the device's data
STATS_ROWS_PER_CLASS = 64


def stats_rows(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``per_class`` rows of each label in ``y``, drawn at random with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(y))
    labels = np.asarray(y)[order]
    keep = np.zeros(len(y), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.sort(order[keep])


def _classes_of(y: np.ndarray, k: int) -> np.ndarray:
    idx = y.astype(np.int64) if y.ndim == 1 and np.issubdtype(y.dtype, np.number) else None
    bad = y if idx is None else y[(idx != y) | (idx < 0) | (idx >= k)]
    if bad.size:
        raise ValueError(f"labels must be integers in [0, {k}) (the model's classes); got {bad.ravel()[:5].tolist()}")
    return idx


def preference_scores(means: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """How much each filter prefers the classes ``classes``: the mean over them of the filter's preference
    z-scored across classes (``(m_cf - mean_c m_cf) / std_c m_cf``), so filters of any scale compare. Classes
    without statistics (NaN) count as average (0), as does every class of a filter that fires alike on all."""
    m = np.asarray(means, dtype=np.float64)
    cls = _classes(classes, m.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        seen = ~np.isnan(m)
        n = seen.sum(axis=0)
        mu = np.where(n > 0, np.nansum(m, axis=0) / np.maximum(n, 1), 0.0)
        sd = np.sqrt(np.where(n > 0, np.nansum((m - mu) ** 2, axis=0) / np.maximum(n, 1), 0.0))
        z = np.where(seen & (sd > 0), (m - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    return z[cls].mean(axis=0)


def critical_paths(stats: ActivationStats, classes: Iterable[int], keep: float) -> dict[int, np.ndarray]:
    """For each layer of ``stats``: the ``keep`` fraction (``max(1, round(keep * filters))``) of filters with the
    highest :func:`preference_scores` for ``classes``, ascending (ties: the lower filter index)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.number)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"cadKeep must be a fraction in (0, 1], got {keep!r}")
    out = {}
    for i in stats.layers:
        score = preference_scores(stats.means(i), classes)
        n = max(1, int(np.floor(keep * score.size + 0.5)))
        out[i] = np.sort(np.argsort(-score, kind="stable")[:n])
    return out


def decouple(stats: ActivationStats, classes: Iterable[int], keep: float) -> SubModel:
    """The sub-model of a device whose classes are ``classes``: the critical paths of ``stats``'s layers kept at
    fraction ``keep``, the output units of ``classes``."""
    return submodel(stats.topology, classes, critical_paths(stats, classes, keep))
