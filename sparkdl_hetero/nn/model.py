"""FeedForwardModel: one flat weight vector, one flat gradient vector, forward and backward over a topology."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..backends import Backend, get_backend
from ..backends.base import Array
from .layers import Layer, LayerModel
from .topology import FeedForwardTopology


def one_hot(labels: np.ndarray, num_classes: int, dtype: Any = np.float32) -> np.ndarray:
    """Rows of zeros with a one at each label; labels must be integers in [0, num_classes)."""
    labels = np.asarray(labels)
    idx = labels.astype(np.int64)
    if labels.ndim != 1 or np.any(idx != labels) or (idx.size and (idx.min() < 0 or idx.max() >= num_classes)):
        bad = labels[(idx != labels) | (idx < 0) | (idx >= num_classes)] if labels.ndim == 1 else labels
        raise ValueError(f"labels must be integers in [0, {num_classes}); got {bad.ravel()[:5].tolist()}")
    out = np.zeros((idx.size, num_classes), dtype=dtype)
    out[np.arange(idx.size), idx] = 1
    return out


class FeedForwardModel:
    """A topology bound to weights on a backend.

    ``weights`` and ``gradient`` are flat device vectors; every layer model holds views into them, so a
    whole-model update is one vector operation and nothing is copied per layer.

    Inputs: :meth:`forward`, :meth:`predict`, :meth:`predict_raw`, :meth:`loss` and :meth:`compute_gradient` take
    host rows in the user's layout ((batch, features); images flattened as C, H, W). A caller that already holds a
    device batch in the engine's layout (from :meth:`device_batch`) runs it with :meth:`forward_device`.

    State: :attr:`state` is a third flat device vector (:attr:`num_state` elements, empty for most topologies)
    of values that every training forward pass updates and no gradient trains -- batch normalization's running
    mean and variance, which inference uses. It is part of a trained model like the weights: save and restore it
    with :meth:`get_state` / :meth:`set_state`. Data-parallel training keeps replicas identical by averaging it
    at each synchronization (see :meth:`set_state`).
    """

    def __init__(self, topology: FeedForwardTopology, weights: np.ndarray | None = None, *,
                 seed: int | None = None, dtype: Any = np.float32, backend: str | Backend = "numpy",
                 views: tuple[Array, Array] | None = None, state: np.ndarray | None = None) -> None:
        """``views``: caller-owned (weights, gradient) device vectors of ``num_weights`` elements to build the
        model on (e.g. slices of a larger parameter vector); ``weights`` (or the initialization) is copied in.
        ``state``: the non-trained state (:meth:`get_state` of a trained model); None: :meth:`initial_state`."""
        self.topology = topology
        self.dtype = np.dtype(dtype)
        self.backend = get_backend(backend)
        self.rng = np.random.default_rng(seed)
        n = topology.num_weights
        if weights is None:
            weights = self.initial_weights(topology, self.rng)
        weights = np.asarray(weights)
        if weights.shape != (n,):
            raise ValueError(f"weights must be a vector of {n} values for {topology.spec!r}, "
                             f"got shape {weights.shape}")
        be = self.backend
        if views is None:
            self.weights: Array = be.asarray(weights, dtype=self.dtype)
            self.gradient: Array = be.zeros((n,), self.dtype)
        else:
            for name, v in zip(("weight", "gradient"), views, strict=True):
                if tuple(v.shape) != (n,) or np.dtype(v.dtype) != self.dtype:
                    raise ValueError(f"the {name} view must be a vector of {n} {self.dtype} values, "
                                     f"got shape {tuple(v.shape)} {np.dtype(v.dtype)}")
            self.weights, self.gradient = views
            be.copy_into(self.weights, weights.astype(self.dtype, copy=False))
        self.state: Array = be.asarray(self.initial_state(topology), dtype=self.dtype)
        if state is not None:
            self.set_state(state)
        offs, s_offs = topology.offsets, topology.state_offsets
        self.layer_models = [
            layer.create_model(topology.shapes[i], self.weights[offs[i]:offs[i + 1]],
                               self.gradient[offs[i]:offs[i + 1]], be, self.rng, self.state[s_offs[i]:s_offs[i + 1]])
            for i, layer in enumerate(topology.layers[:-1])
        ]
        self._step_models = _step_order(topology.layers[:-1], self.layer_models)
        self.rows_per_pass = rows_per_pass(topology, self.backend, self.dtype)

    @staticmethod
    def initial_weights(topology: FeedForwardTopology, rng: np.random.Generator) -> np.ndarray:
        """Spark's initialization of every layer, concatenated in layer order (float64, host)."""
        parts = [layer.init_weights(topology.shapes[i], rng) for i, layer in enumerate(topology.layers)]
        return np.concatenate(parts) if parts else np.zeros(0)

    @staticmethod
    def initial_state(topology: FeedForwardTopology) -> np.ndarray:
        """Every layer's initial state (running means 0, variances 1), concatenated in layer order (float64,
        host)."""
        parts = [layer.init_state(topology.shapes[i]) for i, layer in enumerate(topology.layers)]
        return np.concatenate([np.zeros(0), *parts])

    # ---- weights ---------------------------------------------------------------------------------------
    @property
    def num_weights(self) -> int:
        return self.topology.num_weights

    # ---- state -----------------------------------------------------------------------------------------
    @property
    def num_state(self) -> int:
        return self.topology.num_state

    def get_state(self) -> np.ndarray:
        """A host copy of the non-trained state vector (model dtype; layer order as the topology's
        ``state_offsets``; empty when no layer has state)."""
        return self.backend.to_host(self.state)

    def set_state(self, state: np.ndarray | Array) -> None:
        """Overwrite the state in place (the layers' views stay valid).

        Data-parallel training: a training step moves each replica's running statistics towards its own batch's
        statistics, a linear update of the state; so after each synchronization set every replica's state to the
        mean of the replicas' :meth:`get_state` vectors (an all-reduce sum divided by the replica count, in the
        same order everywhere): the replicas are then identical, and the running means equal those of one model
        that saw the mean of the replicas' batch means."""
        if tuple(state.shape) != (self.num_state,):
            raise ValueError(f"state must be a vector of {self.num_state} values for {self.topology.spec!r}, got "
                             f"shape {tuple(state.shape)}")
        self.backend.copy_into(self.state, state)

    def get_weights(self) -> np.ndarray:
        return self.backend.to_host(self.weights)

    def set_weights(self, weights: np.ndarray | Array) -> None:
        """Overwrite the weights in place (the layer views stay valid)."""
        if tuple(weights.shape) != (self.num_weights,):
            raise ValueError(f"weights must be a vector of {self.num_weights} values, got shape {weights.shape}")
        self.backend.copy_into(self.weights, weights)

    def zero_grad(self) -> None:
        self.backend.fill(self.gradient, 0.0)

    def get_gradient(self) -> np.ndarray:
        return self.backend.to_host(self.gradient)

    # ---- forward ---------------------------------------------------------------------------------------
    def device_batch(self, x: np.ndarray) -> Array:
        """Host rows in the user's layout -> a device batch in the engine's layout (images NHWC)."""
        x = np.asarray(x)
        shape = self.topology.input_shape
        if x.ndim != 2 or x.shape[1] != self.topology.num_inputs:
            raise ValueError(f"input must be a (batch, {self.topology.num_inputs}) array, got {x.shape}")
        if len(shape) == 3:
            x = x.reshape((x.shape[0],) + shape).transpose(0, 2, 3, 1)
        return self.backend.asarray(np.ascontiguousarray(x, dtype=self.dtype))

    @staticmethod
    def _outputs(batch: Array, training: bool, models: list[LayerModel]) -> Iterator[Array]:
        a = batch
        for lm in models:
            a = lm.forward(a, training)
            yield a

    def forward(self, x: np.ndarray, training: bool = False) -> list[Array]:
        """The output of every layer below the loss layer (index i: output of layer i) for host rows ``x``."""
        return self.forward_device(self.device_batch(x), training)

    def forward_device(self, batch: Array, training: bool = False) -> list[Array]:
        """:meth:`forward` of a device batch already in the engine's layout (see :meth:`device_batch`)."""
        return list(self._outputs(batch, training, self.layer_models))

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        """The last layer's output before the loss layer's function (Spark's rawPrediction)."""
        return self.backend.to_host(self.forward(x)[-1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The loss layer's output: class probabilities for softmax (Spark's ``predict``)."""
        return self.backend.to_host(self.topology.loss_layer.output(self.backend, self.forward(x)[-1]))

    # ---- backward --------------------------------------------------------------------------------------
    def backward(self, delta: Array | None, extra: dict[int, Array] | None = None, *,
                 need_input: bool = False) -> Array | None:
        """Back-propagate ``delta`` (w.r.t. the last output of the latest :meth:`forward` call), accumulating
        into :attr:`gradient`. ``extra`` adds deltas w.r.t. intermediate outputs (layer index -> delta); deltas
        may be modified in place. ``need_input``: return the delta w.r.t. the input (the engine's layout)."""
        extra = extra or {}
        for i in range(len(self.layer_models) - 1, -1, -1):
            if i in extra:
                if delta is None:
                    delta = extra[i]
                else:
                    self.backend.axpy(delta, extra[i], 1.0)
            if delta is not None:
                delta = self.layer_models[i].backward(delta, need_dx=i > 0 or need_input)
        return delta if need_input else None

    def target(self, y: np.ndarray) -> Array:
        """Labels -> device targets: class labels (integers) become one-hot rows, a (batch, classes) array is taken
        as targets; under a regression loss the labels are the targets ((batch,) for one output)."""
        y = np.asarray(y)
        k = self.topology.num_outputs
        if not self.topology.loss_layer.class_labels:
            t = y.reshape(len(y), -1)
        else:
            t = y if y.ndim == 2 else one_hot(y, k, self.dtype)
        if t.shape[1] != k:
            raise ValueError(f"targets must have {k} columns, got {t.shape[1]}")
        return self.backend.asarray(t, dtype=self.dtype)

    def compute_gradient(self, x: np.ndarray, y: np.ndarray, grad_out: np.ndarray | None = None,
                         scale: float = 1.0, sample_weight: np.ndarray | None = None) -> float:
        """Mean loss over the host rows ``x``; adds ``scale`` x its gradient to :attr:`gradient` (device), or, when
        ``grad_out`` (host) is given, to ``grad_out``. Runs in passes of at most :attr:`rows_per_pass` rows, the
        layers in :func:`_step_order`.

        ``sample_weight`` (one value >= 0 per row) multiplies each row's loss and gradient; the mean stays over
        the rows (``sum_i w_i loss_i / len(x)``), so ``scale=len(x)`` accumulates the weighted gradient sum and
        ``len(x) x`` the result is the weighted loss sum -- a caller normalizes by the sum of the weights it
        gathered (Spark's ``weightCol``: the weighted mean). Weights of 1 give the unweighted values."""
        sample_weight = _row_weights(sample_weight, len(x))
        if grad_out is not None:
            self.zero_grad()
        n, step = len(x), self.rows_per_pass or len(x)
        if n <= step:
            loss = self._pass(x, y, scale, sample_weight)
        else:  # each pass adds (its rows / n) of the mean gradient: together, the whole batch's
            loss = 0.0
            for lo in range(0, n, step):
                k = min(step, n - lo)
                w = None if sample_weight is None else sample_weight[lo:lo + k]
                loss += self._pass(x[lo:lo + k], y[lo:lo + k], scale * k / n, w) * k
            loss /= n
        if grad_out is not None:
            grad_out += self.get_gradient()
        return loss

    def loss(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """Mean loss over the host rows ``x`` in inference mode, the model :meth:`predict` evaluates: batch
        normalization with its running statistics, dropout off. Forward only: no gradient is computed, and the
        weights, the state and :attr:`gradient` stay as they are (validation). ``sample_weight``: as in
        :meth:`compute_gradient` (each row's loss times its weight, the mean over the rows)."""
        if len(x) == 0:
            raise ValueError("loss needs at least one row, got none")
        sample_weight = _row_weights(sample_weight, len(x))
        z = deque(self._outputs(self.device_batch(x), False, self._step_models), maxlen=1).pop()
        w = None if sample_weight is None else self.backend.asarray(sample_weight, dtype=self.dtype)
        loss_sum, _ = self.topology.loss_layer.loss(self.backend, z, self.target(y), 0.0, w)
        return float(loss_sum) / len(x)

    def _pass(self, x: np.ndarray, y: np.ndarray, scale: float, sample_weight: np.ndarray | None) -> float:
        models = self._step_models
        z = deque(self._outputs(self.device_batch(x), True, models), maxlen=1).pop()  # only the last is kept
        n = z.shape[0]
        w = None if sample_weight is None else self.backend.asarray(sample_weight, dtype=self.dtype)
        loss_sum, delta = self.topology.loss_layer.loss(self.backend, z, self.target(y), scale / n, w)
        del z
        for k in range(len(models) - 1, -1, -1):
            delta = models[k].backward(delta, need_dx=k > 0)
        return loss_sum / n

    def input_gradient(self, x: np.ndarray, layer: int, direction: np.ndarray | Array) -> np.ndarray:
        """``d <direction, output of layer `layer`> / dx`` for host rows ``x``, in ``x``'s layout: the gradient of
        an inner activation with respect to the input (filter visualization). ``direction`` has the shape of
        ``forward(x)[layer]`` (images in the engine's (batch, h, w, c) layout). Runs in inference mode; the weight
        gradient it accumulates on the way is undone, so :attr:`gradient` is left as it was."""
        if not 0 <= layer < len(self.layer_models):
            raise ValueError(f"layer must be in [0, {len(self.layer_models)}), got {layer}")
        out = self.forward(x)[layer]
        if tuple(direction.shape) != tuple(out.shape):
            raise ValueError(f"direction must have the shape of layer {layer}'s output {tuple(out.shape)}, "
                             f"got {tuple(direction.shape)}")
        if isinstance(direction, np.ndarray):  # a copy: backward may write into its deltas
            direction = self.backend.asarray(np.array(direction, dtype=self.dtype))
        saved = self.get_gradient()
        dx = self.backward(None, {layer: direction}, need_input=True)
        self.backend.copy_into(self.gradient, saved)
        g = self.backend.to_host(dx)
        if g.ndim == 4:  # (batch, h, w, c) -> the user's (batch, c * h * w)
            g = g.transpose(0, 3, 1, 2)
        return g.reshape(len(x), -1)


def _row_weights(sample_weight: np.ndarray | None, rows: int) -> np.ndarray | None:
    """``sample_weight`` as an array of one value per row (None stays None); a ValueError otherwise."""
    if sample_weight is None:
        return None
    sample_weight = np.asarray(sample_weight)
    if sample_weight.shape != (rows,):
        raise ValueError(f"sample_weight must have one value per row ({rows}), got shape {sample_weight.shape}")
    return sample_weight


def rows_per_pass(topology: FeedForwardTopology, backend: Backend, dtype: Any) -> int | None:
    """Rows of a training pass whose activations fit ``backend.cache_bytes``: the largest power of two within it,
    between 32 and 1024 (LeNet-5: 64, Spark's MLP [784, 100, 10]: 1024); None (the whole batch in one pass) when
    the backend takes any batch or a layer couples the rows of a batch (:attr:`Layer.couples_rows`)."""
    if backend.cache_bytes is None or any(layer.couples_rows for layer in topology.layers):
        return None  # (batch statistics are the whole batch's: it runs in one pass)
    shapes = topology.shapes
    per_row = max((layer.work_size(shapes[i]) for i, layer in enumerate(topology.layers[:-1])), default=1)
    rows = backend.cache_bytes // max(1, per_row * np.dtype(dtype).itemsize)
    return min(1024, max(32, 1 << max(0, int(rows).bit_length() - 1)))


def _step_order(layers: list[Layer], models: list[LayerModel]) -> list[LayerModel]:
    """The layer models in the order a training step runs them: a layer followed by one it commutes with
    (:meth:`Layer.commutes_with_next`, e.g. a ReLU and a max-pool) runs after it -- the element-wise layer then
    works on the pool's k*k times smaller output. Same output, same gradient, bit for bit."""
    order = list(models)
    for i in range(len(layers) - 1):
        if layers[i].commutes_with_next(layers[i + 1]):
            order[i], order[i + 1] = order[i + 1], order[i]
    return order
