"""Overlays and figures the chapter notebooks share: masks over images, response maps,
feature channels, training curves, length histograms, precision curves.

Pixel functions (``overlay``, ``heatmap``) return plain uint8 RGB arrays, so they are
testable without a display; plotting functions take an optional matplotlib ``ax`` and
return it (or the figure they made), so the notebooks stay one call per figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from referseg.ablations import REFERENCE, load_samples, position_subsets
from referseg.data.transforms import letterbox_image, to_rgb
from referseg.metrics import compare_runs

if TYPE_CHECKING:
    import matplotlib.axes
    import matplotlib.figure
    import pandas as pd

    from referseg.config import Profile
    from referseg.text import Vocabulary

# Colours (RGB 0-255) used across the book: ground truth, prediction, and a cycle for several masks.
GROUND_TRUTH = (60, 230, 90)
PREDICTION = (235, 60, 50)
MASK_COLOURS = ((235, 60, 50), (40, 120, 235), (250, 190, 30), (170, 70, 200), (30, 190, 190), (240, 120, 30))


def setup_style() -> None:
    """One look for every figure of the book: seaborn's white grid (matplotlib's copy of it, which
    spares each notebook the seconds that importing seaborn and scipy.stats takes), readable sizes."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    plt.style.use("seaborn-v0_8-whitegrid")
    mpl.rcParams.update({"figure.dpi": 90, "savefig.dpi": 110, "axes.titlesize": 10, "font.size": 10,
                         "image.interpolation": "nearest"})


# --------------------------------------------------------------------------- pixels


def overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = PREDICTION, alpha: float = 0.45,
            outline: bool = True) -> np.ndarray:
    """The image with ``mask`` tinted in ``color`` (and outlined); uint8 HxWx3 RGB, same size."""
    rgb = to_rgb(np.asarray(image)).astype(np.float32)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} does not match the image's {rgb.shape[:2]}; "
                         "map it back to the image size first (referseg.data.transforms.prediction_mask)")
    tint = np.asarray(color, dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * tint
    out = rgb.clip(0, 255).astype(np.uint8)
    if outline:
        out = draw_outline(out, mask, color)
    return out


def draw_outline(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = GROUND_TRUTH,
                 thickness: int = 2) -> np.ndarray:
    """A copy of the uint8 RGB image with the outer contours of ``mask`` drawn in ``color``.

    A dark halo under the line keeps it visible on any background (green on grass).
    """
    out = np.ascontiguousarray(to_rgb(np.asarray(image)).astype(np.uint8).copy())
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 0, 0), thickness + 2)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), thickness)
    return out


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], colors: Sequence[Sequence[int]] | None = None,
                  alpha: float = 0.45) -> np.ndarray:
    """Several masks over one image, each in its own colour (later masks drawn on top)."""
    colors = colors or MASK_COLOURS
    out = to_rgb(np.asarray(image)).astype(np.uint8)
    for index, mask in enumerate(masks):
        out = overlay(out, mask, colors[index % len(colors)], alpha)
    return out


def compare_masks(image: np.ndarray, prediction: np.ndarray, target: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Prediction tinted red over the image, ground truth outlined in green."""
    return draw_outline(overlay(image, prediction, PREDICTION, alpha, outline=False), target, GROUND_TRUTH)


def resize_map(values: np.ndarray, height: int, width: int, smooth: bool = False) -> np.ndarray:
    """A 2-D map resized to ``height x width``: nearest (cells stay visible) or bilinear."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {values.shape}")
    interpolation = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    return cv2.resize(values, (width, height), interpolation=interpolation)


def cell_mask(labels: np.ndarray, size: int) -> np.ndarray:
    """A (g, g) boolean grid stretched to a (size, size) mask, each cell a block (for drawing labels)."""
    return resize_map(np.asarray(labels, dtype=np.float32), size, size) > 0.5


def heatmap(image: np.ndarray, values: np.ndarray, alpha: float = 0.55, cmap: str = "magma",
            vmin: float = 0.0, vmax: float = 1.0, smooth: bool = False) -> np.ndarray:
    """``values`` (any grid, e.g. a 16x16 sigmoid map) coloured with ``cmap`` and blended over the image.

    The map is stretched over the whole image, so give the letterboxed square image for a
    map of the letterbox. Returns uint8 HxWx3 RGB.
    """
    import matplotlib

    rgb = to_rgb(np.asarray(image)).astype(np.float32)
    height, width = rgb.shape[:2]
    scaled = (resize_map(values, height, width, smooth) - vmin) / max(vmax - vmin, 1e-12)
    colours = matplotlib.colormaps[cmap](np.clip(scaled, 0, 1))[..., :3] * 255
    return ((1 - alpha) * rgb + alpha * colours).clip(0, 255).astype(np.uint8)


def letterboxed(image: np.ndarray, size: int) -> np.ndarray:
    """The image letterboxed to ``size x size`` as the network sees it (SPEC 3), uint8 RGB for display."""
    return np.clip(letterbox_image(image, size) + 0.5, 0, 255).astype(np.uint8)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Elementwise logistic function, stable for large logits."""
    return 0.5 * (1 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64)))


# --------------------------------------------------------------------------- model outputs for figures


def expression_logits(model: torch.nn.Module, image: np.ndarray, expressions: Sequence[str], vocab: Vocabulary,
                      profile: Profile, high_res: bool = False) -> np.ndarray:
    """Logits of several expressions on one image: (n, g, g), or (n, S, S) with ``high_res``
    (:func:`referseg.predict.image_logits`: one backbone pass, the profile's letterbox)."""
    from referseg.predict import image_logits

    return image_logits(model, image, expressions, vocab, profile, high_res=high_res)


# --------------------------------------------------------------------------- choosing examples


def pairs_by_image(pairs: Sequence[Any]) -> dict[int, list[Any]]:
    """Pairs grouped by ``image_id``, in their original order."""
    grouped: dict[int, list[Any]] = {}
    for pair in pairs:
        grouped.setdefault(pair.image_id, []).append(pair)
    return grouped


def pick_image(pairs: Sequence[Any], seed: int = 0, min_regions: int = 3, want_stuff: bool = True) -> int:
    """An image id with at least ``min_regions`` referred regions (one of them stuff, if asked), chosen by seed.

    Falls back to the image with the most regions, so a tiny split still yields an image.
    """
    grouped = pairs_by_image(pairs)
    if not grouped:
        raise ValueError("no pairs to choose an image from")

    def regions(image_pairs: list[Any]) -> int:
        return len({p.ann_id for p in image_pairs})

    good = [image_id for image_id, group in grouped.items()
            if regions(group) >= min_regions and (not want_stuff or any(p.is_stuff for p in group))]
    if not good:
        return max(grouped, key=lambda image_id: regions(grouped[image_id]))
    return good[int(np.random.default_rng(seed).integers(len(good)))]


def one_pair_per_region(pairs: Sequence[Any], limit: int | None = None) -> list[Any]:
    """The first pair of each distinct region (``ann_id``), at most ``limit`` of them."""
    seen: dict[int, Any] = {}
    for pair in pairs:
        seen.setdefault(pair.ann_id, pair)
    chosen = list(seen.values())
    return chosen[:limit] if limit else chosen


# --------------------------------------------------------------------------- figures


TITLE_LINE = 1.3  # height of a title line, in font sizes
TITLE_CHAR = 0.6  # width of an average title character, in font sizes (DejaVu Sans: about 0.55)


def wrap_title(title: str, chars: int, max_lines: int) -> str:
    """``title`` wrapped to lines of at most ``chars`` characters, cut after ``max_lines`` lines."""
    import textwrap

    lines = textwrap.wrap(str(title), max(chars, 8), break_on_hyphens=False) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = textwrap.shorten(lines[-1] + " ...", max(chars, 8), placeholder=" ...")
    return "\n".join(lines)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 3,
               width: float = 3.4, cmap: str | None = None, suptitle: str | None = None,
               vmin: float | None = None, vmax: float | None = None, fontsize: float = 9,
               max_title_lines: int = 4) -> matplotlib.figure.Figure:
    """Images (RGB or 2-D maps) in a grid with no axes, each ``width`` inches wide.

    Titles wrap to the width of their column (at most ``max_title_lines`` lines), and every
    row leaves above its images the height of its longest title, so that a title never runs
    into the images or titles around it; one still too wide for its column is set smaller.
    """
    import matplotlib.pyplot as plt

    count = len(images)
    if count == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    first = np.asarray(images[0])
    image_height = width * first.shape[0] / first.shape[1]
    chars = int(width * 72 / (TITLE_CHAR * fontsize))
    wrapped = [wrap_title(t, chars, max_title_lines) if titles is not None else "" for t in
               (titles if titles is not None else [""] * count)]
    line = TITLE_LINE * fontsize / 72  # inches
    title_rows = [max(w.count("\n") + 1 if w else 0 for w in wrapped[r * ncols:(r + 1) * ncols])
                  for r in range(nrows)]
    title_heights = [lines * line + (0.1 if lines else 0.0) for lines in title_rows]
    gap, margin = 0.12, 0.05  # inches between images, and around the grid
    top = 0.45 if suptitle else margin
    fig_width = ncols * width + (ncols - 1) * gap + 2 * margin
    fig_height = top + sum(title_heights) + nrows * image_height + (nrows - 1) * gap + margin
    fig = plt.figure(figsize=(fig_width, fig_height))
    y = fig_height - top
    for row in range(nrows):
        y -= title_heights[row] + image_height
        for col in range(ncols):
            index = row * ncols + col
            if index >= count:
                break
            x = margin + col * (width + gap)
            ax = fig.add_axes((x / fig_width, y / fig_height, width / fig_width, image_height / fig_height))
            ax.axis("off")
            ax.imshow(images[index], cmap=cmap, vmin=vmin, vmax=vmax)
            if wrapped[index]:
                ax.set_title(wrapped[index], fontsize=fontsize, pad=5)
        y -= gap
    if suptitle:
        fig.suptitle(suptitle, y=1 - 0.08 / fig_height, va="top")
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        extent = ax.title.get_window_extent(renderer)
        if ax.get_title() and extent.width > width * fig.dpi:
            ax.title.set_fontsize(fontsize * width * fig.dpi / extent.width)
    return fig


def channel_grid(maps: np.ndarray | torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8,
                 cmap: str = "viridis", width: float = 1.6, shared_scale: bool = False,
                 suptitle: str | None = None) -> matplotlib.figure.Figure:
    """(C, h, w) channels as small images with a colour scale per channel (or shared), e.g. features."""
    import matplotlib.pyplot as plt

    maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"expected (channels, height, width) maps, got shape {maps.shape}")
    count = len(maps)
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * nrows + 0.4 * nrows), squeeze=False)
    low, high = (float(maps.min()), float(maps.max())) if shared_scale else (None, None)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= count:
            ax.axis("off")
            continue
        image = ax.imshow(maps[index], cmap=cmap, vmin=low, vmax=high)
        if titles is not None:
            ax.set_title(str(titles[index]), fontsize=8)
        if not shared_scale:
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    if shared_scale and count:
        fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def plot_training_curves(logs: Mapping[str, Sequence[Mapping[str, float]]], ax: matplotlib.axes.Axes | None = None,
                         offsets: Mapping[str, int] | None = None) -> matplotlib.axes.Axes:
    """Loss against iteration for one or more training logs (JSONL records), with the learning rate on a
    second axis; ``offsets`` shifts a log's iterations (stage 2 after stage 1)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    rate_ax = ax.twinx()
    rate_ax.grid(False)
    for index, (name, records) in enumerate(logs.items()):
        if not records:
            continue
        shift = (offsets or {}).get(name, 0)
        iterations = np.array([r["iteration"] for r in records]) + shift
        colour = f"C{index}"
        ax.plot(iterations, [r["loss"] for r in records], color=colour, label=f"{name}: loss")
        rate_ax.step(iterations, [r["lr"] for r in records], where="pre", color=colour, linestyle=":",
                     alpha=0.7, label=f"{name}: learning rate")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (window mean)")
    rate_ax.set_ylabel("learning rate")
    rate_ax.set_yscale("log")
    lines = ax.get_legend_handles_labels()
    rate_lines = rate_ax.get_legend_handles_labels()
    ax.legend(lines[0] + rate_lines[0], lines[1] + rate_lines[1], loc="upper right", fontsize=8)
    return ax


def length_histogram(lengths: Mapping[str, Sequence[int]], ax: matplotlib.axes.Axes | None = None,
                     max_length: int = 25, limit: int | None = 20) -> matplotlib.axes.Axes:
    """Share of expressions by token count, one series per dataset; the T=20 cut drawn as a line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.4))
    bins = np.arange(1, max_length + 2)
    width = 0.8 / max(len(lengths), 1)
    for index, (name, values) in enumerate(lengths.items()):
        values = np.asarray(values)
        if len(values) == 0:
            continue
        counts = np.array([(np.minimum(values, max_length) == b).sum() for b in bins[:-1]])
        ax.bar(bins[:-1] + (index - (len(lengths) - 1) / 2) * width, 100 * counts / len(values), width=width,
               label=f"{name} (mean {values.mean():.2f}, max {values.max()})")
    if limit is not None and limit <= max_length:
        ax.axvline(limit + 0.5, color="black", linestyle="--", linewidth=1)
        ax.text(limit + 0.6, ax.get_ylim()[1] * 0.9, f"T = {limit}", fontsize=8)
    ax.set_xlabel(f"tokens per expression (the last bar: {max_length} or more)")
    ax.set_ylabel("% of expressions")
    ax.legend(fontsize=8)
    return ax


def precision_curve(ious: Mapping[str, np.ndarray], ax: matplotlib.axes.Axes | None = None,
                    marks: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9)) -> matplotlib.axes.Axes:
    """Precision@t (share of samples with IoU >= t) for t from 0 to 1, one line per method; SPEC 1's
    thresholds marked."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    thresholds = np.linspace(0, 1, 101)
    for name, values in ious.items():
        values = np.sort(np.asarray(values, dtype=np.float64))
        # share of samples with IoU >= t, for every t at once
        share = 1 - np.searchsorted(values, thresholds - 1e-12, side="left") / max(len(values), 1)
        line = ax.plot(thresholds, 100 * share, label=name)[0]
        at_marks = 1 - np.searchsorted(values, np.asarray(marks) - 1e-12, side="left") / max(len(values), 1)
        ax.plot(marks, 100 * at_marks, "o", color=line.get_color(), markersize=4)
    for mark in marks:
        ax.axvline(mark, color="grey", linewidth=0.5)
    ax.set_xlabel("IoU threshold t")
    ax.set_ylabel("precision@t (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    return ax


def print_wrapped(text: str, width: int = 88) -> None:
    """Print ``text`` in lines of at most ``width`` characters (the book's code column),
    continuation lines indented by two spaces."""
    import textwrap

    print(textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False))


def dash_missing(frame: pd.DataFrame, mark: str = "\u2013") -> pd.DataFrame:
    """``frame`` for display, with every missing value (NaN, None) shown as ``mark``, an en
    dash by default: a value that does not apply, or was not reported, is not a number."""
    return frame.astype(object).where(frame.notna(), mark)


# --------------------------------------------------------------------------- the prose's claims

PUBLISHED_PROFILE = "cpu"  # the profile whose outputs the book's written sentences describe


class ClaimError(AssertionError):
    """A sentence of the book that its own outputs no longer support: the build stops, naming it."""


class Claims:
    """The sentences of a chapter that state a measured number or relation, checked where they stand.

    ``claims("colour is the hardest type", hardest == "colour", f"hardest: {hardest}")`` raises
    :class:`ClaimError`, naming the chapter, the sentence and the evidence, when a rerun's outputs
    no longer support it; the book then does not build. A claim about results is checked when the
    chapter runs for :data:`PUBLISHED_PROFILE`, the profile the prose describes (a smoke run's
    numbers are not those the text reads); ``every_profile=True`` checks a fact of the code or the
    data whatever the profile. Sentences that print their numbers are computed, not claimed.
    """

    def __init__(self, profile: str, chapter: str):
        self.profile, self.chapter = profile, chapter
        self.checked: list[tuple[str, bool, str]] = []

    def __call__(self, statement: str, holds: Any, evidence: str, every_profile: bool = False) -> bool:
        applies = every_profile or self.profile == PUBLISHED_PROFILE
        if applies and not bool(holds):
            raise ClaimError(f"{self.chapter}: the claim {statement!r} no longer holds ({evidence}). "
                             "Rewrite the sentence for the new outputs, or find out what changed them.")
        self.checked.append((statement, applies, evidence))
        mark = "\u2713 holds" if applies else f"not checked for profile {self.profile!r}"
        print_wrapped(f"{mark}: {statement} ({evidence})")
        return bool(holds)


def glue_figure(name: str, figure: Any = None) -> None:
    """Show a figure once and hand it to the book under ``name``: the chapter's text places it
    with ``{glue:figure} name`` as a numbered figure with a caption (tag the cell
    ``remove-output``, so that the book shows it there only). ``figure`` is a matplotlib
    figure or axes (default: the current figure); it is closed afterwards."""
    import matplotlib.pyplot as plt

    if figure is None:
        figure = plt.gcf()
    if isinstance(figure, np.ndarray):  # an array of axes
        figure = figure.flat[0]
    figure = getattr(figure, "figure", figure)  # axes -> their figure
    try:
        from myst_nb import glue
    except ImportError:  # outside the book's environment: only show it
        from IPython.display import display

        display(figure)
    else:
        glue(name, figure, display=True)
    plt.close(figure)


# --------------------------------------------------------------------------- ablation results

def reference_labels(reference: Profile) -> dict[str, str]:
    """What the reference is in each group, for tables ("8 channels (code)", "on", ...)."""
    return {
        "spatial channels": f"{reference.spatial_channels} channels" + (" (code)" if reference.spatial_channels == 8
                                                                         else ""),
        "L2 normalisation": "on" if reference.l2_normalize else "off",
        "text encoder": {"lstm": "LSTM", "bow": "bag of words"}[reference.text_encoder],
        "low-resolution labels": {"or": "OR-pooled (any pixel)", "nearest": "nearest"}[reference.lowres_labels],
        "stage-2 negative weight": f"{reference.stage2.neg_weight:.3g}",
        "initialisation": reference.init, "stage 0 (box pretraining)": "on" if reference.pretrain else "off",
        "backbone": f"{reference.backbone}" + (", pretrained, frozen" if reference.freeze_backbone else ""),
    }


def comparison_table(run_dir: str | Path, results: pd.DataFrame, reference: Profile, resamples: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """The ablation chapter's table: one row per variant of the runner's ``results``, with overall
    IoU over its seeds and a 95% bootstrap CI, and the paired difference to the reference (same
    test samples, same seeds) on all, position and other expressions, in percentage points."""
    import pandas as pd

    done = results[results["status"].isin(["trained", "reused"])]
    seeds = sorted(done["seed"].unique().tolist())
    stage = int(done["stage"].max()) if len(done) else 2
    ref_samples = load_samples(run_dir, REFERENCE, seeds, stage)
    subsets = {"all": None, **position_subsets()}
    rows = []
    for name, part in done.groupby("variant", sort=False):
        samples = load_samples(run_dir, name, sorted(part["seed"].tolist()), stage)
        if samples is None:
            continue
        label = part["label"].iloc[0] if name != REFERENCE else "; ".join(
            f"{k}: {v}" for k, v in reference_labels(reference).items())
        rows.append({"variant": name, "group": part["group"].iloc[0], "label": label,
                     **compare_runs(samples, ref_samples if name != REFERENCE else None, subsets, resamples, seed),
                     "train s": float(part["train_s"].mean()), "iterations": part["iterations"].iloc[0]})
    return pd.DataFrame(rows).set_index("variant")


LEARNED_NOTHING = 1.0  # overall IoU (%) below which a variant is said not to have learned at all
SUBSETS = {"all": "all expressions", "position": "position expressions", "other": "other expressions"}


def describe_difference(table: pd.DataFrame, variant: str, subset: str = "all") -> str:
    """One sentence, from the numbers, on how ``variant`` differs from the reference on ``subset``.

    A difference counts as measured only when its 95% paired bootstrap interval excludes 0.
    """
    if variant not in table.index:
        return f"{variant}: not run (see the status column of the results)."
    row = table.loc[variant]
    key = f"Δ {subset}"
    if key not in row or not np.isfinite(row[key]):
        return f"{row['label']}: no {SUBSETS[subset]} to compare."
    diff, low, high = row[key], row[f"{key} low"], row[f"{key} high"]
    seeds = int(row["seeds"])
    if row["overall IoU"] < LEARNED_NOTHING:
        return (f"{row['group']} = {row['label']} did not learn within the budget: overall IoU "
                f"{row['overall IoU']:.1f}% ({seeds} seed{'s' if seeds > 1 else ''}), so its difference to the "
                "reference measures nothing but that.")
    if low > 0:
        verdict = f"raises overall IoU on {SUBSETS[subset]} by {diff:.1f} points"
    elif high < 0:
        verdict = f"lowers overall IoU on {SUBSETS[subset]} by {-diff:.1f} points"
    else:
        verdict = (f"makes no difference on {SUBSETS[subset]}: {diff:+.1f} points, an interval that spans "
                   "zero")
    return (f"{row['group']} = {row['label']} {verdict} (95% CI {low:+.1f} to {high:+.1f}; "
            f"{seeds} seed{'s' if seeds > 1 else ''}).")


def plot_group(table: pd.DataFrame, variants: Sequence[str], subsets: Sequence[str] = ("all", "position", "other"),
               axes: Any = None, title: str | None = None) -> Any:
    """Left: overall IoU of the reference and the variants with 95% CIs; right, on the same rows:
    the paired differences to the reference per expression subset, with their 95% CIs."""
    import matplotlib.pyplot as plt

    subsets = [s for s in subsets if f"Δ {s}" in table.columns]
    names = [n for n in (REFERENCE, *variants) if n in table.index]
    if axes is None:
        per_row = 0.45 if len(subsets) < 2 else 0.75
        _, axes = plt.subplots(1, 2, figsize=(12, 1.3 + per_row * len(names)), sharey=True,
                               gridspec_kw={"width_ratios": [1, 1.3]})
    rows = table.loc[names]
    # several questions in one figure: name the question too ("L2 normalisation: off")
    others = [n for n in names if n != REFERENCE]
    mixed = rows.loc[others, "group"].nunique() > 1
    labels = ["reference" if n == REFERENCE else f"{rows.loc[n, 'group']}: {rows.loc[n, 'label']}" if mixed
              else rows.loc[n, "label"] for n in names]
    y = np.arange(len(names))[::-1].astype(float)
    errors = np.vstack([rows["overall IoU"] - rows["CI low"], rows["CI high"] - rows["overall IoU"]])
    axes[0].errorbar(rows["overall IoU"], y, xerr=errors, fmt="o", capsize=4, color="black")
    axes[0].set_yticks(y, labels)
    axes[0].set_xlabel("overall IoU (%), 95% CI")
    height = 0.6 / max(len(subsets), 1)
    y_others = y[[names.index(n) for n in others]]
    part = table.loc[others]
    for k, subset in enumerate(subsets):
        offset = (k - (len(subsets) - 1) / 2) * height
        err = np.vstack([part[f"Δ {subset}"] - part[f"Δ {subset} low"], part[f"Δ {subset} high"] - part[f"Δ {subset}"]])
        axes[1].errorbar(part[f"Δ {subset}"], y_others - offset, xerr=err, fmt="o", capsize=3, label=SUBSETS[subset])
    axes[1].axvline(0, color="grey", lw=1, ls="--")
    axes[1].set_xlabel("difference to the reference (points), paired 95% CI")
    if len(subsets) > 1:
        axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    if title:
        axes[0].figure.suptitle(title)
    axes[0].figure.tight_layout()
    return axes


def grid_breakdowns(run_dir: str | Path, variants: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """What the ablations chapter shows beyond the table, from the per-sample results: overall IoU
    (%) per expression type and per region (thing or stuff) of every variant, averaged over its
    seeds, the test pairs per type, and the time-matched variants' plans; kept in the summary so
    that the chapter renders without the run folders."""
    import json

    import pandas as pd

    from referseg.ablations import ABLATIONS_DIR, PLAN_FILE
    from referseg.metrics import overall_iou_by

    by_type, by_region, pairs = {}, {}, {}
    for name in variants:
        samples = load_samples(run_dir, name, seeds)
        if samples is not None:
            by_type[name] = (100 * overall_iou_by(samples, "type")).to_dict()
            by_region[name] = (100 * overall_iou_by(samples, "region")).to_dict()
            if not pairs:
                pairs = samples[samples["seed"] == samples["seed"].iloc[0]]["type"].value_counts().to_dict()
    plans = {f"{path.parent.name} {path.stem.rsplit('-', 1)[1]}": json.loads(path.read_text())  # "<variant> seed<k>"
             for path in sorted((Path(run_dir) / ABLATIONS_DIR).glob(f"*/{PLAN_FILE.format(seed='*')}"))}
    for plan in plans.values():
        plan.pop("key", None)  # the whole reference profile again: the summary has it
    return {"by_type": pd.DataFrame(by_type).to_dict(), "by_region": pd.DataFrame(by_region).to_dict(),
            "type_pairs": {str(k): int(v) for k, v in pairs.items()}, "plans": plans}


def read_grid(summary_file: str | Path, reference: Profile) -> tuple[dict | None, list[str], pd.DataFrame | None, str]:
    """The full ablation grid kept in the repository (``make ablations``), read once: ``(summary, reasons
    it is stale, the chapter's table, a note saying who made it and, loudly, why it is stale)``; the
    summary and table are None when no grid is kept."""
    import pandas as pd

    from referseg.provenance import read_summary

    summary, stale = read_summary(summary_file, reference)
    if summary is None:
        return None, stale, None, (f"No full grid is kept in {summary_file}: `make ablations` makes it (about "
                                   "an hour on two cores). The tables below are the quick grid of this build.")
    table = pd.DataFrame(summary["table"]).set_index("variant")
    seeds = sorted({int(n) for n in table["seeds"]})
    run_seconds = sum(float(row.get("run_s") or 0) for row in summary["results"])
    note = provenance_note(
        f"Full grid: the profile's whole schedule, seeds {summary['seeds']} ({'/'.join(map(str, seeds))} finished "
        f"per variant)", summary["provenance"], stale,
        f"its runs took {run_seconds / 60:.0f} minutes of wall time, summed over runs.")
    return summary, stale, table, note


def kept_grid(summary_file: str | Path, reference: Profile) -> tuple[pd.DataFrame | None, str]:
    """The kept full grid's table and note (:func:`read_grid`)."""
    _, _, table, note = read_grid(summary_file, reference)
    return table, note


def provenance_note(what: str, origin: Mapping[str, Any], stale: Sequence[str], tail: str) -> str:
    """One kept summary's note: what it is, the command, commit, machine and time that made it,
    ``tail``, and first, loudly, each reason it is stale."""
    note = (f"{what}, made by `{origin['command']}` at commit {origin['commit']} on {origin['machine']}, "
            f"finished {origin['finished_utc']} UTC; {tail}")
    return ("**STALE:** " + "; ".join(stale) + ". Read these numbers as those of that code and profile. " + note
            if stale else note)


# --------------------------------------------------------------------------- seeds as the yardstick

SPREAD_FACTOR = 2.0  # a difference counts when it exceeds this many sds of a difference of two runs


def versus(a: tuple[float, float], b: tuple[float, float], higher: str = "beats", lower: str = "is below") -> str:
    """How a result (mean, sd over seeds) compares with another, judged by the seeds' spread:
    ``higher``/``lower`` when the means differ by more than ``SPREAD_FACTOR`` times the sd of a
    difference of two runs (sqrt(sd_a^2 + sd_b^2)), else "is within the seed spread of"."""
    (mean_a, sd_a), (mean_b, sd_b) = a, b
    if not all(np.isfinite([mean_a, mean_b, sd_a, sd_b])):
        return "cannot be compared (too few seeds) with"
    if abs(mean_a - mean_b) <= SPREAD_FACTOR * float(np.hypot(sd_a, sd_b)):
        return "is within the seed spread of"
    return higher if mean_a > mean_b else lower


def seed_table(summary_file: str | Path, reference: Profile) -> tuple[pd.DataFrame | None, str]:
    """Overall IoU (%) per seed, mean and sd, of our model (the grid's reference: the profile's full
    schedule) and of every learned baseline, from the kept ablation summary; and its note."""
    summary, _, _, note = read_grid(summary_file, reference)
    if summary is not None and "baselines" not in summary:
        note += " It holds no baseline seeds (`--no-baselines`)."
    return _seed_frame(summary), note


def _seed_frame(summary: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """:func:`seed_table`'s table from a kept summary (None without one, or without baseline seeds)."""
    import pandas as pd

    if summary is None or "baselines" not in summary:
        return None
    runs = [row for row in summary["results"] if row["variant"] == REFERENCE and row.get("overall_iou") is not None]
    ours = {f"seed {row['seed']}": 100 * row["overall_iou"] for row in runs}
    frame = pd.DataFrame([{"method": "ours, high resolution", **ours}, *summary["baselines"]]).set_index("method")
    seeds = [c for c in frame.columns if c.startswith("seed ")]
    frame["mean"], frame["sd"] = frame[seeds].mean(axis=1), frame[seeds].std(axis=1, ddof=1)
    return frame


# --------------------------------------------------------------------------- the learning-rate sweep

def kept_sweep(summary_file: str | Path, profile: Profile) -> tuple[pd.DataFrame | None, dict | None, str]:
    """The learning-rate sweep kept in the repository (``make sweep``): its table, its choice and a
    note on who made it, saying loudly when it is stale (other code, another profile) or when the
    profile does not use what it chose."""
    from referseg.provenance import read_summary
    from referseg.sweep import CHOSEN

    summary, stale = read_summary(summary_file, profile, chosen=CHOSEN)
    if summary is None:
        return None, None, f"No sweep is kept in {summary_file}: `make sweep` makes it."
    choice, origin = summary["choice"], summary["provenance"]
    used = {"init": profile.init, "pretrain": profile.pretrain, "stage1_lr": profile.stage1.lr,
            "stage2_lr": profile.stage2.lr}
    differs = [f"{key}: chose {choice[key]!r}, the profile has {value!r}" for key, value in used.items()
               if choice[key] != value]
    if differs:
        stale.append("the profile does not use its choice (" + "; ".join(differs) + ")")
    loops = sum(float(r.get("train_s") or 0) for r in summary["rows"])
    note = provenance_note(f"Sweep on the validation split, seed {choice['seed']}", origin, stale,
                           f"its runs' training loops took {loops / 60:.0f} minutes, summed over runs. "
                           f"Rule: {choice['rule']}.")
    return sweep_table(summary["rows"]), choice, note


def schedule_sentence(profile: Profile, spec: Profile, stage: int) -> str:
    """How a profile's schedule for ``stage`` compares with SPEC 5's (``spec``: the paper profile)."""
    mine, theirs = getattr(profile, f"stage{stage}"), getattr(spec, f"stage{stage}")
    ratio = mine.lr / theirs.lr
    return (f"{profile.name}: {mine.iterations:,} iterations at lr {mine.lr:g}, x{mine.lr_gamma:g} every "
            f"{mine.lr_step:,}; SPEC: {theirs.iterations:,} at {theirs.lr:g}, x{theirs.lr_gamma:g} every "
            f"{theirs.lr_step:,}. " + ("The same learning rate." if ratio == 1 else
                                       f"The learning rate is {ratio:g} times SPEC's (the sweep chose it)."))


def sweep_sentences(table: pd.DataFrame, choice: Mapping[str, Any]) -> list[str]:
    """The sweep's findings as sentences computed from its table (:func:`sweep_table`) and choice."""
    from referseg.sweep import SPEC_LR

    first = table[table["stage"] == 1]
    best = first.loc[first["all"].idxmax()]
    sentences = []
    for _, row in first[(first["stage-1 lr"] == SPEC_LR) & (first["init"] == best["init"])].iterrows():
        sentences.append(f"At SPEC's lr {SPEC_LR:g} ({row['init']} init, stage 0: {row['stage 0']}) stage 1 reaches "
                         f"{row['all']:.1f}% validation overall IoU (things {row['things']:.1f}%).")
    sentences.append(f"The best stage 1 (lr {best['stage-1 lr']:g}, {best['init']} init, stage 0: {best['stage 0']}) "
                     f"reaches {best['all']:.1f}%: things {best['things']:.1f}%, stuff {best['stuff']:.1f}%.")
    second = table[table["stage"] == 2]
    if len(second):
        top = second.loc[second["all"].idxmax()]
        sentences.append(f"After stage 2 the best lr, {top['stage-2 lr']:g}, reaches {top['all']:.1f}%: things "
                         f"{top['things']:.1f}%, stuff {top['stuff']:.1f}%.")
    sentences.append(f"Chosen: {choice['init']} init, stage 0 {'on' if choice['pretrain'] else 'off'}, stage-1 lr "
                     f"{choice['stage1_lr']:g}, stage-2 lr {choice['stage2_lr']:g}.")
    return sentences


def by_region(summary: Mapping[str, Any]) -> dict[str, float]:
    """Overall IoU (%) of an evaluation summary (:func:`referseg.evaluate.save_method`) on all pairs,
    on things and on stuff."""
    regions = summary["by_region"]
    return {"all": 100 * summary["overall_iou"],
            **{name: 100 * regions[key]["overall_iou"] if key in regions else float("nan")
               for name, key in (("things", "thing"), ("stuff", "stuff"))}}


def sweep_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The chapter's view: one row per run, validation overall IoU (%) on all, things and stuff."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    table = pd.DataFrame({
        "stage": frame["stage"], "init": frame["init"], "stage 0": frame["pretrain"].map({True: "yes", False: "no"}),
        "stage-1 lr": frame["stage1_lr"], "stage-2 lr": frame["lr"].where(frame["stage"] == 2),
        "all": 100 * frame["overall_iou"], "things": 100 * frame.get("thing_iou"),
        "stuff": 100 * frame.get("stuff_iou"), "train s": frame["train_s"]})
    return table.round(2)


# --------------------------------------------------------------------------- the verdict per claim

CONFIRMED, CONTRADICTED, NO_DIFFERENCE = "confirmed on SynthRef", "contradicted on SynthRef", "not confirmed on SynthRef"
NOT_MEASURED = "not measured in this build"


def _ablation_verdict(table: pd.DataFrame | None, variant: str) -> tuple[str, str]:
    """(figures, status) of a paper claim "this part helps", tested by removing it (``variant``)."""
    if table is None or variant not in table.index:
        return "no kept full grid (`make ablations`)", NOT_MEASURED
    row = table.loc[variant]
    diff, low, high = row["Δ all"], row["Δ all low"], row["Δ all high"]
    figures = (f"{row['label']}: {diff:+.1f} points (95% CI {low:+.1f} to {high:+.1f}; {int(row['seeds'])} seeds, "
               f"seed sd {row['seed sd']:.1f})")
    status = CONFIRMED if high < 0 else CONTRADICTED if low > 0 else NO_DIFFERENCE + " (no difference)"
    return figures, status


def verdicts(run_dir: str | Path, profile: Profile, kept_file: str | Path,
             real_text_file: str | Path | None = None, resamples: int = 1000) -> pd.DataFrame:
    """One row per claim of the paper: where this study tests it, the figures it measured (with
    intervals over test samples and seeds) and a status, computed from the run folder, the kept
    ablation grid and the real-text chapter's summary; what is absent says how to get it."""
    import json

    import pandas as pd

    from referseg.metrics import compare_runs

    rows = []
    eval_dir, split = Path(run_dir) / "eval", profile.eval_split
    files = {stage: eval_dir / f"ours-{stage}res_{split}.csv" for stage in ("high", "low")}
    if all(path.is_file() for path in files.values()):
        high, low = (pd.read_csv(files[s], keep_default_na=False).assign(seed=profile.seed) for s in ("high", "low"))
        row = compare_runs(high, low, resamples=resamples, seed=profile.seed)
        figures = (f"high {row['overall IoU']:.1f}% against low {row['overall IoU'] - row['Δ all']:.1f}%: "
                   f"{row['Δ all']:+.1f} points (95% CI {row['Δ all low']:+.1f} to {row['Δ all high']:+.1f}; 1 seed)")
        status = CONFIRMED if row["Δ all low"] > 0 else CONTRADICTED if row["Δ all high"] < 0 else NO_DIFFERENCE
    else:
        figures, status = "no evaluation in the run folder (chapter 7)", NOT_MEASURED
    rows.append(("the high-resolution model beats the low-resolution one (Table 1)", "7 Evaluation", figures, status))
    summary, stale, grid_table, _ = read_grid(kept_file, profile)
    seeds = _seed_frame(summary)
    if seeds is None:
        rows.append(("the model beats each baseline (Table 1)", "7 Evaluation", "no kept baseline seeds "
                     "(`make ablations`)", NOT_MEASURED))
    else:
        ours = tuple(seeds.loc["ours, high resolution", ["mean", "sd"]])
        judged = {name: versus(ours, (r["mean"], r["sd"])) for name, r in seeds.drop(index="ours, high resolution")
                  .iterrows()}
        above = [name for name, verdict in judged.items() if verdict == "is below"]
        best = seeds.drop(index="ours, high resolution")["mean"].idxmax()
        figures = (f"ours {ours[0]:.1f} ± {ours[1]:.1f}; best baseline: {best} {seeds.loc[best, 'mean']:.1f} ± "
                   f"{seeds.loc[best, 'sd']:.1f} ({len(seeds.columns) - 2} seeds; overall IoU, %)")
        status = (CONTRADICTED + f" ({len(above)} baseline{'s' if len(above) > 1 else ''} above the model)" if above
                  else CONFIRMED if all(v == "beats" for v in judged.values()) else NO_DIFFERENCE)
        rows.append(("the model beats each baseline (Table 1)", "7 Evaluation", figures, status))
    table = None if stale else grid_table
    for claim, variant in (("the spatial channels matter (SPEC 4)", "spatial-0"),
                           ("L2 normalisation matters (SPEC 4)", "no-l2-norm"),
                           ("an LSTM reads the expression better than a bag of words (SPEC 4)", "bag-of-words")):
        rows.append((claim, "8 Ablations", *_ablation_verdict(table, variant)))
    rows.append(("48.03% overall IoU on ReferIt's test split (Table 1, SPEC 6)", "7 Evaluation, paper profile",
                 "needs ReferIt's images, which cannot be had here", "not testable without ReferIt's images"))
    text = json.loads(Path(real_text_file).read_text()) if real_text_file and Path(real_text_file).is_file() else None
    if text is None:
        rows.append(("ReferIt's text as SPEC 2 records it", "1 Data, 9 Real text",
                     "no ReferIt text files (`referseg data fetch-referit-text`)", NOT_MEASURED))
    else:
        stats = text["statistics"]
        figures = (f"{stats['trainval_pairs']:,} trainval and {stats['test_pairs']:,} test expressions, "
                   f"{stats['mean_tokens']:.2f} tokens per expression, {stats['unknown_trainval']:.2f}% and "
                   f"{stats['unknown_test']:.2f}% unknown tokens (official vocabulary)")
        rows.append(("ReferIt's text as SPEC 2 records it", "1 Data, 9 Real text", figures,
                     "reproduced on ReferIt's text" if text["matches_spec"] else "differs from SPEC 2"))
        iou = text["overall_iou"]
        rows.append(("(this study) what the words alone know, on ReferIt's test boxes", "9 Real text",
                     f"words alone {iou['text-only']:.1f}%, whole image {iou['whole-image']:.1f}%, mean box "
                     f"{iou['mean-box']:.1f}% ({text['pairs']:,} test pairs; box IoU, not the paper's mask IoU)",
                     "measured on ReferIt's text (no paper claim)"))
    return pd.DataFrame(rows, columns=["claim", "tested in", "measured", "status"])


def markdown_table(frame: pd.DataFrame) -> str:
    """A frame as a Markdown pipe table (for a page that includes a generated table)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# SPEC 2's figures for ReferIt's text with the official vocabulary (the real-text chapter checks them).
SPEC_REFERIT_TEXT = {"trainval_pairs": 59_976, "test_pairs": 60_105, "mean_tokens": 3.54, "unknown_trainval": 4.95,
                     "unknown_test": 4.99}


def real_text_summary(refer: Any, vocab: Vocabulary, table: pd.DataFrame, pairs: int) -> dict[str, Any]:
    """What the real-text chapter measured, for the introduction's verdicts: ReferIt's text
    statistics (``stats_table`` of the trainval and test splits; mean tokens over both) against
    SPEC 2's, and the words-alone table's overall IoU (%) per method on ``pairs`` test pairs."""
    from referseg.data.refer import stats_table
    from referseg.evaluate import WORDS_ALONE

    stats = stats_table(refer, vocab)
    both = stats.loc[["trainval", "test"]]
    measured = {"trainval_pairs": int(both.loc["trainval", "pairs"]), "test_pairs": int(both.loc["test", "pairs"]),
                "mean_tokens": round(float((both["len_mean"] * both["pairs"]).sum() / both["pairs"].sum()), 2),
                "unknown_trainval": float(both.loc["trainval", "pct_unknown"]),
                "unknown_test": float(both.loc["test", "pct_unknown"])}
    by_label = table["overall IoU"]
    return {"statistics": measured, "spec": SPEC_REFERIT_TEXT, "matches_spec": measured == SPEC_REFERIT_TEXT,
            "pairs": int(pairs), "overall_iou": {key: float(by_label[label]) for key, label in WORDS_ALONE.items()}}


def error_budget(run_dir: str | Path, profile: Profile, kept_file: str | Path) -> pd.DataFrame:
    """Each deviation of this study from the official recipe that a future ReferIt run inherits,
    with its effect where this build measured one (the run folder's evaluation, the kept grid),
    and otherwise what is expected and why it is not measured here."""
    import json

    import pandas as pd

    rows = []
    summary_file = Path(run_dir) / "eval" / f"ours-highres_{profile.eval_split}.json"
    if summary_file.is_file():
        modes = json.loads(summary_file.read_text())["by_mode"]
        if {"logits", "official"} <= set(modes):
            gap = 100 * (modes["official"]["overall_iou"] - modes["logits"]["overall_iou"])
            effect = f"official minus default: {gap:+.2f} points of overall IoU (this run, chapter 7)"
        else:
            effect = "not computed in this run"
    else:
        effect = "no evaluation in the run folder (chapter 7)"
    rows.append(("evaluation mode: logits thresholded at the original size, not the 0/1 map resized",
                 "measured", effect))
    _, stale, grid_table, _ = read_grid(kept_file, profile)
    table = None if stale else grid_table
    for name, what in (("init-official", "initialisation: PyTorch's defaults, not the official one (SPEC 4)"),
                       ("stage0", "no box-retrieval stage 0 before stage 1 (SPEC 5)"),
                       ("stage0-official", "stage 0 with the official initialisation: the official recipe")):
        if table is not None and name in table.index:
            row = table.loc[name]
            effect = (f"{row['label']} minus the study's default: {row['Δ all']:+.1f} points (95% CI "
                      f"{row['Δ all low']:+.1f} to {row['Δ all high']:+.1f}, {int(row['seeds'])} seeds; SynthRef, "
                      "chapter 8)")
            rows.append((what, "measured on SynthRef", effect))
        else:
            rows.append((what, "not measured in this build", "no current kept grid (`make ablations`)"))
    rows += [
        ("VGG-16 weights: torchvision's ImageNet weights and normalisation, not the Caffe model", "expected",
         "sign unknown: both are ImageNet VGG-16s, but their features differ, and the official classifier "
         "was trained on the Caffe model's; only a ReferIt run can measure it"),
        ("precision: bfloat16 on a GPU (optional; float32 by default)", "expected",
         "small with float32 (the default matches the official code); bf16 is measured only for speed, "
         "in the benchmarks, because no GPU ran this build"),
        ("vocabulary: built from the training split unless the official file is given (SPEC 2)", "expected",
         "none with the official file, which the paper profile can load (the real-text chapter uses it)"),
        ("resizing: OpenCV bilinear, not skimage.transform.resize, with the official geometry", "expected",
         "pixels at region borders only: the letterbox geometry agrees with the official code exactly"),
    ]
    return pd.DataFrame(rows, columns=["deviation from the official recipe", "status", "effect"])
