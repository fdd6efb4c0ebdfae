"""The ``attncap`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import parse_overrides
from .errors import AttncapError

DEFAULT_RUN = "runs/demo"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=DEFAULT_RUN, metavar="DIR",
                   help=f"run directory holding every stage's artifacts (default: {DEFAULT_RUN})")
    p.add_argument("--config", metavar="FILE", help="TOML/JSON config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.lr=5e-4 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _knobs(p: argparse.ArgumentParser, *names: str) -> None:
    """The seed's knobs and a few frequent settings as typed flags."""
    flags = {
        "epochs": ("--epochs", int, "training epochs (train.epochs)"),
        "batch_size": ("--batch-size", int, "training batch size (train.batch_size)"),
        "top_k": ("--top-k", int, "vocabulary size limit (data.top_k)"),
        "num_examples": ("--num-examples", int, "use only N training images (data.num_examples)"),
        "encoder": ("--encoder", str, "inception_v3 | efficientnet_lite0 | resnet101 | small_cnn"),
        "beam": ("--beam", int, "beam size (decode.beam_size)"),
    }
    for name in names:
        flag, kind, text = flags[name]
        p.add_argument(flag, dest=name, type=kind, help=text)
    if "encoder" in names:
        p.add_argument("--no-pretrained", action="store_true",
                       help="random encoder weights instead of ImageNet ones (never done silently)")


FLAG_KEYS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "top_k": "data.top_k",
             "num_examples": "data.num_examples", "encoder": "encoder.name", "beam": "decode.beam_size"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attncap", description="Attention-based image captioning (Show, Attend and Tell).")
    parser.add_argument("--version", action="version", version=f"attncap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    specs = {
        "demo": ("every stage on the built-in shapes world; prints the test scores",
                 ("epochs", "batch_size", "top_k", "num_examples", "encoder", "beam")),
        "prepare": ("split, tokenize and build the vocabulary", ("top_k", "num_examples")),
        "features": ("run the encoder over every image into the feature store", ("encoder",)),
        "train": ("train the decoder on the cached features (resumes)", ("epochs", "batch_size")),
        "evaluate": ("decode the test split, score it and write the report", ("beam",)),
    }
    for name, (text, knobs) in specs.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        _knobs(p, *knobs)
        if name == "features":
            p.add_argument("--verify", action="store_true", help="check the store against its manifest")
        if name == "train":
            p.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
        if name == "evaluate":
            p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p = sub.add_parser("caption", help="caption image files", description="Caption image files "
                       "with a trained run; prints one caption per image.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--run", default=DEFAULT_RUN, metavar="DIR")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
    p.add_argument("--n-best", type=int, default=1, help="print the N best captions")
    p.add_argument("--plot", action="store_true", help="write attention figures and GIFs")
    p.add_argument("--out", default=None, metavar="DIR", help="where --plot writes (default RUN/captions)")
    return parser


def _config(args):
    from .pipeline import demo_config, run_config

    pairs = list(args.set)
    for name, key in FLAG_KEYS.items():
        value = getattr(args, name, None)
        if value is not None:
            pairs.append(f"{key}={value}")
    if getattr(args, "no_pretrained", False):
        pairs.append("encoder.pretrained=false")
    load = demo_config if args.command == "demo" else run_config
    return load(args.run, args.config, parse_overrides(pairs))


def _print_scores(scores: dict, run: str) -> None:
    print("\nTest scores:")
    for key, value in scores.items():
        print(f"  {key:<22} {value}" if isinstance(value, int) else f"  {key:<22} {value:.4f}")
    print(f"\nscores: {Path(run) / 'eval' / 'scores.json'}")
    print(f"report: {Path(run) / 'eval' / 'report' / 'index.html'}")


def cmd_demo(args) -> int:
    from .pipeline import demo

    _print_scores(demo(args.run, _config(args), progress=not args.quiet), args.run)
    return 0


def cmd_prepare(args) -> int:
    from .pipeline import prepare_stage

    print(f"vocabulary: {prepare_stage(args.run, _config(args), not args.quiet)} words")
    return 0


def cmd_features(args) -> int:
    from .pipeline import features_stage, verify_stage

    if args.verify:
        problems = verify_stage(args.run)
        for p in problems:
            print(p)
        print("feature store OK" if not problems else f"{len(problems)} problem(s)")
        return 0 if not problems else 1
    features_stage(args.run, _config(args), not args.quiet)
    return 0


def cmd_train(args) -> int:
    from .pipeline import train_stage

    state = train_stage(args.run, _config(args), resume=not args.no_resume, progress=not args.quiet)
    print(f"trained {state.epoch} epochs ({state.step} steps); best val CIDEr {state.best_score:.3f} "
          f"at epoch {state.best_epoch}" + (f"; stopped: {state.stopped}" if state.stopped else ""))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    cfg = _config(args)
    _print_scores(evaluate_run(args.run, cfg.decode, args.split, progress=not args.quiet), args.run)
    return 0


def cmd_caption(args) -> int:
    from .images import load_image
    from .predict import Predictor
    from .report import attention_figure, attention_gif

    if args.beam is not None and args.beam < 1:
        raise AttncapError(f"--beam must be at least 1, got {args.beam}")
    predictor = Predictor.from_run(args.run)
    out = Path(args.out or Path(args.run) / "captions")
    failed = 0
    for path in args.images:
        try:
            image = load_image(path)
        except AttncapError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        preds = predictor.caption([image], args.beam, args.n_best)[0]
        for rank, p in enumerate(preds):
            prefix = f"{path}:" if rank == 0 else " " * len(f"{path}:")
            print(f"{prefix} {p.caption}" + (f"  ({p.score:.2f})" if args.n_best > 1 else ""))
        if args.plot and preds[0].words:
            stem = Path(path).stem
            fig = attention_figure(image, preds[0].words, preds[0].attention, out / f"{stem}_attention.png")
            attention_gif(image, preds[0].words, preds[0].attention, out / f"{stem}.gif")
            print(f"  attention: {fig}")
    return 2 if failed else 0


COMMANDS = {"demo": cmd_demo, "prepare": cmd_prepare, "features": cmd_features,
            "train": cmd_train, "evaluate": cmd_evaluate, "caption": cmd_caption}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except AttncapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
