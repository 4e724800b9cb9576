"""The ``referseg`` command: data, train, evaluate, predict, baseline, convert-official, book.

Each subcommand parses its arguments here and calls one function of the package,
imported lazily so that ``referseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from referseg.config import PROFILES, Profile, get_profile


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["spatial_channels=2", "stage1.iterations=100"]`` -> profile overrides."""
    overrides: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set {pair!r}: expected NAME=VALUE, e.g. --set spatial_channels=2")
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
    try:
        return get_profile(name, **parse_overrides(pairs))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


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
    from referseg.train import train

    profile = resolve_profile(args.profile, args.set)
    train(profile, stage=args.stage, run_dir=_default_run_dir(args), resume=args.resume, device=args.device)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from referseg.evaluate import evaluate_run

    evaluate_run(Path(args.run), split=args.split, mode=args.mode, all_methods=args.all, device=args.device)
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


def cmd_book(args: argparse.Namespace) -> int:
    from referseg.book import build_book

    if args.profile not in PROFILES:
        raise SystemExit(f"error: unknown profile {args.profile!r}; valid profiles: {', '.join(PROFILES)}")
    return build_book(profile=args.profile, overrides=parse_overrides(args.set), student=args.student,
                      force=args.force, build_html=not args.no_html)


# --- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="referseg", description=__doc__.splitlines()[0])
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

    train = sub.add_parser("train", help="train stage 1 (low resolution) or stage 2 (high resolution)")
    _add_profile_args(train)
    train.add_argument("--stage", type=int, choices=(1, 2), required=True)
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
    baseline.add_argument("name", help="whole-image, per-word, box-retrieval or proposal-classification")
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

    book = sub.add_parser("book", help="execute the notebooks with papermill, then build the book")
    _add_profile_args(book)
    book.add_argument("--student", action="store_true",
                      help="write the student edition (no solutions, no outputs) to student/ and check it runs")
    book.add_argument("--force", action="store_true", help="re-execute every notebook even if unchanged")
    book.add_argument("--no-html", action="store_true", help="execute the notebooks only")
    book.set_defaults(func=cmd_book)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
