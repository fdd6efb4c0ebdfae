"""The evaluate stage: decode a split with the best checkpoint, score it, draw the report.

Writes ``run_dir/eval/``: ``results_{split}.json`` (COCO results format, re-scorable by the
official tools), ``captions_{split}.json`` (captions with their words and attention grids),
``scores.json``, and ``report/`` (loss curves, attention figures and GIFs, ``index.html``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from . import metrics, report
from .checkpoint import load_model
from .config import DecodeConfig
from .data.shapes import load_objects
from .dataset import CaptionSplit
from .decoding import decode_split
from .features import FeatureStore
from .files import atomic_path, read_json, write_json
from .images import load_image
from .prepare import load_split, references


def score_split(decoded: dict[int, dict], records: list[dict], objects_file: str | None
                ) -> dict[str, float]:
    """Caption metrics, plus attribute and grounding scores when object boxes are known."""
    candidates = {i: d["caption"] for i, d in decoded.items()}
    scores = metrics.caption_scores(references(records), candidates)
    if objects_file:
        image_size, objects = load_objects(objects_file)
        subset = {i: objects[i] for i in candidates}
        scores.update(metrics.attribute_scores(candidates, subset))
        scores.update(metrics.grounding_scores({i: d["words"] for i, d in decoded.items()},
                                               {i: d["attention"] for i, d in decoded.items()},
                                               subset, image_size))
    return scores


def evaluate_run(run_dir: str | Path, decode_cfg: DecodeConfig | None = None, split: str = "test",
                 checkpoint: str = "best", samples: int = 8, progress: bool = True) -> dict[str, float]:
    """Decode and score ``split`` of a trained run; write results, scores and the report."""
    run_dir = Path(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab, cfg, _ = load_model(run_dir / "checkpoints" / checkpoint, device)
    decode_cfg = decode_cfg or cfg.decode
    records = load_split(run_dir / "data", split)
    data = CaptionSplit(FeatureStore.open(run_dir / "features", split), records)
    started = time.time()
    d = decode_cfg
    decoded = decode_split(model, data, vocab, d.beam_size, d.max_len, d.length_penalty,
                           d.eval_batch_size, device, progress)
    seconds = time.time() - started
    manifest = read_json(run_dir / "data" / "manifest.json", "data manifest")
    scores = score_split(decoded, data.records, manifest.get("objects"))
    out = run_dir / "eval"
    write_json(out / f"results_{split}.json", metrics.coco_results(
        {i: d["caption"] for i, d in decoded.items()}), indent=None)
    write_json(out / f"captions_{split}.json", {str(i): {"caption": d["caption"], "words": d["words"],
               "attention": np.round(d["attention"], 4).tolist()} for i, d in decoded.items()}, indent=None)
    summary = {k: v if isinstance(v, int) else round(float(v), 4) for k, v in scores.items()}
    write_json(out / "scores.json", summary)
    write_json(out / f"scores_{split}_beam{decode_cfg.beam_size}.json",
               {**summary, "decode": decode_cfg.__dict__, "split": split, "images": len(decoded),
                "decode_seconds": round(seconds, 1)})
    write_report(run_dir, summary, decoded, data.records, samples, decode_cfg.beam_size)
    return summary


def write_report(run_dir: Path, scores: dict, decoded: dict, records: list[dict], samples: int,
                 beam_size: int) -> Path:
    """Loss curves, attention figures/GIFs for the first ``samples`` images, and index.html."""
    folder = run_dir / "eval" / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    log = run_dir / "train" / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        if rows:
            report.plot_loss_curves(rows, folder / "loss.png")
            figures["Loss curves"] = "loss.png"
    cards = []
    for rec in records[:samples]:
        d = decoded[rec["id"]]
        image = load_image(rec["file"])
        name = f"image_{rec['id']}"
        with atomic_path(folder / f"{name}.jpg") as tmp:
            image.save(tmp, format="JPEG", quality=92)
        card = {"image": f"{name}.jpg", "caption": d["caption"], "references": rec["captions"]}
        if d["words"]:
            report.attention_figure(image, d["words"], d["attention"], folder / f"{name}_attention.png")
            report.attention_gif(image, d["words"], d["attention"], folder / f"{name}.gif")
            card.update(figure=f"{name}_attention.png", gif=f"{name}.gif")
        cards.append(card)
    notes = [f"Captions decoded with beam size {beam_size}; scores on {len(decoded)} images."]
    return report.write_html_report(folder, "attncap evaluation", scores, cards, figures, notes)
