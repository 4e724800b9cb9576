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
# # The data: ReferIt as the paper used it, SynthRef as run here
#
# In Section 4 of the paper, {cite:t}`hu2016segmentation` take their data from ReferIt
# {cite}`kazemzadeh2014referitgame`, collected in a two-player game in which one player
# writes an expression that refers to an object or a stuff region of a photograph and
# the other clicks on it (our paraphrase, not a quotation). This chapter shows
#
# 1. **ReferIt as the paper used it**: where its photographs, regions and expressions
#    come from, the split of SPEC §2, how to bring a copy of your own and, when the
#    official implementation's query files are at hand, the real counts and expression
#    lengths;
# 2. **SynthRef as run here**: why the `cpu` and `smoke` profiles train on a generated
#    dataset, what it keeps of ReferIt and what it does not, its statistics (splits,
#    expression lengths, expression types, stuff and things) and examples with their
#    masks drawn over the images.
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
# ReferIt's expressions come from ReferItGame {cite}`kazemzadeh2014referitgame`. In that
# two-player game one player sees a photograph with one region outlined and writes an
# expression that picks it out; the other player sees the photograph without the outline
# and must click the region, which checks that the expression identifies it. The
# expressions are short (3.54 tokens on average with the official tokenizer, SPEC §2):
# "sky", "left man", "bottom right corner".
#
# The photographs are those of the IAPR TC-12 benchmark {cite}`grubinger2006iapr`,
# pictures of everyday scenes, and the regions are the segmentations of SAIAPR TC-12
# {cite}`escalante2010segmented`, which annotated every photograph with region masks and
# concept labels. That is why ReferIt refers to *stuff* (sky, water, ground, mountains)
# as well as to *things* (people, cars): every segmented region could be a target. In
# all, about 130,000 expressions for 97,000 regions in 20,000 images (SPEC §2).
#
# The paper splits the images in half: about 10,000 for training (the *trainval* set,
# itself train + val) and 10,000 for testing. SPEC §2 records the split of the official
# code. The REFER API {cite}`yu2016modeling` ships the same split as the dataset
# `refclef` with `splitBy='berkeley'`, minus three images that its release lacks
# (19579.jpg and 17975.jpg in train, 19575.jpg in test), which the loaders skip.

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
# masks. When those files are present (parameter `referit_official`), we count them
# again: the table below is *measured*, not copied.

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
# How long are the real expressions? Tokenised with the official rules of SPEC §2, where
# separators such as `", "` are tokens too, and against the $T = 20$ tokens that the
# model keeps:

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
    for name, v in lengths.items():
        v = np.array(v)
        viz.print_wrapped(
            f"{name}: {100 * np.mean((v >= 1) & (v <= 5)):.1f}% of the {len(v):,} "
            f"expressions have one to five tokens, and {int(np.sum(v > 20))} "
            f"({100 * np.mean(v > 20):.2f}%) are longer than T = 20.")
    viz.length_histogram(lengths).set_title(
        "ReferIt: tokens per expression (official tokenizer)");
else:
    print("ReferIt expression lengths skipped: no official query files")

# %% [markdown]
# ### Bringing your own copy
#
# The original download links of ReferIt, of the REFER API's `refclef` annotations and
# of the official implementation's preprocessed files are dead (SPEC §2), but copies
# remain: `referseg data fetch-referit` fetches them where there is internet access
# (`data/README.md` lists the sources), and nothing in this book downloads data on its
# own. IAPR TC-12 and SAIAPR TC-12 were released for research use, so check the terms
# that came with your copy. Put it under `data/referit/` in either layout:
#
# - the **REFER layout**:
#   - `data/referit/refclef/instances.json`: COCO-style images, annotations (RLE masks)
#     and categories;
#   - `data/referit/refclef/refs(berkeley).p`: the referring expressions, a pickle
#     written by Python 2;
#   - `data/referit/images/saiapr_tc-12/`: the images, named as in `instances.json`;
# - or the **official implementation's format**: `referit_query_trainval.json` and
#   `referit_query_test.json` (`{"<imgid>_<k>": [expression, ...]}`), the masks
#   `mask/<imgid>_<k>.mat` and the images `images/<imgid>.jpg`.
#
# Then `referseg data stats data/referit` prints the split table above, the expression
# lengths and the unknown-word rate, which should match the recipe's (SPEC §2), and
# `referseg data check data/referit` says whether the copy reproduces the paper's split.
# The loader reads the refs pickle with an unpickler that refuses anything but plain
# data, because unpickling an untrusted file can run arbitrary code. Without the data,
# `referseg book --profile paper` stops before running anything and says what is
# missing.

# %% [markdown]
# ## SynthRef as run here
#
# The book has to run from a fresh clone, on two CPU cores, without network access, in
# minutes. ReferIt cannot be part of that: it has to be fetched, and redistributing it
# is not ours to do. **SynthRef** is a generated dataset, fully determined by a seed,
# that keeps the properties of ReferIt that the method depends on:
#
# - **image sizes** are ReferIt's (480 x 360, 360 x 480, 480 x 320, 320 x 480), so
#   letterboxing and evaluation at the original resolution are exercised;
# - **stuff and things**: bands of sky at the top and ground at the bottom (grass,
#   gravel or brick, filled with scikit-image's bundled CC0 photographs, or water), and
#   shapes of several categories, colours and sizes that may overlap; a thing's mask is
#   its visible pixels;
# - **short discriminative expressions** that pick the target out among distractors by
#   category, colour, size, absolute position ("on the left") or superlative
#   ("leftmost", "biggest"), and stuff names, with several phrasings per region. Each
#   expression carries its *type*, so results can be broken down by what the expression
#   relies on;
# - **disjoint train, val and test images**, in the same REFER layout, so a single
#   loader reads SynthRef and ReferIt.
#
# `load_refer(cfg)` generates it the first time (seeded by `cfg.synth_seed`) and reads
# it afterwards; `referseg data synth --out data/synthref --seed 0 --images 600` writes
# it from the command line.
#
# SynthRef is not a stand-in for ReferIt's difficulty. Its scenes are simple, its
# vocabulary is small and its expressions are true by construction. Numbers measured on
# it tell us whether the implementation learns what the method should learn (colours,
# categories, positions, stuff against things) and how its parts compare under the
# same conditions. They say nothing about how well the method does on photographs.

# %%
refer = load_refer(cfg)
vocab = build_vocab(cfg, refer)
print(f"{refer.name}: {len(refer.images)} images")
print(f"vocabulary built from {cfg.train_split!r}: {len(vocab)} tokens")
table = stats_table(refer, vocab)
table

# %% [markdown]
# Columns: `len_*` are tokens per expression; `over_20` counts expressions longer than
# $T = 20$; `pct_unknown` is the share of tokens outside the vocabulary (when the
# vocabulary is built from the training split, as here, it is zero there by
# construction); `pct_stuff` the share of pairs that refer to stuff. Two facts of the
# data that the later chapters rely on are checked here, in every profile:

# %%
claims = viz.Claims(profile, "01_data")
image_sets = {s: {p.image_id for p in refer.pairs(s)} for s in refer.splits
              if s != "trainval"}  # trainval = train + val
shared_images = set().union(*(image_sets[a] & image_sets[b] for a in image_sets
                              for b in image_sets if a < b))
claims("no image is in two splits", not shared_images,
       f"images in two of {sorted(image_sets)}: {len(shared_images)}",
       every_profile=True)
if not cfg.vocab_file:
    train_unknown = table.loc[cfg.train_split, "pct_unknown"]
    claims("no token of the training split is unknown", train_unknown == 0,
           f"{train_unknown}% unknown in {cfg.train_split!r}", every_profile=True)

# %% [markdown]
# {numref}`fig-data-lengths` compares the lengths of SynthRef's expressions with
# ReferIt's; the line below it gives the means.

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

# %% tags=["hide-input"]
synth_means = {name: float(np.mean(v)) for name, v in synth_lengths.items()}
if referit_test:
    name, v = next(iter(referit_test.items()))
    referit_mean, source = float(np.mean(v)), f"{name}, measured above"
else:
    referit_mean, source = 3.54, "SPEC §2"
gaps = [f"{name} {mean:.2f} ({mean - referit_mean:+.2f})"
        for name, mean in synth_means.items()]
viz.print_wrapped(f"Mean tokens per expression: ReferIt {referit_mean:.2f} ({source}); "
                  f"{', '.join(gaps)}.")

# %% [markdown]
# ### Expression types, stuff and things
#
# Every SynthRef expression carries the kind of information that singles out its target:
# the category alone ("star"), a colour ("the red one"), a size ("big circle"), a
# position ("triangle on the left") or a superlative ("leftmost shape"), or it names a
# stuff region ("sky"). The evaluation chapter breaks the results down by these types.
# The generator refers to things more often than to stuff (`STUFF_REFER_PROBABILITY` in
# `referseg/data/synthetic.py`), so that overall IoU is not a measure of the sky alone;
# the line above the table gives the shares.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt

splits = [s for s in refer.splits if s != "trainval"]
types = pd.DataFrame({s: Counter(p.type or "untagged" for p in refer.pairs(s))
                      for s in splits}).fillna(0)
type_share = (100 * types / types.sum()).round(1)
regions = pd.DataFrame({
    s: Counter("stuff" if p.is_stuff else "thing" for p in refer.pairs(s))
    for s in splits
}).reindex(["stuff", "thing"]).fillna(0)
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
majority = [s for s in splits if region_share.loc["thing", s] > 50]
viz.print_wrapped(
    "Stuff is the target of "
    + ", ".join(f"{region_share.loc['stuff', s]:.1f}% of the {s} pairs" for s in splits)
    + "; things are the majority of the pairs in "
    + ("every split" if len(majority) == len(splits)
       else (", ".join(majority) if majority else "no split")) + ".")
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
# A region can be described several times, in different words and with different kinds
# of information. The expressions of the first image above, and the average number of
# expressions per region:

# %% tags=["hide-input"]
per_region_mean = table.loc[cfg.train_split, "pairs"] / table.loc[cfg.train_split,
                                                                 "regions"]
viz.print_wrapped(f"{per_region_mean:.2f} expressions per region on average in the "
                  f"{cfg.train_split!r} split")
pairs = by_image[int(chosen[0])]
pd.DataFrame([{"region": p.ann_id, "category": p.category, "stuff": p.is_stuff,
               "type": p.type, "expression": p.expression,
               "tokens": tokenize(p.expression)} for p in pairs])

# %% [markdown]
# ### Things that look like things
#
# Version 1 of SynthRef painted each thing in one colour, smoothly shaded, with a dark
# rim along its outline. Bottom-up segmentation cuts such shapes almost exactly, which
# flatters every method that picks a segment instead of drawing a mask (the baselines
# chapter). Version 2, the one generated here, keeps every scene, mask and expression
# of version 1 and paints the things as a camera would see objects
# (`render_scene(..., look="photo")` in `referseg/data/synthetic.py`):
#
# - **texture**: a random crop of one of scikit-image's bundled CC0 photographs (a cat's
#   fur, a photographer, a cell, coins), zoomed to the object, shades its colour; the
#   photographs of chapter 10 are kept out;
# - **structure**: six in ten things have a second part, a darker side or a lighter
#   band across them;
# - **light**: one light per scene shades each thing from its side and across the whole
#   image, and every thing casts a soft shadow on what lies behind it;
# - **camera**: a slight lens blur and sensor noise, so no edge is a clean step.
#
# Occlusion (a thing keeps at least 60% of its shape) and distractors that share a
# category or a colour with the target were there in version 1 and stay. The colour
# words stay true: a thing's median pixel keeps its colour's hue, which the tests check
# for every generated thing. {numref}`fig-data-looks` shows the same scenes in both
# looks. The look draws its random numbers from a generator of its own, so the two
# looks differ in pixels only.

# %% tags=["hide-input", "remove-output"]
from referseg.data.synthetic import LOOKS, synthref_image

if cfg.dataset == "synthref":
    look_ids = [int(i) for i in chosen[:3]]
    pictures = [synthref_image(cfg.synth_seed, i, look)[1] for i in look_ids
                for look in LOOKS]
    captions = [f"image {i}, {look} look" for i in look_ids for look in LOOKS]
    viz.glue_figure("fig-data-looks", viz.image_grid(pictures, captions, ncols=2))
else:
    viz.glue_figure("fig-data-looks", viz.image_grid(
        [refer.load_image(int(chosen[0]))], ["ReferIt: a photograph"], ncols=1))

# %% [markdown]
# ```{glue:figure} fig-data-looks
# :name: fig-data-looks
#
# Three training scenes of SynthRef, painted in version 1's flat look (left) and in
# version 2's photo look (right), the one the book trains on.
# ```
#
# How much of the task bottom-up segmentation solves is measured by the **bottom-up
# ceiling**: for each test pair, the IoU of the best of the image's segment proposals
# (Felzenszwalb's graph segmentation and its merges, exactly as the proposal baseline
# makes them), averaged over the pairs. A method that picks one proposal per expression
# can reach no higher. Below, both looks of the same test images:

# %% tags=["hide-input"]
import json

from referseg.baselines.ceiling import look_ceiling
from referseg.io import atomic_write_text

if cfg.dataset == "synthref":
    ceiling = look_ceiling(cfg, refer, cfg.eval_split)
    atomic_write_text(Path(run_dir) / "ceiling.json", json.dumps(ceiling, indent=1))
    plural = {"thing": "things", "stuff": "stuff"}
    ceiling_table = pd.DataFrame({
        f"{look} look": {f"{plural[kind]} ({v['pairs']} pairs)": 100 * v["ceiling"]
                         for kind, v in by_kind.items()}
        for look, by_kind in ceiling.items()}).round(1)
    ceiling_table.index.name = f"best proposal, mean IoU % ({cfg.eval_split})"
    change = {kind: 100 * (ceiling["photo"][kind]["ceiling"]
                           - ceiling["flat"][kind]["ceiling"])
              for kind in ceiling["photo"]}
    viz.print_wrapped(
        "From the flat look to the photo look the ceiling changes by "
        + " and ".join(f"{value:+.1f} points on {plural[kind]}"
                       for kind, value in change.items())
        + ": bottom-up segments fit the textured, shadowed things "
        + ("less well" if change.get("thing", 0) < 0 else "no worse")
        + ", and a method that picks segments has that much less to pick from.")
    display(ceiling_table)
else:
    print(f"{cfg.dataset}: photographs, no looks to compare (the ceiling of its "
          "proposals is in the baselines chapter)")

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
# 1. *(easy)* Why does ReferIt contain so many expressions about stuff such as "sky" or
#    "water", unlike datasets built on object detection annotations?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Its regions come from SAIAPR TC-12, which segments *every* part of an image,
# background included, and ReferItGame could pick any segmented region as a target.
# Datasets such as RefCOCO {cite}`yu2016modeling` only refer to annotated objects.
# ```

# %% [markdown]
# 2. *(easy)* What share of SynthRef's test expressions mention a colour word? Use
#    `referseg.data.synthetic.THING_COLOURS` for the list of colours.

# %% tags=["solution", "hide-cell"]
from referseg.data.synthetic import THING_COLOURS

test_pairs = refer.pairs(cfg.eval_split)
with_colour = [p for p in test_pairs
               if set(tokenize(p.expression)) & set(THING_COLOURS)]
share = 100 * len(with_colour) / len(test_pairs)
print(f"{share:.1f}% of {len(test_pairs)} test expressions name a colour")

# %% [markdown]
# 3. *(medium)* The training set is *trainval* and there is no separate validation set
#    left. How can you choose hyperparameters without touching the test set?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# Tune on the `val` split while training on `train` only, then retrain on `trainval`
# with the chosen setting for the final test. The paper uses fixed hyperparameters
# (SPEC §5), so a reproduction does not need to tune; the `cpu` profile trains on
# `train` and keeps `val` for such checks (the learning-rate sweep of chapter 4 scores
# its runs there).
# ```

# %% [markdown]
# 4. *(medium)* How many pairs and how many distinct regions does each split hold per
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
# 5. *(medium)* Why are the splits disjoint by **image** rather than by region or by
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
# 6. *(medium)* SynthRef draws the four image sizes with fixed probabilities. What would
#    go untested if every image were square?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# The letterbox: a square image is resized without padding, so neither the padding that
# the loss sees as background nor the crop that maps predictions back to the original
# size would be exercised, and a bug in either would go unnoticed until ReferIt.
# ```

# %% [markdown]
# 7. *(harder)* The paper's headline metric is *overall* IoU, the sum of intersections
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
shares = pd.DataFrame({
    "% of pairs": {k: 100 * v / len(test_pairs) for k, v in count.items()},
    "% of ground-truth area": {k: 100 * v / sum(area.values())
                               for k, v in area.items()},
}).round(1)
stuff_pairs, stuff_area = shares.loc["stuff"]
relation = "more" if stuff_area > stuff_pairs else "no more"
viz.print_wrapped(f"Stuff regions are {stuff_pairs}% of the test pairs and cover "
                  f"{stuff_area}% of their ground-truth area: {relation} than their "
                  "share of pairs.")
shares

# %% [markdown] tags=["solution"]
# ```{admonition} Discussion
# :class: dropdown
#
# Large regions weigh more in overall IoU: a sky region of 30% of the image adds as
# many pixels to the sums as ten things of 3% each. Where stuff regions cover a larger
# share of the ground-truth area than their share of pairs (the line above says whether
# they do here), they weigh more than their number in overall IoU. That is why SynthRef
# refers to things more often than to stuff, and why the evaluation chapter also
# reports mean IoU and a breakdown by stuff and things.
# ```

# %% [markdown]
# 8. *(harder)* A SynthRef expression is "the biggest circle". Which parts of the model
#    must work together for the prediction to be right?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# The visual features must encode shape and extent, the language encoder must combine
# "biggest" and "circle", and because the classifier sees one cell at a time (its input
# is the cell's visual vector, the tiled text vector and the cell's position), "biggest"
# can only be resolved through the visual features' receptive field: the classifier
# cannot compare two distant circles directly. That suggests superlatives are a hard
# type for this model; the evaluation chapter's breakdown by expression type shows how
# hard they are in this run.
# ```
