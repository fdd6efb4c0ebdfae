"""The evaluate stage: decode a split with the best checkpoint, once per decoding setting, and score it.

Writes ``run_dir/eval/``, per setting (beam size K, 1 = greedy): ``results_{split}_beam{K}.json``
(COCO results format ``[{"image_id", "caption"}]``, which the official coco-caption tools re-score)
and ``scores_{split}_beam{K}.json``; for all settings ``table_{split}.md`` (scores x 100, as papers
print them). For the main setting (``decode.beam_size`` when evaluated, else the last one):
``results_{split}.json``, ``captions_{split}.json`` (words and attention grids; with COCO instance
annotations also each caption's hallucinated words and grounded tokens), ``scores.json`` and
``report/`` (loss curves, attention figures and GIFs, ``index.html``).

Caption metrics equal coco-caption's ``COCOEvalCap`` on the same results file (raw references,
see :class:`attncap.metrics.CaptionScorer`); CHAIR (:mod:`attncap.chair`) and attention grounding
(:mod:`attncap.grounding`) are added when the dataset has instance annotations
(:func:`attncap.instances.find_instances`), the shapes world's own scores when it is the shapes world.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import chair, grounding, metrics, report
from .checkpoint import load_model
from .config import DecodeConfig
from .data import shapes_scores
from .data.shapes import load_objects
from .dataset import CaptionSplit
from .decoding import decode_split, diagnose_captions, options
from .distributed import Dist, process_group, threads_per_process
from .errors import AttncapError
from .features import FeatureStore
from .files import atomic_path, read_json, read_jsonl, write_json
from .images import load_image
from .instances import ImageObjects, mentions, split_instances
from .prepare import load_split, raw_references

TABLE_KEYS = (*metrics.METRIC_KEYS, "SPICE", "CHAIRs", "CHAIRi")


def score_split(decoded: dict[int, dict], scorer: metrics.CaptionScorer, objects_file: str | None,
                instances: dict[int, ImageObjects] | None = None, truth: dict[int, set[str]] | None = None
                ) -> tuple[dict[str, float], dict[int, dict]]:
    """Caption metrics (``scorer`` holds the split's references); shapes-world scores when its boxes
    are known; attention grounding from COCO ``instances``; CHAIR against ``truth`` ({image id:
    objects present}). Returns (scores, {image id: notes: hallucinated words, grounded tokens})."""
    candidates = {i: d["caption"] for i, d in decoded.items()}
    scores, notes = scorer.score(candidates), {i: {} for i in decoded}
    if objects_file:
        image_size, objects = load_objects(objects_file)
        subset = {i: objects[i] for i in candidates}
        scores.update(shapes_scores.attribute_scores(candidates, subset))
        scores.update(shapes_scores.grounding_scores({i: d["words"] for i, d in decoded.items()},
                                                     {i: d["attention"] for i, d in decoded.items()},
                                                     subset, image_size))
    if instances is not None:
        found = {i: mentions(d["words"], instances[i]) for i, d in decoded.items()}
        scores.update(grounding.grounding_scores(found, {i: d["attention"] for i, d in decoded.items()},
                                                 {i: (o.width, o.height) for i, o in instances.items()}))
        for i, found_here in found.items():
            notes[i]["grounded"] = [{"token": m.token, "boxes": [list(b) for b in m.boxes]} for m in found_here]
    if truth is not None:
        chair_summary, hallucinated = chair.chair_scores(candidates, truth)
        scores.update(chair_summary)
        for i, words in hallucinated.items():
            notes[i]["hallucinated"] = words
    return scores, notes


def evaluate_run(run_dir: str | Path, decode_cfg: DecodeConfig | None = None, split: str = "test",
                 checkpoint: str = "best", samples: int = 8, progress: bool = True) -> dict[str, float]:
    """Decode and score ``split`` of a trained run with one setting; write results, scores and the report."""
    return next(iter(evaluate_beams(run_dir, None, decode_cfg, split, checkpoint, samples, progress).values()))


def evaluate_beams(run_dir: str | Path, beams: list[int] | None = None, decode_cfg: DecodeConfig | None = None,
                   split: str = "test", checkpoint: str = "best", samples: int = 8, progress: bool = True
                   ) -> dict[int, dict[str, float]]:
    """Decode and score ``split`` once per beam size in ``beams`` (default: ``decode_cfg.beam_size``).

    The model and features are loaded once; returns ``{beam size: scores}`` in the given order.
    Under torchrun every rank decodes every world-size-th batch and rank 0 scores and writes: the
    files are the ones a single process writes (and every rank returns the scores).
    """
    run_dir = Path(run_dir)
    with process_group(None) as dist:
        model, vocab, cfg, _ = load_model(run_dir / "checkpoints" / checkpoint, dist.device)
        decode_cfg = decode_cfg or cfg.decode
        torch.set_num_threads(decode_cfg.threads or threads_per_process(dist.local_world_size))
        beams = list(dict.fromkeys(beams or [decode_cfg.beam_size]))
        if any(k < 1 for k in beams):
            raise AttncapError(f"beam sizes must be at least 1 (1 = greedy), got {beams}")
        data = CaptionSplit(FeatureStore.open(run_dir / "features", split), load_split(run_dir / "data", split))
        settings = {k: dataclasses.replace(decode_cfg, beam_size=k, n_best=min(k, decode_cfg.n_best))
                    for k in beams}
        main = decode_cfg.beam_size if decode_cfg.beam_size in beams else beams[-1]
        runs = {k: _decode_shared(model, data, vocab, s, dist, progress) for k, s in settings.items()}
        results = _score_and_write(run_dir, cfg, data, split, runs, settings, main, samples) \
            if dist.is_main else None
        return dist.broadcast(results)


class _RankShare:
    """The batches of a split one rank decodes: every world-size-th, cut as one process cuts them."""

    def __init__(self, split: CaptionSplit, rank: int, world_size: int):
        self.split, self.rank, self.world_size = split, rank, world_size

    def __len__(self) -> int:
        return len(self.split)

    def image_batches(self, batch_size: int):
        return self.split.image_batches(batch_size, keep=lambda b: b % self.world_size == self.rank)


def _decode_shared(model, data: CaptionSplit, vocab, setting: DecodeConfig, dist: Dist,
                   progress: bool) -> tuple[dict[int, dict], float]:
    """Every image of ``data`` decoded with ``setting`` (this rank's share, gathered), in split order;
    and the seconds it took."""
    started = time.time()
    share = data if dist.world_size == 1 else _RankShare(data, dist.rank, dist.world_size)
    mine = decode_split(model, share, vocab, setting.beam_size, setting.max_len, setting.length_penalty,
                        setting.eval_batch_size, dist.device, progress and dist.is_main,
                        **options(setting, vocab.unk))
    if dist.world_size == 1:
        return mine, time.time() - started
    found = {i: d for part in dist.gather(mine) for i, d in part.items()}
    return {i: found[i] for i in data.image_ids if i in found}, time.time() - started


def _score_and_write(run_dir: Path, cfg, data: CaptionSplit, split: str, runs: dict, settings: dict,
                     main: int, samples: int) -> dict[int, dict[str, float]]:
    """Rank 0: score every setting's captions (one METEOR process) and write the results, and for
    the ``main`` beam size the report."""
    objects = read_json(run_dir / "data" / "manifest.json", "data manifest").get("objects")
    instances = split_instances(cfg.data, [r["id"] for r in data.records]) if not objects else None
    truth = None if instances is None else chair.ground_truth(
        {i: set(o.boxes) for i, o in instances.items()}, raw_references(data.records))
    out, results = run_dir / "eval", {}
    with metrics.CaptionScorer(raw_references(data.records)) as scorer:  # one METEOR process for all beams
        for k, setting in settings.items():
            decoded, seconds = runs[k]
            scores, notes = score_split(decoded, scorer, objects, instances, truth)
            summary = {key: v if isinstance(v, int) else round(float(v), 4) for key, v in scores.items()}
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
                    "attention": np.round(d["attention"], 4).tolist(), **notes[i]} for i, d in decoded.items()},
                    indent=None)
                write_json(out / "scores.json", summary)
                write_report(run_dir, summary, decoded, data.records, samples, k, notes)
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
                 beam_size: int, notes: dict[int, dict] | None = None) -> Path:
    """Loss curves, attention figures/GIFs for the first ``samples`` images, and index.html.

    notes: {image id: {"hallucinated": [phrases], "grounded": [{"token", "boxes"}]}} from
    :func:`score_split`: hallucinated words are marked in the caption, grounded words' boxes drawn.
    """
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
        note = (notes or {}).get(rec["id"], {})
        if "hallucinated" in note:
            card["hallucinated"] = _hallucinated_words(d["words"], note["hallucinated"])
        boxes = {g["token"]: g["boxes"] for g in note.get("grounded", ()) if g["token"] < len(d["words"])}
        if d["words"]:
            report.attention_figure(image, d["words"], d["attention"], folder / f"{name}_attention.png",
                                    boxes=boxes)
            report.attention_gif(image, d["words"], d["attention"], folder / f"{name}.gif", boxes=boxes)
            card.update(figure=f"{name}_attention.png", gif=f"{name}.gif")
        cards.append(card)
    notes = [f"Captions decoded with beam size {beam_size}; scores on {len(decoded)} images."]
    return report.write_html_report(folder, "attncap evaluation", scores, cards, figures, notes)


def _hallucinated_words(words: list[str], phrases: list[str]) -> list[int]:
    """Indices of the words naming a hallucinated object: every phrase of the categories that
    CHAIR found absent (its notes list each category's first phrase only)."""
    found = chair.named_objects(list(words))
    absent = {category for _, phrase, category in found if phrase in set(phrases)}
    return [j for index, phrase, category in found if category in absent
            for j in range(index - len(phrase.split()) + 1, index + 1)]
