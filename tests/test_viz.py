"""The notebooks' shared figures: overlays, response maps, example choice and plots, on small real arrays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from referseg import viz  # noqa: E402
from referseg.config import get_profile  # noqa: E402
from referseg.data.refer import Pair  # noqa: E402
from referseg.data.transforms import letterbox_image, normalize  # noqa: E402
from referseg.text import Vocabulary  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def gradient_image(height: int = 30, width: int = 40) -> np.ndarray:
    """A uint8 RGB image whose pixels all differ from pure red and from each other along x."""
    x = np.linspace(20, 200, width, dtype=np.float32)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = 30
    image[..., 1] = x[None, :].astype(np.uint8)
    image[..., 2] = 90
    return image


def square_mask(height: int = 30, width: int = 40) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[8:22, 10:30] = True
    return mask


def test_overlay_tints_only_masked_pixels():
    image, mask = gradient_image(), square_mask()
    out = viz.overlay(image, mask, color=(255, 0, 0), alpha=0.5, outline=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    # Red rises and green falls towards the tint inside the mask.
    assert (out[mask][:, 0] > image[mask][:, 0]).all()
    assert (out[mask][:, 1] <= image[mask][:, 1]).all()
    expected = np.round(0.5 * image[mask].astype(np.float32) + 0.5 * np.array([255, 0, 0], np.float32))
    np.testing.assert_allclose(out[mask], expected, atol=1)


def test_overlay_outline_draws_the_mask_border_and_rejects_a_wrong_size():
    image, mask = gradient_image(), square_mask()
    out = viz.overlay(image, mask, color=(255, 0, 0), alpha=0.0, outline=True)
    np.testing.assert_array_equal(out[8, 15], [255, 0, 0])  # top edge of the mask
    np.testing.assert_array_equal(out[15, 20], image[15, 20])  # well inside: alpha 0 leaves it
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # far outside
    with pytest.raises(ValueError, match="does not match"):
        viz.overlay(image, mask[:-1])


def test_outline_has_a_dark_halo_and_overlay_masks_uses_distinct_colours():
    image, mask = gradient_image(), square_mask()
    outlined = viz.draw_outline(image, mask, color=(0, 255, 0), thickness=1)
    assert (outlined[8, 15] == [0, 255, 0]).all()
    assert (outlined[7, 15] == 0).all() and (outlined[9, 15] == 0).all()  # the halo either side of the line
    other = np.zeros_like(mask)
    other[0:12, 0:8] = True
    both = viz.overlay_masks(image, [mask, other], alpha=1.0)
    assert tuple(both[15, 20]) == viz.MASK_COLOURS[0]
    assert tuple(both[5, 3]) == viz.MASK_COLOURS[1]


def test_compare_masks_tints_prediction_and_outlines_target():
    image = gradient_image()
    prediction, target = square_mask(), np.zeros((30, 40), dtype=bool)
    target[2:6, 2:6] = True
    out = viz.compare_masks(image, prediction, target)
    assert out[15, 20, 0] > image[15, 20, 0]  # prediction tinted red
    assert tuple(out[2, 3]) == viz.GROUND_TRUTH  # target's border


def test_heatmap_and_cell_mask_stretch_a_grid_over_the_image():
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    values = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = viz.heatmap(image, values, alpha=1.0, cmap="gray")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert (out[:16, :16] == 0).all() and (out[:16, 16:] == 255).all()  # nearest: whole blocks
    smooth = viz.heatmap(image, values, alpha=1.0, cmap="gray", smooth=True)
    assert 0 < smooth[15, 15, 0] < 255  # bilinear blends at the block corner
    cells = viz.cell_mask(values, 8)
    assert cells.shape == (8, 8) and cells.dtype == bool
    np.testing.assert_array_equal(cells[:4, 4:], True)
    np.testing.assert_array_equal(cells[:4, :4], False)


def test_letterboxed_pads_a_wide_image_top_and_bottom():
    image = gradient_image(30, 60)
    square = viz.letterboxed(image, 64)
    assert square.shape == (64, 64, 3) and square.dtype == np.uint8
    assert (square[0] == 0).all() and (square[-1] == 0).all()  # padding rows
    assert square[32].any()


def test_sigmoid_is_stable_and_exact():
    x = np.array([-1000.0, -2.0, 0.0, 3.0, 1000.0])
    np.testing.assert_allclose(viz.sigmoid(x), [0.0, 1 / (1 + np.exp(2.0)), 0.5, 1 / (1 + np.exp(-3.0)), 1.0],
                               atol=1e-12)


def pair(ann_id: int, image_id: int, is_stuff: bool = False, expression: str = "x") -> Pair:
    return Pair(ref_id=ann_id, ann_id=ann_id, image_id=image_id, sent_id=ann_id * 10, split="test",
                expression=expression, type=None, category="c", is_stuff=is_stuff)


def test_example_choice_groups_by_image_and_region():
    pairs = [pair(1, 10), pair(1, 10, expression="again"), pair(2, 10, True), pair(3, 10),
             pair(4, 20), pair(5, 20)]
    grouped = viz.pairs_by_image(pairs)
    assert list(grouped) == [10, 20] and len(grouped[10]) == 4
    assert [p.ann_id for p in viz.one_pair_per_region(grouped[10])] == [1, 2, 3]
    assert [p.ann_id for p in viz.one_pair_per_region(grouped[10], limit=2)] == [1, 2]
    # Only image 10 has 3 regions including stuff; with nothing qualifying, the most regions wins.
    assert {viz.pick_image(pairs, seed=s) for s in range(5)} == {10}
    assert viz.pick_image(pairs, min_regions=5) == 10
    with pytest.raises(ValueError):
        viz.pick_image([])


def test_expression_logits_match_a_direct_forward():
    from referseg.model.segmenter import build_model

    profile = get_profile("smoke", backbone_weights=None)
    vocab = Vocabulary.build(["the red circle", "sky", "left star"])
    torch.manual_seed(0)
    model = build_model(profile, len(vocab)).eval()
    image = gradient_image(36, 48)
    expressions = ["the red circle", "sky on the left"]
    low = viz.expression_logits(model, image, expressions, vocab, profile)
    high = viz.expression_logits(model, image, expressions, vocab, profile, high_res=True)
    assert low.shape == (2, profile.grid, profile.grid)
    assert high.shape == (2, profile.input_size, profile.input_size)
    images = normalize(letterbox_image(image, profile.input_size), profile.pixel_mean, profile.pixel_std)[None]
    tokens = torch.tensor([vocab.encode(expressions[1], profile.seq_len)])
    with torch.no_grad():
        direct = model(tokens, images=images)[0].numpy()
    np.testing.assert_allclose(low[1], direct, rtol=1e-5, atol=1e-5)
    assert not np.allclose(low[0], low[1])  # the expression matters


def test_grids_make_one_visible_axis_per_image():
    images = [gradient_image() for _ in range(5)]
    fig = viz.image_grid(images, [f"image {i}" for i in range(5)], ncols=3)
    assert sum(ax.get_visible() and bool(ax.images) for ax in fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes if ax.images][4] == "image 4"
    maps = np.random.default_rng(0).normal(size=(3, 4, 4))
    fig = viz.channel_grid(maps, ["a", "b", "c"], ncols=2)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    np.testing.assert_array_equal(shown[2].images[0].get_array(), maps[2])
    with pytest.raises(ValueError):
        viz.channel_grid(maps[0])


def drawn_boxes(fig) -> tuple[list, list, object]:
    """Window extents of the image axes and of their titles (None without one), and the suptitle's."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    titles = [ax.title.get_window_extent(renderer) if ax.get_title() else None for ax in axes]
    suptitle = fig._suptitle.get_window_extent(renderer) if fig._suptitle else None
    return [ax.get_window_extent(renderer) for ax in axes], titles, suptitle


@pytest.mark.parametrize("ncols, width", [(3, 3.4), (4, 2.6), (5, 1.6), (1, 3.2)])
def test_grid_titles_never_overlap_images_or_each_other(ncols, width):
    # captions as long as chapter 1's: one expression per region, up to six regions
    words = ["the red circle on the left", "sky", "the biggest star", "the blue square",
             "gravel at the bottom", "leftmost triangle"]
    captions = [" | ".join(f'"{w}"' for w in words[:k]) for k in (6, 1, 4, 6, 2, 5, 3)]
    images = [gradient_image(360, 480)] * 6 + [gradient_image(480, 360)]
    fig = viz.image_grid(images, captions, ncols=ncols, width=width, suptitle="a long suptitle")
    boxes, titles, suptitle = drawn_boxes(fig)
    assert len(boxes) == len(images)
    frame = fig.bbox
    for i, title in enumerate(titles):
        assert title is not None
        assert frame.x0 - 1 <= title.x0 and title.x1 <= frame.x1 + 1 and title.y1 <= frame.y1 + 1
        assert not title.overlaps(suptitle), f"title {i} runs into the suptitle"
        for j, other in enumerate(boxes):
            assert not title.overlaps(other), f"title {i} runs into image {j}"
        for j, other in enumerate(titles):
            assert j == i or not title.overlaps(other), f"title {i} runs into title {j}"
    shown = [ax.get_title() for ax in fig.axes if ax.images]
    assert all(len(line) <= int(width * 72 / (viz.TITLE_CHAR * 9)) for t in shown for line in t.split("\n"))
    assert all(t.count("\n") < 4 for t in shown)  # at most four lines, the rest cut with "..."


def test_a_title_is_cut_after_its_last_line():
    assert viz.wrap_title("one two three four five six", 9, 2) == "one two\nthree ..."
    assert viz.wrap_title("short", 20, 1) == "short"


def test_training_curves_plot_loss_and_learning_rate():
    records = [{"iteration": i, "loss": 1 / i, "lr": 0.01 if i <= 10 else 0.001} for i in (1, 5, 10, 15, 20)]
    ax = viz.plot_training_curves({"stage 1": records, "stage 2": records}, offsets={"stage 2": 20})
    loss_lines = ax.get_lines()
    assert len(loss_lines) == 2
    np.testing.assert_array_equal(loss_lines[1].get_xdata(), [21, 25, 30, 35, 40])
    np.testing.assert_allclose(loss_lines[0].get_ydata(), [r["loss"] for r in records])


def test_length_histogram_bars_are_percentages():
    ax = viz.length_histogram({"a": [1, 1, 2, 3, 30], "b": [2, 2]}, max_length=25)
    heights = np.array([bar.get_height() for bar in ax.patches])
    assert heights.sum() == pytest.approx(200.0)  # each series sums to 100%
    assert heights[0] == pytest.approx(40.0)  # two of five expressions of "a" have one token


def test_precision_curve_values_at_the_marks():
    ious = np.array([0.0, 0.5, 0.55, 0.7, 0.95])
    ax = viz.precision_curve({"m": ious})
    curve, marks = ax.get_lines()[0], ax.get_lines()[1]
    assert curve.get_ydata()[0] == pytest.approx(100.0)  # everything has IoU >= 0
    np.testing.assert_allclose(marks.get_ydata(), [80.0, 40.0, 40.0, 20.0, 20.0])  # IoU >= 0.5 .. 0.9


def _ablation_table():
    import pandas as pd

    rows = [
        {"variant": "reference", "group": "reference", "label": "reference", "seeds": 2, "overall IoU": 50.0,
         "CI low": 48.0, "CI high": 52.0},
        {"variant": "spatial-0", "group": "spatial channels", "label": "0 channels", "seeds": 2,
         "overall IoU": 45.0, "CI low": 43.0, "CI high": 47.0, "Δ all": -5.0, "Δ all low": -6.5, "Δ all high": -3.5,
         "Δ position": float("nan"), "Δ position low": float("nan"), "Δ position high": float("nan")},
        {"variant": "no-l2-norm", "group": "L2 normalisation", "label": "off", "seeds": 1, "overall IoU": 51.0,
         "CI low": 49.0, "CI high": 53.0, "Δ all": 1.0, "Δ all low": -0.5, "Δ all high": 2.5,
         "Δ position": 3.0, "Δ position low": 1.0, "Δ position high": 5.0},
    ]
    return pd.DataFrame(rows).set_index("variant")


def test_describe_difference_says_what_the_interval_allows():
    table = _ablation_table()
    assert viz.describe_difference(table, "spatial-0") == (
        "spatial channels = 0 channels lowers overall IoU on all expressions by 5.0 points "
        "(95% CI -6.5 to -3.5; 2 seeds).")
    assert "makes no difference on all expressions: +1.0 points, an interval that spans zero" in (
        viz.describe_difference(table, "no-l2-norm"))
    assert "1 seed)" in viz.describe_difference(table, "no-l2-norm")
    assert "raises overall IoU on position expressions by 3.0" in viz.describe_difference(table, "no-l2-norm",
                                                                                          "position")
    assert viz.describe_difference(table, "spatial-0", "position") == "0 channels: no position expressions to compare."
    assert viz.describe_difference(table, "bag-of-words").startswith("bag-of-words: not run")
    table.loc["spatial-0", "overall IoU"] = 0.0  # a variant that predicts nothing has no effect to report
    assert "0 channels did not learn within the budget: overall IoU 0.0%" in viz.describe_difference(table,
                                                                                                    "spatial-0")


def test_plot_group_shows_the_reference_and_the_differences():
    table = _ablation_table()
    axes = viz.plot_group(table, ["spatial-0", "no-l2-norm"], subsets=("all",), title="two questions")
    labels = [tick.get_text() for tick in axes[0].get_yticklabels()]
    assert labels == ["reference", "spatial channels: 0 channels", "L2 normalisation: off"]
    assert axes[0].figure.get_suptitle() == "two questions"
    assert len(axes[1].containers) == 1  # one error bar series: the "all" subset


def test_missing_values_show_as_a_dash():
    frame = pd.DataFrame({"overall IoU": [48.03, 12.5], "mean IoU": [np.nan, 11.25]},
                         index=["published", "this run"])
    shown = viz.dash_missing(frame)
    assert shown.loc["published", "mean IoU"] == "\u2013" and shown.loc["this run", "mean IoU"] == 11.25
    assert "NaN" not in shown.to_html() and frame["mean IoU"].isna().sum() == 1  # a copy


def test_printed_text_fits_the_code_column(capsys):
    viz.print_wrapped("word " * 40 + "end")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) > 1 and all(len(line) <= 88 for line in lines)
    assert all(line.startswith("  ") for line in lines[1:])


def test_a_glued_figure_is_shown_once_and_closed(capsys):
    fig, ax = plt.subplots()
    viz.glue_figure("fig-test", ax)
    assert not plt.fignum_exists(fig.number)
    assert capsys.readouterr().out.count("<Figure") == 1  # outside a kernel: its text form
