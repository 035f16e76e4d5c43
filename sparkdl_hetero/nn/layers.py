"""Layers (configuration) and layer models (computation over views of one flat weight vector).

As in Spark ML's ``ml.ann``: a :class:`Layer` is stateless configuration -- how many weights it needs, its
output shape, how its weights are initialized; :meth:`Layer.create_model` binds it to *views* of the model's
flat weight and gradient vectors and returns a :class:`LayerModel` that runs forward and backward through
a :class:`~sparkdl_hetero.backends.Backend`. Shapes exclude the batch axis; images are ``(h, w, c)``.

Besides weights, a layer may hold *state*: values a training forward pass updates that are not trained by the
gradient (batch normalization's running mean and variance). Like weights, every layer's state is a view of one flat
vector of the model (:meth:`Layer.state_size` elements, initialized by :meth:`Layer.init_state`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..backends.activations import DEFAULT_ALPHA, NAMES, activation
from ..backends.base import Array, Backend, pool_out

Shape = tuple[int, ...]


class SpecError(ValueError):
    """A layer or topology specification that cannot be built."""


class LayerModel(ABC):
    """A layer bound to its weight and gradient views; caches what backward needs from forward.

    A cache lives from :meth:`forward` to the :meth:`backward` that consumes it: forward drops the previous one
    before computing and backward drops it once used, so a step's large buffers (a convolution's columns: MBs)
    are freed for the next allocations instead of staying alive beside their successors -- a smaller memory
    footprint per step, which two workers sharing one cache feel. One backward per forward."""

    @abstractmethod
    def forward(self, x: Array, training: bool) -> Array:
        """The layer's output for a batch ``x``."""

    @abstractmethod
    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        """Accumulate this layer's weight gradient for output delta ``dy``; return the input delta."""


class Layer(ABC):
    """Configuration of one layer."""

    def weight_size(self, in_shape: Shape) -> int:
        return 0

    @abstractmethod
    def out_shape(self, in_shape: Shape) -> Shape:
        """Output shape for ``in_shape``; raises :class:`SpecError` when the input does not fit."""

    def init_weights(self, in_shape: Shape, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(0)

    def state_size(self, in_shape: Shape) -> int:
        """Elements of non-trained state (see the module docstring); 0 for most layers."""
        return 0

    def init_state(self, in_shape: Shape) -> np.ndarray:
        """The state of a new model (float64, host)."""
        return np.zeros(self.state_size(in_shape))

    @property
    def couples_rows(self) -> bool:
        """Whether a training forward pass mixes the rows of a batch (batch statistics): the engine then runs
        each training batch in one pass instead of splitting it."""
        return False

    def work_size(self, in_shape: Shape) -> int:
        """Elements per sample this layer's forward + backward holds at once (its input and output)."""
        return math.prod(in_shape) + math.prod(self.out_shape(in_shape))

    @abstractmethod
    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        """Bind to the views ``weights`` and ``grad`` (each of :meth:`weight_size` elements) and ``state``
        (:meth:`state_size` elements; None: a new vector holding :meth:`init_state`); ``rng`` serves layers that
        draw random numbers while training."""

    @abstractmethod
    def spec(self) -> str:
        """The layer in spec-string form (``affine(10)``, ``conv(6,5,stride=1,pad=2)``...)."""

    def commutes_with_next(self, next_layer: Layer) -> bool:
        """Whether running ``next_layer`` before this layer gives the same output and the same gradients, bit for
        bit (then a training step may run them in the cheaper order). False unless a layer knows better."""
        return False

    @property
    def selects_maxima(self) -> bool:
        """Whether each output is the maximum of a window of inputs, its gradient routed to the window's first
        maximal position (max-pooling)."""
        return False


def _spark_uniform(size: int, fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """Spark's initialization: uniform in [-2.4/sqrt(fan_in), 2.4/sqrt(fan_in)]."""
    return (rng.random(size) * 4.8 - 2.4) / math.sqrt(fan_in)


def _shown(shape: Shape) -> Shape:
    """A shape as users write it: images as (c, h, w)."""
    return (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape


def _flat_size(layer: Layer, in_shape: Shape) -> int:
    if len(in_shape) != 1:
        raise SpecError(f"{layer.spec()} needs a flat input but gets shape {_shown(in_shape)}; add 'flatten' "
                        "before it")
    return in_shape[0]


# ---- affine -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Affine(Layer):
    """``y = W x + b``; in the flat vector W (num_out x num_in) is column-major, then b -- Spark's layout."""

    num_out: int

    def __post_init__(self) -> None:
        if self.num_out < 1:
            raise SpecError(f"affine({self.num_out}): the output size must be >= 1")

    def weight_size(self, in_shape: Shape) -> int:
        return (_flat_size(self, in_shape) + 1) * self.num_out

    def out_shape(self, in_shape: Shape) -> Shape:
        _flat_size(self, in_shape)
        return (self.num_out,)

    def init_weights(self, in_shape: Shape, rng: np.random.Generator) -> np.ndarray:
        return _spark_uniform(self.weight_size(in_shape), in_shape[0], rng)

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        n_in = in_shape[0]
        k = n_in * self.num_out
        # column-major (num_out x num_in) read row-major is W transposed: (num_in x num_out)
        return _AffineModel(backend, weights[:k].reshape(n_in, self.num_out), weights[k:],
                            grad[:k].reshape(n_in, self.num_out), grad[k:])

    def spec(self) -> str:
        return f"affine({self.num_out})"


class _AffineModel(LayerModel):
    def __init__(self, be: Backend, wt: Array, b: Array, gwt: Array, gb: Array) -> None:
        self.be, self.wt, self.b, self.gwt, self.gb = be, wt, b, gwt, gb
        self.x: Array = None

    def forward(self, x: Array, training: bool) -> Array:
        self.x = x
        y = self.be.gemm(x, self.wt)
        self.be.add_row(y, self.b)
        return y

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        x, self.x = self.x, None
        self.be.gemm(x, dy, out=self.gwt, trans_a=True, beta=1.0)
        self.be.col_sum(dy, self.gb, beta=1.0)
        return self.be.gemm(dy, self.wt, trans_b=True) if need_dx else None


# ---- element-wise functions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Functional(Layer):
    """``y = f(x)`` element-wise for a ``kind`` of :mod:`sparkdl_hetero.backends.activations` (sigmoid, tanh, relu,
    leaky_relu with slope ``alpha``, identity)."""

    kind: str
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        if self.kind not in NAMES:
            raise SpecError(f"unknown activation {self.kind!r}; expected one of {', '.join(NAMES)}")

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        return _FunctionalModel(backend, self.kind, self.alpha)

    def spec(self) -> str:
        return f"{self.kind}({self.alpha})" if activation(self.kind).has_alpha else self.kind

    def commutes_with_next(self, next_layer: Layer) -> bool:
        """A max-pool after an activation that commutes exactly with max (ReLU: max-pool(relu(x)) ==
        relu(max-pool(x)), see :attr:`Activation.commutes_with_max`) may run first, on the activation's input."""
        return activation(self.kind).commutes_with_max and next_layer.selects_maxima


class _FunctionalModel(LayerModel):
    def __init__(self, be: Backend, kind: str, alpha: float) -> None:
        self.be, self.kind, self.alpha = be, kind, alpha
        self.y: Array = None

    def forward(self, x: Array, training: bool) -> Array:
        self.y = None
        self.y = self.be.activation(self.kind, x, self.alpha)
        return self.y

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        y, self.y = self.y, None
        return self.be.activation_backward(self.kind, y, dy, self.alpha) if need_dx else None


# ---- convolution ------------------------------------------------------------------------------------------
def _image(layer: Layer, in_shape: Shape) -> tuple[int, int, int]:
    if len(in_shape) != 3:
        raise SpecError(f"{layer.spec()} needs an image input (channels, height, width) but gets shape "
                        f"{in_shape}")
    return in_shape  # type: ignore[return-value]


def _window_out(layer: Layer, in_shape: Shape, k: int, stride: int, pad: int) -> tuple[int, int, int, int]:
    h, w, c = _image(layer, in_shape)
    oh, ow = pool_out(h, k, stride, pad), pool_out(w, k, stride, pad)
    if oh < 1 or ow < 1:
        raise SpecError(f"{layer.spec()}: a {k}x{k} window does not fit an input of {h}x{w} "
                        f"(channels {c}) with padding {pad}")
    return h, w, oh, ow


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D convolution, square kernel; weights (kh, kw, c_in, filters) row-major, then the bias."""

    filters: int
    kernel: int
    stride: int = 1
    pad: int = 0

    def __post_init__(self) -> None:
        if self.filters < 1 or self.kernel < 1 or self.stride < 1 or self.pad < 0:
            raise SpecError(f"{self.spec()}: filters, kernel and stride must be >= 1 and pad >= 0")

    def weight_size(self, in_shape: Shape) -> int:
        c = _image(self, in_shape)[2]
        return (self.kernel * self.kernel * c + 1) * self.filters

    def out_shape(self, in_shape: Shape) -> Shape:
        _, _, oh, ow = _window_out(self, in_shape, self.kernel, self.stride, self.pad)
        return (oh, ow, self.filters)

    def init_weights(self, in_shape: Shape, rng: np.random.Generator) -> np.ndarray:
        return _spark_uniform(self.weight_size(in_shape), self.kernel * self.kernel * in_shape[2], rng)

    def work_size(self, in_shape: Shape) -> int:
        """Input and output plus the im2col columns (``kernel^2 * channels`` per output pixel)."""
        oh, ow, _ = self.out_shape(in_shape)
        return super().work_size(in_shape) + oh * ow * self.kernel * self.kernel * in_shape[2]

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        k = self.kernel * self.kernel * in_shape[2] * self.filters
        shape = (k // self.filters, self.filters)
        return _ConvModel(self, backend, self.out_shape(in_shape), weights[:k].reshape(shape), weights[k:],
                          grad[:k].reshape(shape), grad[k:])

    def spec(self) -> str:
        return f"conv({self.filters},{self.kernel},stride={self.stride},pad={self.pad})"


class _ConvModel(LayerModel):
    def __init__(self, cfg: Conv2D, be: Backend, out_shape: Shape, w: Array, b: Array, gw: Array,
                 gb: Array) -> None:
        self.cfg, self.be, self.out, self.w, self.b, self.gw, self.gb = cfg, be, out_shape, w, b, gw, gb
        self.x: Array = None

    def forward(self, x: Array, training: bool) -> Array:
        c = self.cfg
        self.x = None
        y = self.be.conv_forward(x, self.w, self.b, c.kernel, c.kernel, c.stride, c.pad)
        self.x = x
        return y.reshape((x.shape[0],) + self.out)

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        c = self.cfg
        x, self.x = self.x, None
        dy2 = dy.reshape(dy.shape[0] * self.out[0] * self.out[1], c.filters)
        return self.be.conv_backward(x, dy2, self.w, self.gw, self.gb, c.kernel, c.kernel, c.stride, c.pad, need_dx)


# ---- pooling, flatten, dropout ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool2D(Layer):
    """Max or average pooling over ``size`` x ``size`` windows (stride defaults to the size), ``pad`` positions on
    each side (at most ``size // 2``): ignored by max-pooling, zeros counted in the average (PyTorch's defaults)."""

    size: int
    stride: int = 0
    mode: str = "max"
    pad: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("max", "avg"):
            raise SpecError(f"unknown pooling {self.mode!r}; expected 'max' or 'avg'")
        if self.size < 1 or self.stride < 0:
            raise SpecError(f"{self.spec()}: the window must be >= 1 and the stride >= 1")
        if not 0 <= self.pad <= self.size // 2:
            raise SpecError(f"{self.spec()}: pad must be in [0, {self.size // 2}] (half the window), got {self.pad}")

    @property
    def step(self) -> int:
        return self.stride or self.size

    @property
    def selects_maxima(self) -> bool:
        return self.mode == "max"

    def out_shape(self, in_shape: Shape) -> Shape:
        _, _, oh, ow = _window_out(self, in_shape, self.size, self.step, self.pad)
        return (oh, ow, in_shape[2])

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        return _PoolModel(self, backend)

    def spec(self) -> str:
        return f"{self.mode}pool({self.size},stride={self.step}" + (f",pad={self.pad})" if self.pad else ")")


class _PoolModel(LayerModel):
    def __init__(self, cfg: Pool2D, be: Backend) -> None:
        self.cfg, self.be = cfg, be
        self.idx: Array = None
        self.x_shape: tuple[int, int, int, int] = (0, 0, 0, 0)

    def forward(self, x: Array, training: bool) -> Array:
        c = self.cfg
        self.x_shape = tuple(x.shape)
        if c.mode == "avg":
            return self.be.avgpool(x, c.size, c.step, c.pad)
        self.idx = None
        y, self.idx = self.be.maxpool(x, c.size, c.step, c.pad)
        return y

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        c = self.cfg
        idx, self.idx = self.idx, None
        if not need_dx:
            return None
        if c.mode == "avg":
            return self.be.avgpool_backward(dy, self.x_shape, c.size, c.step, c.pad)
        return self.be.maxpool_backward(dy, idx, self.x_shape, c.size, c.step, c.pad)


@dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """The mean of each channel of an image over all its pixels: (h, w, c) -> (c,), a flat vector."""

    def out_shape(self, in_shape: Shape) -> Shape:
        return (_image(self, in_shape)[2],)

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        return _GlobalAvgPoolModel(backend)

    def spec(self) -> str:
        return "gap"


class _GlobalAvgPoolModel(LayerModel):
    def __init__(self, be: Backend) -> None:
        self.be = be
        self.x_shape: tuple[int, int, int, int] = (0, 0, 0, 0)

    def forward(self, x: Array, training: bool) -> Array:
        self.x_shape = tuple(x.shape)
        return self.be.global_avgpool(x)

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        return self.be.global_avgpool_backward(dy, self.x_shape) if need_dx else None


# ---- batch normalization ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalization per feature (flat input) or per channel (image), as PyTorch's ``BatchNorm1d/2d``.

    Weights: the scale gamma (initialized to 1), then the shift beta (0), one per feature/channel. State: the
    running mean (initialized to 0), then the running variance (1). A training pass normalizes with the batch's
    statistics and moves the running ones towards them by ``momentum`` (the batch variance unbiased); inference
    normalizes with the running ones. ``eps`` is added to the variance."""

    momentum: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise SpecError(f"{self.spec()}: momentum must be in [0, 1], got {self.momentum}")
        if not self.eps > 0.0:
            raise SpecError(f"{self.spec()}: eps must be > 0, got {self.eps}")

    @staticmethod
    def channels(in_shape: Shape) -> int:
        """The normalized axis' size: features of a flat input, channels of an image."""
        return in_shape[-1]

    def weight_size(self, in_shape: Shape) -> int:
        return 2 * self.channels(in_shape)

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def init_weights(self, in_shape: Shape, rng: np.random.Generator) -> np.ndarray:
        c = self.channels(in_shape)
        return np.concatenate([np.ones(c), np.zeros(c)])

    def state_size(self, in_shape: Shape) -> int:
        return 2 * self.channels(in_shape)

    def init_state(self, in_shape: Shape) -> np.ndarray:
        c = self.channels(in_shape)
        return np.concatenate([np.zeros(c), np.ones(c)])

    @property
    def couples_rows(self) -> bool:
        return True

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        c = self.channels(in_shape)
        if state is None:
            state = backend.asarray(self.init_state(in_shape), dtype=weights.dtype)
        return _BatchNormModel(self, backend, c, weights[:c], weights[c:], grad[:c], grad[c:], state[:c], state[c:])

    def spec(self) -> str:
        return f"batchnorm(momentum={self.momentum},eps={self.eps})"


class _BatchNormModel(LayerModel):
    def __init__(self, cfg: BatchNorm, be: Backend, c: int, gamma: Array, beta: Array, dgamma: Array,
                 dbeta: Array, mean: Array, var: Array) -> None:
        self.cfg, self.be, self.c = cfg, be, c
        self.gamma, self.beta, self.dgamma, self.dbeta, self.mean, self.var = gamma, beta, dgamma, dbeta, mean, var
        self.x: Array = None  # the input as (rows, c), with the statistics it was normalized with
        self.mu: Array = None
        self.inv_std: Array = None
        self.training = False

    def forward(self, x: Array, training: bool) -> Array:
        self.x = self.mu = self.inv_std = None
        x2 = x.reshape(-1, self.c)
        if training and x2.shape[0] < 2:
            raise ValueError(f"{self.cfg.spec()} needs more than one value per channel while training (batch "
                             f"statistics), got an input of shape {tuple(x.shape)}")
        y, self.mu, self.inv_std = self.be.batchnorm_forward(x2, self.gamma, self.beta, self.mean, self.var,
                                                             self.cfg.eps, self.cfg.momentum, training)
        self.x, self.training = x2, training
        return y.reshape(x.shape)

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        x, mu, inv_std = self.x, self.mu, self.inv_std
        self.x = self.mu = self.inv_std = None
        dx = self.be.batchnorm_backward(dy.reshape(-1, self.c), x, self.gamma, mu, inv_std, self.dgamma, self.dbeta,
                                        self.training, need_dx)
        return None if dx is None else dx.reshape(dy.shape)


# ---- residual blocks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Residual(Layer):
    """``y = body(x) + shortcut(x)``: ``body`` a stack of layers; the shortcut is the identity when the body keeps
    the shape, else a learned projection to the body's output shape -- a 1x1 convolution whose stride maps the
    input image onto the output's (h, w), or an affine layer for flat shapes. Weights: the body's layers in order,
    then the projection's; state: the body's layers' in order."""

    body: tuple[Layer, ...]

    def __post_init__(self) -> None:
        if not self.body:
            raise SpecError("res(): a residual block needs at least one layer")
        for layer in self.body:
            if isinstance(layer, LossLayer):
                raise SpecError(f"{self.spec()}: a loss layer ({layer.spec()}) cannot be inside a residual block")

    def shapes(self, in_shape: Shape) -> list[Shape]:
        """The input shape of each body layer, then the body's output shape."""
        shapes = [in_shape]
        for i, layer in enumerate(self.body):
            try:
                shapes.append(layer.out_shape(shapes[-1]))
            except SpecError as e:
                raise SpecError(f"res layer {i} ({layer.spec()}) with input shape {_shown(shapes[-1])}: {e}") from None
        return shapes

    def projection(self, in_shape: Shape) -> Layer | None:
        """The shortcut's layer: None for the identity."""
        out = self.shapes(in_shape)[-1]
        if out == in_shape:
            return None
        if len(in_shape) == 1 and len(out) == 1:
            return Affine(out[0])
        if len(in_shape) == 3 and len(out) == 3:
            (h, w, _), (oh, ow, c) = in_shape, out
            stride = -(-h // oh)
            if pool_out(h, 1, stride) == oh and pool_out(w, 1, stride) == ow:
                return Conv2D(c, 1, stride)
        raise SpecError(f"{self.spec()}: no 1x1 projection with one stride maps the input shape {_shown(in_shape)} "
                        f"onto the block's output shape {_shown(out)}")

    def _sizes(self, in_shape: Shape) -> tuple[list[int], list[int]]:
        shapes = self.shapes(in_shape)
        weights = [layer.weight_size(shapes[i]) for i, layer in enumerate(self.body)]
        states = [layer.state_size(shapes[i]) for i, layer in enumerate(self.body)]
        return weights, states

    def weight_size(self, in_shape: Shape) -> int:
        proj = self.projection(in_shape)
        return sum(self._sizes(in_shape)[0]) + (proj.weight_size(in_shape) if proj else 0)

    def out_shape(self, in_shape: Shape) -> Shape:
        self.projection(in_shape)  # raises when the shapes cannot be joined
        return self.shapes(in_shape)[-1]

    def init_weights(self, in_shape: Shape, rng: np.random.Generator) -> np.ndarray:
        shapes, proj = self.shapes(in_shape), self.projection(in_shape)
        parts = [layer.init_weights(shapes[i], rng) for i, layer in enumerate(self.body)]
        return np.concatenate(parts + ([proj.init_weights(in_shape, rng)] if proj else []))

    def state_size(self, in_shape: Shape) -> int:
        return sum(self._sizes(in_shape)[1])

    def init_state(self, in_shape: Shape) -> np.ndarray:
        shapes = self.shapes(in_shape)
        return np.concatenate([np.zeros(0)] + [layer.init_state(shapes[i]) for i, layer in enumerate(self.body)])

    @property
    def couples_rows(self) -> bool:
        return any(layer.couples_rows for layer in self.body)

    def work_size(self, in_shape: Shape) -> int:
        shapes = self.shapes(in_shape)
        return super().work_size(in_shape) + max(layer.work_size(shapes[i]) for i, layer in enumerate(self.body))

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        if state is None:
            state = backend.asarray(self.init_state(in_shape), dtype=weights.dtype)
        shapes, proj = self.shapes(in_shape), self.projection(in_shape)
        sizes, states = self._sizes(in_shape)
        models, w, s = [], 0, 0
        for i, layer in enumerate(self.body):
            models.append(layer.create_model(shapes[i], weights[w:w + sizes[i]], grad[w:w + sizes[i]], backend, rng,
                                             state[s:s + states[i]]))
            w, s = w + sizes[i], s + states[i]
        shortcut = proj.create_model(in_shape, weights[w:], grad[w:], backend, rng) if proj else None
        return _ResidualModel(backend, models, shortcut)

    def spec(self) -> str:
        return "res(" + "-".join(layer.spec() for layer in self.body) + ")"


class _ResidualModel(LayerModel):
    def __init__(self, be: Backend, body: list[LayerModel], shortcut: LayerModel | None) -> None:
        self.be, self.body, self.shortcut = be, body, shortcut

    def forward(self, x: Array, training: bool) -> Array:
        a = x
        for lm in self.body:
            a = lm.forward(a, training)
        # a new array: the body's last layer may keep its output for its backward pass (an activation)
        return self.be.add(a, x if self.shortcut is None else self.shortcut.forward(x, training))

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        skip = dy if self.shortcut is None else self.shortcut.backward(dy, need_dx)
        delta = dy
        for k in range(len(self.body) - 1, -1, -1):
            delta = self.body[k].backward(delta, need_dx=need_dx or k > 0)
        if not need_dx:
            return None
        self.be.axpy(delta, skip, 1.0)  # delta may be dy itself (a body of reshapes): y += y is still exact
        return delta


@dataclass(frozen=True)
class Flatten(Layer):
    """An image (h, w, c) as one vector, in (h, w, c) order."""

    def out_shape(self, in_shape: Shape) -> Shape:
        return (int(np.prod(in_shape)),)

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        return _ReshapeModel(in_shape)

    def spec(self) -> str:
        return "flatten"


class _ReshapeModel(LayerModel):
    def __init__(self, in_shape: Shape) -> None:
        self.in_shape = in_shape

    def forward(self, x: Array, training: bool) -> Array:
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        return dy.reshape((dy.shape[0],) + self.in_shape) if need_dx else None


@dataclass(frozen=True)
class Dropout(Layer):
    """Zeroes each input with probability ``rate`` while training (inverted dropout); identity otherwise."""

    rate: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise SpecError(f"dropout({self.rate}): the rate must be in [0, 1)")

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        return _DropoutModel(self.rate, backend, rng)

    def spec(self) -> str:
        return f"dropout({self.rate})"


class _DropoutModel(LayerModel):
    def __init__(self, rate: float, be: Backend, rng: np.random.Generator) -> None:
        self.rate, self.be, self.rng = rate, be, rng
        self.mask: Array = None

    def forward(self, x: Array, training: bool) -> Array:
        if not training or self.rate == 0.0:
            self.mask = None
            return x
        self.mask = self.be.dropout_mask(tuple(x.shape), 1.0 - self.rate, self.rng, x.dtype)
        return self.be.mul(x, self.mask)

    def backward(self, dy: Array, need_dx: bool) -> Array | None:
        mask, self.mask = self.mask, None
        if not need_dx:
            return None
        return dy if mask is None else self.be.mul(dy, mask)


# ---- losses -----------------------------------------------------------------------------------------------
class LossLayer(Layer):
    """The top layer: turns the last output into predictions and (loss, delta) against targets."""

    #: targets are class labels (one-hot rows); False: the labels are the targets themselves (regression)
    class_labels: bool = True

    def out_shape(self, in_shape: Shape) -> Shape:
        _flat_size(self, in_shape)
        return in_shape

    def create_model(self, in_shape: Shape, weights: Array, grad: Array, backend: Backend,
                     rng: np.random.Generator, state: Array | None = None) -> LayerModel:
        raise SpecError(f"{self.spec()} is a loss layer; the model applies it through loss()")

    @abstractmethod
    def output(self, be: Backend, z: Array) -> Array:
        """Predictions (probabilities, or the regression outputs) from the last layer's output ``z``."""

    @abstractmethod
    def loss(self, be: Backend, z: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        """(summed loss, delta w.r.t. ``z`` multiplied by ``scale``); ``weight`` (one value per row) multiplies
        each row's loss and delta."""


@dataclass(frozen=True)
class SoftmaxCrossEntropy(LossLayer):
    """Softmax on top, cross-entropy loss (Spark's ``softmaxOnTop=true``)."""

    def output(self, be: Backend, z: Array) -> Array:
        return be.softmax(z)

    def loss(self, be: Backend, z: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        return be.softmax_xent(z, target, scale, weight)

    def spec(self) -> str:
        return "softmax"


@dataclass(frozen=True)
class SigmoidSquaredError(LossLayer):
    """Sigmoid on top, squared error loss (Spark's ``softmaxOnTop=false``)."""

    def output(self, be: Backend, z: Array) -> Array:
        return be.activation("sigmoid", z)

    def loss(self, be: Backend, z: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        return be.sigmoid_sq(z, target, scale, weight)

    def spec(self) -> str:
        return "sigmoid_mse"


@dataclass(frozen=True)
class SquaredError(LossLayer):
    """Linear output, squared error ``(z - t)^2 / 2`` summed over the outputs: per row, half the squared error, as
    Spark's ``LinearRegression`` defines its ``squaredError`` loss (so the mean loss is half the MSE)."""

    class_labels = False

    def output(self, be: Backend, z: Array) -> Array:
        return z

    def loss(self, be: Backend, z: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        return be.huber(z, target, scale, math.inf, weight)

    def spec(self) -> str:
        return "squared_error"


#: Huber's threshold by default: Spark's ``LinearRegression`` default ``epsilon`` (95% statistical efficiency on
#: normally distributed residuals of unit scale)
DEFAULT_HUBER_DELTA = 1.35


@dataclass(frozen=True)
class Huber(LossLayer):
    """Linear output, Huber loss of each output's error ``e = z - t``: ``e^2 / 2`` where ``|e| <= delta``,
    ``delta * (|e| - delta / 2)`` beyond -- quadratic near the target, linear (robust to outliers) far from it.

    Spark's ``LinearRegression`` (``loss="huber"``, ``epsilon``) estimates a residual scale ``sigma`` jointly and
    applies its threshold ``epsilon`` to ``e / sigma``; a network has no such scale, so ``delta`` applies to the
    raw error. With ``sigma = 1`` Spark's per-row term is twice this one at ``delta = epsilon``."""

    delta: float = DEFAULT_HUBER_DELTA
    class_labels = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise SpecError(f"huber({self.delta}): delta must be a finite number > 0")

    def output(self, be: Backend, z: Array) -> Array:
        return z

    def loss(self, be: Backend, z: Array, target: Array, scale: float,
             weight: Array | None = None) -> tuple[float, Array]:
        return be.huber(z, target, scale, self.delta, weight)

    def spec(self) -> str:
        return f"huber({self.delta})"
