"""ONNX export of a trained topology (optional extra ``onnx``), for running the model on a phone or edge board.

The graph takes ``features``: (N, d) float32 rows in the same layout as the training features (images as
C, H, W), and returns ``probability``: the loss layer's output (softmax, or sigmoid for ``sigmoid_mse``) -- or,
under a regression loss (linear output), ``prediction``: the last layer's output.
Images run in ONNX's NCHW layout; before a ``flatten`` the graph transposes to NHWC so the flattened vector
has the engine's (h, w, c) order the next affine layer's weights expect. Batch normalization exports in inference
form (``BatchNormalization`` with the model's running statistics: pass the model's state).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..backends.activations import activation
from .layers import (
    Affine,
    BatchNorm,
    Conv2D,
    Dropout,
    Flatten,
    Functional,
    GlobalAvgPool,
    Layer,
    Pool2D,
    Residual,
    SigmoidSquaredError,
    SoftmaxCrossEntropy,
)
from .topology import FeedForwardTopology

if TYPE_CHECKING:
    import onnx

OPSET = 13


def to_onnx(topology: FeedForwardTopology, weights: np.ndarray, name: str = "sparkdl_hetero",
            state: np.ndarray | None = None) -> onnx.ModelProto:
    """The ONNX model computing ``topology``'s probabilities with ``weights`` and the non-trained ``state``
    (``FeedForwardModel.get_state()``; required when the topology has state, i.e. batch normalization)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("ONNX export needs the 'onnx' extra: pip install 'sparkdl-hetero[onnx]'") from e
    weights = np.asarray(weights)
    if weights.shape != (topology.num_weights,):
        raise ValueError(f"weights must be a vector of {topology.num_weights} values for {topology.spec!r}, "
                         f"got shape {weights.shape}")
    if state is None and topology.num_state:
        raise ValueError(f"{topology.spec!r} has {topology.num_state} values of state (batch normalization's running "
                         "statistics): pass state=model.get_state()")
    state = np.zeros(0) if state is None else np.asarray(state)
    if state.shape != (topology.num_state,):
        raise ValueError(f"state must be a vector of {topology.num_state} values for {topology.spec!r}, "
                         f"got shape {state.shape}")
    nodes, inits = [], []

    def const(tag: str, value: np.ndarray, dtype: type = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), tag))
        return tag

    def node(op: str, inputs: list[str], tag: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [tag], name=tag, **attrs))
        return tag

    x = "features"
    if len(topology.input_shape) == 3:
        x = node("Reshape", [x, const("input_shape", np.array([-1, *topology.input_shape]), np.int64)],
                 "input_nchw")
    offs, s_offs = topology.offsets, topology.state_offsets
    for i, layer in enumerate(topology.layers[:-1]):
        w, st = weights[offs[i]:offs[i + 1]], state[s_offs[i]:s_offs[i + 1]]
        tag = f"l{i}_{type(layer).__name__.lower()}"
        x = _layer(layer, topology.shapes[i], w, st, x, tag, node, const)
    top = topology.loss_layer
    out = "probability"
    if isinstance(top, SoftmaxCrossEntropy):
        node("Softmax", [x], out, axis=1)
    elif isinstance(top, SigmoidSquaredError):
        node("Sigmoid", [x], out)
    elif not top.class_labels:  # a regression loss: the output is linear
        out = node("Identity", [x], "prediction")
    else:
        raise ValueError(f"cannot export the loss layer {top.spec()!r}; expected softmax, sigmoid_mse or a "
                         f"regression loss")
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", topology.num_inputs])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", topology.num_outputs])],
        inits)
    opsets = [helper.make_opsetid("", OPSET)]
    # the oldest IR version that carries this opset, so that older runtimes load the file too
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="sparkdl-hetero", doc_string=f"{topology.spec} {topology.input_shape}")
    onnx.checker.check_model(model)
    return model


def _layer(layer: Layer, in_shape: tuple[int, ...], w: np.ndarray, state: np.ndarray, x: str, tag: str,
           node: Callable[..., str], const: Callable[..., str]) -> str:
    """Append the nodes of one layer (weights ``w``, state ``state``) reading tensor ``x``; return the name of its
    output."""
    if isinstance(layer, Affine):
        n_in, k = in_shape[0], in_shape[0] * layer.num_out
        # the flat block read row-major is W^T (n_in x n_out): Gemm's B as it is
        return node("Gemm", [x, const(f"{tag}_W", w[:k].reshape(n_in, layer.num_out)),
                             const(f"{tag}_b", w[k:])], tag)
    if isinstance(layer, Conv2D):
        c_in, k = in_shape[2], layer.kernel
        n = k * k * c_in * layer.filters
        kernel = w[:n].reshape(k, k, c_in, layer.filters).transpose(3, 2, 0, 1)  # -> (filters, c_in, kh, kw)
        return node("Conv", [x, const(f"{tag}_W", kernel), const(f"{tag}_b", w[n:])], tag,
                    kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[layer.pad] * 4)
    if isinstance(layer, Pool2D):
        attrs = {"kernel_shape": [layer.size] * 2, "strides": [layer.step] * 2, "pads": [layer.pad] * 4}
        if layer.mode == "max":
            return node("MaxPool", [x], tag, **attrs)
        return node("AveragePool", [x], tag, count_include_pad=1, **attrs)
    if isinstance(layer, GlobalAvgPool):
        return node("Flatten", [node("GlobalAveragePool", [x], f"{tag}_pool")], tag, axis=1)
    if isinstance(layer, BatchNorm):
        c = layer.channels(in_shape)
        return node("BatchNormalization", [x, const(f"{tag}_scale", w[:c]), const(f"{tag}_B", w[c:]),
                                           const(f"{tag}_mean", state[:c]), const(f"{tag}_var", state[c:])],
                    tag, epsilon=float(layer.eps))
    if isinstance(layer, Residual):
        shapes, proj = layer.shapes(in_shape), layer.projection(in_shape)
        a, wo, so = x, 0, 0
        for i, inner in enumerate(layer.body):
            nw, ns = inner.weight_size(shapes[i]), inner.state_size(shapes[i])
            a = _layer(inner, shapes[i], w[wo:wo + nw], state[so:so + ns], a, f"{tag}_{i}", node, const)
            wo, so = wo + nw, so + ns
        skip = x if proj is None else _layer(proj, in_shape, w[wo:], np.zeros(0), x, f"{tag}_proj", node, const)
        return node("Add", [a, skip], tag)
    if isinstance(layer, Flatten):
        nhwc = node("Transpose", [x], f"{tag}_nhwc", perm=[0, 2, 3, 1])
        return node("Flatten", [nhwc], tag, axis=1)
    if isinstance(layer, Functional):
        act = activation(layer.kind)
        return node(act.onnx_op, [x], tag, **act.onnx_attributes(layer.alpha))
    if isinstance(layer, Dropout):
        return x  # identity at inference
    raise ValueError(f"cannot export layer {layer.spec()!r} to ONNX")


def export_onnx(topology: FeedForwardTopology, weights: np.ndarray, path: str | os.PathLike,
                state: np.ndarray | None = None) -> None:
    """Write ``topology`` with ``weights`` (and ``state``, see :func:`to_onnx`) as an ONNX file at ``path`` (see
    the module docstring)."""
    import onnx

    onnx.save(to_onnx(topology, weights, state=state), os.fspath(path))
