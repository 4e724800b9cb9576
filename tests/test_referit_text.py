"""What the words alone know: ReferIt's text files as a dataset of boxes, the model without
visual features, its training without images, and its evaluation against boxes (by hand on a
tiny fixture, and against the pixel-by-pixel path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from referseg.config import get_profile
from referseg.data.refer import DatasetNotFoundError, ReferItText, expression_group, load_refer
from referseg.data.transforms import (
    box_coverage,
    box_mask,
    letterbox_box,
    letterbox_boxes,
    letterbox_mask,
    lowres_box_labels,
    lowres_labels,
    prediction_mask,
    undo_letterbox,
    undo_letterbox_matrices,
)
from referseg.evaluate import (
    box_counts,
    evaluate_models,
    evaluate_words_alone,
    mean_box_prior,
    positive_runs,
    text_only_box_counts,
    words_alone_table,
)
from referseg.metrics import box_intersection_union, summarize
from referseg.model.segmenter import Segmenter, bilinear_kernel, bilinear_upsampling, build_model
from referseg.predict import image_logits, split_logits, text_only_logits
from referseg.runs import Run, read_checkpoint
from referseg.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*unknown to the vocabulary:UserWarning")]
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "09_real_text.py"


def text_profile(root: Path, **overrides):
    """The `text` profile on a fixture: a 64 letterbox, a 4x4 grid, tiny widths, a few iterations."""
    settings = dict(data_root=str(root), vocab_file=None, input_size=64, stride=16, d_embed=8, d_text=8,
                    d_cls=4, stage1={"iterations": 6, "lr_step": 4}, checkpoint_every=3, log_every=2)
    return get_profile("text", **{**settings, **overrides})


# ---------------------------------------------------------------------------- box geometry


def test_letterboxed_boxes_are_the_letterboxed_masks():
    rng = np.random.default_rng(0)
    for size in (512, 256, 64):
        for height, width in ((360, 480), (480, 360), (320, 480), (37, 53), (700, 90), (1, 5)):
            corners = np.sort(rng.integers(0, [width, height], size=(40, 2, 2)), axis=1)
            boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)  # x0, y0, x1, y1
            boxes[:5, 2:] = boxes[:5, :2]  # one-pixel boxes: a strong downscale may skip them
            square = letterbox_boxes(boxes, height, width, size)
            for box, inside in zip(boxes, square, strict=True):
                expected = letterbox_mask(box_mask(box, height, width), size)
                assert np.array_equal(box_mask(inside, size, size), expected), (size, height, width, box)
                for mode in ("or", "nearest"):
                    assert np.array_equal(lowres_box_labels(inside, size, 16, mode), lowres_labels(expected, 16, mode))
    assert letterbox_box([0, 0, 479, 359], 360, 480, 512) == (0, 64, 511, 447)  # 480x360 -> 512x384, centred
    boxes = rng.integers(0, 40, size=(30, 4))
    boxes[:, 2:] += boxes[:, :2]
    boxes[0] = [5, 5, 3, 9]  # empty
    assert np.array_equal(box_coverage(boxes, 64), sum(box_mask(b, 64, 64).astype(int) for b in boxes))


def test_box_intersection_union():
    prediction = np.zeros((4, 6), dtype=bool)
    prediction[:, :3] = True  # 12 pixels
    assert box_intersection_union(prediction, [2, 1, 4, 2]) == (2, 12 + 6 - 2)
    assert box_intersection_union(prediction, [2, 1, 4, 2], predicted=12) == (2, 16)
    with pytest.raises(ValueError, match="not inside the 6x4 prediction"):
        box_intersection_union(prediction, [0, 0, 6, 1])


def test_undoing_the_letterbox_is_two_matrices():
    rng = np.random.default_rng(1)
    for size, (height, width) in ((512, (360, 480)), (256, (480, 320)), (64, (37, 53)), (64, (90, 200))):
        square = rng.normal(size=(size, size)).astype(np.float32)
        rows, cols = undo_letterbox_matrices(size, height, width)
        np.testing.assert_allclose(rows @ square @ cols.T, undo_letterbox(square, height, width), atol=1e-5)


def test_positive_runs_are_the_pixels_of_prediction_mask():
    rng = np.random.default_rng(2)
    for size, stride in ((512, 32), (256, 16), (64, 16)):
        grid = size // stride
        upsample = torch.nn.ConvTranspose2d(1, 1, 2 * stride, stride=stride, padding=stride // 2, bias=False)
        with torch.no_grad():
            upsample.weight.copy_(bilinear_kernel(stride))
        hats = bilinear_upsampling(upsample, grid)
        cells = rng.normal(size=(3, grid, grid)).astype(np.float32) + rng.normal(size=(3, 1, 1)).astype(np.float32)
        cells[2] = 1.0  # flat: every interval positive
        with torch.no_grad():
            square = upsample(torch.from_numpy(cells)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(hats @ cells[0] @ hats.T, square[0], atol=1e-5)
        for height, width in ((360, 480), (480, 320), (37, 53), (700, 900)):
            rows = undo_letterbox_matrices(size, height, width)[0] @ hats @ cells
            start, stop = positive_runs(rows, size, stride, height, width)
            for k in range(len(cells)):
                mask = np.zeros((height, width), dtype=bool)
                for t in range(height):
                    for a, b in zip(start[k, t].astype(int), stop[k, t].astype(int), strict=True):
                        mask[t, a:b] = True
                assert np.array_equal(mask, prediction_mask(square[k], height, width)), (size, height, width, k)
    with torch.no_grad():
        upsample.weight.add_(0.01)  # trained (stage 2): no longer the bilinear kernel
    assert bilinear_upsampling(upsample, grid) is None


# ---------------------------------------------------------------------------- the dataset


def test_text_files_serve_pairs_sizes_and_boxes_without_pixels(referit_text):
    refer = ReferItText(referit_text["root"])
    assert refer.splits == ["train", "val", "trainval", "test"]
    assert [p.expression for p in refer.pairs("trainval")] == ["left half", "the left", "everything", "sky"]
    assert [p.ann_id for p in refer.pairs("test")] == [303001, 303002, 304001]
    assert refer.images[304] == {"id": 304, "file_name": "304.jpg", "height": 32, "width": 64}
    assert refer.boxes[305001] == (1, 2, 30, 40)  # every box of the files, used or not
    for pair in refer.pairs("trainval") + refer.pairs("test"):
        image = refer.images[pair.image_id]
        mask = refer.load_mask(pair.ann_id)
        assert np.array_equal(mask, box_mask(refer.boxes[pair.ann_id], image["height"], image["width"]))
        square = letterbox_mask(mask, 64)
        assert np.array_equal(refer.square_mask(pair.ann_id, 64), square)
        assert np.array_equal(refer.lowres_mask(pair.ann_id, 64, 4), lowres_labels(square, 4))
    assert refer.load_mask(304001).sum() == 100
    with pytest.raises(FileNotFoundError, match="no images .*visual_features=false"):
        refer.load_image(303)
    profile = text_profile(referit_text["root"])
    assert isinstance(load_refer(profile), ReferItText)


def test_text_files_missing_or_wrong_are_refused(referit_text, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="referit_bbox.json, referit_imsize.json.*fetch-referit-text"):
        ReferItText(tmp_path / "nothing")
    root = referit_text["root"]
    with pytest.raises(ValueError, match="no referit_query_testB.json; its splits are train, val, trainval, test"):
        ReferItText(root).pairs("testB")
    boxes = json.loads((root / "referit_bbox.json").read_text())
    (root / "referit_bbox.json").write_text(json.dumps({**boxes, "304_1": [10, 5, 64, 14]}))
    with pytest.raises(ValueError, match=r"region 304_1: box \[10, 5, 64, 14\] is not .* inside its 64x32 image"):
        ReferItText(root)
    del boxes["303_2"]
    (root / "referit_bbox.json").write_text(json.dumps(boxes))
    with pytest.raises(ValueError, match="region 303_2 has no box"):
        ReferItText(root).pairs("test")
    with pytest.raises(ValueError, match="holds expressions and boxes but no pixels"):
        get_profile("text", visual_features=True)


def test_official_text_files_are_the_papers_split(official_referit):
    refer = ReferItText(official_referit)
    counts = {split: (len({p.image_id for p in refer.pairs(split)}), len({p.ann_id for p in refer.pairs(split)}),
                      len(refer.pairs(split))) for split in ("trainval", "test")}
    assert counts == {"trainval": (9995, 49515, 59976), "test": (9994, 49730, 60105)}  # SPEC 2
    assert refer.boxes[38685001] == (0, 0, 479, 132)
    assert (refer.images[38685]["height"], refer.images[38685]["width"]) == (360, 480)
    pair = refer.pairs("test")[0]
    square = letterbox_mask(refer.load_mask(pair.ann_id), 512)
    assert np.array_equal(refer.square_mask(pair.ann_id, 512), square)


def test_expression_groups():
    assert expression_group("sky") == "stuff name"
    assert expression_group("water on the left") == "stuff name and position"
    assert expression_group("bottom right corner") == "position words"
    assert expression_group("left guy") == "position words"
    assert expression_group("red car") == "other"
    assert expression_group(" ") == "other"


# ---------------------------------------------------------------------------- the model


def test_the_model_without_visual_features_has_no_backbone(referit_text):
    profile = text_profile(referit_text["root"])
    model = build_model(profile, vocab_size=20)
    assert model.backbone is None and model.head is None
    names = [name for name, _ in model.named_parameters()]
    assert names and not [name for name in names if name.startswith(("backbone", "head"))]
    assert {name.split(".")[0] for name in names} == {"text", "classifier", "upsample"}
    assert model.classifier[0].in_channels == profile.d_text + profile.spatial_channels  # no d_im
    tokens = torch.randint(0, 20, (3, profile.seq_len))
    assert model(tokens).shape == (3, 4, 4)
    assert model(tokens, high_res=True).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="no visual features.*tokens only"):
        model(tokens, images=torch.zeros(3, 3, 64, 64))
    with pytest.raises(ValueError, match="needs no images"):
        model.backbone_features(torch.zeros(1, 3, 64, 64))
    # One profile option, one code path: the paper's model has both, and reads d_im more channels.
    seeing = Segmenter(get_profile("smoke"), vocab_size=20)
    assert seeing.backbone is not None and seeing.head is not None
    assert seeing.classifier[0].in_channels == seeing.profile.d_text + seeing.profile.d_im + 8


def test_it_trains_from_words_and_boxes_alone(referit_text, tmp_path):
    profile = text_profile(referit_text["root"])
    run_dir = tmp_path / "run"
    checkpoint = train(profile, 1, run_dir, device="cpu", progress=False)  # load_image would raise
    state = read_checkpoint(checkpoint)
    assert state["finished"] and state["iteration"] == 6 and math.isfinite(state["loss"])
    assert not [key for key in state["model"] if key.startswith(("backbone", "head"))]
    assert not (run_dir / "features").exists()  # nothing cached: there are no features
    run = Run(run_dir, device="cpu", progress=False)
    data = run.split("trainval")
    targets = data.labels(1, progress=False)
    for i, pair in enumerate(data.pairs):
        square = letterbox_mask(box_mask(referit_text["boxes"][f"{pair.image_id}_{pair.ann_id % 1000}"], 64, 64), 64)
        expected = lowres_labels(square, 4)
        assert np.array_equal(targets.batch_labels(np.array([i]))[0].numpy(), expected)
    # The image-free paths of prediction: one expression on no image, a split without features.
    model = build_model(profile, len(run.vocab)).eval()
    logits = image_logits(model, None, ["sky", "left half"], run.vocab, profile, high_res=False)
    assert logits.shape == (2, 4, 4)
    streamed = dict(split_logits({"m": model}, run.split("test"), 2))
    assert set(streamed) == {0, 1, 2} and streamed[0]["m"].shape == (64, 64)


# ---------------------------------------------------------------------------- evaluation


@pytest.fixture
def trained(referit_text, tmp_path):
    profile = text_profile(referit_text["root"])
    run_dir = tmp_path / "run"
    checkpoint = train(profile, 1, run_dir, device="cpu", progress=False)
    run = Run(run_dir, device="cpu", progress=False)
    model = build_model(profile, len(run.vocab))
    model.load_state_dict(read_checkpoint(checkpoint)["model"])
    model.eval()
    with torch.no_grad():  # move the threshold into the maps: part of each positive, part not
        cells = model(run.split("test").tokens)
        model.classifier[2].bias.sub_(cells.median())
    return run, model


def test_whole_image_and_mean_box_by_hand(trained):
    run, model = trained
    test, train_split = run.split("test"), run.split("trainval")
    # Training boxes: left half three times, the whole image once: coverage 1 on the left half,
    # 1/4 on the right. Left half: I = 2048 N, U = N 2048 + sum|box| - I, sum|box| = 3 * 2048 + 4096:
    # IoU 2048 / 2560 = 0.8; everything: 2560 / 4096 = 0.625. The best set is the left half, the
    # level halfway between its coverage and the next lower one.
    coverage, level = mean_box_prior(train_split)
    assert level == pytest.approx((1 + 0.25) / 2)
    assert np.allclose(coverage[:, :32], 1) and np.allclose(coverage[:, 32:], 0.25)
    frames = evaluate_words_alone(model, test, train_split, progress=False)
    whole, prior = frames["whole-image"], frames["mean-box"]
    # Test: a right half (2048 px) and a 16x16 corner on 64x64, a 10x10 box on 32x64 (2048 px).
    assert whole[["intersection", "union"]].to_numpy().tolist() == [[2048, 4096], [256, 4096], [100, 2048]]
    # The prior predicts the left half: on 32x64, its 16 padding rows above and below are cropped away.
    assert prior[["intersection", "union"]].to_numpy().tolist() == [[0, 4096], [256, 2048], [100, 1024]]
    table, groups = words_alone_table(frames)
    assert table.loc["whole image", "overall IoU"] == pytest.approx(100 * 2404 / 10240, abs=0.01)
    assert table.loc["whole image", "mean IoU"] == pytest.approx(100 * (0.5 + 0.0625 + 100 / 2048) / 3, abs=0.01)
    assert table.loc["whole image", "P@0.5"] == pytest.approx(100 / 3, abs=0.01)
    assert table.loc["mean-box prior", "overall IoU"] == pytest.approx(100 * 356 / 7168, abs=0.01)
    assert groups.loc["position words", "pairs"] == 2 and groups.loc["other", "pairs"] == 1  # corner, half; car
    assert groups.loc["other", "whole image"] == pytest.approx(100 * 100 / 2048, abs=0.01)
    # Every method on a sample of the pairs: the same rows, and only those.
    sample = evaluate_words_alone(model, test, train_split, pairs=[0, 2], progress=False)
    assert sample["whole-image"]["union"].tolist() == [4096, 2048]


def test_text_only_counts_are_those_of_the_pixel_path(trained, referit_text):
    run, model = trained
    test = run.split("test")
    pairs = np.arange(len(test))
    pixels = box_counts(test, text_only_logits(model, test, pairs=pairs, progress=False))
    runs = text_only_box_counts(model, test, pairs, progress=False)
    assert np.array_equal(runs, pixels)
    assert 0 < pixels[:, 0].sum() < pixels[:, 1].sum()  # some of each map is positive
    # The study's own protocol (split_logits, evaluate_stream with the box as mask) agrees too.
    checkpoint = run.run_dir / "stage1" / "checkpoint.pt"
    state = read_checkpoint(checkpoint)
    state["model"] = model.state_dict()
    torch.save(state, checkpoint)
    ours = evaluate_models(run, "test", stages=[1])["ours-lowres"]
    assert ours["overall_iou"] == pytest.approx(summarize(runs[:, 0], runs[:, 1])["overall_iou"])
    with torch.no_grad():
        model.upsample.weight.mul_(1.01)  # no longer bilinear: the pixel path, still right
    pixels = box_counts(test, text_only_logits(model, test, pairs=pairs, progress=False))
    assert np.array_equal(text_only_box_counts(model, test, pairs, progress=False), pixels)


def test_the_book_is_not_built_with_the_text_profile():
    from referseg.book import build_book

    with pytest.raises(ValueError, match="profile 'text' has no visual features.*paper, cpu or smoke"):
        build_book(profile="text", root=REPO)


# ---------------------------------------------------------------------------- the chapter


def execute_chapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **parameters) -> str:
    """Run notebooks/09 with papermill under the smoke profile in ``tmp_path``; its text outputs."""
    import nbformat
    import papermill

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's package

    from referseg.book import read_notebook

    output = tmp_path / "09_real_text.ipynb"
    papermill.execute_notebook(read_notebook(NOTEBOOK), output, kernel_name="python3", language="python",
                               cwd=tmp_path, progress_bar=False,
                               parameters={"profile": "smoke", "run_dir": str(tmp_path / "runs" / "smoke"),
                                           "device": "cpu", "seed": 0, "overrides": {}, **parameters})
    executed = nbformat.read(output, as_version=4)
    assert executed.metadata.papermill.exception is not True
    return "\n".join(str(out.get("text", "")) + json.dumps(out.get("data", {}).get("text/plain", ""))
                     + json.dumps(out.get("data", {}).get("text/markdown", ""))
                     for cell in executed.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.slow
def test_the_chapter_runs_under_smoke_on_the_real_files(official_referit, tmp_path, monkeypatch):
    text = execute_chapter(tmp_path, monkeypatch, referit_official=str(official_referit),
                           text_data=str(tmp_path / "data" / "referit-text"))
    assert "12 official text files" in text and "trained: 300 iterations" in text
    assert "3000 of 60105 test pairs scored" in text and "identical (I, U) on 100 of 100 pairs" in text
    assert (tmp_path / "runs" / "smoke" / "text" / "stage1" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_the_chapter_without_the_files_says_how_to_get_them(tmp_path, monkeypatch):
    text = execute_chapter(tmp_path, monkeypatch, referit_official=str(tmp_path / "absent"))
    assert "No ReferIt text files" in text and "fetch-referit-text --from FOLDER" in text
    assert not (tmp_path / "runs" / "smoke" / "text").exists()
