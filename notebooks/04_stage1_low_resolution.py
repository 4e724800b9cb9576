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
#     alone: true
#     needs: [01_data]
# ---

# %% [markdown]
# # Stage 1: the low-resolution model
#
# In outline ({cite:t}`hu2016segmentation`, Sections 3.2 and 4): the network is
# first trained with a low-resolution output, against the ground-truth label map
# downsampled to the output grid, with a logistic regression loss at each location.
#
# The first stage trains everything above the frozen convolutions (fc6-fc8, the word
# embedding and LSTM, the 1x1 classifier) to predict the $g \times g$ logit map of the
# referred region. SPEC §5 gives the recipe:
#
# ```{list-table}
# :header-rows: 1
# :widths: auto
#
# * -
#   - stage 1 (SPEC §5)
# * - labels
#   - $g \times g$; a cell is positive if **any** pixel of its $s \times s$ block is
#     foreground
# * - loss
#   - mean over the $g^2$ cells of the sigmoid cross-entropy, positive : negative weight
#     1 : 1
# * - optimiser
#   - SGD, momentum 0.9, weight decay 5e-4 on weights only, batches of 10 pairs
# * - schedule (paper)
#   - 30,000 iterations, learning rate 0.01, x0.1 every 10,000
# ```
#
# This chapter shows the labels, trains the stage by calling the package's trainer once
# (`referseg.train.train`), then reads the training log and the checkpoint it wrote to
# the run folder and draws the model's response maps for several expressions on one
# image.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # chooses the images shown
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
retrain: bool = False  # True: train again, even over the run folder's finished stage
sweep_summary: str = ""  # the kept lr sweep; "": book/results/sweep_<profile>.json

# %% tags=["hide-input"]
import time
from pathlib import Path

import pandas as pd
from IPython.display import display

from referseg import viz
from referseg.config import get_profile
from referseg.data.refer import load_refer
from referseg.data.transforms import letterbox_mask, lowres_labels
from referseg.evaluate import stage_summary
from referseg.metrics import intersection_union, iou_from_counts, summarize_groups
from referseg.runs import Run, load_checkpoint, read_checkpoint, read_log
from referseg.train import train

viz.setup_style()
claims = viz.Claims(profile, "04_stage1_low_resolution")
cfg = get_profile(profile, **overrides)
spec = get_profile("paper")  # SPEC 5's schedule
run_dir = Path(run_dir)
stage_dir = run_dir / "stage1"
stage1 = cfg.stage1
print(f"profile {cfg.name!r}: {stage1.iterations} iterations of {cfg.batch_size} "
      f"pairs, lr {stage1.lr} x{stage1.lr_gamma} every {stage1.lr_step};")
print(f"grid {cfg.grid}x{cfg.grid}; run folder {run_dir}")

# %% [markdown]
# ## The low-resolution labels
#
# The mask is letterboxed like the image (SPEC §3), then pooled to the grid: a cell is
# positive when any pixel of its block is (the official code; `lowres_labels="or"`).
# This *dilates* small or thin regions: a shape that touches a corner of a cell claims
# the whole cell. Taking the block's centre pixel instead (`"nearest"`, an ablation)
# loses them ({numref}`fig-stage1-labels`).

# %% tags=["hide-input", "remove-output"]
refer = load_refer(cfg)
train_pairs = refer.pairs(cfg.train_split)
example = next(p for p in train_pairs if not p.is_stuff)
image = refer.load_image(example.image_id)
square = viz.letterboxed(image, cfg.input_size)
square_mask = letterbox_mask(refer.load_mask(example.ann_id), cfg.input_size)
labels = {mode: lowres_labels(square_mask, cfg.grid, mode)
          for mode in ("or", "nearest")}
labels_fig = viz.image_grid(
    [viz.overlay(square, square_mask, viz.GROUND_TRUTH),
     viz.overlay(square, viz.cell_mask(labels["or"], cfg.input_size)),
     viz.overlay(square, viz.cell_mask(labels["nearest"], cfg.input_size))],
    [f'"{example.expression}": letterboxed mask',
     f"OR-pooled labels (official): {labels['or'].sum()} of {cfg.grid ** 2} cells",
     f"centre-pixel labels (ablation): {labels['nearest'].sum()} cells"],
    ncols=3,
)
viz.glue_figure("fig-stage1-labels", labels_fig)

# %% [markdown]
# ```{glue:figure} fig-stage1-labels
# :name: fig-stage1-labels
#
# A thing's letterboxed mask (green) and its low-resolution labels (red cells): pooled
# with OR as the official code does, and from each block's centre pixel.
# ```

# %% [markdown]
# ## Training
#
# One call trains the stage: `train(cfg, stage=1, run_dir=run_dir, device=device)`. It
# writes `config.json` and `vocab.txt` to the run folder (or checks that those there
# belong to this profile), caches the frozen backbone's features, and saves
# `stage1/checkpoint.pt` (weights, optimiser, iteration, random states: a run can
# resume) and `stage1/log.jsonl`. When the run folder already holds the finished stage-1
# checkpoint of this very profile, the call only checks it and returns (set
# `retrain = True` to start over); an unfinished one is resumed.

# %%
checkpoint_file = stage_dir / "checkpoint.pt"
resume = checkpoint_file.is_file() and not retrain
start = time.perf_counter()
checkpoint_file = train(cfg, stage=1, run_dir=run_dir, resume=resume, device=device,
                        progress=False)
elapsed = time.perf_counter() - start
state = read_checkpoint(checkpoint_file)
num_pairs = len(train_pairs)
epochs = state["iteration"] * cfg.batch_size / num_pairs
print(f"{'checked' if resume else 'trained'} in {elapsed:.1f} s: {checkpoint_file}")
print(f"at iteration {state['iteration']} (finished: {state['finished']}), "
      f"{epochs:.1f} epochs of {num_pairs} training pairs")
del state

# %% [markdown]
# ## Training curves
#
# The log holds the mean loss of each window of `log_every` iterations, the learning
# rate and the speed. The steps in the learning rate follow SPEC §5's schedule; how this
# profile's schedule compares with SPEC's:

# %% tags=["hide-input"]
records = read_log(stage_dir / "log.jsonl")
ax = viz.plot_training_curves({"stage 1": records})
ax.set_title(f"stage 1 ({cfg.name} profile)");
log = pd.DataFrame(records)
print(f"loss {log['loss'].iloc[0]:.4f} -> {log['loss'].iloc[-1]:.4f}; "
      f"median speed {log['pairs_per_s'].median():.0f} pairs/s; "
      f"{log['elapsed'].iloc[-1]:.1f} s of training")
viz.print_wrapped(viz.schedule_sentence(cfg, spec, stage=1))

# %% [markdown]
# ## Choosing the learning rate on validation
#
# SPEC §5's rate, 0.01, is made for 30,000 iterations. A shorter schedule may need a
# larger one, and the official recipe also starts stage 1 from a box-retrieval stage
# (stage 0, SPEC §5) with its own initialisation (SPEC §4). `make sweep` (`referseg
# sweep`) trains stage 1 at several rates, from scratch and from stage 0, then the other
# initialisation at the best rate, then stage 2 at several rates from the chosen stage
# 1, and scores each on the **validation** split (never test), on all pairs, things and
# stuff. Its rule keeps the most SPEC-like setting within one point of the best. The
# sweep takes longer than this book may, so its small summary is kept in the repository
# with its provenance; the note says first when it is stale.

# %% tags=["hide-input"]
sweep_file = sweep_summary or f"book/results/sweep_{profile}.json"
sweep, choice, sweep_note = viz.kept_sweep(sweep_file, cfg)
viz.print_wrapped(sweep_note)
if sweep is not None:
    display(viz.dash_missing(sweep))
    for sentence in viz.sweep_sentences(sweep, choice):
        viz.print_wrapped(sentence)

# %% [markdown]
# ## On validation: things and stuff
#
# The trained stage-1 model on the validation split, at the original image size, on all
# pairs and separately on things (SynthRef's shapes) and stuff (sky, grass, water...):

# %% tags=["hide-input"]
val_summary = stage_summary(Run(run_dir, device=device, progress=False), 1, "val")
val_iou = viz.by_region(val_summary)
display(pd.Series(val_iou, name="validation overall IoU (%)").round(2).to_frame().T)
viz.print_wrapped(
    f"Stuff {'above' if val_iou['stuff'] > val_iou['things'] else 'below'} things: "
    f"{val_iou['stuff']:.1f}% against {val_iou['things']:.1f}% on "
    f"{val_summary['samples']} validation pairs.")

# %% [markdown]
# ## Response maps
#
# The trained low-resolution model scores every cell for an expression.
# {numref}`fig-stage1-maps` shows one test image (never seen in training) and one
# expression per referred region, plus a stuff word; the colours are $\sigma(z_{ij})$,
# the model's probability that cell $(i, j)$ belongs to the region. The green outline is
# the region's ground truth for the expressions taken from the dataset.

# %%
model, run_profile, vocab = load_checkpoint(checkpoint_file, device=device)
test_pairs = refer.pairs(run_profile.eval_split)
image_id = viz.pick_image(test_pairs, seed=seed)
shown = viz.one_pair_per_region(viz.pairs_by_image(test_pairs)[image_id], limit=4)
expressions = [p.expression for p in shown] + ["sky"]
test_image = refer.load_image(image_id)
lowres = viz.expression_logits(model, test_image, expressions, vocab, run_profile)
print(f"image {image_id}: logits of shape {lowres.shape} "
      f"for {len(expressions)} expressions")

# %% tags=["hide-input", "remove-output"]
test_square = viz.letterboxed(test_image, run_profile.input_size)
pictures, captions = [test_square], ["input (letterboxed)"]
for index, expression in enumerate(expressions):
    picture = viz.heatmap(test_square, viz.sigmoid(lowres[index]), alpha=0.6)
    if index < len(shown):
        target = letterbox_mask(refer.load_mask(shown[index].ann_id),
                                run_profile.input_size)
        picture = viz.draw_outline(picture, target)
    pictures.append(picture)
    captions.append(f'"{expression}"')
viz.glue_figure("fig-stage1-maps", viz.image_grid(pictures, captions, ncols=3))

# %% [markdown]
# ```{glue:figure} fig-stage1-maps
# :name: fig-stage1-maps
#
# The stage-1 model's response maps $\sigma(z)$ on a test image for one expression per
# referred region and for "sky", with the region's ground truth outlined in green.
# ```

# %% [markdown]
# At this resolution a cell is a 16x16 block of the 256 input (32x32 of 512 in the
# paper): the maps find the right region but cannot follow its outline. Stage 2 adds the
# high-resolution output. How well each cell agrees with its label, for the expressions
# taken from the dataset:

# %% tags=["hide-input"]
rows = []
for index, pair in enumerate(shown):
    square_target = letterbox_mask(refer.load_mask(pair.ann_id), run_profile.input_size)
    label = lowres_labels(square_target, run_profile.grid)
    predicted = lowres[index] > 0
    iou = iou_from_counts(*intersection_union(predicted, label))
    rows.append({"expression": pair.expression, "type": pair.type,
                 "label cells": int(label.sum()),
                 "predicted cells": int(predicted.sum()),
                 "cell IoU": round(float(iou), 3)})
display(pd.DataFrame(rows))

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* How many epochs over the training pairs does stage 1 run in this profile,
#    and in the paper (30,000 iterations of 10 pairs over ReferIt's 59,976 trainval
#    pairs, SPEC §2, §5)?

# %% tags=["solution", "hide-cell"]
paper_profile = get_profile("paper")
print(f"{cfg.name}: {cfg.stage1.iterations * cfg.batch_size / num_pairs:.1f} epochs")
paper_pairs = paper_profile.stage1.iterations * paper_profile.batch_size
print(f"paper: {paper_pairs / 59976:.1f} epochs")

# %% [markdown]
# 2. *(easy)* Type your own expressions for the test image above ("leftmost shape", "the
#    ground", a colour) and draw their response maps. What happens with a word the
#    vocabulary does not know?

# %% tags=["solution", "hide-cell"]
mine = ["leftmost shape", "the ground", "the red one", "purple thingamajig"]
maps = viz.sigmoid(viz.expression_logits(model, test_image, mine, vocab, run_profile))
viz.image_grid([viz.heatmap(test_square, m, alpha=0.6) for m in maps],
               [f'"{e}"' for e in mine], ncols=4);
print("unknown words map to <unk>:",
      [t for t in "purple thingamajig".split() if t not in vocab])

# %% [markdown]
# 3. *(medium)* With OR-pooled labels, what share of the positive cells of the training
#    split's labels are only *partly* covered by the region? What does that imply for
#    the size of a low-resolution prediction compared with the region's true size?

# %% tags=["solution", "hide-cell"]
partial = total = 0
for pair in viz.one_pair_per_region(train_pairs, limit=200):
    mask = letterbox_mask(refer.load_mask(pair.ann_id), cfg.input_size).astype(float)
    s = cfg.stride
    coverage = mask.reshape(cfg.grid, s, cfg.grid, s).mean(axis=(1, 3))
    total += int((coverage > 0).sum())
    partial += int(((coverage > 0) & (coverage < 1)).sum())
print(f"{100 * partial / total:.1f}% of positive cells are only partly foreground")

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Every partly covered positive cell adds background pixels to the region, so a model
# that reproduces its OR-pooled labels predicts regions larger than the truth (a
# dilation by up to one cell). The smaller the region, the larger the share of partial
# cells and the worse the effect: one reason the low-resolution model is upsampled and
# refined in stage 2.
# ```

# %% [markdown]
# 4. *(harder)* Measure the cell IoU of the low-resolution model on the validation
#    split, grouped by expression type (the first 40 validation images are enough).
#    Which types are hardest, and why? (Hint: group the pairs by image so that each
#    image goes through the backbone once.)

# %% tags=["solution", "hide-cell"]
val_rows = []
val_images = list(viz.pairs_by_image(refer.pairs("val")).items())[:40]
for val_image_id, val_pairs in val_images:
    logits = viz.expression_logits(model, refer.load_image(val_image_id),
                                   [p.expression for p in val_pairs], vocab,
                                   run_profile)
    for pair, cell_logits in zip(val_pairs, logits):
        target = letterbox_mask(refer.load_mask(pair.ann_id), run_profile.input_size)
        label = lowres_labels(target, run_profile.grid)
        intersection, union = intersection_union(cell_logits > 0, label)
        val_rows.append({"type": pair.type, "intersection": intersection,
                         "union": union})
groups = summarize_groups(pd.DataFrame(val_rows), "type")
by_type = pd.Series({kind: round(s["overall_iou"], 3) for kind, s in groups.items()},
                    name="overall cell IoU").sort_values()
display(by_type.to_frame())
viz.print_wrapped(f"Hardest here: {', '.join(by_type.index[:2])}; easiest: "
                  f"{by_type.index[-1]} (first {len(val_images)} validation images).")

# %% [markdown] tags=["solution"]
# ```{admonition} Discussion
# :class: dropdown
#
# Read the ranking from the table, not from intuition: on SynthRef it need not follow
# the difficulty one expects. The classifier scores each cell on its own, seeing only
# the cell's visual vector, its coordinates and the expression, never the other
# regions; so a type is hard when the cell's own features cannot tell the referred
# region from the others (a colour or category the visual features confuse), or when
# the answer depends on a comparison between regions (sizes, superlatives such as
# "leftmost"). Stuff names are usually easy: one word, a large region at a typical
# place.
# ```
