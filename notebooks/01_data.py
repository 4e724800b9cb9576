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
# ---

# %% [markdown]
# # The data: ReferIt as the paper used it, SynthRef as run here
#
# > *"We use the ReferIt dataset [...] collected in a two-player game [...]: one player
# > writes an expression referring to an object or a stuff region of a photo, the other
# > clicks on it."* (paraphrasing {cite:t}`hu2016segmentation`, Section 4, about
# > {cite}`kazemzadeh2014referitgame`)
#
# The paper trains and tests on ReferIt: photos of the IAPR TC-12 collection
# {cite}`grubinger2006iapr` with the segmented regions of SAIAPR TC-12
# {cite}`escalante2010segmented`, things ("the man on the left") and stuff ("sky",
# "water") alike, about 130k expressions of 97k regions in 20k images (SPEC §2). This
# chapter shows
#
# 1. **ReferIt as the paper used it**: the split of SPEC §2 and, when the official
#    implementation's query files are at hand, the real counts and expression lengths;
# 2. **SynthRef as run here**: the generated dataset the `cpu` and `smoke` profiles
#    train on, with the same statistics (splits, expression lengths, expression types,
#    stuff and things) and examples with their masks drawn over the images.
#
# Nothing in this chapter trains anything; it only reads (and, the first time,
# generates) data.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # chooses the examples drawn below
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
# the official ReferIt query files (expressions, no images); skipped when absent
referit_official: str = "../shared/data/referit-official"  # official query files
examples: int = 6  # images drawn with their referred regions

# %% tags=["hide-input"]
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

import referseg
from referseg import viz
from referseg.config import get_profile
from referseg.data.refer import OfficialReferIt, build_vocab, load_refer, stats_table
from referseg.text import tokenize

viz.setup_style()
cfg = get_profile(profile, **overrides)
print(f"referseg {referseg.__version__}: profile {cfg.name!r} "
      f"({cfg.dataset} at {cfg.data_root})")
print(f"run folder {run_dir}, device {device}, seed {seed}")

# %% [markdown]
# ## ReferIt as the paper used it
#
# The paper splits ReferIt's 20k images in half: 10k images for training (the *trainval*
# set, itself train + val) and 10k for testing. SPEC §2 records the split of the
# official code; the REFER API's `refclef` dataset with `splitBy='berkeley'` is the same
# split minus three images its release lacks.

# %% tags=["hide-input"]
paper_split = pd.DataFrame(
    {"images with queries": [8995, 1000, 9995, 9994],
     "regions": [44649, 4866, 49515, 49730],
     "(region, expression) pairs": [54134, 5842, 59976, 60105]},
    index=pd.Index(["train", "val", "trainval", "test"], name="split"),
)
paper_split.attrs["source"] = ("SPEC §2 (the split of the official code, "
                               "as used by the paper)")
print("ReferIt split used by the paper; source:")
print(paper_split.attrs["source"])
paper_split

# %% [markdown]
# The official implementation ships its split as `referit_query_<split>.json` files,
# `{"<imgid>_<k>": [expression, ...]}`: every real ReferIt expression, without images or
# masks (their download link is dead). When those files are present (parameter
# `referit_official`), we count them again: the table below is *measured*, not copied.

# %% tags=["hide-input"]
official_root = Path(referit_official)
referit = None
if official_root.is_dir() and any(official_root.glob("referit_query_*.json")):
    referit = OfficialReferIt(official_root)
    measured = pd.DataFrame(
        [{"split": split,
          "images with queries": len({p.image_id for p in referit.pairs(split)}),
          "regions": len({p.ann_id for p in referit.pairs(split)}),
          "(region, expression) pairs": len(referit.pairs(split))}
         for split in referit.splits]
    ).set_index("split")
    measured["matches SPEC §2"] = [
        bool((measured.loc[s] == paper_split.loc[s]).all()) if s in paper_split.index
        else None
        for s in measured.index
    ]
    print(f"measured from {official_root}")
    display(measured)
else:
    print(f"no official ReferIt query files at {official_root}:")
    print("skipping the measured split "
          "(set the parameter referit_official to their folder)")

# %% [markdown]
# ReferItGame expressions are short: players were rewarded for speed, so most
# expressions have one to five tokens (tokenised with the official rules of SPEC §2,
# where separators such as `", "` are tokens too). The model keeps the first $T = 20$
# tokens; very few expressions are longer.

# %% tags=["hide-input"]
lengths = {}
if referit is not None:
    for split in ("trainval", "test"):
        expressions = [p.expression for p in referit.pairs(split)
                       if p.expression.strip()]
        lengths[f"ReferIt {split}"] = [len(tokenize(e)) for e in expressions]
    summary = pd.DataFrame({name: {"expressions": len(v),
                                   "mean tokens": round(float(np.mean(v)), 2),
                                   "max tokens": int(np.max(v)),
                                   "longer than T=20": int(np.sum(np.array(v) > 20))}
                            for name, v in lengths.items()}).T
    display(summary)
    viz.length_histogram(lengths).set_title(
        "ReferIt: tokens per expression (official tokenizer)");
else:
    print("ReferIt expression lengths skipped: no official query files")

# %% [markdown]
# ## SynthRef as run here
#
# ReferIt's images cannot be downloaded any more, so the `cpu` and `smoke` profiles run
# on **SynthRef**, a dataset generated on the spot in the same REFER format (DESIGN,
# "SynthRef"): scenes of ReferIt's image sizes with stuff bands (sky at the top; grass,
# gravel, brick or water at the bottom, textured with real photographs) and things
# (shapes of several categories, colours and sizes, possibly overlapping); short
# expressions that single out their target among the distractors. `load_refer(cfg)`
# generates it the first time (seeded by `cfg.synth_seed`) and reads it afterwards.

# %%
refer = load_refer(cfg)
vocab = build_vocab(cfg, refer)
print(f"{refer.name}: {len(refer.images)} images")
print(f"vocabulary built from {cfg.train_split!r}: {len(vocab)} tokens")
table = stats_table(refer, vocab)
table

# %% [markdown]
# Columns: `len_*` are tokens per expression; `over_20` counts expressions longer than
# $T = 20$; `pct_unknown` is the share of tokens outside the vocabulary (built from the
# training split, so it is zero there by construction); `pct_stuff` the share of pairs
# that refer to stuff. The lengths of SynthRef's expressions follow ReferIt's closely
# ({numref}`fig-data-lengths`).

# %% tags=["hide-input", "remove-output"]
synth_lengths = {
    f"SynthRef {split}": [len(tokenize(p.expression)) for p in refer.pairs(split)]
    for split in ("train", "test")
}
referit_test = {k: v for k, v in lengths.items() if k.endswith("test")}
ax = viz.length_histogram({**referit_test, **synth_lengths})
ax.set_title("tokens per expression: ReferIt (if present) and SynthRef")
viz.glue_figure("fig-data-lengths", ax)

# %% [markdown]
# ```{glue:figure} fig-data-lengths
# :name: fig-data-lengths
#
# Tokens per expression, as a share of each split's expressions: SynthRef's training
# and test splits, and ReferIt's test split when the official query files are present.
# ```

# %% [markdown]
# ### Expression types, stuff and things
#
# Every SynthRef expression carries the kind of information that singles out its target:
# the category alone ("star"), a colour ("the red one"), a size ("big circle"), a
# position ("triangle on the left") or a superlative ("leftmost shape"), or it names a
# stuff region ("sky"). The evaluation chapter breaks the results down by these types.
# Things are referred to more often than stuff, as in ReferIt, so that overall IoU is
# not dominated by the sky.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt

splits = [s for s in refer.splits if s != "trainval"]
types = pd.DataFrame({s: Counter(p.type or "untagged" for p in refer.pairs(s))
                      for s in splits}).fillna(0)
type_share = (100 * types / types.sum()).round(1)
regions = pd.DataFrame({
    s: Counter("stuff" if p.is_stuff else "thing" for p in refer.pairs(s))
    for s in splits
})
region_share = (100 * regions / regions.sum()).round(1)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [3, 1]})
type_share.plot.bar(ax=axes[0], rot=0)
axes[0].set_ylabel("% of pairs")
axes[0].set_title("expression types by split")
region_share.T.plot.bar(ax=axes[1], stacked=True, rot=0)
axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
axes[1].set_ylabel("% of pairs")
axes[1].set_title("stuff or thing")
fig.tight_layout()
pd.concat({"% of pairs by type": type_share, "% of pairs by region kind": region_share})

# %% tags=["hide-input"]
categories = pd.DataFrame({s: Counter(p.category for p in refer.pairs(s))
                           for s in splits})
categories = categories.fillna(0).astype(int)
stuff = {p.category for p in refer.pairs("train") if p.is_stuff}
categories["kind"] = ["stuff" if c in stuff else "thing" for c in categories.index]
categories.sort_values(["kind", "train"], ascending=[False, False])

# %% [markdown]
# ### Image sizes
#
# SynthRef draws ReferIt's four image sizes (SPEC §2), so the letterbox (SPEC §3) pads
# some images at the top and bottom and others at the left and right, and evaluation at
# the original size must undo both.

# %% tags=["hide-input"]
sizes = pd.DataFrame({"SynthRef": Counter(f"{im['width']}x{im['height']}"
                                          for im in refer.images.values())})
imsize_file = official_root / "referit_imsize.json"
if imsize_file.is_file():
    import json

    referit_sizes = Counter(f"{w}x{h}"
                            for w, h in json.loads(imsize_file.read_text()).values())
    top = dict(referit_sizes.most_common(6))
    top["other"] = sum(referit_sizes.values()) - sum(top.values())
    sizes = sizes.join(pd.Series(top, name="ReferIt"), how="outer")
sizes = (100 * sizes / sizes.sum()).round(1).fillna(0)
sizes.index.name = "width x height (% of images)"
sizes.sort_values(sizes.columns[-1], ascending=False)

# %% [markdown]
# ### Examples
#
# {numref}`fig-data-examples` shows training images with every referred region drawn in
# its own colour, and one expression per region in the same order as the colours (red,
# blue, yellow, purple, ...).

# %% tags=["hide-input", "remove-output"]
rng = np.random.default_rng(seed)
by_image = viz.pairs_by_image(refer.pairs(cfg.train_split))
image_ids = sorted(by_image)
chosen = rng.choice(image_ids, size=min(examples, len(image_ids)), replace=False)
pictures, captions = [], []
for image_id in chosen:
    regions_of_image = viz.one_pair_per_region(by_image[image_id],
                                               limit=len(viz.MASK_COLOURS))
    image = refer.load_image(int(image_id))
    masks = [refer.load_mask(p.ann_id) for p in regions_of_image]
    pictures.append(viz.overlay_masks(image, masks))
    captions.append(" | ".join(f'"{p.expression}"' for p in regions_of_image))
viz.glue_figure("fig-data-examples", viz.image_grid(pictures, captions, ncols=3))

# %% [markdown]
# ```{glue:figure} fig-data-examples
# :name: fig-data-examples
#
# SynthRef training images with their referred regions, each in its own colour; above
# each image, one expression per region, in the order of the colours.
# ```

# %% [markdown]
# The same region is usually described several times, in different words and with
# different kinds of information:

# %% tags=["hide-input"]
pairs = by_image[int(chosen[0])]
pd.DataFrame([{"region": p.ann_id, "category": p.category, "stuff": p.is_stuff,
               "type": p.type, "expression": p.expression,
               "tokens": tokenize(p.expression)} for p in pairs])

# %% [markdown]
# ## What the next chapters use
#
# Training reads the profile's training split (`train` for SynthRef, `trainval` in the
# paper) and the evaluation its test split; the vocabulary is built from the training
# split (or read from `vocab_file`). Both are written to the run folder by the trainer,
# so every later chapter reads the same files.
#
# ## Exercises
#
# 1. *(easy)* What share of SynthRef's test expressions mention a colour word? Use
#    `referseg.data.synthetic.THING_COLOURS` for the list of colours.

# %% tags=["solution", "hide-cell"]
from referseg.data.synthetic import THING_COLOURS

test_pairs = refer.pairs(cfg.eval_split)
with_colour = [p for p in test_pairs
               if set(tokenize(p.expression)) & set(THING_COLOURS)]
share = 100 * len(with_colour) / len(test_pairs)
print(f"{share:.1f}% of {len(test_pairs)} test expressions name a colour")

# %% [markdown]
# 2. *(medium)* How many pairs and how many distinct regions does each split hold per
#    image on average? Compare SynthRef with ReferIt's split of SPEC §2. Does SynthRef
#    describe a region as many times as ReferIt does?

# %% tags=["solution", "hide-cell"]
both = ("train", "test")
referit_pairs = paper_split["(region, expression) pairs"]
per_image = pd.DataFrame({
    "SynthRef": {s: round(table.loc[s, "pairs"] / table.loc[s, "images"], 2)
                 for s in both},
    "ReferIt (SPEC §2)": {
        s: round(referit_pairs[s] / paper_split.loc[s, "images with queries"], 2)
        for s in both},
})
per_region = pd.DataFrame({
    "SynthRef": {s: round(table.loc[s, "pairs"] / table.loc[s, "regions"], 2)
                 for s in both},
    "ReferIt (SPEC §2)": {s: round(referit_pairs[s] / paper_split.loc[s, "regions"], 2)
                          for s in both},
})
pd.concat({"pairs per image": per_image, "expressions per region": per_region})

# %% [markdown]
# 3. *(medium)* Why are the splits disjoint by **image** rather than by region or by
#    expression? What would go wrong if two regions of one image were in different
#    splits?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# The visual features are computed from the whole image, and the model sees the image
# with every expression of it during training. With regions of one image in both splits,
# the test image would have been seen in training (only its expression would be new), so
# the test would measure memorised scenes, not generalisation. Splitting by image keeps
# every test image unseen; it is what ReferIt's split (SPEC §2) and SynthRef's generator
# do.
# ```

# %% [markdown]
# 4. *(harder)* The paper's headline metric is *overall* IoU, the sum of intersections
#    over the sum of unions (SPEC §1). Which regions dominate it, large or small ones?
#    Compute the share of the test split's total ground-truth area that stuff regions
#    cover, and compare it with their share of pairs.

# %% tags=["solution", "hide-cell"]
area = {"stuff": 0, "thing": 0}
count = {"stuff": 0, "thing": 0}
for p in test_pairs:
    kind = "stuff" if p.is_stuff else "thing"
    area[kind] += int(refer.load_mask(p.ann_id).sum())
    count[kind] += 1
pd.DataFrame({
    "% of pairs": {k: 100 * v / len(test_pairs) for k, v in count.items()},
    "% of ground-truth area": {k: 100 * v / sum(area.values())
                               for k, v in area.items()},
}).round(1)

# %% [markdown] tags=["solution"]
# ```{admonition} Discussion
# :class: dropdown
#
# Large regions weigh more in overall IoU: a sky region of 30% of the image counts as
# much as ten small things. Stuff regions cover a larger share of the ground-truth area
# than their share of pairs, which is why SynthRef refers to things more often than to
# stuff, and why the evaluation chapter also reports mean IoU and a breakdown by stuff
# and things.
# ```
