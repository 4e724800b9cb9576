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
# # The data and the profile
#
# *Placeholder chapter: the data notebook replaces it.* It shows how every chapter
# starts: a cell of parameters that papermill overrides (`referseg book --profile cpu`
# injects the real values just below it), then the profile those parameters select.

# %% tags=["parameters"]
profile = "cpu"  # paper, cpu or smoke
run_dir = "runs/cpu"  # where the notebooks hand their results to each other
device = "auto"  # auto (CUDA when available), cpu or cuda
seed = 0
overrides = {}  # profile overrides, e.g. {"spatial_channels": 2}

# %%
import pandas as pd

import referseg
from referseg.config import get_profile

config = get_profile(profile, **overrides)
print(f"referseg {referseg.__version__}, profile {config.name!r}, run folder {run_dir}, device {device}, seed {seed}")
table = pd.DataFrame(
    [(name, str(value)) for name, value in config.to_dict().items()], columns=["parameter", "value"]
).set_index("parameter")
table

# %% [markdown]
# ## Exercises
#
# 1. How many cells does the low-resolution grid of this profile have?

# %% tags=["solution", "hide-cell"]
config.grid**2

# %% [markdown]
# 2. Which profile parameters differ between `cpu` and `paper`?

# %% tags=["solution", "hide-cell"]
paper = get_profile("paper").to_dict()
sorted(name for name, value in get_profile("cpu").to_dict().items() if value != paper[name])

# %% [markdown]
# 3. Why does a profile change sizes and the backbone but never code paths?

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# So that a run on two CPU cores exercises exactly the fusion, classifier, upsampling,
# training loop and evaluation that the paper profile runs on a GPU: a bug found on a
# laptop is a bug of the paper run too.
# ```
