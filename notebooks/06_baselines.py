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
#     needs: [05_stage2_high_resolution]
# ---

# %% [markdown]
# # Baselines
#
# In Section 4.1 of the paper, {cite:t}`hu2016segmentation` compare their model with
# five baselines (our paraphrase, not a quotation): the bounding box returned by a
# natural-language object retrieval model, used as the foreground; GrabCut on that box;
# a per-word segmentation model; classification over segmentation proposals; and the
# whole image as the foreground.
#
# The paper measures its model against methods that segment without reading the
# expression as a whole, or that only retrieve a box. SPEC §7 describes them; the
# package implements each with the model's interface (`fit` on the training split,
# logits or masks for a test split), on the same frozen features the model uses:
#
# ```{list-table}
# :header-rows: 1
# :widths: auto
#
# * - baseline (SPEC §7)
#   - here
#   - the paper used (SPEC §7)
# * - whole image
#   - every pixel is foreground
#   - the same
# * - box retrieval, box as mask / GrabCut of the box
#   - an SCRC-style scorer {cite}`hu2016natural` picks a box among sliding boxes and
#     segment boxes; the box, or GrabCut {cite}`rother2004grabcut` initialised with it
#   - SCRC scoring box proposals (the official code's box retrieval scores EdgeBoxes
#     {cite}`zitnick2014edge`, SPEC §5)
# * - per-word segmentation
#   - one map per vocabulary word from one FCN head; an expression's map is the mean (or
#     the intersection) of its words' maps
#   - a segmentation model per word
# * - classification over segmentation proposals
#   - the scorer picks one of the segments of Felzenszwalb and Huttenlocher's graph
#     segmentation {cite}`felzenszwalb2004efficient` and their merges
#   - MCG proposals {cite}`arbelaez2014multiscale`
# ```
#
# SPEC §7 gives no sizes for them (number of proposals, widths of the scorers);
# `BaselineSettings` holds the ones used here. This chapter fits each baseline once on
# the run's training split, draws what it does, and evaluates it on the test split,
# writing `eval/<method>_<split>.csv` and `.json` to the run folder, which the
# evaluation chapter reads. It then puts the model beside them.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # chooses the examples drawn
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
# overrides of referseg.baselines.common.BaselineSettings, e.g. {"iterations": 200}
baseline_settings: dict = {}  # overrides of the baselines' settings
examples: int = 4  # test pairs drawn for every baseline

# %% tags=["hide-input"]
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display

from referseg import viz
from referseg.baselines import BASELINES, evaluate_baseline, fit_baseline
from referseg.baselines.common import BaselineSettings
from referseg.config import get_profile
from referseg.data.transforms import prediction_mask
from referseg.evaluate import OURS, paper_table, stage_summary
from referseg.metrics import (intersection_union, iou_from_counts, overall_iou,
                              summarize_groups)
from referseg.runs import Run

viz.setup_style()
cfg = get_profile(profile, **overrides)
run = Run(run_dir, device=device, progress=False)  # config.json, vocab.txt: chapter 4
if run.profile != cfg:
    print(f"note: the run folder {run_dir} holds profile {run.profile.name!r}; "
          "its saved profile is used")
# The smoke profile exists to run in seconds: fewer fitting steps and proposals
# (a choice of this book).
quick = {"iterations": 30, "max_segments": 30} if run.profile.name == "smoke" else {}
settings = BaselineSettings(**{**quick, **baseline_settings})
train_data = run.split(run.profile.train_split)
test_data = run.split(run.profile.eval_split)
print(f"{run.profile.name} profile: fit on {run.profile.train_split} "
      f"({len(train_data)} pairs, {train_data.num_images} images), "
      f"evaluate on {run.profile.eval_split} ({len(test_data)} pairs)")
print(textwrap.fill(repr(settings), 88, subsequent_indent="  "))

# %% [markdown]
# ## Fitting and evaluating every baseline
#
# One loop: build, fit on the training split (the whole-image baseline learns nothing),
# predict the test split's square logits, map each back to its image's original size
# exactly as the model's (SPEC §1), and save the per-sample intersections and unions.

# %%
fitted, summaries, timing = {}, {}, []
for name in BASELINES:
    fitted[name] = fit_baseline(run, name, settings)
    rows = evaluate_baseline(run, fitted[name], run.profile.eval_split)
    summaries.update(rows)
    first = next(iter(rows.values()))
    timing.append({"baseline": name, "fit (s)": round(first["fit_seconds"], 1),
                   "fit + test (s)": round(first["seconds"] * len(rows), 1),
                   **{k: round(v, 3) for k, v in first["fit_stats"].items()}})
display(viz.dash_missing(pd.DataFrame(timing).set_index("baseline")))
# The model: chapter 5's high-resolution stage, evaluated as chapter 7 evaluates it
# (its saved results are read back when they are newer than its checkpoint).
split = run.profile.eval_split
ours = stage_summary(run, 2, split)
if ours is None:
    print(f"no stage-2 model in {run.run_dir}: the table has no row for the model")
table = paper_table({**summaries, **({"ours-highres": ours} if ours else {})})
table

# %% [markdown]
# All numbers are in % on this run's test split, in the paper's table layout; the last
# row is the model (chapter 5's high-resolution stage), evaluated with the same
# protocol. The evaluation chapter adds the low-resolution model and breaks the results
# down. `best_overlap` is the mean IoU of the *best* proposal for each training pair:
# the ceiling of a proposal method with a perfect scorer; the methods without proposals
# show "–" there.
#
# ### The model against the baselines
#
# The paper's central comparison is this table on ReferIt: there its high-resolution
# model comes out above every baseline ({cite:t}`hu2016segmentation`, Section 4.1 and
# Table 1; SPEC §6 copies only the model's row, so the baselines' figures are not
# repeated here). On this run the comparison reads:

# %% tags=["hide-input"]
model_label = OURS["ours-highres"][1]
if ours is not None:
    model_row = table.loc[model_label]
    others = table.drop(index=model_label)

    def listing(rows: pd.DataFrame) -> str:
        return "; ".join(f"{label} ({row['overall IoU']:.2f})"
                         for label, row in rows.iterrows())

    score = others["overall IoU"]
    groups = {"more": others[score > model_row["overall IoU"]],
              "as much": others[score == model_row["overall IoU"]],
              "less": others[score < model_row["overall IoU"]]}
    sentence = (f"On {run.profile.dataset} {split} ({len(test_data)} pairs) the model "
                f"reaches {model_row['overall IoU']:.2f}% overall IoU. Of the "
                f"{len(others)} baseline rows, "
                + "; ".join(f"{len(rows)} reach {word}: {listing(rows)}"
                            for word, rows in groups.items() if len(rows)) + ". ")
    if len(groups["less"]) == len(others):
        sentence += "On overall IoU, this run agrees with the paper's outcome."
    else:
        sentence += ("On overall IoU, this run does not reproduce the paper's "
                     "outcome.")
    viz.print_wrapped(sentence)
    ahead = {label: [f"{c} ({row[c]:.2f} against {model_row[c]:.2f})"
                     for c in ("P@0.5", "mean IoU") if row[c] > model_row[c]]
             for label, row in others.iterrows()}
    ahead = {label: metrics for label, metrics in ahead.items() if metrics}
    viz.print_wrapped(
        "Above the model at P@0.5 or in mean IoU: "
        + "; ".join(f"{label}: {', '.join(m)}" for label, m in ahead.items()) + "."
        if ahead else "No baseline is above the model at P@0.5 or in mean IoU.")
else:
    print("no model to compare with: train chapter 5's stage 2 first")

# %% [markdown]
# Where a baseline built on proposals comes close to the model or beats it, the
# reason lies in how SynthRef's things meet bottom-up segmentation. Felzenszwalb and
# Huttenlocher's graph segmentation {cite}`felzenszwalb2004efficient` merges
# neighbouring pixels of similar colour; the proposal scorer then only has to *pick*
# the right segment among the image's proposals (the first table gives their number
# per image), with the help of SynthRef's words (a colour, a category, a position) and
# the segment's pooled features. The model has to *draw* the mask itself, from a
# $g \times g$ grid of decisions upsampled by its learned deconvolution (chapter 5).
# How well the segments fit is measured by the bottom-up ceiling: the IoU of the best
# proposal for each test pair, the best that a perfect scorer could reach. The data
# chapter measured it on the same test images in SynthRef's two looks
# ({numref}`fig-data-looks`): the flat shapes of version 1 and the textured, two-tone,
# shadowed things of version 2 that this book trains on.

# %% tags=["hide-input"]
proposal_baseline = fitted["proposal-classification"]
best = {"thing": [], "stuff": []}
for k in range(len(test_data)):
    segments = proposal_baseline.segments(test_data, int(test_data.pair_image[k]))
    target_square = test_data.square_mask(k, proposal_baseline.resolution)
    kind = "stuff" if test_data.pairs[k].is_stuff else "thing"
    best[kind].append(float(segments.overlaps(target_square).max()))
ceiling = {kind: 100 * float(np.mean(v)) for kind, v in best.items() if v}
side = proposal_baseline.resolution
parts = [f"{ceiling[kind]:.1f}% for the {len(best[kind])} test pairs that refer to "
         f"{'things' if kind == 'thing' else 'stuff'}" for kind in ceiling]
sentence = (f"The bottom-up ceiling, at the proposals' {side}x{side} letterbox: the "
            f"best proposal's mean IoU is {' and '.join(parts)}.")
ceiling_file = Path(run_dir) / "ceiling.json"  # the data chapter's, both looks
if ceiling_file.is_file() and "thing" in ceiling:
    looks = json.loads(ceiling_file.read_text())
    flat = 100 * looks["flat"]["thing"]["ceiling"]
    sentence += (f" On things that is {ceiling['thing'] - flat:+.1f} points from the "
                 f"{flat:.1f}% of the same scenes in the flat look (the data chapter).")
picked = summaries["proposal-classification"]["by_region"].get("thing")
if picked and "thing" in ceiling:
    sentence += (f" On things, the fitted scorer's picks reach a mean IoU of "
                 f"{100 * picked['mean_iou']:.1f}% (at the original size)")
    if ours is not None and "thing" in ours["by_region"]:
        sentence += (f", the model "
                     f"{100 * ours['by_region']['thing']['mean_iou']:.1f}%")
    sentence += "."
viz.print_wrapped(sentence)

# %% [markdown]
# Texture, a second tone, shadows and blur break some segments, which the change of
# the ceiling above measures; but SynthRef's things are still single objects on a
# simpler background than ReferIt's photographs, so the comparison with the model says
# little about the same comparison on photographs, where the paper makes it. The
# `paper` profile runs it on ReferIt ({doc}`../paper_profile`), and chapter 10 applies
# the model to photographs.
#
# ## What each baseline predicts
#
# {numref}`fig-baselines-predictions` shows the same test pairs for every baseline; the
# prediction is tinted red, the ground truth outlined in green.

# %% tags=["hide-input", "remove-output"]
rng = np.random.default_rng(seed)
chosen = np.sort(rng.choice(len(test_data), size=min(examples, len(test_data)),
                            replace=False))
targets = [test_data.original_mask(int(i)) for i in chosen]
images = {int(i): test_data.dataset.refer.load_image(test_data.pairs[int(i)].image_id)
          for i in chosen}
predictions = {}
for name, baseline in fitted.items():
    predictions.update(baseline.predict_masks(test_data, chosen))
pictures, captions = [], []
for row, i in enumerate(chosen):
    pictures.append(viz.overlay(images[int(i)], targets[row], viz.GROUND_TRUTH))
    captions.append(f'ground truth: "{test_data.pairs[int(i)].expression}"')
    for variant, masks in predictions.items():
        iou = iou_from_counts(*intersection_union(masks[row], targets[row]))
        pictures.append(viz.compare_masks(images[int(i)], masks[row], targets[row]))
        captions.append(f"{variant} (IoU {iou:.2f})")
grid = viz.image_grid(pictures, captions, ncols=1 + len(predictions), width=2.6)
viz.glue_figure("fig-baselines-predictions", grid)

# %% [markdown]
# ```{glue:figure} fig-baselines-predictions
# :name: fig-baselines-predictions
#
# Test pairs (one per row): the ground truth (green), then the prediction of each
# baseline (red, ground truth outlined) with its IoU.
# ```

# %% [markdown]
# ## Inside the baselines
#
# **Per-word segmentation** gives every word its own map. The expression's map combines
# them, so "left" and "circle" each vote for their own cells; nothing models how the
# words relate ("the circle left of the star").

# %% tags=["hide-input"]
per_word = fitted["per-word"]
i = int(chosen[0])
tokens = test_data.tokens[[i]].to(run.device)
features = test_data.image_features([int(test_data.pair_image[i])]).to(run.device)
with torch.no_grad():
    word_maps = per_word.head(features, tokens)[0].cpu().numpy()
words = [run.vocab.tokens[t] for t in tokens[0].tolist()]
keep = [t for t, w in enumerate(words) if w != "<pad>"]
square = viz.letterboxed(images[i], run.profile.input_size)
viz.image_grid([viz.heatmap(square, viz.sigmoid(word_maps[t]), alpha=0.6)
                for t in keep],
               [f'word "{words[t]}"' for t in keep], ncols=len(keep), width=2.6,
               suptitle=f'per-word maps of "{test_data.pairs[i].expression}"');

# %% [markdown]
# **Proposals.** Box retrieval scores boxes (sliding windows and the boxes of segments);
# proposal classification scores segments: Felzenszwalb's graph segments and their
# greedy merges, standing in for MCG ({numref}`fig-baselines-proposals`). A method can
# do no better than its best proposal.

# %% tags=["hide-input", "remove-output"]
import matplotlib.pyplot as plt

proposals = fitted["proposal-classification"]
image_index = int(test_data.pair_image[i])
segments = proposals.segments(test_data, image_index)
labels = segments.labels
colours = np.random.default_rng(seed).integers(40, 255, size=(labels.max() + 2, 3))
colours = colours.astype(np.uint8)
segment_picture = np.where((labels >= 0)[..., None], colours[labels], 0)
segment_picture = segment_picture.astype(np.uint8)
boxes = fitted["box-retrieval"].candidates(test_data, image_index).boxes
box_picture = test_data.square_image(image_index, proposals.resolution).copy()
drawn = np.random.default_rng(seed).choice(len(boxes), size=min(25, len(boxes)),
                                           replace=False)
for x0, y0, x1, y1 in boxes[drawn]:
    box_picture[y0:y1, [x0, x1 - 1]] = (255, 220, 0)
    box_picture[[y0, y1 - 1], x0:x1] = (255, 220, 0)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
axes[0].imshow(test_data.square_image(image_index, proposals.resolution))
axes[0].set_title("letterboxed image at the proposal resolution")
axes[1].imshow(segment_picture)
axes[1].set_title(f"{labels.max() + 1} segments -> {len(segments)} region proposals")
axes[2].imshow(box_picture)
axes[2].set_title(f"25 of {len(boxes)} box proposals")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
viz.glue_figure("fig-baselines-proposals", fig)

# %% [markdown]
# ```{glue:figure} fig-baselines-proposals
# :name: fig-baselines-proposals
#
# The proposals of the first test pair's image: the letterboxed image (left), its
# segments, each in a colour of its own (middle), and some of its box proposals (right).
# ```

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* The whole-image baseline's overall IoU equals the share of the test
#    images' pixels that the referred regions cover (summed over pairs). Check it from
#    the saved per-sample file `eval/whole-image_<split>.csv`.

# %% tags=["solution", "hide-cell"]
per_sample = pd.read_csv(Path(run_dir) / "eval" / f"whole-image_{test_data.split}.csv")
areas = sum(h * w for h, w in (test_data.size(k) for k in range(len(test_data))))
whole = overall_iou(per_sample["intersection"], per_sample["union"])
covered = per_sample["intersection"].sum() / areas
print(f"overall IoU {whole:.4f}; ground-truth pixels / image pixels {covered:.4f}")

# %% [markdown]
# 2. *(medium)* Which expression types does per-word segmentation (mean) handle worst
#    compared with proposal classification? Use the `type` column of the per-sample
#    files.

# %% tags=["solution", "hide-cell"]
rows = {}
for variant in ("per-word-mean", "proposal-classification"):
    frame = pd.read_csv(Path(run_dir) / "eval" / f"{variant}_{test_data.split}.csv")
    rows[variant] = {kind: round(100 * s["overall_iou"], 1)
                     for kind, s in summarize_groups(frame, "type").items()}
by_type = pd.DataFrame(rows)
by_type["difference"] = by_type["proposal-classification"] - by_type["per-word-mean"]
by_type.sort_values("difference")

# %% [markdown]
# 3. *(medium)* GrabCut {cite}`rother2004grabcut` starts from the box that box retrieval
#    picks and keeps the part of it that its colour models call foreground. Against the
#    box itself, on this run:

# %% tags=["hide-input"]
box_row, cut_row = (table.loc[summaries[v]["label"]]
                    for v in ("box-retrieval-box", "box-retrieval-grabcut"))
raised = [f"{c} ({box_row[c]:.2f} to {cut_row[c]:.2f})" for c in table.columns
          if cut_row[c] > box_row[c]]
lowered = [f"{c} ({box_row[c]:.2f} to {cut_row[c]:.2f})" for c in table.columns
           if cut_row[c] < box_row[c]]
premise = ("GrabCut raises " + (", ".join(raised) if raised else "no metric")
           + "; it lowers " + (", ".join(lowered) if lowered else "none") + ".")
if raised and lowered:
    question = "Why can one change of the masks raise some metrics and lower others?"
else:
    question = ("Why does GrabCut move every metric the same way here, and what would "
                "make the metrics disagree?")
viz.print_wrapped(f"{premise} {question}")

# %% [markdown]
#    Hint: overall IoU sums the intersections and the unions over all pairs (SPEC §1);
#    mean IoU and precision average over pairs. Compare the two variants on stuff and on
#    things, with the per-sample files `eval/box-retrieval-box_<split>.csv` and
#    `eval/box-retrieval-grabcut_<split>.csv`.

# %% tags=["solution", "hide-cell"]
kinds = {}
for variant in ("box-retrieval-box", "box-retrieval-grabcut"):
    frame = pd.read_csv(Path(run_dir) / "eval" / f"{variant}_{test_data.split}.csv")
    for kind, summary in summarize_groups(frame, "region").items():
        kinds[(kind, variant)] = {
            "pairs": int((frame["region"] == kind).sum()),
            "overall IoU": round(100 * summary["overall_iou"], 1),
            "mean IoU": round(100 * summary["mean_iou"], 1),
            "P@0.5": round(100 * summary["precision@0.5"], 1)}
pd.DataFrame.from_dict(kinds, orient="index").rename_axis(
    ["region", "variant"]).sort_index()

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# The metrics weigh pairs differently. Overall IoU is dominated by large regions: a
# stuff band or a big thing adds many pixels to both sums, a small thing few. Mean IoU
# and precision give every pair the same weight, and most pairs refer to things. A box
# around a compact thing holds background in its corners, which GrabCut can remove,
# raising that pair's IoU a little, often across the 0.5 threshold. On a large region
# GrabCut can lose much more: when the target shares its colours with what lies around
# it (a band of textured ground, a shape overlapping another of the same colour), its
# colour models cannot tell them apart and the cut shrinks or leaks, and it runs on the
# proposals' low-resolution letterbox, which blurs thin parts. Many small gains and a
# few large losses raise the averages over pairs while lowering the ratio of sums; the
# table above shows, per kind of region, whether that is what happens in this run.
# ```

# %% [markdown]
# 4. *(harder)* Give the proposal classifier a perfect scorer: for each test pair, take
#    the proposal with the best IoU with the ground truth, and compute the overall IoU
#    of these oracle choices on the first 100 test pairs. How far is the fitted scorer
#    from it?

# %% tags=["solution", "hide-cell"]
oracle = []
for k in range(min(100, len(test_data))):
    image_index = int(test_data.pair_image[k])
    segments = proposals.segments(test_data, image_index)
    target_square = test_data.square_mask(k, proposals.resolution)
    best = int(np.argmax(segments.overlaps(target_square)))
    square_logits = np.where(segments.masks([best])[0], 1.0, -1.0)
    height, width = test_data.size(k)
    mask = prediction_mask(square_logits, height, width, run.profile.eval_mode)
    oracle.append(intersection_union(mask, test_data.original_mask(k)))
fitted_file = Path(run_dir) / "eval" / f"proposal-classification_{test_data.split}.csv"
fitted_frame = pd.read_csv(fitted_file).head(100)
fitted_iou = overall_iou(fitted_frame["intersection"], fitted_frame["union"])
print(f"oracle proposal: overall IoU {overall_iou(*np.array(oracle).T):.3f}; "
      f"fitted scorer: {fitted_iou:.3f} (same pairs)")
