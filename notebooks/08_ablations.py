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
#     needs: [06_baselines]
# ---

# %% [markdown]
# # Beyond the paper: which parts of the method matter?
#
# The paper reports one model and its low-resolution version; it does not take the model
# apart. This chapter does, on SynthRef, with the profile's own network. Each question
# is one **profile override** of a *reference* run
# (`get_profile(profile, **overrides)`), never a second copy of the code:
#
# ```{list-table}
# :header-rows: 1
# :widths: auto
#
# * - question
#   - reference (SPEC)
#   - variant(s)
# * - do the spatial channels help, and for which expressions?
#   - 8 channels (code, SPEC §4)
#   - 2 (paper), 0
# * - does the per-position L2 normalisation matter?
#   - on (SPEC §4)
#   - off
# * - does word order matter, i.e. is the LSTM needed?
#   - LSTM (SPEC §4)
#   - bag of words (`text_encoder="bow"`)
# * - how should the 16 x 16 labels be made?
#   - OR-pooled: any pixel of the block (SPEC §5)
#   - the block's centre pixel (`lowres_labels="nearest"`)
# * - why down-weight negatives in stage 2?
#   - 1/3 (SPEC §5)
#   - 1 (`stage2={"neg_weight": 1.0}`)
# * - does the official initialisation help (SPEC §4, §8)?
#   - the profile's (`init`)
#   - the other one
# * - does the box-retrieval stage 0 help (SPEC §5)?
#   - the profile's (`pretrain`)
#   - on; on with the official initialisation (the official recipe)
# * - is a pretrained backbone worth it?
#   - pretrained, frozen, features cached
#   - slim VGG-16 trained from scratch in the same training time
# ```
#
# Every variant is trained and evaluated exactly like the reference (same data, same
# iterations, same seed, same test split), so the difference to the reference is the
# effect of the override. **Uncertainty**: each overall IoU comes with a 95% bootstrap
# confidence interval over the test samples (the test pairs are drawn with replacement
# and overall IoU recomputed), and each difference with a *paired* interval (both models
# scored on the same resampled pairs), usually much narrower than two separate
# intervals. With several seeds each resampled test set scores the mean of the seeds'
# runs, so the intervals cover the test samples and the seeds' average; the `seed sd`
# column gives the spread between seeds. A difference whose interval spans zero is
# called no difference.
#
# **Where the numbers come from.** Every variant at the profile's whole schedule over
# three seeds takes longer than this book may (`make ablations`, about an hour and a
# half on two cores). Its small summary is kept in the repository with the command,
# commit, machine, time, profile and a hash of the code that made it, and this chapter
# shows it whenever it is current. Otherwise (another profile, other code) the chapter
# says so and runs a **quick grid** here, at a fraction of the schedule, labelled as
# such in every heading that follows.

# %% tags=["parameters"]
from typing import Optional

profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # runs go to <run_dir>/ablations/<variant>/seed<k>/
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # the first seed; also seeds the bootstrap
overrides: dict = {}  # profile overrides applied to the reference and every variant
seeds: Optional[list[int]] = None  # seeds of each variant, e.g. [0, 1, 2]; None: [seed]
iteration_fraction: float = 0.2  # share of the profile's iterations, per stage
stage1_iterations: Optional[int] = None  # or a count (instead of iteration_fraction)
stage2_iterations: Optional[int] = None  # or a count for stage 2
# runs that would end past this many seconds are skipped (and marked so); None: no limit
budget_s: Optional[float] = 600  # seconds for all the runs; later ones are skipped
resamples: int = 1000  # bootstrap resamples of the test set
slim_width_mult: float = 0.25  # channel width of the slim VGG-16 trained from scratch
probe_iterations: int = 4  # iterations of the probe run that times the slim VGG-16
# PyTorch CPU threads (None: its default, all cores); 1 when other work shares the cores
threads: Optional[int] = None  # PyTorch CPU threads; None: all cores
kept_grid: str = ""  # kept full grid; "": book/results/ablations_<profile>.json
quick: str = "auto"  # auto: quick grid only without a current full grid; always; never

# %% tags=["hide-input"]
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from referseg import ablations, viz
from referseg.config import get_profile, profile_changes
from referseg.metrics import bootstrap_overall_iou, overall_iou

viz.setup_style()
claims = viz.Claims(profile, "08_ablations")
seeds = [int(seed)] if seeds is None else [int(s) for s in seeds]
base = get_profile(profile, **overrides)
reference = ablations.reference_profile(
    base,
    stage1_iterations=(stage1_iterations
                       or max(3, round(base.stage1.iterations * iteration_fraction))),
    stage2_iterations=(stage2_iterations
                       or max(3, round(base.stage2.iterations * iteration_fraction))),
)
grid = ablations.ablation_grid(reference, slim_width_mult=slim_width_mult)
stage1, stage2 = reference.stage1, reference.stage2
print(f"profile {profile!r} ({reference.dataset}, backbone {reference.backbone}, "
      f"grid {reference.grid}x{reference.grid})")
print(f"every variant: stage 1 {stage1.iterations} iterations "
      f"(lr x{stage1.lr_gamma} every {stage1.lr_step}), "
      f"stage 2 {stage2.iterations} (every {stage2.lr_step})")
print(f"the profile itself trains {base.stage1.iterations} + {base.stage2.iterations}")
print(f"seeds {seeds}; budget {budget_s} s; "
      f"run folder {Path(run_dir) / ablations.ABLATIONS_DIR}")

# %% [markdown]
# ## The grid
#
# Each row is a variant; the last column is computed from the profiles themselves: the
# fields where the variant's profile differs from the reference's, which are exactly its
# overrides. The slim VGG-16 keeps the reference's input size and stride, so its grid is
# the same; its iteration counts are set further down to take the reference's training
# time.

# %% tags=["hide-input"]
grid_table = pd.DataFrame([
    {"variant": v.name, "question": v.group, "variant is": v.label,
     "overrides": json.dumps(v.overrides) if v.overrides else "(none)",
     "profile differs from the reference in":
         ", ".join(profile_changes(reference, v.profile(reference))) or "(nothing)"}
    for v in grid
]).set_index("variant")
grid_table

# %% [markdown]
# ## The full grid, kept from `make ablations`
#
# The note says who made the kept summary and, first, whether it is stale.

# %% tags=["hide-input"]
full_reference = get_profile(profile, **overrides)
kept_file = kept_grid or f"book/results/ablations_{profile}.json"
kept, kept_stale, full_table, full_note = viz.read_grid(kept_file, full_reference)
viz.print_wrapped(full_note)
use_kept = full_table is not None and not kept_stale and quick != "always"
if quick == "never" and not use_kept:
    raise ValueError(f"quick='never' but no current full grid is kept in {kept_file}: "
                     "run `make ablations`, or set quick='auto'")
if use_kept:  # the kept summary holds everything the sections below show
    source = f"the full grid ({len(kept['seeds'])} seeds, whole schedule)"
    table, results = full_table, pd.DataFrame(kept["results"])
    breakdowns = {key: kept[key]
                  for key in ("by_type", "by_region", "type_pairs", "plans")}
    grid_seeds, grid_reference = kept["seeds"], full_reference
else:
    source = (f"the QUICK grid of this build ({len(seeds)} seed(s), "
              f"{reference.stage1.iterations}/{reference.stage2.iterations} "
              "iterations)")
print(f"The sections below show {source}.")

# %% [markdown]
# ## The quick grid, when no current full grid is kept
#
# One call trains both stages of each (variant, seed) with the package's trainer and
# evaluates the final (high-resolution) model on the test split with the evaluation
# protocol of SPEC §1. Variants with the reference's frozen backbone share its feature
# cache. Finished runs are read back instead of retrained. With a current full grid
# kept, nothing runs here.

# %%
if not use_kept:
    started = time.perf_counter()
    results = ablations.run_ablations(reference, grid, run_dir, seeds=seeds,
                                      stages=(1, 2), device=device, budget_s=budget_s,
                                      resamples=resamples,
                                      probe_iterations=probe_iterations,
                                      threads=threads)
    elapsed = time.perf_counter() - started
    status = results["status"].value_counts().to_dict()
    print(f"{len(results)} runs in {elapsed:.0f} s: "
          + ", ".join(f"{n} {s}" for s, n in status.items()))
    table = viz.comparison_table(run_dir, results, reference, resamples=resamples,
                                 seed=seed)
    breakdowns = viz.grid_breakdowns(run_dir, table.index, seeds)
    grid_seeds, grid_reference = seeds, reference
viz.dash_missing(results.round(4))

# %% [markdown]
# ## All variants against the reference
#
# Overall IoU (SPEC §1, in %) of each variant with its 95% bootstrap interval; `Δ`
# columns are the paired differences to the reference in points, on all test
# expressions, on the position expressions (SynthRef types `position` and `superlative`:
# "circle on the left", "leftmost one") and on the others; `train s` is the wall time of
# the training loops. The reference has no difference to itself ("–").

# %%
print(f"from {source}")
shown = ["group", "label", "seeds", "overall IoU", "CI low", "CI high",
         "Δ all", "Δ all low", "Δ all high", "Δ position", "Δ other", "train s",
         "iterations"]
viz.dash_missing(table[[c for c in shown if c in table.columns]].round(2))

# %% [markdown]
# {numref}`fig-ablations-all` puts every variant beside the reference:

# %% tags=["hide-input", "remove-output"]
others = [n for n in table.index if n != ablations.REFERENCE]
if others:
    axes = viz.plot_group(table, others, subsets=("all",),
                          title="every ablation against the reference")
else:  # every variant was skipped (budget_s): say so in the figure's place
    axes = plt.figure(figsize=(8, 1)).text(0.5, 0.5, "no variant ran", ha="center")
viz.glue_figure("fig-ablations-all", axes)

# %% [markdown]
# ```{glue:figure} fig-ablations-all
# :name: fig-ablations-all
#
# Overall IoU of every variant with its 95% bootstrap interval (left), and its paired
# difference to the reference on all test expressions (right).
# ```

# %%
for name in others:
    viz.print_wrapped(viz.describe_difference(table, name))

# %% [markdown]
# ## Spatial channels: 8, 2 or none
#
# The official code gives the classifier 8 coordinates per cell; the paper's text
# describes 2 (SPEC §4 and §8 record the difference). Without any, the classifier only
# sees what the visual features say about position (their receptive fields and padding
# carry some). One would expect the channels to matter most for expressions that name a
# place; the per-type table below says whether they do here.

# %%
spatial = [n for n in ("spatial-2", "spatial-0") if n in table.index]
if spatial:
    viz.plot_group(table, spatial, title="spatial channels")
    plt.show()
for name in spatial:
    for subset in ("position", "other"):
        viz.print_wrapped(viz.describe_difference(table, name, subset))

# %% [markdown]
# The same numbers per expression type (overall IoU in %, averaged over seeds):

# %% tags=["hide-input"]
by_type = pd.DataFrame(breakdowns["by_type"])
types = by_type[[n for n in (ablations.REFERENCE, *spatial) if n in by_type]].copy()
types["test pairs"] = pd.Series(breakdowns["type_pairs"])
display(viz.dash_missing(types.round(1)))
for name in spatial:
    if name in by_type and ablations.REFERENCE in by_type:
        loss = (by_type[name] - by_type[ablations.REFERENCE]).sort_values()
        rank = list(loss.index).index("position") + 1 if "position" in loss else None
        viz.print_wrapped(
            f"{table.loc[name, 'label']}, change per type against the reference: "
            + ", ".join(f"{kind} {value:+.1f}" for kind, value in loss.items())
            + " points" + (f"; position expressions come {rank} of {len(loss)} "
                           "(1: the largest loss)" if rank else "") + ".")

# %% [markdown]
# ## L2 normalisation, text encoder, low-resolution labels
#
# - **L2 normalisation** puts the text vector and the visual vector on the same scale at
#   every cell before the classifier mixes them (SPEC §4).
# - **Bag of words** averages the word embeddings: it keeps the words but loses their
#   order, so "red circle left of the square" and "square left of the red circle" look
#   alike. SynthRef's short expressions rarely depend on order, so any difference here
#   mostly measures the two encoders' capacity and ease of training.
# - **Nearest labels** mark a 16 x 16 cell positive only when the block's centre pixel
#   is foreground, so small or thin things can vanish from the stage-1 labels.

# %%
for name in ("no-l2-norm", "bag-of-words", "nearest-labels"):
    if name in table.index:
        viz.plot_group(table, [name], title=table.loc[name, "group"])
        plt.show()
        viz.print_wrapped(viz.describe_difference(table, name))
reversals = [name for name in ("no-l2-norm", "bag-of-words")
             if name in table.index and table.loc[name, "Δ all low"] > 0]
if reversals:
    viz.print_wrapped(
        "Against the paper's design on SynthRef: "
        + " and ".join(table.loc[n, "group"] + " = " + table.loc[n, "label"]
                       for n in reversals)
        + " scores above the reference, with an interval that excludes zero.")
else:
    print("No variant of this section scores above the reference beyond its interval.")
if "bag-of-words" in table.index and table.loc["bag-of-words", "Δ all high"] >= 0:
    viz.print_wrapped(
        "The bag of words does not score below the LSTM beyond its interval: "
        "SynthRef's expressions are short and single out their region by "
        "construction, so there is little word order to read (exercise 4 counts the "
        "expressions whose bag of words another region of the same image shares). "
        "Chapter 9 measures what ReferIt's longer expressions carry.")

# %% [markdown]
# ## Initialisation and the box-retrieval stage 0
#
# The official code initialises the embedding, the LSTM's single gate biases and the
# classifier differently from PyTorch's defaults (SPEC §4, §8), and starts stage 1 from
# a box-retrieval stage 0 (SPEC §5) trained on proposals of the training images. The
# chosen profile values come from the validation sweep of chapter 4; here they are
# tested on the test split over seeds.

# %%
for name in ("init-official", "stage0", "stage0-official"):
    if name in table.index:
        viz.print_wrapped(viz.describe_difference(table, name))
present = [n for n in ("init-official", "stage0", "stage0-official")
           if n in table.index]
if present:
    viz.plot_group(table, present, subsets=("all",), title="initialisation and stage 0")
    plt.show()

# %% [markdown]
# ## Stage 2: the weight of the negatives
#
# At high resolution most pixels of a 512 x 512 (here smaller) letterbox are background.
# The official recipe weights negatives by 1/3 in stage 2 (SPEC §5), which pushes the
# logits of uncertain pixels up; with weight 1 the model is more conservative.

# %%
if "neg-weight-1" in table.index:
    viz.plot_group(table, ["neg-weight-1"], title="stage-2 negative weight")
    plt.show()
    viz.print_wrapped(viz.describe_difference(table, "neg-weight-1"))
    finished = results[results["status"].isin(["trained", "reused"])]
    mean_iou = {name: finished[finished["variant"] == name]["mean_iou"].mean()
                for name in (ablations.REFERENCE, "neg-weight-1")}
    print(f"mean IoU (%, not in the paper): "
          f"reference {100 * mean_iou[ablations.REFERENCE]:.1f}, "
          f"negative weight 1: {100 * mean_iou['neg-weight-1']:.1f}")

# %% [markdown]
# ## A pretrained backbone against a slim VGG-16 from scratch, in the same time
#
# The trainer has no time-budget stop, so the runner measures the slim network's seconds
# per iteration with a short probe run and gives it the iteration count that takes as
# long as the reference's training loops (stage by stage). The reference's one-off
# feature extraction (its frozen backbone runs once per image, shared by all variants)
# is not counted. The plan and the measured training times:

# %% tags=["hide-input"]
slim = "slim-vgg16-scratch"
plans = {key.split()[-1]: plan for key, plan in breakdowns["plans"].items()
         if key.split()[0] == slim}  # one plan per seed
if plans:
    display(pd.concat({seed_name: pd.DataFrame({
        "reference loop (s)": plan["reference_seconds"],
        "slim s / iteration (probe)": plan["seconds_per_iteration"],
        "slim iterations": plan["iterations"],
        "reference iterations": {"1": grid_reference.stage1.iterations,
                                 "2": grid_reference.stage2.iterations},
    }) for seed_name, plan in sorted(plans.items())})
        .rename_axis(["seed", "stage"]).round(3))
    finished = results[results["status"].isin(["trained", "reused"])]
    trained = finished.set_index(["variant", "seed"])["train_s"]
    viz.print_wrapped("measured training time (s): " + ", ".join(
        f"{name} seed {s}: {t:.1f}" for (name, s), t in trained.items()
        if name in (ablations.REFERENCE, slim)))
viz.print_wrapped(viz.describe_difference(table, slim))
if slim in table.index:
    viz.plot_group(table, [slim], title="backbone")
    plt.show()
    by_region = pd.DataFrame(breakdowns["by_region"])
    shown_regions = [n for n in (ablations.REFERENCE, slim) if n in by_region]
    display(by_region[shown_regions].round(1).rename_axis("overall IoU (%) on"))

# %% [markdown]
# ## What to keep in mind
#
# - These are SynthRef results with the profile's small network (the line printed at
#   the end of this section says which grid, schedule and seeds). They measure each
#   part's effect on this data in this budget; they do not predict its effect on
#   ReferIt, and one part's effect is not a ranking of the parts.
# - The bootstrap intervals treat test pairs as independent, but pairs of one image
#   share the image (exercise 2 resamples whole images instead). With one seed they
#   leave out the training noise: an interval that excludes 0 with one seed is
#   evidence, not proof. With several seeds, compare a difference with the `seed sd`
#   column too.
# - Each variant changes one thing; the parts may interact (for example, the spatial
#   channels are not normalised, so their weight relative to the normalised vectors
#   changes when L2 normalisation is off).

# %% tags=["hide-input"]
seed_counts = sorted({int(n) for n in table["seeds"]})
print(f"Shown: {source}; seeds per variant: {'/'.join(map(str, seed_counts))}.")

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* Which expression type loses most when the spatial channels are removed?
#    Compute the per-type overall IoU of the reference and of `spatial-0` from their
#    per-sample results (`ablations.load_samples`) and sort the types by the difference.

# %% tags=["solution", "hide-cell"]
if {"spatial-0", ablations.REFERENCE} <= set(by_type):
    iou = by_type[[ablations.REFERENCE, "spatial-0"]].copy()
    iou["difference"] = iou["spatial-0"] - iou[ablations.REFERENCE]
    display(iou.sort_values("difference").round(1))
else:
    print("spatial-0 or the reference did not run (see the results table)")

# %% [markdown]
# 2. *(medium)* The bootstrap above resamples test *pairs*, but the pairs of one image
#    share the image and are not independent. Write a *cluster* bootstrap that resamples
#    whole test images (with all their pairs) and compare its 95% interval for the
#    reference's overall IoU with the pair bootstrap's. Which one is wider, and why?

# %% tags=["solution", "hide-cell"]
def image_bootstrap(samples: pd.DataFrame, resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% interval of overall IoU when whole images are drawn with replacement."""
    per_image = samples.groupby("image_id")[["intersection", "union"]].sum()
    per_image = per_image.to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_image), size=(resamples, len(per_image)))
    totals = per_image[draws].sum(axis=1)
    low, high = np.percentile(totals[:, 0] / totals[:, 1], [2.5, 97.5])
    return float(low), float(high)


ref_samples = ablations.load_samples(run_dir, ablations.REFERENCE, grid_seeds[:1])
if ref_samples is None:  # the kept grid's runs are elsewhere: this book's own run
    own = Path(run_dir) / "eval" / f"ours-highres_{full_reference.eval_split}.csv"
    ref_samples = pd.read_csv(own, keep_default_na=False) if own.is_file() else None
if ref_samples is not None:
    pair_ci = bootstrap_overall_iou(ref_samples["intersection"], ref_samples["union"],
                                    resamples, seed=seed)
    image_ci = image_bootstrap(ref_samples, resamples, seed)
    widths = {"pairs": pair_ci[2] - pair_ci[1], "images": image_ci[1] - image_ci[0]}
    viz.print_wrapped(
        f"overall IoU {100 * pair_ci[0]:.1f}%: "
        f"pairs resampled [{100 * pair_ci[1]:.1f}, {100 * pair_ci[2]:.1f}], "
        f"images resampled [{100 * image_ci[0]:.1f}, {100 * image_ci[1]:.1f}] "
        f"({ref_samples['image_id'].nunique()} test images, {len(ref_samples)} pairs); "
        f"resampling {max(widths, key=widths.get)} gives the wider interval here")
# Resampling images is usually wider: pairs of one image (and of one region) tend to
# succeed or fail together, so there are fewer independent observations than pairs. With
# very few test images (the smoke profile) the percentiles of the image bootstrap are
# themselves unreliable.

# %% [markdown]
# 3. *(medium)* The slim VGG-16 is compared with the pretrained backbone in the same
#    training *time*, not in the same number of iterations. What would an
#    iteration-matched comparison measure instead, and why is it less useful for someone
#    choosing a backbone for a laptop?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# With equal iterations, both networks see the same number of training pairs, so the
# comparison asks which network learns more *per example*; but each iteration of the
# slim network costs much more, because its convolutions run (forward and backward) on
# every image of every batch, while the frozen backbone's features are computed once and
# read from the cache. Someone with a fixed amount of compute cares about what each
# choice reaches in that compute, which is what the time-matched comparison measures.
# (Neither counts the one-off cost of pretraining on ImageNet, which someone else paid.)
# ```

# %% [markdown]
# 4. *(harder)* The bag-of-words encoder cannot tell word order apart. Find the test
#    expressions that have the same *bag* of words as another test expression with a
#    different target, and compare how the LSTM and the bag of words do on them. Does
#    SynthRef test word order at all?

# %% tags=["solution", "hide-cell"]
bow = {name: ablations.load_samples(run_dir, name, grid_seeds[:1])
       for name in (ablations.REFERENCE, "bag-of-words")}
if any(s is None for s in bow.values()):
    viz.print_wrapped("needs the per-sample results of the grid's runs: "
                      "`make ablations` (or the quick grid, quick='always') "
                      "writes them to the run folder")
else:
    columns = ["sent_id", "image_id", "ann_id", "expression", "intersection", "union"]
    frame = bow[ablations.REFERENCE][columns].copy()
    words = frame["expression"].str.lower().str.split()
    frame["bag"] = words.map(lambda bag: " ".join(sorted(bag)))
    # regions of the same image that some expression with this bag of words refers to
    targets = frame.groupby(["image_id", "bag"])["ann_id"].transform("nunique")
    ambiguous = targets > 1
    other = bow["bag-of-words"].set_index("sent_id").loc[frame["sent_id"]]
    print(f"{int(ambiguous.sum())} of {len(frame)} test expressions share their bag of "
          "words with an expression")
    print("of another region of the same image")
    for name, part in (("LSTM", frame), ("bag of words", other.reset_index())):
        chosen = part[ambiguous.to_numpy()]
        if len(chosen):
            iou = overall_iou(chosen["intersection"], chosen["union"])
            print(f"{name}: overall IoU on them {100 * iou:.1f}%")
# SynthRef's expressions are short and single out their region by construction, so few
# (if any) pairs of expressions of one image differ only in word order: when the count
# above is small, this data barely tests word order, and a small gap between the
# encoders says little about ReferIt's longer expressions.
