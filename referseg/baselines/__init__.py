"""The paper's baselines (SPEC 7), each with the model's predict interface.

``build_baseline(name, profile, vocab)`` gives a :class:`~referseg.baselines.common.Baseline`
(``fit`` on a training split, ``predict_logits`` / ``predict_masks`` for another);
``evaluate_baseline(run, name)`` fits it on the run's training split and evaluates it;
``run_baseline(name, run_dir)`` does so and prints its rows, as ``referseg baseline NAME
--run runs/cpu`` does; ``evaluate_all(run_dir)`` makes the paper's whole table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from referseg.baselines.common import Baseline, BaselineSettings
    from referseg.config import Profile
    from referseg.runs import Run
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


def fit_baseline(run: Run, name: str, settings: BaselineSettings | None = None) -> Baseline:
    """A baseline fitted on the run's training split (``fit_seconds`` records how long that took)."""
    start = time.perf_counter()
    baseline = build_baseline(name, run.profile, run.vocab, settings=settings, device=str(run.device),
                              progress=run.progress)
    if baseline.learns:
        baseline.fit(run.split(run.profile.train_split))
    baseline.fit_seconds = time.perf_counter() - start
    return baseline


def evaluate_baseline(run: Run, baseline: str | Baseline, split: str = "test", mode: str | None = None,
                      settings: BaselineSettings | None = None) -> dict[str, dict]:
    """Evaluate a baseline (a name: fitted first, see :func:`fit_baseline`) on ``split``; summaries by variant.

    Writes ``<run>/eval/<variant>_<split>.csv`` (per sample) and ``.json`` (summary) for each variant.
    """
    from referseg.evaluate import evaluate_stream, modes_for, save_method

    mode = mode or run.profile.eval_mode
    if isinstance(baseline, str):
        baseline = fit_baseline(run, baseline, settings)
    fit_seconds = float(getattr(baseline, "fit_seconds", 0.0))
    start = time.perf_counter()
    data = run.split(split)
    counts = evaluate_stream(data, baseline.predict_logits(data), modes_for(mode))
    seconds = fit_seconds + time.perf_counter() - start
    extra = {"baseline": baseline.name, "fit_seconds": round(fit_seconds, 2),
             "fit_stats": getattr(baseline, "fit_stats", {})}
    return {variant: save_method(run, data, variant, label, counts[variant], mode,
                                 seconds / len(baseline.variants), extra)
            for variant, label in baseline.variants.items()}


def run_baseline(name: str, run_dir: str | Path, split: str = "test", device: str = "auto",
                 mode: str | None = None, run: Run | None = None,
                 settings: BaselineSettings | None = None) -> dict[str, dict]:
    """Fit a baseline on the run's training split, evaluate it on ``split``, write and print its results.

    As ``referseg baseline NAME --run runs/cpu`` does; returns the summaries by variant.
    """
    from referseg.evaluate import paper_table
    from referseg.runs import Run

    cls = baseline_class(name)  # an unknown name fails before any data is loaded
    run = run if run is not None else Run(run_dir, device=device)
    summaries = evaluate_baseline(run, cls.name, split=split, mode=mode, settings=settings)
    first = next(iter(summaries.values()))
    print(f"{cls.name} on {run.profile.dataset} {split} ({first['samples']} pairs), {first['mode']} mode, in %; "
          f"fit {first['fit_seconds']:.1f} s, fit + test {first['seconds'] * len(summaries):.1f} s; "
          f"results in {run.eval_dir}")
    print(paper_table(summaries).to_string())
    return summaries


def evaluate_all(run_dir: str | Path, split: str = "test", mode: str | None = None, device: str = "auto",
                 progress: bool = True, settings: BaselineSettings | None = None,
                 reuse_baselines: bool = False, reuse_models: bool = False) -> pd.DataFrame:
    """The paper's table of a run: every baseline, then our two stages, on ``split``.

    Writes each method's results and ``<run>/eval/table_<split>.csv`` and ``.md``; prints
    and returns the table (rows: methods; columns in %). ``referseg evaluate --all``. With
    ``reuse_baselines``, a baseline whose results this profile already saved is not refitted;
    with ``reuse_models``, a stage whose saved results are current (``current_summary``: newer
    than its checkpoint, in the profile's mode) is not evaluated again. The book reuses both.
    """
    from referseg.evaluate import OURS, STAGE_METHOD, current_summary, evaluate_models, report, saved_summary
    from referseg.runs import Run, stage_checkpoints

    run_dir = Path(run_dir)
    stage_checkpoints(run_dir)  # a run without a model says which stage to train, before any work
    run = Run(run_dir, device=device, progress=progress)
    mode = mode or run.profile.eval_mode
    started = time.perf_counter()
    summaries: dict[str, dict] = {}
    for name in BASELINES:
        saved = {v: saved_summary(run, v, split) for v in baseline_class(name).variants}
        if reuse_baselines and all(s is not None and s["mode"] == mode for s in saved.values()):
            summaries.update(saved)
        else:
            summaries.update(evaluate_baseline(run, name, split, mode, settings))
    current = {stage: current_summary(run, stage, split) if reuse_models and mode == run.profile.eval_mode
               else None for stage in stage_checkpoints(run_dir)}
    stale = [stage for stage, summary in current.items() if summary is None]
    ours = {STAGE_METHOD[stage]: summary for stage, summary in current.items() if summary is not None}
    if stale:
        ours.update(evaluate_models(run, split, mode, stages=stale))
    summaries.update({m: ours[m] for m in OURS if m in ours})
    return report(run, split, mode, summaries, time.perf_counter() - started, write=True)


def seed_spread(run: Run, seeds: tuple[int, ...] = (0, 1, 2), split: str = "test",
                settings: BaselineSettings | None = None) -> pd.DataFrame:
    """Overall IoU of every learned baseline's variants over several seeds, and their mean and sd (%).

    Each seed refits the baseline from its own generators (``BaselineSettings.seed``);
    proposals and features are computed once per split and shared by the seeds. Writes
    ``<run>/eval/baseline_seeds_<split>.csv`` and returns that table (rows: variants).
    """
    import dataclasses

    import pandas as pd

    from referseg.baselines.common import BaselineSettings
    from referseg.evaluate import evaluate_stream
    from referseg.io import atomic_open
    from referseg.metrics import seed_spread as spread
    from referseg.metrics import summarize

    settings = settings or BaselineSettings()
    data, rows = run.split(split), {}
    for name in BASELINES:
        if not baseline_class(name).learns:
            continue
        for seed in seeds:
            baseline = fit_baseline(run, name, dataclasses.replace(settings, seed=seed))
            counts = evaluate_stream(data, baseline.predict_logits(data), (run.profile.eval_mode,))
            for variant, label in baseline.variants.items():
                by_mode = counts[variant][run.profile.eval_mode]
                iou = summarize(by_mode[:, 0], by_mode[:, 1])["overall_iou"]
                rows.setdefault(label, {})[f"seed {seed}"] = 100 * iou
    table = pd.DataFrame(rows).T
    per_seed = table[[f"seed {s}" for s in seeds]].to_numpy()
    table["mean"] = [spread(row)[0] for row in per_seed]
    table["sd"] = [spread(row)[1] for row in per_seed]
    table.index.name = "method"
    with atomic_open(run.eval_dir / f"baseline_seeds_{split}.csv") as handle:
        table.to_csv(handle)
    return table
