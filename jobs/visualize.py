"""What a trained model's filters respond to: activation maximization (a grid of images) and per-class preferences.

    python jobs/visualize.py --model PATH --layer K --out filters.png [--iterations 100] [--filters 0,1,2]
    spark-submit jobs/visualize.py --model PATH --layer K --out prefs.png --preferences [--limit 2000]

Without ``--preferences``: one image per filter of layer K (a conv or affine layer of the saved
DeepClassificationModel), found by gradient ascent on the input from random noise with an L2 (and optional blur)
regularizer (``model.visualizeFilters``), drawn as a grid. With ``--preferences``: the classes x filters matrix of
mean activations over Fashion-MNIST's test images (``model.filterPreferences``, computed on Spark) as a heatmap,
each class's critical path (the ``--keep`` fraction of filters that prefer it most, as CAD keeps them) marked.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/visualize.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="path of a saved DeepClassificationModel")
    p.add_argument("--layer", type=int, required=True, help="index of a conv or affine layer in the model's topology")
    p.add_argument("--out", default="filters.png", help="PNG to write")
    p.add_argument("--filters", help="comma-separated filter indices (default: all)")
    p.add_argument("--iterations", type=int, default=100, help="gradient-ascent steps")
    p.add_argument("--step-size", type=float, default=0.05, help="gradient-ascent step")
    p.add_argument("--l2", type=float, default=1.0, help="L2 regularizer weight")
    p.add_argument("--blur", type=float, default=0.0, help="Gaussian blur (pixels) every few steps (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--preferences", action="store_true", help="draw the filter-by-class preference heatmap of "
                   "Fashion-MNIST's test images instead (runs on Spark)")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: $SPARKDL_FASHION_MNIST, then "
                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--limit", type=int, default=2000, help="--preferences: test images used (0: all)")
    p.add_argument("--keep", type=float, default=0.5, help="--preferences: fraction of filters on a critical path")
    return p.parse_args(argv)


def _plt():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("matplotlib is not installed (pip install 'sparkdl-hetero[plot]')") from None
    return plt


def filter_grid(images: np.ndarray, filters: list[int], input_shape: tuple[int, ...], path: str, title: str) -> None:
    """One panel per filter: its image (the mean over channels), or a flat input reshaped when it is square."""
    plt = _plt()
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k]
        if img.ndim == 3:
            img = img.mean(axis=0)
        elif int(np.sqrt(img.size)) ** 2 == img.size:
            img = img.reshape(int(np.sqrt(img.size)), -1)
        else:
            img = img.reshape(1, -1)
        ax.imshow(img, cmap="gray")
        ax.set_title(f"filter {filters[k]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preference_heatmap(means: np.ndarray, keep: float, path: str, title: str) -> None:
    """The (classes, filters) preferences, z-scored per filter, with each class's critical path boxed."""
    from sparkdl_hetero.nn.cad import preference_scores

    plt = _plt()
    k, f = means.shape
    z = np.stack([preference_scores(means, [c]) for c in range(k)])
    n_keep = max(1, int(np.floor(keep * f + 0.5)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * f + 2), 0.4 * k + 1.5))
    im = ax.imshow(z, cmap="viridis", aspect="auto")
    for c in range(k):
        for j in np.argsort(-z[c], kind="stable")[:n_keep]:
            ax.add_patch(plt.Rectangle((j - 0.5, c - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("filter")
    ax.set_ylabel("class")
    ax.set_yticks(range(k))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="preference (z-score across classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pyspark.sql import SparkSession

    from sparkdl_hetero.ml import DeepClassificationModel

    spark = SparkSession.builder.appName("sparkdl-hetero visualize").getOrCreate()
    model = DeepClassificationModel.load(args.model)
    spec = model.network.layers[args.layer].spec() if 0 <= args.layer < len(model.network.layers) else "?"
    if args.preferences:
        from sparkdl_hetero.data import fashion_mnist

        _, _, x, y = fashion_mnist(args.data_dir)
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        import pyarrow as pa

        feats = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]).cast(pa.list_(pa.float32()))
        df = spark.createDataFrame(pa.table({"features": feats, "label": pa.array(y.astype(np.float64))}))
        means = model.filterPreferences(df, args.layer)
        preference_heatmap(means, args.keep, args.out, f"layer {args.layer} ({spec}): preferences over {len(y)} "
                           f"test images; boxes: each class's critical path (keep {args.keep})")
    else:
        filters = [int(v) for v in args.filters.split(",")] if args.filters else None
        images = model.visualizeFilters(args.layer, filters, iterations=args.iterations, stepSize=args.step_size,
                                        l2=args.l2, blur=args.blur, seed=args.seed)
        chosen = filters if filters is not None else list(range(len(images)))
        filter_grid(images, chosen, tuple(model.network.input_shape), args.out,
                    f"layer {args.layer} ({spec}): activation maximization, {args.iterations} steps")
    print(f"figure: {args.out}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
