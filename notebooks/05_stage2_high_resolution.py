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
#     needs: [04_stage1_low_resolution]
# ---

# %% [markdown]
# # Stage 2: the high-resolution model
#
# In Sections 3.2 and 4 of the paper, {cite:t}`hu2016segmentation` describe the
# high-resolution model as follows (our paraphrase, not a quotation): a deconvolution
# layer on top of the low-resolution score map upsamples it by a factor of 32 to the
# input size; its filter starts as bilinear interpolation and is learned, with a
# per-pixel logistic loss. The upsampling follows {cite:t}`long2015fully`.
#
# Stage 2 starts from stage 1's final weights and trains the whole model (frozen
# convolutions apart) against the letterboxed mask at full input resolution. SPEC §4 and
# §5:
#
# ```{list-table}
# :header-rows: 1
# :widths: auto
#
# * -
#   - stage 2
# * - output
#   - transposed convolution 1 -> 1 channel, kernel $2s \times 2s$, stride $s$, padding
#     $s/2$, no bias: $g \times g \to S \times S$
# * - initialisation
#   - bilinear kernel $f f^\top$, $f = [0, 1/s, \dots, 1, \dots, 1/s]$, then trained
# * - labels
#   - the $S \times S$ letterboxed mask
# * - loss
#   - mean over the $S^2$ pixels, positive : negative weight 1 : 1/3
# * - schedule (paper)
#   - 18,000 iterations, learning rate 0.01, x0.1 every 6,000
# ```
#
# SPEC §5 also records a known risk: a retrained high-resolution stage once *collapsed*
# under another framework version. The evaluation chapter checks that stage 2 does not
# fall below stage 1.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # chooses the image shown (the same as in chapter 4 for the same seed)
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
retrain: bool = False  # True: train again, even over the run folder's finished stage

# %% tags=["hide-input"]
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from referseg import viz
from referseg.config import get_profile
from referseg.data.refer import load_refer
from referseg.data.transforms import letterbox_mask, prediction_mask
from referseg.evaluate import stage_summary
from referseg.metrics import intersection_union, iou_from_counts
from referseg.model.segmenter import bilinear_kernel
from referseg.runs import Run, load_checkpoint, read_checkpoint, read_log
from referseg.train import train

viz.setup_style()
cfg = get_profile(profile, **overrides)
run_dir = Path(run_dir)
stage1_file = run_dir / "stage1" / "checkpoint.pt"
stage2_file = run_dir / "stage2" / "checkpoint.pt"
stage2 = cfg.stage2
print(f"profile {cfg.name!r}: {stage2.iterations} iterations, "
      f"lr {stage2.lr} x{stage2.lr_gamma} every {stage2.lr_step},")
print(f"weights positive {stage2.pos_weight:g} : negative {stage2.neg_weight:.3g}")

# %% [markdown]
# ## Training
#
# The trainer reads stage 1's final checkpoint from the run folder (chapter 4 wrote it)
# and refuses to start if it is missing or unfinished. As in chapter 4, a finished
# stage-2 checkpoint of the same profile is only checked, unless it is older than the
# stage-1 checkpoint it should start from, or `retrain = True`.

# %%
if not stage1_file.is_file():
    raise FileNotFoundError(f"{stage1_file} does not exist: "
                            "run chapter 4 (stage 1) first, with the same run_dir")
resume = (stage2_file.is_file() and not retrain
          and stage2_file.stat().st_mtime >= stage1_file.stat().st_mtime)
start = time.perf_counter()
stage2_file = train(cfg, stage=2, run_dir=run_dir, resume=resume, device=device,
                    progress=False)
state = read_checkpoint(stage2_file)
print(f"{'checked' if resume else 'trained'} in {time.perf_counter() - start:.1f} s: "
      f"{stage2_file}")
print(f"at iteration {state['iteration']} (finished: {state['finished']})")
del state

# %% [markdown]
# ## The deconvolution kernel, before and after
#
# The transposed convolution starts as bilinear interpolation: each low-resolution logit
# is spread over a $2s \times 2s$ window with weights falling linearly from the centre,
# so neighbouring cells blend smoothly. Training may reshape the kernel; the difference
# shows where.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt

model1, run_profile, vocab = load_checkpoint(stage1_file, device=device)
model2, _, _ = load_checkpoint(stage2_file, device=device)
initial = bilinear_kernel(run_profile.stride).numpy()
trained = model2.upsample.weight[0, 0].detach().cpu().numpy()
fig, axes = plt.subplots(1, 4, figsize=(14, 3.3),
                         gridspec_kw={"width_ratios": [1, 1, 1, 1.4]})
for ax, values, title, cmap in (
        (axes[0], initial, "initial (bilinear)", "viridis"),
        (axes[1], trained, "after stage 2", "viridis"),
        (axes[2], trained - initial, "trained - initial", "coolwarm")):
    limit = np.abs(values).max() if cmap == "coolwarm" else None
    image = ax.imshow(values, cmap=cmap, vmin=-limit if limit else None, vmax=limit)
    ax.set_title(title)
    ax.axis("off")
    fig.colorbar(image, ax=ax, fraction=0.046)
middle = run_profile.stride
axes[3].plot(initial[middle], label="initial, middle row")
axes[3].plot(trained[middle], label="trained, middle row")
axes[3].set_xlabel("kernel column")
axes[3].legend(fontsize=8)
s = run_profile.stride
fig.suptitle(f"{2 * s}x{2 * s} deconvolution kernel (stride {s})")
fig.tight_layout()
print(f"largest change of a kernel weight: {np.abs(trained - initial).max():.4f} "
      f"(peak weight {initial.max():.1f})")

# %% [markdown]
# ## Training curves
#
# Stage 2 continues where stage 1 stopped. Its loss is not on the same scale: it
# averages over $S^2$ pixels instead of $g^2$ cells, and negatives weigh 1/3.

# %% tags=["hide-input"]
logs = {"stage 1": read_log(run_dir / "stage1" / "log.jsonl"),
        "stage 2": read_log(run_dir / "stage2" / "log.jsonl")}
ax = viz.plot_training_curves(logs, offsets={"stage 2": run_profile.stage1.iterations})
ax.axvline(run_profile.stage1.iterations, color="grey", linewidth=0.8)
ax.set_title(f"both stages ({run_profile.name} profile)");

# %% [markdown]
# ## On validation: things and stuff, after each stage
#
# Both stages' models on the validation split at the original image size, on all pairs,
# on things and on stuff (chapter 4 showed stage 1 alone; the test split waits for
# chapter 7):

# %% tags=["hide-input"]
val_run = Run(run_dir, device=device, progress=False)  # stage 1: chapter 4's, read back
summaries = {stage: stage_summary(val_run, stage, "val") for stage in (1, 2)}
val_table = pd.DataFrame({f"stage {stage}": viz.by_region(summary)
                          for stage, summary in summaries.items()}).T.round(2)
display(val_table.rename_axis("validation overall IoU (%)"))
change = val_table.loc["stage 2"] - val_table.loc["stage 1"]
after = val_table.loc["stage 2"]
side = "below" if after["things"] < after["stuff"] else "above"
viz.print_wrapped(
    "Stage 2 against stage 1 on validation: "
    + ", ".join(f"{name} {value:+.1f} points" for name, value in change.items())
    + f"; after stage 2, things stay {side} stuff.")

# %% [markdown]
# ## High resolution against low resolution
#
# The same test image as in chapter 4. Each row of {numref}`fig-stage2-comparison` is
# one expression: the stage-1 model's output upsampled by its untrained bilinear kernel,
# and the stage-2 model's, both mapped back to the original image size (undo the
# letterbox, then logit > 0, SPEC §1), tinted red; the ground truth is outlined in
# green.

# %%
refer = load_refer(run_profile)
test_pairs = refer.pairs(run_profile.eval_split)
image_id = viz.pick_image(test_pairs, seed=seed)
shown = viz.one_pair_per_region(viz.pairs_by_image(test_pairs)[image_id], limit=4)
expressions = [p.expression for p in shown]
test_image = refer.load_image(image_id)
height, width = test_image.shape[:2]
models = {"stage 1 (low resolution)": model1, "stage 2 (high resolution)": model2}
square_logits = {name: viz.expression_logits(model, test_image, expressions, vocab,
                                             run_profile, high_res=True)
                 for name, model in models.items()}
masks = {name: [prediction_mask(square, height, width, run_profile.eval_mode)
                for square in logits]
         for name, logits in square_logits.items()}
targets = [refer.load_mask(p.ann_id) for p in shown]
rows = []
for index, pair in enumerate(shown):
    row = {"expression": pair.expression, "type": pair.type}
    for name in masks:
        iou = iou_from_counts(*intersection_union(masks[name][index], targets[index]))
        row[f"IoU, {name}"] = round(float(iou), 3)
    rows.append(row)
comparison = pd.DataFrame(rows)
comparison

# %% tags=["hide-input", "remove-output"]
pictures, captions = [], []
for index, expression in enumerate(expressions):
    for name in masks:
        pictures.append(viz.compare_masks(test_image, masks[name][index],
                                          targets[index]))
        iou = comparison.loc[index, f"IoU, {name}"]
        captions.append(f'{name}: "{expression}" (IoU {iou:.2f})')
viz.glue_figure("fig-stage2-comparison",
                viz.image_grid(pictures, captions, ncols=4, width=3.2))

# %% [markdown]
# ```{glue:figure} fig-stage2-comparison
# :name: fig-stage2-comparison
#
# Predictions of the stage-1 and the stage-2 model at the original image size (red), for
# one expression per referred region of a test image, with the ground truth outlined in
# green.
# ```

# %% [markdown]
# The probability maps themselves, on the letterbox: the low-resolution model's blocks
# against the high-resolution model's outlines.

# %% tags=["hide-input"]
test_square = viz.letterboxed(test_image, run_profile.input_size)
pictures, captions = [], []
for index, expression in enumerate(expressions[:2]):
    for name, logits in square_logits.items():
        pictures.append(viz.heatmap(test_square, viz.sigmoid(logits[index]), alpha=0.6,
                                    smooth=True))
        captions.append(f'{name}: "{expression}"')
viz.image_grid(pictures, captions, ncols=4, width=3.2);

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* Check that the initial kernel really is bilinear interpolation: upsample a
#    constant $g \times g$ map with a transposed convolution carrying
#    `bilinear_kernel(s)` and look at the output away from the border. What happens at
#    the border, and why does it not matter much here?

# %% tags=["solution", "hide-cell"]
s, g = run_profile.stride, run_profile.grid
deconv = torch.nn.ConvTranspose2d(1, 1, 2 * s, stride=s, padding=s // 2, bias=False)
with torch.no_grad():
    deconv.weight.copy_(bilinear_kernel(s))
    out = deconv(torch.ones(1, 1, g, g))[0, 0]
inner = out[s:-s, s:-s]
print(f"output {tuple(out.shape)}; interior min {inner.min():.4f}, "
      f"max {inner.max():.4f}; corner value {out[0, 0]:.4f}")
print("the border gets only part of the neighbouring kernels' mass;")
print("it is mostly letterbox padding")

# %% [markdown]
# 2. *(medium)* What share of the training pixels are foreground in the $S \times S$
#    labels? Use it to explain the stage-2 weights 1 : 1/3 (SPEC §5). What would an
#    unweighted loss push the model towards?

# %% tags=["solution", "hide-cell"]
train_regions = viz.one_pair_per_region(refer.pairs(run_profile.train_split), limit=300)
positive = np.mean([
    letterbox_mask(refer.load_mask(p.ann_id), run_profile.input_size).mean()
    for p in train_regions
])
print(f"{100 * positive:.1f}% of the letterboxed label pixels are foreground "
      f"(over {len(train_regions)} training regions)")
weighted = positive / (positive + (1 - positive) / 3)
print(f"weighted by 1 : 1/3, foreground carries {100 * weighted:.1f}% of the loss")
claims = viz.Claims(profile, "05_stage2_high_resolution")
claims("foreground is a minority of the label pixels", positive < 0.5,
       f"{100 * positive:.1f}% foreground");

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Foreground is a minority of the pixels, so an unweighted per-pixel loss is lowered
# most by predicting background at uncertain pixels: masks shrink, small things vanish,
# and overall IoU falls. Weighting negatives by 1/3 moves the balance towards the
# foreground. (Stage 1 needs no weight: its OR-pooled labels already enlarge the
# foreground, chapter 4.)
# ```

# %% [markdown]
# 3. *(harder)* Compare the distribution of the high-resolution logits of both models on
#    this image for its first expression. Which model is more decided (fewer logits near
#    0), and where in the image are the undecided pixels of the stage-2 model?

# %% tags=["solution", "hide-cell"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for name, logits in square_logits.items():
    axes[0].hist(logits[0].ravel(), bins=80, alpha=0.6, label=name)
axes[0].set_xlabel("logit")
axes[0].legend(fontsize=8)
undecided = np.abs(square_logits["stage 2 (high resolution)"][0]) < 1
axes[1].imshow(viz.overlay(test_square, undecided, viz.PREDICTION))
axes[1].set_title("stage 2: pixels with |logit| < 1")
axes[1].axis("off")
fig.tight_layout()
