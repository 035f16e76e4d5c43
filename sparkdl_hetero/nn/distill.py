"""Mentor-guided training: a mentee learns from labels, a frozen mentor's soft targets and intermediate-layer hints.

Loss per sample, averaged over the batch (so it decomposes over partitions like the plain loss)::

    a * L(labels)  +  (1 - a) * T^2 * KL(softmax(mentor / T) || softmax(mentee / T))
                   +  sum_k w_k * RMSE(adapter_k(mentee layer i_k), mentor layer j_k)

``L`` is the mentee's own loss layer (cross-entropy for softmax); ``mentor`` / ``mentee`` are the last layers'
outputs before the loss layer (Spark's rawPrediction); RMSE is per sample, over the layer's features (image
outputs flattened in the engine's (h, w, c) order). When a hint pair's widths differ, a trainable adapter
(FitNets' regressor) maps the mentee layer to the mentor's width: an affine layer for flat outputs, a 1x1
convolution for images of the same height and width. Adapter weights follow the mentee's in the one flat
parameter vector the trainers optimize; :meth:`DistillationObjective.model_weights` drops them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends import Backend, get_backend
from ..backends.base import Array
from .config import ConfigError
from .layers import Affine, Conv2D, Layer, LayerModel, Shape
from .model import FeedForwardModel
from .objective import Objective
from .topology import FeedForwardTopology


def _user(shape: Shape) -> tuple[int, ...]:
    """An internal (h, w, c) shape in the user's (c, h, w) order."""
    return shape if len(shape) == 1 else (shape[2], shape[0], shape[1])


def _adapter(k: int, i: int, j: int, src: Shape, dst: Shape) -> Layer | None:
    """The layer mapping mentee output shape ``src`` to mentor output shape ``dst`` (None when they match)."""
    if src == dst:
        return None
    if len(src) == 3 and len(dst) == 3:
        if src[:2] != dst[:2]:
            raise ValueError(f"hint pair {k} ({i}, {j}): mentee layer {i} outputs an image of shape {_user(src)} "
                             f"and mentor layer {j} one of shape {_user(dst)}; image hints need the same height "
                             f"and width (pick layers after 'flatten' to compare flat vectors)")
        return Conv2D(dst[2], 1)
    d_src, d_dst = math.prod(src), math.prod(dst)
    return None if d_src == d_dst else Affine(d_dst)


class DistillationObjective(Objective):
    """Train ``topology`` (the mentee) guided by a frozen mentor (``mentor_topology`` + ``mentor_weights``).

    ``hint_layers``: pairs ``(i, j)`` of layer indices (as in :meth:`FeedForwardModel.forward`'s output list:
    0 .. number of layers below the loss layer - 1) of the mentee and the mentor; ``hint_weights``: one
    weight per pair (default 1.0 each).
    """

    def __init__(self, topology: FeedForwardTopology, mentor_topology: FeedForwardTopology,
                 mentor_weights: np.ndarray, *, alpha: float = 1.0, temperature: float = 1.0,
                 hint_layers: Sequence[Sequence[int]] = (), hint_weights: Sequence[float] | None = None) -> None:
        super().__init__(topology)
        if mentor_topology.num_inputs != topology.num_inputs:
            raise ValueError(f"the mentor takes {mentor_topology.num_inputs} input features "
                             f"(input shape {mentor_topology.input_shape}) but the mentee "
                             f"{topology.num_inputs} (input shape {topology.input_shape})")
        if mentor_topology.num_outputs != topology.num_outputs:
            raise ValueError(f"the mentor predicts {mentor_topology.num_outputs} classes but the mentee "
                             f"{topology.num_outputs}")
        mentor_weights = np.array(mentor_weights, copy=True)
        if mentor_weights.shape != (mentor_topology.num_weights,):
            raise ValueError(f"mentor weights must be a vector of {mentor_topology.num_weights} values for "
                             f"{mentor_topology.spec!r}, got shape {mentor_weights.shape}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError("alpha", "in [0, 1]", alpha)
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ConfigError("temperature", "a finite number > 0", temperature)
        pairs = [tuple(p) if isinstance(p, (Sequence, np.ndarray)) else (p,) for p in hint_layers]
        weights = [1.0] * len(pairs) if hint_weights is None else [float(w) for w in hint_weights]
        if len(weights) != len(pairs):
            raise ConfigError("hint_weights", f"one weight per hint pair ({len(pairs)} pairs {pairs})", weights)
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError("hint_weights", "finite and >= 0", weights)
        n_mentee, n_mentor = len(topology.layers) - 1, len(mentor_topology.layers) - 1
        self.adapters: list[tuple[int, Layer, Shape, int]] = []  # (hint index, layer, input shape, offset)
        offset = topology.num_weights
        for k, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
                raise ValueError(f"hint pair {k} must be two layer indices (mentee, mentor), got {pair}")
            i, j = int(pair[0]), int(pair[1])
            if not 0 <= i < n_mentee:
                raise ValueError(f"hint pair {k}: mentee layer index {i} is out of range [0, {n_mentee}) "
                                 f"for {topology.spec!r}")
            if not 0 <= j < n_mentor:
                raise ValueError(f"hint pair {k}: mentor layer index {j} is out of range [0, {n_mentor}) "
                                 f"for {mentor_topology.spec!r}")
            src = topology.shapes[i + 1]
            layer = _adapter(k, i, j, src, mentor_topology.shapes[j + 1])
            if layer is not None:
                in_shape = src if isinstance(layer, Conv2D) else (math.prod(src),)
                self.adapters.append((k, layer, in_shape, offset))
                offset += layer.weight_size(in_shape)
            pairs[k] = (i, j)
        self.mentor_topology = mentor_topology
        self.mentor_weights = mentor_weights
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.hint_layers: list[tuple[int, int]] = pairs
        self.hint_weights = weights
        self._num_weights = offset

    @property
    def num_weights(self) -> int:
        """Mentee weights followed by every adapter's weights."""
        return self._num_weights

    def initial_weights(self, seed: int | None) -> np.ndarray:
        """The mentee's initialization (identical to plain training's for the same seed), then the adapters'."""
        rng = np.random.default_rng(seed)
        parts = [FeedForwardModel.initial_weights(self.topology, rng)]
        parts += [layer.init_weights(in_shape, rng) for _, layer, in_shape, _ in self.adapters]
        return np.concatenate(parts)

    def replica(self, backend: str | Backend = "numpy", dtype: Any = np.float32,
                seed: int | None = None) -> DistillationReplica:
        return DistillationReplica(self, backend, dtype, seed)

    def model_weights(self, weights: np.ndarray) -> np.ndarray:
        """The mentee's weights (the adapters are training aids and are dropped)."""
        return weights[:self.topology.num_weights]


class DistillationReplica:
    """Mentee + adapters over one flat parameter vector, and the frozen mentor, on one backend."""

    def __init__(self, objective: DistillationObjective, backend: str | Backend, dtype: Any,
                 seed: int | None) -> None:
        be = get_backend(backend)
        self.objective, self.backend, self.dtype = objective, be, np.dtype(dtype)
        self.topology = objective.topology  # the mentee's: what the labels and predictions are for
        self.num_weights = objective.num_weights
        n_mentee = objective.topology.num_weights
        self.weights: Array = be.zeros((self.num_weights,), self.dtype)
        self.gradient: Array = be.zeros((self.num_weights,), self.dtype)
        self.mentee = FeedForwardModel(objective.topology, np.zeros(n_mentee), seed=seed, dtype=dtype, backend=be,
                                       views=(self.weights[:n_mentee], self.gradient[:n_mentee]))
        self.mentor = FeedForwardModel(objective.mentor_topology, objective.mentor_weights, dtype=dtype,
                                       backend=be)
        self.adapters: dict[int, tuple[LayerModel, Shape]] = {}  # hint index -> (adapter, its input shape)
        for k, layer, in_shape, o in objective.adapters:
            size = layer.weight_size(in_shape)
            self.adapters[k] = (layer.create_model(in_shape, self.weights[o:o + size], self.gradient[o:o + size],
                                                   be, self.mentee.rng), in_shape)

    def set_weights(self, weights: np.ndarray | Array) -> None:
        if tuple(weights.shape) != (self.num_weights,):
            raise ValueError(f"weights must be a vector of {self.num_weights} values (mentee + adapters), "
                             f"got shape {tuple(weights.shape)}")
        self.backend.copy_into(self.weights, weights)

    def get_weights(self) -> np.ndarray:
        return self.backend.to_host(self.weights)

    def zero_grad(self) -> None:
        self.backend.fill(self.gradient, 0.0)

    def get_gradient(self) -> np.ndarray:
        return self.backend.to_host(self.gradient)

    def predict(self, x: np.ndarray | Array) -> np.ndarray:
        """The mentee's class probabilities (what the trained model will predict)."""
        return self.mentee.predict(x)

    def loss(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
        """The mentee's mean loss on the labels in inference mode (:meth:`FeedForwardModel.loss`): validation
        measures the model the fit returns, as the federated mode's does, not the distillation objective."""
        return self.mentee.loss(x, y, sample_weight)

    def _mentor_outputs(self, x: np.ndarray | Array, on_device: bool) -> list[Array]:
        """The mentor's layer outputs for the batch the mentee got: host rows serve both models; a device batch
        (in the mentee's layout) is re-laid out through the host if the mentor's input shape differs."""
        if not on_device:
            return self.mentor.forward(x, training=False)
        if self.mentor.topology.input_shape == self.mentee.topology.input_shape:
            return self.mentor.forward_device(x, training=False)
        host = self.backend.to_host(x)
        if host.ndim == 4:  # NHWC -> the user's C, H, W rows
            host = host.transpose(0, 3, 1, 2)
        return self.mentor.forward(host.reshape(host.shape[0], -1), training=False)

    def compute_gradient(self, x: np.ndarray | Array, y: np.ndarray, grad_out: np.ndarray | None = None,
                         scale: float = 1.0, *, on_device: bool = False) -> float:
        """Mean combined loss over the batch; adds ``scale`` x its gradient (w.r.t. mentee and adapter weights)
        to :attr:`gradient`, or, when ``grad_out`` (host) is given, to ``grad_out``. The mentor is not updated.
        ``x``: host rows in the user's layout, or with ``on_device`` a device batch in the mentee's engine layout
        (:meth:`FeedForwardModel.device_batch`)."""
        obj, be = self.objective, self.backend
        if grad_out is not None:
            self.zero_grad()
        outs = (self.mentee.forward_device if on_device else self.mentee.forward)(x, training=True)
        z = outs[-1]
        n = z.shape[0]
        loss, delta = 0.0, None
        if obj.alpha > 0:
            label_loss, delta = obj.topology.loss_layer.loss(be, z, self.mentee.target(y), obj.alpha * scale / n)
            loss = obj.alpha * label_loss
        extra: dict[int, Array] = {}
        if obj.alpha < 1 or obj.hint_layers:
            mouts = self._mentor_outputs(x, on_device)
            if obj.alpha < 1:
                kl, d_kl = self._soft_target_term(z, mouts[-1], (1 - obj.alpha) * scale / n)
                loss += (1 - obj.alpha) * kl
                if delta is None:
                    delta = d_kl
                else:
                    be.axpy(delta, d_kl, 1.0)
            for k, (i, j) in enumerate(obj.hint_layers):
                w = obj.hint_weights[k]
                if w == 0:
                    continue
                r, d_h = self._hint_term(k, outs[i], mouts[j], w * scale / n)
                loss += w * r
                if i in extra:
                    be.axpy(extra[i], d_h, 1.0)
                else:
                    extra[i] = d_h
        self.mentee.backward(delta, extra)
        if grad_out is not None:
            grad_out += self.get_gradient()
        return loss / n

    def _soft_target_term(self, z: Array, z_mentor: Array, scale: float) -> tuple[float, Array]:
        """``(T^2 * sum over rows of KL(softmax(z_mentor/T) || softmax(z/T)), scale * its gradient w.r.t. z)``."""
        be, t = self.backend, self.objective.temperature
        zt, mt = be.zeros(tuple(z.shape), self.dtype), be.zeros(tuple(z_mentor.shape), self.dtype)
        be.axpy(zt, z, 1.0 / t)
        be.axpy(mt, z_mentor, 1.0 / t)
        soft = be.softmax(mt)
        # KL = cross-entropy(soft, softmax(z/T)) - entropy(soft); d/dz of T^2 * KL = T * (softmax(z/T) - soft)
        xent, delta = be.softmax_xent(zt, soft, scale * t)
        entropy, _ = be.softmax_xent(mt, soft, 0.0)
        return t * t * (xent - entropy), delta

    def _hint_term(self, k: int, h: Array, g: Array, scale: float) -> tuple[float, Array]:
        """``(sum over rows of RMSE(adapter(h), g), scale * its gradient w.r.t. h)`` (h's shape)."""
        n = h.shape[0]
        adapter, in_shape = self.adapters.get(k, (None, ()))
        a = h if adapter is None else adapter.forward(h.reshape((n,) + in_shape), True)
        r, d = self.backend.row_rmse(a.reshape(n, -1), g.reshape(n, -1), scale)
        if adapter is not None:
            d = adapter.backward(d.reshape(tuple(a.shape)), need_dx=True)
        return r, d.reshape(tuple(h.shape))
