"""The evaluate stage: decode a split with the best checkpoint, once per decoding setting, and score it.

Writes ``run_dir/eval/``, per setting (beam size K, 1 = greedy): ``results_{split}_beam{K}.json``
(COCO results format ``[{"image_id", "caption"}]``, which the official coco-caption tools re-score)
and ``scores_{split}_beam{K}.json``; for all settings ``table_{split}.md`` (scores x 100, as papers
print them). For the main setting (``decode.beam_size`` when evaluated, else the last one):
``results_{split}.json``, ``captions_{split}.json`` (words and attention grids), ``scores.json``
and ``report/`` (loss curves, attention figures and GIFs, ``index.html``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import metrics, report
from .checkpoint import load_model
from .config import DecodeConfig
from .data.shapes import load_objects
from .dataset import CaptionSplit
from .decoding import decode_split, diagnose_captions
from .errors import AttncapError
from .features import FeatureStore
from .files import atomic_path, read_json, read_jsonl, write_json
from .images import load_image
from .prepare import load_split, raw_references

TABLE_KEYS = (*metrics.METRIC_KEYS, "SPICE")


def score_split(decoded: dict[int, dict], scorer: metrics.CaptionScorer, objects_file: str | None
                ) -> dict[str, float]:
    """Caption metrics (``scorer`` holds the split's references), plus shapes-world scores when boxes are known."""
    candidates = {i: d["caption"] for i, d in decoded.items()}
    scores = scorer.score(candidates)
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
    """Decode and score ``split`` of a trained run with one setting; write results, scores and the report."""
    return next(iter(evaluate_beams(run_dir, None, decode_cfg, split, checkpoint, samples, progress).values()))


def evaluate_beams(run_dir: str | Path, beams: list[int] | None = None, decode_cfg: DecodeConfig | None = None,
                   split: str = "test", checkpoint: str = "best", samples: int = 8, progress: bool = True
                   ) -> dict[int, dict[str, float]]:
    """Decode and score ``split`` once per beam size in ``beams`` (default: ``decode_cfg.beam_size``).

    The model and features are loaded once; returns ``{beam size: scores}`` in the given order.
    """
    run_dir = Path(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab, cfg, _ = load_model(run_dir / "checkpoints" / checkpoint, device)
    decode_cfg = decode_cfg or cfg.decode
    beams = list(dict.fromkeys(beams or [decode_cfg.beam_size]))
    if any(k < 1 for k in beams):
        raise AttncapError(f"beam sizes must be at least 1 (1 = greedy), got {beams}")
    main = decode_cfg.beam_size if decode_cfg.beam_size in beams else beams[-1]
    data = CaptionSplit(FeatureStore.open(run_dir / "features", split), load_split(run_dir / "data", split))
    objects = read_json(run_dir / "data" / "manifest.json", "data manifest").get("objects")
    out, results = run_dir / "eval", {}
    with metrics.CaptionScorer(raw_references(data.records)) as scorer:  # one METEOR process for all beams
        for k in beams:
            setting = dataclasses.replace(decode_cfg, beam_size=k, n_best=min(k, decode_cfg.n_best))
            started = time.time()
            decoded = decode_split(model, data, vocab, k, setting.max_len, setting.length_penalty,
                                   setting.eval_batch_size, device, progress, setting.min_len)
            seconds = time.time() - started
            summary = {key: v if isinstance(v, int) else round(float(v), 4)
                       for key, v in score_split(decoded, scorer, objects).items()}
            coco = metrics.coco_results({i: d["caption"] for i, d in decoded.items()})
            write_json(out / f"results_{split}_beam{k}.json", coco, indent=None)
            write_json(out / f"scores_{split}_beam{k}.json",
                       {**summary, "decode": setting.__dict__, "split": split, "images": len(decoded),
                        "decode_seconds": round(seconds, 1), "spice": metrics.spice_unavailable() or "scored"})
            results[k] = summary
            if k == main:
                warn_degenerate(decoded, split)
                write_json(out / f"results_{split}.json", coco, indent=None)
                write_json(out / f"captions_{split}.json", {str(i): {
                    "caption": d["caption"], "words": d["words"],
                    "attention": np.round(d["attention"], 4).tolist()} for i, d in decoded.items()}, indent=None)
                write_json(out / "scores.json", summary)
                write_report(run_dir, summary, decoded, data.records, samples, k)
    with atomic_path(out / f"table_{split}.md") as tmp:
        tmp.write_text(format_table(results, split, len(data)), encoding="utf-8")
    return results


def warn_degenerate(decoded: dict[int, dict], split: str) -> None:
    """One ``warning:`` line on stderr when the captions look like an undertrained model's."""
    problem = diagnose_captions([d["caption"] for d in decoded.values()])
    if problem:
        print(f"warning: {split} captions look degenerate: {problem}; train longer (train.epochs) "
              "or check the data (captions, images, vocabulary)", file=sys.stderr)


def format_table(results: dict[int, dict[str, float]], split: str, images: int) -> str:
    """A Markdown table of the caption metrics per setting, x 100 as papers print them."""
    keys = [k for k in TABLE_KEYS if any(k in s for s in results.values())]
    lines = [f"Split {split}, {images} images; scores x 100.", "",
             "| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for k, scores in results.items():
        name = "greedy" if k == 1 else f"beam {k}"
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[key]:.1f}" for key in keys) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, scores: dict, decoded: dict, records: list[dict], samples: int,
                 beam_size: int) -> Path:
    """Loss curves, attention figures/GIFs for the first ``samples`` images, and index.html."""
    folder = run_dir / "eval" / "report"
    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    rows = read_jsonl(run_dir / "train" / "metrics.jsonl", "training metrics log")
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
