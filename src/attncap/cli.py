"""The ``attncap`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import parse_overrides
from .cpu_kernels import pin_avx2
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
        "captions": ("--captions", str, "COCO captions JSON (data.captions; implies data.dataset=coco)"),
        "image_dir": ("--images", str, "folder the captions' file names are relative to (data.images; "
                      "implies data.dataset=coco)"),
        "splits": ("--splits", str, "split file: Karpathy's dataset_coco.json or {train,val,test: [ids]} "
                   "(data.splits)"),
    }
    for name in names:
        flag, kind, text = flags[name]
        p.add_argument(flag, dest=name, type=kind, help=text)
    if "encoder" in names:
        p.add_argument("--no-pretrained", action="store_true",
                       help="random encoder weights instead of ImageNet ones (never done silently)")


FLAG_KEYS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "top_k": "data.top_k",
             "num_examples": "data.num_examples", "encoder": "encoder.name", "beam": "decode.beam_size",
             "captions": "data.captions", "image_dir": "data.images", "splits": "data.splits"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attncap", description="Attention-based image captioning (Show, Attend and Tell).")
    parser.add_argument("--version", action="version", version=f"attncap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    specs = {
        "demo": ("every stage on the built-in shapes world; prints the test scores",
                 ("epochs", "batch_size", "top_k", "num_examples", "encoder", "beam")),
        "prepare": ("split, tokenize and build the vocabulary",
                    ("top_k", "num_examples", "captions", "image_dir", "splits")),
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
        if name in ("train", "demo"):
            p.add_argument("--no-resume", action="store_true", help="start training over instead of resuming")
        if name == "train":
            p.add_argument("--scst", action="store_true", help="self-critical training ([scst] settings) "
                           "from the run's cross-entropy checkpoint, into checkpoints/scst_latest, scst_best")
        if name == "evaluate":
            p.add_argument("--split", default="test", choices=["train", "val", "test"])
            p.add_argument("--beams", metavar="K,K,...", help="score several settings, e.g. 1,3,5 "
                           "(1 = greedy), each into its own results file (default: decode.beam_size)")
            p.add_argument("--checkpoint", default="best", choices=["best", "latest", "scst_best", "scst_latest"],
                           help="which checkpoint of the run to score (default best; SCST: scst_best)")
            p.add_argument("--samples", type=int, default=8, metavar="N", help="images of the split "
                           "the report shows with attention figures and GIFs (default 8; 0 = none)")
    _caption_parser(sub)
    _serve_parser(sub)
    _export_parser(sub)
    _import_parser(sub)
    _data_parser(sub)
    return parser


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a published checkpoint into an attncap model folder",
                       description="Read sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning checkpoint "
                       "(BEST_checkpoint_*.pth.tar) and its WORDMAP_*.json without running code from "
                       "them; write a model folder that caption, serve, export and attncap.load use.")
    p.add_argument("source", choices=["sgrvinod"], help="whose checkpoint format")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="the .pth.tar file")
    p.add_argument("word_map", metavar="WORDMAP", help="its WORDMAP_*.json")
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")


def _data_parser(sub) -> None:
    """``attncap data coco2014 --root DIR ...``: download and extract a dataset."""
    p = sub.add_parser("data", help="download and extract a dataset (coco2014)",
                       description="Download and extract a dataset; resumes and reuses what is done.")
    p.add_argument("dataset", choices=["coco2014"])
    p.add_argument("--root", required=True, metavar="DIR", help="where the archives and folders go")
    p.add_argument("--mirror", metavar="URL", help="base address serving the same file names "
                   "(default: $ATTNCAP_COCO_MIRROR, else the official addresses)")
    p.add_argument("--no-images", action="store_true", help="only the captions and Karpathy's split")
    p.add_argument("--no-karpathy", action="store_true", help="skip Karpathy's split file")
    p.add_argument("--no-checksums", action="store_true", help="do not check the published sizes and "
                   "SHA-256 (a mirror serving other files); Content-Length and zip CRCs are still checked")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


MODEL_HELP = "run directory, checkpoint folder or exported model folder"


def _caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption image files and folders", description="Caption "
                       "images in batches; prints one caption per image, optionally writes COCO "
                       "results JSON and attention figures/GIFs.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or folders (their image files, recursively)")
    p.add_argument("--run", default=DEFAULT_RUN, metavar="DIR", help=f"{MODEL_HELP} (default: {DEFAULT_RUN})")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the model's)")
    p.add_argument("--n-best", type=int, default=1, help="print the N best captions")
    p.add_argument("--allow-unk", action=argparse.BooleanOptionalAction, default=None,
                   help="may captions contain <unk> (default: the model's decode.allow_unk, normally no)")
    p.add_argument("--block-trigrams", action=argparse.BooleanOptionalAction, default=None,
                   help="never repeat a trigram within a caption (default: decode.block_trigrams)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the captions in COCO results format [{image_id, caption, file_name}]")
    p.add_argument("--plot", action="store_true", help="write an attention figure and GIF per image")
    p.add_argument("--plot-dir", default=None, metavar="DIR",
                   help="where --plot writes (default RUN/captions; implies --plot)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page for a trained model",
                       description="Serve POST /caption, GET /health, the web page (/) and the API "
                                   "docs (/docs). Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("model", metavar="RUN_DIR", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per model call at most (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="upload size limit (default 10)")
    p.add_argument("--max-pixels", type=int, default=None, help="decoded image size limit in pixels "
                   "(default 50000000)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a decode "
                   "thread, and for the model, at most; past it a 503 with Retry-After (default 256)")
    p.add_argument("--max-queue-mb", type=float, default=1024.0, help="memory held for waiting "
                   "requests (uploads, decodes, model inputs); past it a 503 with Retry-After "
                   "(default 1024)")
    p.add_argument("--decode-workers", type=int, default=2, help="threads decoding uploads (default 2)")
    p.add_argument("--upload-timeout", type=float, default=60.0,
                   help="seconds an upload may take before a 408 (default 60)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no access log")


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model as ONNX graphs, a self-contained folder or a "
                       "Hugging Face model repository",
                       description="--format onnx: encode.onnx + step.onnx (one decoder step, dynamic "
                       "batch) with vocab and config; --format folder: safetensors + config + vocab "
                       "+ README card that attncap.load() reads; --format hub: that folder with a Hub "
                       "model card, training_config.json and the commands (then `hf upload ORG/NAME "
                       "DIR`; attncap.load('ORG/NAME') reads it).")
    p.add_argument("model", metavar="RUN_DIR", help=MODEL_HELP)
    p.add_argument("--format", dest="fmt", choices=["onnx", "folder", "hub"], default="folder")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN_DIR/export/FORMAT)")


def _config(args):
    from .pipeline import demo_config, run_config

    pairs = list(args.set)
    for name, key in FLAG_KEYS.items():
        value = getattr(args, name, None)
        if value is not None:
            pairs.append(f"{key}={value}")
    if getattr(args, "no_pretrained", False):
        pairs.append("encoder.pretrained=false")
    if getattr(args, "captions", None) or getattr(args, "image_dir", None):
        pairs.append("data.dataset=coco")
    load = demo_config if args.command == "demo" else run_config
    return load(args.run, args.config, parse_overrides(pairs))


def _print_scores(scores: dict, run: str) -> None:
    print("\nTest scores:")
    for key, value in scores.items():
        print(f"  {key:<22} {value}" if isinstance(value, int) else f"  {key:<22} {value:.4f}")
    print(f"\nscores: {Path(run) / 'eval' / 'scores.json'}")
    print(f"report: {Path(run) / 'eval' / 'report' / 'index.html'}")


def cmd_demo(args) -> int:
    pin_avx2()  # the README's figures on every x86-64 CPU (cpu_kernels.py); before torch loads
    from .pipeline import demo

    _print_scores(demo(args.run, _config(args), progress=not args.quiet, resume=not args.no_resume),
                  args.run)
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
    from .distributed import EXIT_PREEMPTED, is_main_process
    from .pipeline import train_stage

    cfg = _config(args)
    if args.scst:
        from .scst_train import scst_train
        state = scst_train(args.run, cfg, resume=not args.no_resume, progress=not args.quiet)
    else:
        state = train_stage(args.run, cfg, resume=not args.no_resume, progress=not args.quiet)
    if is_main_process():  # under torchrun, once for the run rather than once per process
        what = f"self-critical: best val CIDEr (beam {cfg.decode.beam_size})" if args.scst else "best val CIDEr"
        print(f"trained {state.epoch} epochs ({state.step} steps); {what} {state.best_score:.3f} "
              f"at epoch {state.best_epoch}" + (f"; stopped: {state.stopped}" if state.stopped else ""))
    return EXIT_PREEMPTED if state.preempted else 0  # 75: a job script may requeue and resume


def cmd_evaluate(args) -> int:
    from .distributed import is_main_process
    from .evaluate import evaluate_beams

    cfg = _config(args)
    try:
        beams = [int(k) for k in args.beams.split(",")] if args.beams else None
    except ValueError:
        raise AttncapError(f"--beams must be beam sizes separated by commas, e.g. 1,3,5; got {args.beams!r}") from None
    if args.samples < 0:
        raise AttncapError(f"--samples is how many images the report shows, 0 or more; got {args.samples}")
    results = evaluate_beams(args.run, beams, cfg.decode, args.split, args.checkpoint, args.samples,
                             progress=not args.quiet)
    if not is_main_process():  # under torchrun, rank 0 alone prints
        return 0
    if len(results) == 1:
        _print_scores(next(iter(results.values())), args.run)
        return 0
    print((Path(args.run) / "eval" / f"table_{args.split}.md").read_text(encoding="utf-8"))
    print(f"results: {Path(args.run) / 'eval'}/results_{args.split}_beam{{K}}.json (COCO format)")
    return 0


def _caption_args(args) -> tuple[Path | None, Path | None]:
    """Check the caption options; returns (results file, figure folder)."""
    if args.beam is not None and args.beam < 1:
        raise AttncapError(f"--beam must be at least 1, got {args.beam}")
    if args.n_best < 1:
        raise AttncapError(f"--n-best must be at least 1, got {args.n_best}")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise AttncapError(f"--out {out} is a folder: --out takes the results file (e.g. results.json); "
                           "attention figures go to --plot-dir")
    plot_dir = Path(args.plot_dir) if args.plot_dir else (Path(args.run) / "captions" if args.plot else None)
    return out, plot_dir


def cmd_caption(args) -> int:
    from tqdm import tqdm

    from . import load
    from .files import write_json
    from .predict import caption_files, coco_image_ids, find_images, image_number
    from .report import attention_figure, attention_gif

    out, plot_dir = _caption_args(args)
    predictor = load(args.run)
    paths = find_images(args.images)
    captioned, stems, failed = [], set(), 0
    for item in caption_files(predictor, paths, args.batch_size, args.beam, args.n_best,
                              progress=not args.quiet, allow_unk=args.allow_unk,
                              block_trigrams=args.block_trigrams):
        if item.error:
            tqdm.write(f"error: {item.error}", file=sys.stderr)
            failed += 1
            continue
        preds = item.predictions
        for rank, p in enumerate(preds):
            prefix = f"{item.path}:" if rank == 0 else " " * len(f"{item.path}:")
            tqdm.write(f"{prefix} {p.caption}" + (f"  ({p.score:.2f})" if args.n_best > 1 else ""))
        captioned.append((item.path, preds[0].caption))
        if plot_dir is not None and preds[0].words:
            stem = item.path.stem if item.path.stem not in stems else f"{item.path.stem}-{len(captioned)}"
            stems.add(stem)
            best = preds[0]
            attention_figure(item.image, best.words, best.attention, plot_dir / f"{stem}_attention.png")
            attention_gif(item.image, best.words, best.attention, plot_dir / f"{stem}.gif")
    if plot_dir is not None:
        print(f"attention figures: {plot_dir}")
    if out is not None:
        ids = coco_image_ids([path for path, _ in captioned])
        write_json(out, [{"image_id": i, "caption": text, "file_name": str(path)}
                         for i, (path, text) in zip(ids, captioned)], indent=None)
        print(f"results: {out} ({len(captioned)} images, COCO results format)")
        if captioned and all(image_number(path) is None for path, _ in captioned):
            print("note: no file name holds a number, so each image_id is the file's position "
                  "(1, 2, 3...), not a COCO id")
    return 2 if failed else 0


def cmd_serve(args) -> int:
    from . import load
    from .images import DEFAULT_MAX_PIXELS
    from .serve import ServeLimits, bind, create_app, run_server

    limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_queued_bytes=int(args.max_queue_mb * 1024 * 1024),
                         decode_workers=args.decode_workers, upload_timeout_s=args.upload_timeout)
    sock = bind(args.host, args.port)  # a busy port fails before the model is loaded
    try:
        app = create_app(load(args.model, args.device), limits)
    except BaseException:
        sock.close()
        raise
    run_server(app, args.host, args.port, args.quiet, sock)
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    out = args.out
    if out is None:
        if not (Path(args.model) / "checkpoints").is_dir():
            raise AttncapError(f"{args.model} is not a run directory; pass --out DIR for the export")
        out = Path(args.model) / "export" / args.fmt
    print(f"exported ({args.fmt}): {export_model(args.model, out, args.fmt)}")
    return 0


def cmd_import(args) -> int:
    from .sgrvinod import import_checkpoint

    out = import_checkpoint(args.checkpoint, args.word_map, args.out)
    print(f"imported ({args.source}): {out}\nnext: attncap caption IMAGE --run {out}")
    return 0


def cmd_data(args) -> int:
    from .data.coco import fetch_coco2014

    folders = fetch_coco2014(args.root, args.mirror, images=not args.no_images,
                             karpathy=not args.no_karpathy, checksums=not args.no_checksums,
                             progress=not args.quiet)
    for name, path in folders.items():
        print(f"{name:<12} {path}")
    if "karpathy" in folders:
        print(f"next: attncap prepare --run runs/coco_paper --config configs/coco_paper.toml "
              f"--splits {folders['karpathy'] / 'dataset_coco.json'} --images {args.root}")
    return 0


COMMANDS = {"demo": cmd_demo, "prepare": cmd_prepare, "features": cmd_features,
            "train": cmd_train, "evaluate": cmd_evaluate, "caption": cmd_caption, "data": cmd_data,
            "serve": cmd_serve, "export": cmd_export, "import": cmd_import}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m attncap.cli -- train --run DIR` (docs/distributed.md)
        argv = argv[1:]
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
