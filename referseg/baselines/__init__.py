"""The paper's baselines (SPEC 7), each with the model's predict interface.

``build_baseline(name, profile, vocab)`` gives a :class:`~referseg.baselines.common.Baseline`
(``fit`` on a training split, ``predict_logits`` / ``predict_masks`` for another);
``run_baseline(name, run_dir)`` trains it on the run's training split and evaluates it,
as ``referseg baseline NAME --run runs/cpu`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from referseg.baselines.common import Baseline, BaselineSettings, Run
    from referseg.config import Profile
    from referseg.text import Vocabulary

BASELINES = ("whole-image", "per-word", "box-retrieval", "proposal-classification")


def baseline_class(name: str) -> type[Baseline]:
    """The class of a baseline by its command-line name."""
    if name == "whole-image":
        from referseg.baselines.whole_image import WholeImage

        return WholeImage
    if name == "per-word":
        from referseg.baselines.per_word import PerWordSegmentation

        return PerWordSegmentation
    if name == "box-retrieval":
        from referseg.baselines.box_retrieval import BoxRetrieval

        return BoxRetrieval
    if name == "proposal-classification":
        from referseg.baselines.proposal_classification import ProposalClassification

        return ProposalClassification
    raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def build_baseline(name: str, profile: Profile, vocab: Vocabulary, settings: BaselineSettings | None = None,
                   device: str = "cpu", progress: bool = True) -> Baseline:
    """An untrained baseline for a profile and vocabulary."""
    return baseline_class(name)(profile, vocab, settings=settings, device=device, progress=progress)


def run_baseline(name: str, run_dir: str | Path, split: str = "test", device: str = "auto",
                 mode: str | None = None, run: Run | None = None,
                 settings: BaselineSettings | None = None) -> dict[str, dict]:
    """Fit a baseline on the run's training split, evaluate it on ``split``, write its results.

    Writes ``<run>/eval/<variant>_<split>.csv`` (per sample) and ``.json`` (summary) for each
    of its variants and returns the summaries by variant.
    """
    from referseg.evaluate import evaluate_baseline

    cls = baseline_class(name)  # an unknown name fails before any data is loaded
    if run is None:
        from referseg.baselines.common import Run

        run = Run(run_dir, device=device)
    from referseg.evaluate import paper_table

    summaries = evaluate_baseline(run, cls.name, split=split, mode=mode, settings=settings)
    first = next(iter(summaries.values()))
    print(f"{cls.name} on {run.profile.dataset} {split} ({first['samples']} pairs), {first['mode']} mode, in %; "
          f"fit {first['fit_seconds']:.1f} s, fit + test {first['seconds'] * len(summaries):.1f} s; "
          f"results in {run.eval_dir}")
    print(paper_table(summaries).to_string())
    return summaries
