"""FeedForwardTopology: a validated stack of layers, built from Spark-style sizes or a spec string."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..backends.activations import DEFAULT_ALPHA, REGISTRY
from .layers import (
    Affine,
    BatchNorm,
    Conv2D,
    Dropout,
    Flatten,
    Functional,
    GlobalAvgPool,
    Huber,
    Layer,
    LossLayer,
    Pool2D,
    Residual,
    Shape,
    SigmoidSquaredError,
    SoftmaxCrossEntropy,
    SpecError,
    SquaredError,
)


def _resnet8(widths: Sequence[int] = (16, 32, 64), classes: int = 10) -> str:
    """ResNet-8's spec: a 3x3 stem convolution, three stages of one basic residual block (two 3x3 convolutions with
    batch normalization; the second and third stages halve the resolution with stride 2 and their shortcut is a
    strided 1x1 projection), global average pooling and the classifier."""
    def block(width: int, stride: int) -> str:
        return f"res(conv({width},3,stride={stride},pad=1)-batchnorm-relu-conv({width},3,pad=1)-batchnorm)-relu"

    stem = f"conv({widths[0]},3,pad=1)-batchnorm-relu"
    stages = [block(w, 1 if i == 0 else 2) for i, w in enumerate(widths)]
    return "-".join([stem, *stages, f"gap-affine({classes})"])


#: named networks ``FeedForwardTopology.from_spec`` (hence the estimator's ``topology`` param) accepts as a spec
PRESETS: dict[str, str] = {
    "lenet": "conv(6,5,pad=2)-relu-maxpool(2)-conv(16,5)-relu-maxpool(2)-flatten-affine(120)-relu-affine(84)-relu-"
             "affine(10)",
    "resnet8": _resnet8(),
}

_TOKEN = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\((.*)\))?\s*$")


def _number(text: str, where: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        raise SpecError(f"{where}: {text!r} is not a number") from None
    return int(v) if v.is_integer() and "." not in text else v


def _int(v: int | float, where: str) -> int:
    if not isinstance(v, int):
        raise SpecError(f"{where}: expected a whole number, got {v}")
    return v


def _args(text: str | None, names: Sequence[str], required: int, where: str) -> dict[str, int | float]:
    """Parse ``a, b, key=value`` against positional ``names`` (the first ``required`` of them mandatory)."""
    out: dict[str, int | float] = {}
    parts = [p.strip() for p in text.split(",")] if text and text.strip() else []
    for i, part in enumerate(parts):
        if "=" in part:
            key, val = (s.strip() for s in part.split("=", 1))
            if key not in names:
                raise SpecError(f"{where}: unknown argument {key!r}; expected {', '.join(names)}")
        else:
            if i >= len(names):
                raise SpecError(f"{where}: too many arguments (at most {len(names)}: {', '.join(names)})")
            key, val = names[i], part
        out[key] = _number(val, where)
    missing = [n for n in names[:required] if n not in out]
    if missing:
        raise SpecError(f"{where}: missing argument {', '.join(missing)}")
    return out


def _conv(a: dict, where: str) -> Layer:
    return Conv2D(*(_int(a.get(k, d), where) for k, d in
                    (("filters", 0), ("kernel", 0), ("stride", 1), ("pad", 0))))


def _pool(mode: str) -> Callable[[dict, str], Layer]:
    return lambda a, where: Pool2D(_int(a["size"], where), _int(a.get("stride", 0), where), mode,
                                   _int(a.get("pad", 0), where))


def _batchnorm(a: dict, where: str) -> Layer:
    return BatchNorm(float(a.get("momentum", 0.1)), float(a.get("eps", 1e-5)))


# name -> (argument names, how many are required, builder)
_BUILDERS: dict[str, tuple[tuple[str, ...], int, Callable[[dict, str], Layer]]] = {
    "affine": (("out",), 1, lambda a, w: Affine(_int(a["out"], w))),
    "conv": (("filters", "kernel", "stride", "pad"), 2, _conv),
    "maxpool": (("size", "stride", "pad"), 1, _pool("max")),
    "avgpool": (("size", "stride", "pad"), 1, _pool("avg")),
    "gap": ((), 0, lambda a, w: GlobalAvgPool()),
    "batchnorm": (("momentum", "eps"), 0, _batchnorm),
    "flatten": ((), 0, lambda a, w: Flatten()),
    "dropout": (("rate",), 1, lambda a, w: Dropout(float(a["rate"]))),
    "softmax": ((), 0, lambda a, w: SoftmaxCrossEntropy()),
    "sigmoid_mse": ((), 0, lambda a, w: SigmoidSquaredError()),
    "squared_error": ((), 0, lambda a, w: SquaredError()),
    "huber": (("delta",), 0, lambda a, w: Huber(float(a.get("delta", Huber.delta)))),
}
for _kind, _act in REGISTRY.items():  # every registered activation; those with a slope take it as ``alpha``
    _BUILDERS[_kind] = ((("alpha",), 0, lambda a, w, k=_kind: Functional(k, float(a.get("alpha", DEFAULT_ALPHA))))
                        if _act.has_alpha else ((), 0, lambda a, w, k=_kind: Functional(k)))


RESIDUAL = "res"  # res(<spec>): a residual block around the layers of <spec>


def split_spec(spec: str) -> list[str]:
    """The ``-``-separated layer tokens of a spec, a residual block's ``res(...)`` (dashes inside parentheses)
    as one token."""
    tokens, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' at position {i} of spec {spec!r}")
        elif ch == "-" and depth == 0:
            tokens.append(spec[start:i])
            start = i + 1
    if depth:
        raise SpecError(f"unbalanced '(' in spec {spec!r}")
    tokens.append(spec[start:])
    if not spec.strip() or any(not t.strip() for t in tokens):
        raise SpecError(f"empty layer in spec {spec!r}")
    return tokens


def parse_layers(spec: str, where: str = "") -> list[Layer]:
    """The layers of a ``-``-separated spec (see :func:`parse_layer`); ``where`` prefixes error messages."""
    prefix = f"{where} > " if where else ""
    return [parse_layer(t, f"{prefix}layer {i} ({t.strip()!r})") for i, t in enumerate(split_spec(spec))]


def parse_layer(token: str, where: str = "") -> Layer:
    """One layer from its spec form, e.g. ``conv(6,5,pad=2)``, ``maxpool(2)``, ``affine(10)``, ``relu``,
    ``res(conv(16,3,pad=1)-batchnorm-relu)``."""
    where = where or repr(token)
    m = _TOKEN.match(token.lower())
    if not m:
        raise SpecError(f"{where}: cannot parse {token!r}")
    name, args = m.group(1), m.group(2)
    if name == RESIDUAL:
        if not args or not args.strip():
            raise SpecError(f"{where}: a residual block needs layers, e.g. res(conv(16,3,pad=1)-relu)")
        try:
            return Residual(tuple(parse_layers(args, where)))
        except SpecError as e:
            if str(e).startswith(where):
                raise
            raise SpecError(f"{where}: {e}") from None
    if name not in _BUILDERS:
        raise SpecError(f"{where}: unknown layer {name!r}; expected one of "
                        f"{', '.join(sorted([*_BUILDERS, RESIDUAL]))}")
    names, required, build = _BUILDERS[name]
    try:
        return build(_args(args, names, required, where), where)
    except SpecError as e:
        if str(e).startswith(where):
            raise
        raise SpecError(f"{where}: {e}") from None


def _internal_shape(input_shape: int | Sequence[int]) -> Shape:
    """User shapes are ``(d,)`` or ``(channels, height, width)``; internally images are (h, w, c)."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise SpecError(f"input shape must be (features,) or (channels, height, width) of positive sizes, "
                        f"got {tuple(input_shape) if not isinstance(input_shape, int) else input_shape}")
    return shape if len(shape) == 1 else (shape[1], shape[2], shape[0])


class FeedForwardTopology:
    """Layers from input to a loss layer on top, with the shape of every intermediate output. ``loss``: the loss
    layer put on top when ``layers`` do not end with one (default softmax + cross-entropy)."""

    def __init__(self, layers: Sequence[Layer], input_shape: int | Sequence[int],
                 loss: LossLayer | None = None) -> None:
        layers = list(layers)
        if not layers or not isinstance(layers[-1], LossLayer):
            layers.append(loss if loss is not None else SoftmaxCrossEntropy())
        for i, layer in enumerate(layers[:-1]):
            if isinstance(layer, LossLayer):
                raise SpecError(f"layer {i} ({layer.spec()}): a loss layer can only be the last layer")
        self.layers: list[Layer] = layers
        self.input_shape: Shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        shape = _internal_shape(input_shape)
        self.shapes: list[Shape] = [shape]  # shapes[i] is the input of layer i; shapes[-1] the output
        self.offsets: list[int] = [0]  # layer i's weights: [offsets[i], offsets[i + 1]) of the weight vector
        self.state_offsets: list[int] = [0]  # layer i's state: [state_offsets[i], state_offsets[i + 1])
        for i, layer in enumerate(layers):
            try:
                out = layer.out_shape(shape)
                size = layer.weight_size(shape)
                state = layer.state_size(shape)
            except SpecError as e:
                raise SpecError(f"layer {i} ({layer.spec()}) with input shape {_user_shape(shape)}: {e}") from None
            self.offsets.append(self.offsets[-1] + size)
            self.state_offsets.append(self.state_offsets[-1] + state)
            self.shapes.append(out)
            shape = out
        if len(shape) != 1:
            raise SpecError(f"the last layer's output must be flat, got {_user_shape(shape)}")

    @classmethod
    def multilayer_perceptron(cls, sizes: Sequence[int], softmax_on_top: bool = True) -> FeedForwardTopology:
        """Spark's MLP: affine + sigmoid hidden layers, affine + softmax (or sigmoid/squared error) on top."""
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise SpecError(f"layers must list at least an input and an output size, all >= 1, got {sizes}")
        layers: list[Layer] = []
        for i, n in enumerate(sizes[1:]):
            layers.append(Affine(n))
            if i < len(sizes) - 2:
                layers.append(Functional("sigmoid"))
        layers.append(SoftmaxCrossEntropy() if softmax_on_top else SigmoidSquaredError())
        return cls(layers, sizes[0])

    @classmethod
    def from_spec(cls, spec: str, input_shape: int | Sequence[int],
                  loss: LossLayer | None = None) -> FeedForwardTopology:
        """Layers from a ``-``-separated spec, e.g. ``conv(6,5,pad=2)-relu-maxpool(2)-flatten-affine(10)``, or
        the name of a preset network of :data:`PRESETS` (``lenet``, ``resnet8``); ``loss`` as in the
        constructor."""
        return cls(parse_layers(PRESETS.get(spec.strip().lower(), spec)), input_shape, loss)

    @property
    def spec(self) -> str:
        return "-".join(layer.spec() for layer in self.layers)

    @property
    def num_weights(self) -> int:
        return self.offsets[-1]

    @property
    def num_state(self) -> int:
        """Elements of the model's non-trained state vector (batch normalization's running statistics)."""
        return self.state_offsets[-1]

    @property
    def num_inputs(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    @property
    def num_outputs(self) -> int:
        return self.shapes[-1][0]

    @property
    def loss_layer(self) -> LossLayer:
        return self.layers[-1]  # type: ignore[return-value]

    def mlp_sizes(self) -> list[int] | None:
        """Spark's ``layers`` when this topology is exactly a Spark MLP (sigmoid hidden layers), else None."""
        body, sizes = self.layers[:-1], [self.num_inputs]
        if len(self.input_shape) != 1 or not body or len(body) % 2 != 1:
            return None
        for i, layer in enumerate(body):
            if i % 2 == 0 and isinstance(layer, Affine):
                sizes.append(layer.num_out)
            elif not (i % 2 == 1 and layer == Functional("sigmoid")):
                return None
        return sizes

    def to_dict(self) -> dict:
        return {"spec": self.spec, "inputShape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> FeedForwardTopology:
        return cls.from_spec(d["spec"], d["inputShape"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeedForwardTopology) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"FeedForwardTopology({self.spec!r}, input_shape={self.input_shape})"


def _user_shape(shape: Shape) -> Shape:
    return shape if len(shape) == 1 else (shape[2], shape[0], shape[1])
