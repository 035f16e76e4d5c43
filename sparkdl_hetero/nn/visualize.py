"""What filters respond to: activation maximization (the CAD poster's filter visualization) and per-class
preferences."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from .cad import ActivationStats, activation_output, num_filters
from .model import FeedForwardModel


def filter_preferences(model: FeedForwardModel, x: np.ndarray, y: np.ndarray, layer: int) -> np.ndarray:
    """The (classes, filters) matrix of mean activations of conv/affine layer ``layer``'s filters over the rows of
    each class (NaN for a class without rows): the preference CAD ranks filters by."""
    stats = ActivationStats(model.topology, [layer])
    stats.add(model, x, y)
    return stats.means(layer)


def visualize_filters(model: FeedForwardModel, layer: int, filters: Sequence[int] | None = None,
                      iterations: int = 100, step_size: float = 0.05, l2: float = 1.0, blur: float = 0.0,
                      blur_every: int = 4, jitter: int = 0, seed: int = 0) -> np.ndarray:
    """One input per filter of conv/affine layer ``layer`` (all filters, or ``filters``), found by gradient ascent
    from small random noise: ``x <- x + step_size * (g / rms(g) - l2 * x)``, ``g`` the gradient of ``A_i(x)``: the
    gradient of ``A_i(x) - l2 / 2 * |x|^2`` with ``A_i``'s part scaled to unit root mean square, so one step size
    and one ``l2`` fit filters of any scale (``l2`` bounds the pixels' root mean square by about ``1 / l2``).
    ``A_i`` is filter ``i``'s activation as CAD measures it (:func:`~.cad.filter_activations`: the mean over
    positions after the ReLU, ... that follows the layer); while a filter is silent everywhere on its image (no
    gradient through the ReLU) the step follows the mean of its own output instead, which the noise it starts from
    may leave negative. Every ``blur_every`` steps the images are blurred (Gaussian, standard deviation ``blur``
    pixels; 0: off); ``jitter`` shifts each step's input by up to that many pixels (rolled back after), both to
    favour patterns over pixel noise. Returns (filters, channels, height, width) for an image input, (filters,
    features) for a flat one."""
    topo = model.topology
    n = num_filters(topo, layer)
    chosen = np.arange(n) if filters is None else np.asarray(list(filters))
    if chosen.size == 0 or chosen.ndim != 1 or not np.issubdtype(chosen.dtype, np.integer) or chosen.min() < 0 \
            or chosen.max() >= n:
        raise ValueError(f"filters must be filter indices in [0, {n}) of layer {layer}, at least one; "
                         f"got {chosen.tolist()}")
    for name, v, lo in (("iterations", iterations, 0), ("blur_every", blur_every, 1), ("jitter", jitter, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    for name, v in (("step_size", step_size), ("l2", l2), ("blur", blur)):
        if not np.isfinite(v) or v < 0 or (name == "step_size" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'step_size' else '>= 0'}, got {v!r}")
    image = len(topo.input_shape) == 3
    if not image and (blur or jitter):
        raise ValueError(f"blur and jitter need an image input; the model's input shape is {topo.input_shape}")
    rng = np.random.default_rng(seed)
    k = len(chosen)
    x = rng.normal(0.0, 0.1, size=(k, topo.num_inputs))
    post = activation_output(topo, layer)
    direction = _mean_direction(topo.shapes[layer + 1], chosen)  # the same shape before and after the activation
    shape = (k,) + tuple(topo.input_shape)
    for it in range(iterations):
        shift = tuple(int(s) for s in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
        xin = np.roll(x.reshape(shape), shift, axis=(2, 3)).reshape(k, -1) if jitter else x
        g = model.input_gradient(xin, post, direction).astype(np.float64)
        silent = ~np.any(g, axis=1)
        if post != layer and silent.any():
            g[silent] = model.input_gradient(xin[silent], layer, direction[silent])
        if jitter:
            g = np.roll(g.reshape(shape), (-shift[0], -shift[1]), axis=(2, 3)).reshape(k, -1)
        rms = np.sqrt(np.mean(g * g, axis=1, keepdims=True))
        g /= np.where(rms > 0, rms, 1.0)
        g -= l2 * x
        x += step_size * g
        if blur and (it + 1) % blur_every == 0:
            x = gaussian_filter(x.reshape(shape), sigma=(0, 0, blur, blur)).reshape(k, -1)
    return x.reshape(shape)


def _mean_direction(out_shape: tuple[int, ...], chosen: np.ndarray) -> np.ndarray:
    """Row ``j``: the gradient of the mean over positions of channel ``chosen[j]`` w.r.t. a layer output."""
    k = len(chosen)
    d = np.zeros((k,) + tuple(out_shape))
    positions = int(np.prod(out_shape[:-1]))
    d.reshape(k, positions, out_shape[-1])[np.arange(k), :, chosen] = 1.0 / positions
    return d
