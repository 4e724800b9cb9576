# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   referseg:
#     needs: []
# ---

# %% [markdown]
# # What the words alone know
#
# ReferIt's images {cite}`kazemzadeh2014referitgame` cannot be downloaded any more, but
# its words can: the official implementation of {cite:t}`hu2016segmentation` ships every
# real expression of the paper's split, the box of every referred region and the size of
# every image (SPEC §2). Those files hold no pixels, so they cannot train the paper's
# model. They can train the paper's model **without its eyes**: the same `Segmenter`,
# with the visual vector removed from the fusion (profile option
# `visual_features=False`). What remains is the expression's LSTM state, tiled over the
# $16 \times 16$ grid, next to the 8 spatial channels of each cell:
#
# $$
# \hat{z}_{ij} = w_2^\top \,\mathrm{ReLU}\!\left(W_1 \left[
# \tfrac{h_T}{\lVert h_T\rVert};\; x^{\mathrm{spatial}}_{ij}\right] + b_1\right) + b_2
# $$
#
# (the classifier of SPEC §4 with $D_{\mathrm{im}} = 0$: no backbone is built or run).
# Such a model can only learn *where* things tend to be for given words: "sky" is at the
# top, "left guy" on the left, "bottom right corner" in one corner. Its score on
# ReferIt's real test expressions measures how much of the task the words and the
# position priors solve on their own, the share the visual features must add.
#
# - **model**: the paper's without visual features (embedding, LSTM, spatial channels,
#   1x1 classifier), profile `text`: widths 64 (embedding, LSTM) and 32 (classifier);
# - **vocabulary**: the official `vocabulary_referit.txt` (8,803 tokens, SPEC §2);
# - **training**: ReferIt trainval, 59,976 real expressions, **stage 1 only** (low
#   resolution, SPEC §5) against the region's box, letterboxed to 512, OR-pooled
#   to 16x16;
# - **targets**: boxes, not masks (the text files have no masks);
# - **evaluation**: all 60,105 test pairs, at the original image size (SPEC §1), against
#   the boxes.

# %% tags=["parameters"]
profile: str = "cpu"  # the book's profile (this chapter trains `text`)
run_dir: str = "runs/cpu"  # the book's run folder; this chapter's model: <run_dir>/text
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # the model's seed and the test sample's
overrides: dict = {}  # the book's overrides; unused (`text` is fixed)
referit_official: str = "../shared/data/referit-official"  # a copy of the files
text_data: str = "data/referit-text"  # where the fetch places the files, checked
train_pairs: int = 0  # pairs trained on (batches of 10); 0: one epoch (smoke: 3,000)
test_pairs: int = 0  # test pairs scored; 0: all 60,105 (smoke: a seeded 3,000)
retrain: bool = False  # True: train again even if <run_dir>/text holds the model

# %%
import json
import math
import shutil
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from IPython.display import Markdown, display

from referseg import viz
from referseg.config import get_profile
from referseg.data.fetch import TEXT_FILES, fetch_referit_text
from referseg.data.refer import POSITION_WORDS, SAIAPR_STUFF
from referseg.evaluate import (
    WORDS_ALONE,
    box_counts,
    evaluate_words_alone,
    mean_box_prior,
    words_alone_table,
)
from referseg.io import atomic_write_text
from referseg.predict import text_only_logits
from referseg.runs import Run, check_profile, load_checkpoint, read_checkpoint, read_log
from referseg.train import train

viz.setup_style()
# A model 64 wide gains nothing from threads; on a busy machine extra ones only spin.
torch.set_num_threads(1)
smoke = profile == "smoke"
train_pairs = train_pairs or (3000 if smoke else 0)
test_pairs = test_pairs or (3000 if smoke else 0)

# %% [markdown]
# ## The files
#
# `referseg data fetch-referit-text` places the official text files in
# `data/referit-text/`, each checked against its SHA-256: from the official repository
# at the pinned commit, or from a local copy (`--from FOLDER`). This chapter fetches
# them from the copy named by the parameter `referit_official` when there is one; it
# never downloads on its own.

# %%
text_root = Path(text_data)
official = Path(referit_official)
complete = all((text_root / name).is_file() for name in TEXT_FILES)
if not complete and official.is_dir():
    fetch_referit_text(text_root, from_dir=official, progress=False)
have_text = complete or official.is_dir()
if have_text:
    print(f"{len(TEXT_FILES)} official text files in {text_root}\n(SHA-256 checked)")
else:
    display(Markdown(
        f"**No ReferIt text files** in `{text_root}`, and no copy at `{official}`: "
        "this chapter measures nothing. To get them, run `referseg data "
        "fetch-referit-text` (downloads them from `ronghanghu/text_objseg`) or "
        "`referseg data fetch-referit-text --from FOLDER` (a copy of its "
        "`exp-referit/data/`), then build the book again."))

# %% [markdown]
# ## Training
#
# The `text` profile is the paper's geometry (512 letterbox, stride 32, a 16x16 grid)
# with small widths, the official vocabulary and one epoch of stage 1 at the `text`
# profile's learning rate (printed below; it was not swept, and SPEC §5 uses 0.01 over
# 30,000 iterations). A region's box is letterboxed and OR-pooled exactly as a mask
# would be (SPEC §3, §5): the letterbox of a box is again a box, so no mask is drawn.
# The trainer is the study's own (`referseg.train.train`); with `visual_features=False`
# it reads no image and caches no feature, only tokens and labels.

# %%
iterations = math.ceil(train_pairs / 10) if train_pairs else None
cfg = get_profile(
    "text",
    data_root=str(text_root),
    vocab_file=str(text_root / "vocabulary_referit.txt"),
    seed=seed,
    **({"stage1": {"iterations": iterations}} if iterations else {}),
)
text_dir = Path(run_dir) / "text"
checkpoint_file = text_dir / "stage1" / "checkpoint.pt"
if have_text and checkpoint_file.is_file() and not retrain:
    try:
        saved = read_checkpoint(checkpoint_file)["profile"]
        check_profile(saved, cfg, str(checkpoint_file))
    except ValueError:  # other parameters made it: this chapter's folder, start over
        retrain = True
if have_text:
    if retrain and text_dir.exists():
        shutil.rmtree(text_dir)
    resume = checkpoint_file.is_file()
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the expressions of unknown words only are counted below
        warnings.filterwarnings("ignore", message=".*unknown to the vocabulary")
        checkpoint_file = train(cfg, stage=1, run_dir=text_dir, resume=resume,
                                device=device, progress=False)
    state = read_checkpoint(checkpoint_file)
    # The whole call when it trains (data, labels, loop); else the loop's own clock.
    train_seconds = state["elapsed"] if resume else time.perf_counter() - start
    print(f"{'found, finished' if resume else 'trained'}: {state['iteration']} "
          f"iterations of {cfg.batch_size} pairs at lr {cfg.stage1.lr:g}, "
          f"{train_seconds:.1f} s of training")
    del state

# %% tags=["hide-input"]
if have_text:
    records = read_log(text_dir / "stage1" / "log.jsonl")
    ax = viz.plot_training_curves({"words alone, stage 1": records})
    ax.set_title("training loss (sigmoid cross-entropy on 16x16 box labels)");

# %% [markdown]
# ## Evaluation against the boxes
#
# Each test pair is scored as SPEC §1 prescribes: the 512x512 logits (the low-resolution
# map through the bilinear deconvolution, as stage 1 is evaluated throughout this book)
# are mapped back to the original image size and thresholded at 0, then compared with
# the region's **box** rasterised at that size. A model that reads only words gives the
# same words the same map, so each distinct expression (32,933 of the 60,105 test pairs)
# is predicted once per image size; the positive pixels of each original row are found
# as runs between cell centres (`referseg.evaluate.positive_runs`), which makes counting
# a box's intersection a few additions instead of a pass over 170,000 pixels.
#
# Beside it, two predictions that ignore the words:
#
# - **whole image** (SPEC §7): every pixel is foreground; its IoU is the box's share of
#   the image;
# - **mean-box prior**: the average letterboxed training box, a map of how often each
#   pixel of the square is inside a referred box; its fixed prediction is the set of
#   pixels above the level that scores best on the training pairs (overall IoU, computed
#   in the letterbox from the map alone), the same mask for every test pair.
#
# ```{important}
# These are **box** IoUs. The paper's figures (and every other chapter's) compare with
# the region's **mask**; a box is larger than its region, so a box IoU is neither the
# paper's metric nor comparable with its 48.03% overall IoU
# ({cite:t}`hu2016segmentation`, Table 1; SPEC §6).
# ```

# %%
if have_text:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as unknown:
        warnings.simplefilter("always")
        run = Run(text_dir, device=device, progress=False)
        test, trainval = run.split(cfg.eval_split), run.split(cfg.train_split)
    model, _, vocab = load_checkpoint(checkpoint_file, device=run.device)
    rng = np.random.default_rng(seed)
    sample = None
    if test_pairs and test_pairs < len(test):
        sample = np.sort(rng.choice(len(test), size=test_pairs, replace=False))
    frames = evaluate_words_alone(model, test, trainval, pairs=sample,
                                  device=run.device, progress=False)
    eval_seconds = time.perf_counter() - start
    table, by_group = words_alone_table(frames)
    scored = len(frames["text-only"])
    table.attrs["source"] = f"measured here: ReferIt test, {scored} pairs, boxes, in %"
    print(f"{scored} of {len(test)} test pairs scored in {eval_seconds:.1f} s;\n"
          f"training + evaluation: {train_seconds + eval_seconds:.1f} s (one thread)")
    for message in unknown:
        print(textwrap.fill(str(message.message), 88))
    display(table)
    # the introduction's verdicts read this chapter's figures from the run folder
    summary = viz.real_text_summary(run.refer, vocab, table, scored)
    atomic_write_text(text_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

# %% [markdown]
# The timing above is this build's: one epoch of training and the evaluation of every
# test pair (the smoke profile does less), on the machine the book was built on (the
# appendix times every chapter).
#
# The counts through runs of pixels are those of the pixel-by-pixel path
# (`prediction_mask`, then the mask against the box) up to float rounding; a sample of
# pairs, counted both ways:

# %%
if have_text:
    check = frames["text-only"].index[:100]
    check_pairs = (np.arange(len(test)) if sample is None else sample)[check]
    stream = text_only_logits(model, test, device=run.device, pairs=check_pairs,
                              progress=False)
    pixels = box_counts(test, stream)[check_pairs]
    runs = frames["text-only"].loc[check, ["intersection", "union"]].to_numpy()
    agree = int((pixels == runs).all(axis=1).sum())
    print(f"identical (I, U) on {agree} of {len(check)} pairs")

# %% [markdown]
# ## What the expression says
#
# An expression is grouped by the words it contains: a *stuff name* (SAIAPR's amorphous
# classes: sky, water, grass, ground, ...), a *position word* (left, right, top, bottom,
# middle, center, corner, ...), both, or neither. Overall IoU (%) of each group, on the
# same boxes:

# %%
if have_text:
    for name, words in (("position words", POSITION_WORDS),
                        ("stuff names", SAIAPR_STUFF)):
        print(textwrap.fill(f"{name}: {', '.join(sorted(words))}", 88))
    display(by_group)
    words, whole = WORDS_ALONE["text-only"], WORDS_ALONE["whole-image"]
    said = {group: f"{row[words]:.1f}% (whole image {row[whole]:.1f}%)"
            for group, row in by_group.iterrows()}
    overall = table["overall IoU"]
    display(Markdown(
        f"Measured here, against the boxes: the words alone reach "
        f"**{overall[words]:.1f}%** overall IoU, the whole image {overall[whole]:.1f}% "
        f"and the mean-box prior {overall[WORDS_ALONE['mean-box']]:.1f}%; by what the "
        f"expression says: "
        + "; ".join(f"{group} {value}" for group, value in said.items()) + "."))

# %% [markdown]
# In the full run (one epoch, every test pair; the smoke profile's 300 iterations learn
# far less), the words alone beat both word-blind predictions in overall IoU by about
# seven points, and the gain comes from two kinds of words. Stuff names carry the most:
# "sky" is a band at the top and "water" or "ground" one at the bottom, whatever the
# photograph. Position words move the prediction to the named side or corner, but with
# no eyes the model cannot tell which of the objects on the left is meant, nor how large
# it is, so that group stays the hardest. Expressions that only name a thing ("red
# car", "dog") gain nothing over the mean box: which car, and where, is in the pixels.
# Mean IoU tells the other side: the whole image scores every large box well, the words
# alone predict smaller regions and miss more of the small ones.

# %% [markdown]
# ## Maps of real expressions
#
# The model's probability $\sigma(\hat z_{ij})$ for a few test expressions, drawn on the
# letterbox of a 480x360 image (grey: the image, black: the padding). No image is read:
# the map is the same for every photograph. The green outline is the box of the first
# test pair with that very expression on a 480x360 image, where there is one; the last
# panel is the mean-box prior (over images of every size) and its fixed prediction.

# %%
if have_text:
    shown = ["sky", "left guy", "bottom right corner", "water", "man on right",
             "middle"]
    lowres = viz.sigmoid(viz.expression_logits(model, None, shown, vocab, cfg))
    grey = np.full((360, 480, 3), 150, dtype=np.uint8)  # a 480x360 "image"
    canvas = viz.letterboxed(grey, cfg.input_size)
    by_expression = {}  # the first test pair of each expression on a 480x360 image
    for index, pair in enumerate(test.pairs):
        if test.size(index) == (360, 480):
            by_expression.setdefault(pair.expression.strip().lower(), index)
    pictures, captions = [], []
    for expression, probability in zip(shown, lowres):
        picture = viz.heatmap(canvas, probability, alpha=0.6)
        index = by_expression.get(expression)
        if index is not None:
            picture = viz.draw_outline(picture, test.square_mask(index, cfg.input_size))
        pictures.append(picture)
        where = "" if index is None else f" (box of test pair {index})"
        captions.append(f'"{expression}"{where}')
    coverage, level = mean_box_prior(trainval)
    prior = viz.heatmap(canvas, coverage / coverage.max(), alpha=0.6)
    pictures.append(viz.draw_outline(prior, coverage > level, viz.PREDICTION))
    captions.append(f"mean-box prior; red: above {level:.2f}")
    viz.image_grid(pictures, captions, ncols=4);

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* Which expressions of the test split do the words alone get best, and which
#    worst? Look at the 10 most frequent expressions and their overall IoU.

# %% tags=["solution", "hide-cell"]
if have_text:
    words = frames["text-only"].assign(expression=lambda f: f["expression"].str.lower())
    sums = words.groupby("expression")[["intersection", "union"]].sum()
    sums["pairs"] = words.groupby("expression").size()
    sums["overall IoU"] = (100 * sums["intersection"] / sums["union"]).round(1)
    frequent = sums.sort_values("pairs", ascending=False).head(10)
    display(frequent[["pairs", "overall IoU"]])

# %% [markdown]
# 2. *(medium)* The model's spatial channels are all it knows of the picture. Train it
#    with the paper's 2 channels, or none (`spatial_channels=2` or `0` in
#    `get_profile("text", ...)`), for a few hundred iterations, and compare the
#    position-word group. What does the model predict with no spatial channels at all?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Without spatial channels every cell sees the same input, so the model predicts the
# same logit everywhere: the whole image or nothing, for every expression. Two channels
# (the cell's centre) already place "left" and "top"; the official code's eight add the
# cell's extent, which changes little at this resolution.
# ```
