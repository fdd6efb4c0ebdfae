"""The stages wired together over one run directory, as the CLI and the demo use them.

Each stage reads the previous stage's artifacts from ``run_dir`` and writes its own; the run's
effective config is saved as ``run_dir/config.json`` so later stages (and checkpoints) agree.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from . import config as config_lib
from .config import RunConfig
from .data.shapes import generate_shapes_world
from .distributed import process_group, threads_per_process
from .encoders import build_encoder
from .errors import AttncapError
from .evaluate import evaluate_run
from .features import ImageItem, extract_features, pinned_precision, verify_store
from .files import read_json, write_json
from .prepare import SPLITS, load_split, prepare
from .train import TrainState, train


def run_config(run_dir: str | Path, config_file: str | None = None,
               overrides: dict[str, dict] | None = None, base: RunConfig | None = None) -> RunConfig:
    """``base`` (defaults) < the run's saved config < a config file < command-line overrides."""
    saved = Path(run_dir) / "config.json"
    cfg = base or RunConfig()
    if saved.is_file():
        cfg = config_lib.from_dict(read_json(saved, "run config"), source=str(saved))
    if config_file:
        cfg = config_lib.load(config_file, cfg)
    return config_lib.merge(cfg, overrides or {}, source="command line", from_text=True)


def save_run_config(run_dir: str | Path, cfg: RunConfig) -> None:
    write_json(Path(run_dir) / "config.json", config_lib.to_dict(cfg))


def prepare_stage(run_dir: str | Path, cfg: RunConfig, progress: bool = True) -> int:
    """Get the data (generating the shapes world if asked) and tokenize it; returns the vocab size."""
    run_dir = Path(run_dir)
    d = cfg.data
    if d.dataset == "shapes":
        world = generate_shapes_world(run_dir / "dataset", d.train_images, d.val_images,
                                      d.test_images, d.shapes_image_size, d.seed, progress=progress)
        data_cfg = dataclasses.replace(d, splits=str(world.splits_json))
        vocab = prepare(data_cfg, world.captions_json, world.images_dir, run_dir / "data",
                        extra={"objects": str(world.objects_json.resolve())})
    elif d.dataset == "coco":
        if not d.images or not (d.captions or d.splits):
            raise AttncapError("dataset 'coco' needs data.images and data.captions (a COCO captions JSON) "
                               "or data.splits (Karpathy's dataset_coco.json), e.g. --images DIR "
                               "--captions captions.json; see docs/coco.md")
        vocab = prepare(d, d.captions or None, d.images, run_dir / "data")
    else:
        raise AttncapError(f"data.dataset must be 'shapes' or 'coco', got {d.dataset!r}")
    save_run_config(run_dir, cfg)
    return len(vocab)


def features_stage(run_dir: str | Path, cfg: RunConfig, progress: bool = True,
                   allow_download: bool = True) -> None:
    """Run the encoder over every split into the feature store (reused or resumed when possible)."""
    run_dir = Path(run_dir)
    _require_prepared(run_dir)
    e = cfg.encoder
    items = {split: [ImageItem(r["id"], r["file"]) for r in load_split(run_dir / "data", split)]
             for split in SPLITS}
    with process_group(None, cfg.train.dist_timeout_minutes) as dist:  # torchrun: shard the images
        torch.set_num_threads(e.threads or threads_per_process(dist.local_world_size))
        precision = dist.broadcast(pinned_precision(run_dir / "features", e.precision) if dist.is_main else None)
        encoder = build_encoder(e.name, e.pretrained, e.colour_stats, allow_download, precision,
                                str(dist.device), fine_tune_blocks=e.fine_tune, image_size=e.image_size,
                                head=e.head)
        for split in SPLITS:
            extract_features(encoder, items[split], run_dir / "features", split, e.pretrained, e.batch_size,
                             e.workers, progress and dist.is_main, requested_precision=e.precision, dist=dist)
        if dist.is_main:
            save_run_config(run_dir, cfg)


def _require_prepared(run_dir: Path) -> None:
    """A stage after prepare was pointed at a folder without prepared data: say so, create nothing."""
    if not (run_dir / "data" / "manifest.json").is_file():
        raise AttncapError(f"{run_dir} has no prepared data ({run_dir / 'data' / 'manifest.json'} is "
                           f"missing); run `attncap prepare --run {run_dir}` first, or check --run")


def verify_stage(run_dir: str | Path) -> list[str]:
    return [f"{split}: {p}" for split in SPLITS for p in verify_store(Path(run_dir) / "features", split)]


def train_stage(run_dir: str | Path, cfg: RunConfig, resume: bool = True, progress: bool = True
                ) -> TrainState:
    """Train (the run's config is saved by :func:`attncap.train.train` once it may start)."""
    _require_prepared(Path(run_dir))
    return train(run_dir, cfg, resume=resume, progress=progress)


# What `attncap demo` changes from the defaults, before the user's own overrides (docs/design.md
# has the measurements): frozen ImageNet features carry colour weakly, so the shapes world gets
# per-cell colour histograms; the decoder learns where each region is (spatial words: "from left
# to right", "above"); 8000 training images and dropout against over-fitting. The work is fixed
# (14 epochs, their whole schedule), so the scores do not depend on the machine's speed: the
# budget is only a safety net that the reference runs (README) are far from.
DEMO_PRESET = {
    "data": {"train_images": 8000},
    # fp32 even where bf16 is fast (AVX512-BF16): the same figures on every CPU (with the AVX2
    # kernels `attncap demo` asks for: cpu_kernels.py); bf16 features cost the scores' third digit
    # (test BLEU-4 0.622 -> 0.616, CIDEr 3.43 -> 3.39; README)
    "encoder": {"colour_stats": True, "precision": "fp32"},
    # attention 256 wide instead of the seed's 512: a training step 1.24-1.30x faster on an
    # AVX2-held Xeon, and test scores at least as good over three training seeds (docs/performance.md)
    "model": {"region_positions": True, "dropout": 0.3, "attention_dim": 256},
    "train": {"epochs": 14, "patience": 6, "max_minutes": 45.0},
    # beams ranked by mean log-probability per word: on the demo's val split CIDEr 3.301 -> 3.367
    # and BLEU-4 0.618 -> 0.619 against the raw sum (docs/design.md)
    "decode": {"length_penalty": 1.0},
}


def demo_config(run_dir: str | Path, config_file: str | None = None,
                overrides: dict[str, dict] | None = None) -> RunConfig:
    """The demo's config: :func:`run_config` with DEMO_PRESET on top of the defaults."""
    preset = config_lib.merge(RunConfig(), DEMO_PRESET, source="demo preset")
    return run_config(run_dir, config_file, overrides, base=preset)


def demo(run_dir: str | Path, cfg: RunConfig, progress: bool = True, resume: bool = True) -> dict[str, float]:
    """Every stage on the configured data (see :func:`demo_config`); returns the test scores."""
    timings = {}
    for name, stage in (("prepare", lambda: prepare_stage(run_dir, cfg, progress)),
                        ("features", lambda: features_stage(run_dir, cfg, progress)),
                        ("train", lambda: train_stage(run_dir, cfg, resume, progress)),
                        ("evaluate", lambda: evaluate_run(run_dir, cfg.decode, progress=progress))):
        started = time.time()
        if progress:
            print(f"== {name}", flush=True)
        result = stage()
        timings[name] = round(time.time() - started, 1)
    write_json(Path(run_dir) / "eval" / "timings.json", timings)
    return result
