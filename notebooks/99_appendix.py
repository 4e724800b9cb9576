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
# # Measured environment and timings
#
# This page is executed last by `referseg book`. It records the machine and the
# software that produced this edition of the book, the seeds, and how long each
# notebook and each cell took, read from the metadata papermill stores in the
# executed notebooks (`book/notebooks/*.ipynb`). Nothing here is typed in by hand.

# %% tags=["parameters"]
profile: str = "cpu"  # paper, cpu or smoke: the profile whose run is recorded
run_dir: str = "runs/cpu"  # the run folder, whose config.json names the profile
device: str = "auto"  # auto (CUDA when available), cpu or cuda
seed: int = 0  # the notebooks' seed parameter, recorded here
overrides: dict = {}  # profile overrides, e.g. {"spatial_channels": 2}

# %% tags=["hide-input"]
import json
import os
import platform
import sys
from pathlib import Path

import nbformat
import pandas as pd
import torch
from IPython.display import display

import referseg
from referseg import viz
from referseg.book import cpu_model, data_hash, lock_summary, package_version
from referseg.config import Profile, get_profile
from referseg.provenance import git_commit

executed_dir = Path("book/notebooks")
config_file = Path(run_dir) / "config.json"
if config_file.exists():
    config = Profile.load(config_file)
else:
    config = get_profile(profile, **overrides)


# %% [markdown]
# ## Environment and hardware

# %% tags=["hide-input"]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
environment = {
    "referseg": referseg.__version__,
    "git commit": git_commit(Path(".")),
    f"data ({config.data_root})": f"sha256 {data_hash(config.data_root)}…",
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "CPU": f"{cpu_model()} ({os.cpu_count()} logical cores, "
           f"torch uses {torch.get_num_threads()} threads)",
    "GPU": gpu,
    **{name: package_version(name)
       for name in ("torch", "torchvision", "numpy", "opencv-python-headless",
                    "pycocotools", "papermill", "jupyter-book")},
}
pd.DataFrame(environment.items(), columns=["item", "value"]).set_index("item")

# %% [markdown]
# ### The lock
#
# `requirements.lock` holds the exact versions the book was built with; `make` installs
# them when the file is present and `make lock` writes it again. Below, each locked
# version beside the installed one (torch and torchvision stay unpinned: they come from
# the machine's own wheels).

# %% tags=["hide-input"]
lock = lock_summary()
differ = lock[lock["agrees"] != "yes"]
print(f"{len(lock) - len(differ)} of {len(lock)} locked packages are installed "
      f"at their locked version; {len(differ)} differ (listed):")
differ

# %% tags=["hide-cell"]
lock

# %% [markdown]
# ## The verdict per claim of the paper
#
# The introduction's table, computed here from this edition's results: the run folder's
# evaluation (chapter 7), the kept ablation grid with its baseline seeds (chapters 7 and
# 8) and the real-text chapter's summary (chapter 9). It is written to
# `book/_generated/verdicts.md`, which the introduction includes, with the error budget
# for a ReferIt run (`error_budget.md`).

# %% tags=["hide-input"]
verdict_table = viz.verdicts(run_dir, config, f"book/results/ablations_{profile}.json",
                             Path(run_dir) / "text" / "summary.json")
generated = Path("book/_generated")
generated.mkdir(parents=True, exist_ok=True)
(generated / "verdicts.md").write_text(viz.markdown_table(verdict_table))
budget = viz.error_budget(run_dir, config, f"book/results/ablations_{profile}.json")
(generated / "error_budget.md").write_text(viz.markdown_table(budget))
display(verdict_table.set_index("claim"))
budget.set_index("deviation from the official recipe")

# %% [markdown]
# ## Profile and seeds
#
# The profile below is the one saved in the run folder when training wrote it, otherwise
# the named profile with its overrides. Every random choice (SynthRef generation,
# initialisation, batch order) derives from these seeds.

# %% tags=["hide-input"]
print(f"profile {config.name!r} with overrides {json.dumps(overrides)}; "
      f"run folder {run_dir}; device {device}")
pd.DataFrame({"seed (notebook parameter)": [seed], "profile seed": [config.seed],
              "SynthRef seed": [config.synth_seed]})

# %% [markdown]
# ## Time per notebook

# %% tags=["hide-input"]
notebooks = {}
for path in sorted(executed_dir.glob("[0-9][0-9]_*.ipynb")):
    if path.stem != "99_appendix":
        notebooks[path.stem] = nbformat.read(path, as_version=4)
rows = []
for name, nb in notebooks.items():
    run = nb.metadata.get("papermill", {})
    rows.append({"notebook": name, "started": (run.get("start_time") or "")[:19],
                 "ended": (run.get("end_time") or "")[:19],
                 "seconds": run.get("duration"),
                 "cells": sum(c.cell_type == "code" for c in nb.cells),
                 "profile": run.get("parameters", {}).get("profile")})
per_notebook = pd.DataFrame(rows, columns=["notebook", "started", "ended", "seconds",
                                           "cells", "profile"])
if per_notebook.empty:
    print(f"no executed notebooks in {executed_dir} yet: run `referseg book` first")
else:
    span = (pd.to_datetime(per_notebook["ended"]).max()
            - pd.to_datetime(per_notebook["started"]).min()).total_seconds()
    busy = per_notebook["seconds"].sum()
    viz.print_wrapped(f"all notebooks but this one: {busy:.1f} s of notebook time, "
                      f"{span:.0f} s from the first start to the last end (notebooks "
                      "that do not need each other run at once)")
per_notebook.round(1)

# %% [markdown]
# ## Time per cell
#
# The slowest cells first; the complete table is folded below it.

# %% tags=["hide-input"]
cells = pd.DataFrame(
    [{"notebook": name, "cell": index,
      "seconds": cell.metadata.get("papermill", {}).get("duration"),
      "first line": next((line for line in cell.source.splitlines() if line.strip()),
                         "")[:60]}
     for name, nb in notebooks.items()
     for index, cell in enumerate(nb.cells) if cell.cell_type == "code"],
    columns=["notebook", "cell", "seconds", "first line"],
)
cells.sort_values("seconds", ascending=False).head(10).round(2)

# %% tags=["hide-cell"]
print(cells.round(2).to_string(index=False, max_colwidth=40))

# %% [markdown]
# ## Exercises
#
# 1. Which notebook dominates the running time, and which cell inside it?
#
# ```{admonition} Solution
# :class: dropdown
#
# Sort the two tables above by `seconds`. Training notebooks usually dominate; within
# them, the cell that caches backbone features or runs the training loop.
# ```
#
# 2. Re-run `referseg book` without changing anything. What happens to the timings on
#    this page?
#
# ```{admonition} Solution
# :class: dropdown
#
# Nothing: every notebook, this one included, is skipped because its source, its
# parameters and the package are unchanged, so the page keeps the timings of the run
# that produced it.
# ```
#
# 3. Two machines print different package versions above but the same seeds. Should the
#    results match?
#
# ```{admonition} Solution
# :class: dropdown
#
# Not bit for bit: the same seeds fix the random choices, but kernels (BLAS, cuDNN,
# OpenCV's resize) may change between versions and devices. Expect agreement to within
# run-to-run noise, and record versions (this page) whenever you report a number.
# ```
