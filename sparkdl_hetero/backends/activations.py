"""The one registry of element-wise activation functions.

Each :class:`Activation` says everything the package needs about one kind: its code for the kernels (the
``ACT_<NAME>`` defines of kernels/opencl_ops.cl), its forward and backward definitions over an array module
``xp`` (the array-module backends run them), its ONNX operator, whether it takes the slope ``alpha`` and whether
it commutes exactly with max-pooling. The backends, the layer parser, the layers and the ONNX export all read this
table; adding an activation means one entry here plus its cases in the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Array = Any  # a backend-native array
DEFAULT_ALPHA = 0.01  # the slope of activations that take one (leaky_relu), when the spec gives none


@dataclass(frozen=True)
class Activation:
    """One activation kind. ``forward(xp, x, alpha)`` returns ``f(x)`` as a new array; ``backward(xp, y, delta,
    alpha)`` returns ``delta * f'(x)`` from the forward output ``y = f(x)`` as a new array."""

    name: str
    code: int  # ACT_<NAME> in kernels/opencl_ops.cl
    forward: Callable[[Any, Array, float], Array]
    backward: Callable[[Any, Array, Array, float], Array]
    onnx_op: str
    #: takes the slope ``alpha`` (a spec argument, an ONNX attribute)
    has_alpha: bool = False
    #: ``max(f(a), f(b)) == f(max(a, b))`` exactly in floating point, and the first maximal position of a window
    #: of ``f``'s outputs passes the same gradient as that of its inputs: max-pooling may run before ``f``.
    #: True for ReLU (monotone, the identity on positive values; ties it creates are at 0, where the gradient is
    #: 0 either way); not for leaky ReLU or sigmoid, whose rounding can merge distinct inputs into ties
    commutes_with_max: bool = False

    def onnx_attributes(self, alpha: float) -> dict[str, float]:
        """The ONNX node's attributes for this activation with slope ``alpha``."""
        return {"alpha": float(alpha)} if self.has_alpha else {}


def _sigmoid(xp: Any, x: Array, alpha: float) -> Array:
    e = xp.exp(-xp.abs(x))  # exp of a non-positive number never overflows
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def _sigmoid_backward(xp: Any, y: Array, delta: Array, alpha: float) -> Array:
    out = 1 - y  # delta * y * (1 - y) with one temporary
    out *= y
    out *= delta
    return out


def _leaky_relu(xp: Any, x: Array, alpha: float) -> Array:
    return xp.where(x > 0, x, x * x.dtype.type(alpha))


def _leaky_relu_backward(xp: Any, y: Array, delta: Array, alpha: float) -> Array:
    return xp.where(y > 0, delta, delta * delta.dtype.type(alpha))


_ALL = (
    Activation("sigmoid", 0, _sigmoid, _sigmoid_backward, "Sigmoid"),
    Activation("tanh", 1, lambda xp, x, a: xp.tanh(x), lambda xp, y, d, a: d * (1 - y * y), "Tanh"),
    Activation("relu", 2, lambda xp, x, a: xp.maximum(x, 0), lambda xp, y, d, a: d * (y > 0), "Relu",
               commutes_with_max=True),
    Activation("leaky_relu", 3, _leaky_relu, _leaky_relu_backward, "LeakyRelu", has_alpha=True),
    Activation("identity", 4, lambda xp, x, a: x.copy(), lambda xp, y, d, a: d.copy(), "Identity"),
)

#: name -> :class:`Activation`, in kernel-code order
REGISTRY: dict[str, Activation] = {a.name: a for a in _ALL}
#: the activation names, in kernel-code order
NAMES: tuple[str, ...] = tuple(REGISTRY)


def activation(name: str) -> Activation:
    """The registered activation called ``name``; ValueError names the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(NAMES)}") from None
