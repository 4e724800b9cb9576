"""The ``referseg`` command: data, train, evaluate, predict, baseline, convert-official, book.

Each subcommand parses its arguments here and calls one function of the package,
imported lazily so that ``referseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from referseg.baselines import BASELINES  # the names only; no torch at import
from referseg.book import JOBS
from referseg.config import PROFILES, Profile, get_profile


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["spatial_channels=2", "stage1.iterations=100"]`` -> profile overrides."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE, e.g. --set spatial_channels=2")
        key, raw = pair.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            stage, sub = key.split(".", 1)
            overrides.setdefault(stage, {})[sub] = value
        else:
            overrides[key] = value
    return overrides


def resolve_profile(name: str, pairs: list[str] | None = None) -> Profile:
    """The profile with its ``--set`` overrides, every value checked (a bad one is a ValueError)."""
    return get_profile(name, **parse_overrides(pairs))


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default: cpu)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="override a profile parameter, e.g. --set spatial_channels=2 --set stage1.iterations=100")


def _default_run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if getattr(args, "run_dir", None) else Path("runs") / args.profile


# --- handlers -----------------------------------------------------------------

def cmd_data_synth(args: argparse.Namespace) -> int:
    from referseg.data.synthetic import generate_synthref

    generate_synthref(Path(args.out), seed=args.seed, images=args.images)
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from referseg.data.refer import dataset_stats

    print(dataset_stats(Path(args.root), dataset=args.dataset, split_by=args.split_by, vocab_file=args.vocab))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    profile = resolve_profile(args.profile, args.set)
    if args.stage == 0:  # the optional box-retrieval pretraining (SPEC 5)
        from referseg.pretrain import pretrain

        pretrain(profile, run_dir=_default_run_dir(args), resume=args.resume, device=args.device)
        return 0
    from referseg.train import train

    train(profile, stage=args.stage, run_dir=_default_run_dir(args), resume=args.resume, device=args.device)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.all:
        from referseg.baselines import evaluate_all

        evaluate_all(Path(args.run), split=args.split, mode=args.mode, device=args.device)
    else:
        from referseg.evaluate import evaluate_run

        evaluate_run(Path(args.run), split=args.split, mode=args.mode, device=args.device)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from referseg.predict import predict_to_file

    predict_to_file(Path(args.checkpoint), Path(args.image), args.expression, Path(args.out), device=args.device)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from referseg.baselines import run_baseline

    run_baseline(args.name, Path(args.run), split=args.split, device=args.device)
    return 0


def cmd_convert_official(args: argparse.Namespace) -> int:
    from referseg.convert import TensorFlowMissingError, convert_official

    try:
        convert_official(Path(args.vgg), Path(args.tfmodel), Path(args.out), stage=args.stage,
                         vocab=Path(args.vocab) if args.vocab else None, overrides=parse_overrides(args.set))
    except TensorFlowMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_ablations(args: argparse.Namespace) -> int:
    import time

    from referseg import ablations, viz
    from referseg.provenance import write_summary

    started = time.time()
    reference = resolve_profile(args.profile, args.set)
    grid = ablations.ablation_grid(reference)
    if args.variants:
        unknown = sorted(set(args.variants) - {v.name for v in grid})
        if unknown:
            raise ValueError(f"unknown variants {unknown}; the grid has {', '.join(v.name for v in grid)}")
        grid = [v for v in grid if v.name in {ablations.REFERENCE, *args.variants}]
    run_dir = _default_run_dir(args)
    results = ablations.run_ablations(reference, grid, run_dir, seeds=tuple(args.seeds), device=args.device,
                                      threads=args.threads, only_finished=args.collect)
    table = viz.comparison_table(run_dir, results, reference)
    payload = {"seeds": list(args.seeds), "results": json.loads(results.to_json(orient="records")),
               "table": json.loads(table.reset_index().to_json(orient="records")),
               **viz.grid_breakdowns(run_dir, table.index, args.seeds)}
    first = ablations.variant_dir(run_dir, ablations.REFERENCE, args.seeds[0])
    if args.baselines and (first / "config.json").is_file():  # the learned baselines over the same seeds
        from referseg.baselines import seed_spread
        from referseg.runs import Run

        spread = seed_spread(Run(first, device=args.device), seeds=tuple(args.seeds))
        payload["baselines"] = json.loads(spread.reset_index().to_json(orient="records"))
        print(spread.round(2).to_string())
    summary = Path(args.summary or f"book/results/ablations_{args.profile}.json")
    write_summary(summary, payload, reference, started)
    print(table.round(2).to_string())
    print(f"summary with its provenance: {summary} (commit it: the book shows it)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import time

    from referseg.provenance import write_summary
    from referseg.sweep import run_sweep
    from referseg.viz import sweep_table

    started = time.time()
    reference = resolve_profile(args.profile, args.set)
    frame, choice = run_sweep(reference, _default_run_dir(args), seed=args.seed, device=args.device,
                              threads=args.threads)
    summary = Path(args.summary or f"book/results/sweep_{args.profile}.json")
    write_summary(summary, {"choice": choice, "rows": json.loads(frame.to_json(orient="records"))}, reference,
                  started)
    print(sweep_table(frame.to_dict("records")).to_string(index=False))
    print(f"chosen on validation: {choice}")
    print(f"summary with its provenance: {summary} (commit it: the stage-1 chapter shows it)")
    return 0


def cmd_book(args: argparse.Namespace) -> int:
    from referseg.book import build_book

    if args.profile not in PROFILES:
        raise ValueError(f"unknown profile {args.profile!r}; valid profiles: {', '.join(PROFILES)}")
    return build_book(profile=args.profile, overrides=parse_overrides(args.set), student=args.student,
                      force=args.force, build_html=not args.no_html, jobs=args.jobs)


# --- data fetch-referit-text, fetch-referit, check (referseg.data.fetch) ---------

def cmd_data_fetch_referit_text(args: argparse.Namespace) -> int:
    from referseg.data.fetch import OFFICIAL_COMMIT, OFFICIAL_REPO, fetch_referit_text

    paths = fetch_referit_text(Path(args.out), from_dir=args.from_dir, url_base=args.url_base)
    origin = args.from_dir or f"{OFFICIAL_REPO}@{OFFICIAL_COMMIT[:7]}"
    print(f"{len(paths)} official ReferIt text files in {args.out} (from {origin}; SHA-256 checked)")
    return 0


def cmd_data_fetch_referit(args: argparse.Namespace) -> int:
    from referseg.data.fetch import SOURCES, describe_sources, fetch_referit

    if args.source is None:
        print(describe_sources())
        return 0
    out = Path(args.out or SOURCES[args.source].out) if args.source in SOURCES else args.out
    fetch_referit(args.source, out, url_base=args.url_base, text=not args.no_text, text_from=args.text_from,
                  timeout=args.timeout, retries=args.retries, keep_archives=args.keep_archives)
    print(f"source {args.source!r} is in {out}; check it with: referseg data check {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from referseg.data.fetch import check_referit, load_expected

    expected = load_expected(args.expected) if args.expected else None
    report = check_referit(Path(args.root), expected=expected, masks=not args.no_masks)
    print(report.text())
    return 0 if report.ok else 1


def _add_fetch_parsers(data_sub: Any) -> None:
    text = data_sub.add_parser("fetch-referit-text", help="place the official ReferIt text files (queries, "
                               "splits, sizes, vocabulary), SHA-256 checked")
    text.add_argument("--out", default="data/referit-text", help="output folder (default: data/referit-text)")
    text.add_argument("--from", dest="from_dir", default=None, metavar="DIR",
                      help="copy from a local folder instead of downloading from ronghanghu/text_objseg")
    text.add_argument("--url-base", default=None, metavar="URL", help="download URL/<name> instead (a mirror)")
    text.set_defaults(func=cmd_data_fetch_referit_text)
    fetch = data_sub.add_parser("fetch-referit", help="download ReferIt (images, masks or the REFER release) "
                                "or the official models; without --source, list the sources")
    fetch.add_argument("--source", default=None, metavar="NAME",
                       help="official, models, refclef, saiapr or refer (default: list them and exit)")
    fetch.add_argument("--out", default=None, help="output folder (default: data/referit, "
                       "data/referit-models for models)")
    fetch.add_argument("--url-base", default=None, metavar="URL",
                       help="fetch each file of the source from URL/<filename> over plain HTTP (a mirror)")
    fetch.add_argument("--text-from", default=None, metavar="DIR",
                       help="official: copy the text files from DIR instead of downloading them")
    fetch.add_argument("--no-text", action="store_true", help="official: skip the text files")
    fetch.add_argument("--keep-archives", action="store_true", help="keep the archives in <out>/downloads/")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default: 60)")
    fetch.add_argument("--retries", type=int, default=3, help="resumes of a broken transfer (default: 3)")
    fetch.set_defaults(func=cmd_data_fetch_referit)
    check = data_sub.add_parser("check", help="check a ReferIt copy (either layout) against the paper's split")
    check.add_argument("root", help="the copy, e.g. data/referit")
    check.add_argument("--expected", default=None, metavar="FILE.json",
                       help='expected counts instead of SPEC 2\'s: {"test": [images, regions, pairs], ...}')
    check.add_argument("--no-masks", action="store_true", help="do not decode every mask (faster)")
    check.set_defaults(func=cmd_data_check)


# --- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="referseg", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: REFERSEG_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or describe datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate SynthRef in the REFER format")
    synth.add_argument("--out", default="data/synthref", help="output folder (default: data/synthref)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    synth.add_argument("--images", type=int, default=get_profile("cpu").synth_images,
                       help="number of images over all splits")
    synth.set_defaults(func=cmd_data_synth)
    stats = data_sub.add_parser("stats", help="print a dataset's table (splits, lengths, unknown rate, types)")
    stats.add_argument("root", help="dataset root, e.g. data/synthref or data/referit")
    stats.add_argument("--dataset", default=None, help="refclef, refcoco, refcoco+, refcocog or synthref "
                       "(default: guessed from the folder)")
    stats.add_argument("--split-by", default=None, help="berkeley or unc for refclef, unc/google for refcoco")
    stats.add_argument("--vocab", default=None, help="vocabulary file for the unknown-token rate "
                       "(default: built from the training split)")
    stats.set_defaults(func=cmd_data_stats)
    _add_fetch_parsers(data_sub)

    train = sub.add_parser("train", help="train stage 1 (low resolution) or stage 2 (high resolution), or the "
                           "optional box pretraining, stage 0 (stage 1 starts from it with --set pretrain=true)")
    _add_profile_args(train)
    train.add_argument("--stage", type=int, choices=(0, 1, 2), required=True,
                       help="0: box-retrieval pretraining (optional), 1: low resolution, 2: high resolution")
    train.add_argument("--run-dir", default=None, help="run folder (default: runs/<profile>)")
    train.add_argument("--resume", action="store_true", help="continue from the stage's last checkpoint")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a run at the original image resolution")
    evaluate.add_argument("--run", required=True, help="run folder, e.g. runs/cpu")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--mode", default=None, choices=("logits", "official"),
                          help="logits: undo letterbox then > 0 (default); official: the code's dilated resize")
    evaluate.add_argument("--all", action="store_true", help="also run every baseline and print the paper's table")
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(func=cmd_evaluate)

    predict = sub.add_parser("predict", help="segment one image with one expression")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("--image", required=True)
    predict.add_argument("--expression", required=True)
    predict.add_argument("--out", required=True, help="mask PNG; an overlay is written beside it")
    predict.add_argument("--device", default="auto")
    predict.set_defaults(func=cmd_predict)

    baseline = sub.add_parser("baseline", help="train (where needed) and evaluate one baseline")
    baseline.add_argument("name", help=", ".join(BASELINES))
    baseline.add_argument("--run", required=True, help="run folder, e.g. runs/cpu")
    baseline.add_argument("--split", default="test")
    baseline.add_argument("--device", default="auto")
    baseline.set_defaults(func=cmd_baseline)

    convert = sub.add_parser("convert-official",
                             help="turn the official TensorFlow release into a paper-profile checkpoint")
    convert.add_argument("--vgg", required=True, help="the official VGG-16, e.g. data/referit-models/vgg_params.npz")
    convert.add_argument("--tfmodel", required=True,
                         help="a released .tfmodel (needs the 'convert' extra: TensorFlow), or an .npz of its "
                              "variables by TensorFlow name")
    convert.add_argument("--out", required=True,
                         help="checkpoint to write, e.g. runs/paper-official/stage2/checkpoint.pt (the run "
                              "folder's config.json and vocab.txt are written beside stage<N>/)")
    convert.add_argument("--stage", type=int, choices=(1, 2), default=2,
                         help="2: the high-resolution model (highres_iter_18000, default); 1: low resolution")
    convert.add_argument("--vocab", default=None, help="the official vocabulary_referit.txt (default: looked "
                         "for in data/referit/ and beside --tfmodel and --vgg)")
    convert.add_argument("--set", action="append", metavar="NAME=VALUE",
                         help="override a paper-profile parameter, e.g. --set data_root=/data/referit")
    convert.set_defaults(func=cmd_convert_official)

    grid = sub.add_parser("ablations", help="train and evaluate the ablation grid at the profile's full schedule "
                          "over several seeds (resumable), and write its summary for the book")
    _add_profile_args(grid)
    grid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    grid.add_argument("--variants", nargs="+", default=None, help="only these variants (and the reference)")
    grid.add_argument("--run-dir", default=None, help="run folder (default: runs/<profile>)")
    grid.add_argument("--summary", default=None, help="summary file (default: book/results/ablations_<profile>.json)")
    grid.add_argument("--device", default="auto")
    grid.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    grid.add_argument("--no-baselines", dest="baselines", action="store_false",
                      help="skip the learned baselines' spread over the same seeds (kept for the evaluation chapter)")
    grid.add_argument("--collect", action="store_true",
                      help="train nothing: summarise the runs that have finished (e.g. while others still run)")
    grid.set_defaults(func=cmd_ablations)

    sweep = sub.add_parser("sweep", help="choose stage 1's and stage 2's learning rates on validation, with and "
                           "without stage 0 (resumable), and write its summary for the book")
    _add_profile_args(sweep)
    sweep.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    sweep.add_argument("--run-dir", default=None, help="run folder (default: runs/<profile>)")
    sweep.add_argument("--summary", default=None, help="summary file (default: book/results/sweep_<profile>.json)")
    sweep.add_argument("--device", default="auto")
    sweep.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    sweep.set_defaults(func=cmd_sweep)

    book = sub.add_parser("book", help="execute the notebooks with papermill, then build the book")
    _add_profile_args(book)
    book.add_argument("--student", action="store_true",
                      help="write the student edition (no solutions, no outputs) to student/ and check it runs")
    book.add_argument("--force", action="store_true", help="re-execute every notebook even if unchanged")
    book.add_argument("--no-html", action="store_true", help="execute the notebooks only")
    book.add_argument("--jobs", type=int, default=JOBS,
                      help=f"notebooks executed at once, each when those it needs are done (default: {JOBS}; "
                           "1: one after the other)")
    book.set_defaults(func=cmd_book)
    return parser


# Errors a user can cause (a wrong value, a missing, unreadable or unsafe file, a full disk, a
# read-only folder) end as one message and exit code 2; anything else is a bug of the package
# and keeps its traceback. --debug (or REFERSEG_DEBUG=1) shows the traceback of every error.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)
OS_HINTS = {
    errno.ENOSPC: "free some disk space, or write to another folder (--run-dir, --out)",
    errno.EDQUOT: "free some disk space, or write to another folder (--run-dir, --out)",
    errno.EACCES: "choose a folder you may write to (--run-dir, --out), or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another folder (--run-dir, --out)",
    errno.ENOTDIR: "a path that should be a folder is a file: choose another path",
    errno.EEXIST: "a path that should be a folder is a file: choose another path",
    errno.EISDIR: "a path that should be a file is a folder: give a file name",
    errno.EFBIG: "a file grew past the size this process may write (ulimit -f): raise the limit or free space",
}


def describe_error(err: BaseException) -> str:
    """A user's error as one line: what went wrong, where, and what to do."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno in OS_HINTS:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}: {OS_HINTS[err.errno]}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("REFERSEG_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished work was kept; resume with the same command (train: --resume)",
              file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
