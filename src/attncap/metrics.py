"""Caption scores: the COCO metrics through pycocoevalcap, as coco-caption's COCOEvalCap computes them.

- :class:`CaptionScorer` / :func:`caption_scores`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (CIDEr-D, as
  in the COCO tools) and SPICE when its Stanford models are already installed; needs Java.
- :func:`cider`: CIDEr-D alone, pure Python, on already tokenized text (per-epoch validation).

Hallucination (CHAIR) is in :mod:`attncap.chair`, attention grounding in :mod:`attncap.grounding`,
the shapes world's own scores in :mod:`attncap.data.shapes_scores`.

Corpus-level scores depend on the whole evaluated set (CIDEr's document frequencies come from its
references), so compare scores only over the same images.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pycocoevalcap.bleu.bleu
import pycocoevalcap.cider.cider
import pycocoevalcap.meteor.meteor
import pycocoevalcap.rouge.rouge
import pycocoevalcap.spice.spice
import pycocoevalcap.tokenizer.ptbtokenizer

from .errors import AttncapError

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_SPICE_DIR = Path(pycocoevalcap.tokenizer.ptbtokenizer.__file__).resolve().parent.parent / "spice"
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

log = logging.getLogger(__name__)


def _checked_references(references: dict[int, list[str]]) -> dict[int, list[str]]:
    """References in pycocoevalcap's form {id: [refs]}, sorted by id; an empty set or image is an error."""
    if not references:
        raise AttncapError("no references to score against; pass {image id: [reference captions]}")
    for image_id in sorted(references):
        if not references[image_id]:
            raise AttncapError(f"image {image_id} has no reference captions; drop it or add references")
    return {i: [str(r) for r in references[i]] for i in sorted(references)}


def _checked_candidates(references: dict, candidates: dict[int, str]) -> dict[int, list[str]]:
    """Candidates in pycocoevalcap's form {id: [candidate]}, one per referenced image, sorted by id."""
    for image_id in sorted(references):
        if image_id not in candidates:
            raise AttncapError(f"no candidate caption for image {image_id}; caption every image that has references")
    extra = sorted(set(candidates) - set(references))
    if extra:
        raise AttncapError(f"candidate for image {extra[0]} has no references ({len(extra)} such images); "
                           f"score candidates and references of the same split")
    return {i: [str(candidates[i])] for i in sorted(references)}


def _collapse(texts: dict[int, list[str]]) -> dict[int, list[str]]:
    """Collapse whitespace of already tokenized text (pycocoevalcap splits on single spaces)."""
    return {i: [" ".join(t.split()) for t in v] for i, v in texts.items()}


def ptb_tokenize(captions: dict[int, list[str]]) -> dict[int, list[str]]:
    """Captions as written -> PTBTokenizer output, exactly as coco-caption's ``COCOEvalCap`` does it.

    captions: {image id: [caption]}. One Java call (lowercases, splits clitics, drops punctuation);
    references and candidates are tokenized in separate calls, as ``COCOEvalCap.evaluate`` does.
    """
    joined = {i: [{"caption": c} for c in caps] for i, caps in captions.items()}
    out = pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer().tokenize(joined)
    if any(len(out.get(i, [])) != len(caps) for i, caps in captions.items()):
        raise AttncapError("PTBTokenizer (java) returned the wrong number of lines; check that `java -version` works")
    return {i: out[i] for i in captions}


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here (None when it can). Never downloads anything."""
    missing = [jar for jar in _SPICE_JARS if not (_SPICE_DIR / "lib" / jar).is_file()]
    if missing:
        return (f"Stanford CoreNLP models missing ({', '.join(missing)} in {_SPICE_DIR / 'lib'}); run "
                f"pycocoevalcap/spice/get_stanford_models.py once with internet")
    return None


def _spice(gts: dict, res: dict) -> float:
    """SPICE F-score (Java, needs ~8 GB); only called when spice_unavailable() is None."""
    score, _ = pycocoevalcap.spice.spice.Spice().compute_score(gts, res)
    return float(score)


class CaptionScorer:
    """Scores many candidate sets against one reference set: the official coco-caption metrics.

    References are tokenized once, and one METEOR (Java) process serves every :meth:`score` call
    (an ``evaluate --beams 1,3,5`` run); use it as a context manager, or call :meth:`close`.
    tokenize=True: references and candidates as written, through the PTBTokenizer as
    ``COCOEvalCap`` does; False: already lowercase, space-separated tokens.
    """

    def __init__(self, references: dict[int, list[str]], spice: bool = True, tokenize: bool = True):
        if shutil.which("java") is None:
            raise AttncapError("caption scores need `java` on PATH (METEOR, PTBTokenizer); install a JRE, "
                               "or use metrics.cider() for a Java-free score")
        self.references = references
        self.spice, self.tokenize = spice, tokenize
        gts = _checked_references(references)
        self._gts = ptb_tokenize(gts) if tokenize else _collapse(gts)
        self._meteor = None

    def score(self, candidates: dict[int, str]) -> dict[str, float]:
        """Every key of METRIC_KEYS (plus "SPICE" when enabled and installed) for one candidate set.

        candidates: {image id: caption}, one per image with references (a missing or extra id is an
        AttncapError).
        """
        res = _checked_candidates(self.references, candidates)
        res = ptb_tokenize(res) if self.tokenize else _collapse(res)
        gts = self._gts
        bleu, _ = pycocoevalcap.bleu.bleu.Bleu(4).compute_score(gts, res, verbose=0)
        scores = {key: float(value) for key, value in zip(METRIC_KEYS[:4], bleu)}
        scores["METEOR"] = self._meteor_score(gts, res)
        scores["ROUGE-L"] = float(pycocoevalcap.rouge.rouge.Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(pycocoevalcap.cider.cider.Cider().compute_score(gts, res)[0])
        if self.spice:
            reason = spice_unavailable()
            if reason is None:
                scores["SPICE"] = _spice(gts, res)
            else:
                log.warning("SPICE skipped: %s", reason)
        return scores

    def _meteor_score(self, gts: dict, res: dict) -> float:
        """METEOR 1.5 through pycocoevalcap's Java subprocess, started on first use."""
        if self._meteor is None:
            self._meteor = pycocoevalcap.meteor.meteor.Meteor()
        try:
            score, _ = self._meteor.compute_score(gts, res)
        except ValueError:  # the jar died: its stdout ended early
            self.close()
            raise AttncapError("METEOR (java -Xmx2G) failed; check `java -version` and free memory") from None
        return float(score)

    def close(self) -> None:
        """Stop the METEOR process (idempotent)."""
        scorer, self._meteor = self._meteor, None
        if scorer is None:
            return
        if scorer.lock.locked():  # compute_score keeps the lock when it fails; __del__ would hang on it
            scorer.lock.release()
        process = scorer.meteor_p
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
        process.kill()
        process.wait()

    def __enter__(self) -> "CaptionScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def caption_scores(references: dict[int, list[str]], candidates: dict[int, str], spice: bool = True,
                   tokenize: bool = True) -> dict[str, float]:
    """Corpus-level COCO caption metrics for one candidate set, as coco-caption's COCOEvalCap computes them.

    references: {image id: [reference captions as written]}; candidates: {image id: caption}, one
    per image with references. See :class:`CaptionScorer` (use it directly to score several sets
    with one METEOR process) and :func:`spice_unavailable`. METEOR and the tokenizer need ``java``.
    """
    with CaptionScorer(references, spice, tokenize) as scorer:
        return scorer.score(candidates)


def cider(references: dict[int, list[str]], candidates: dict[int, str]) -> float:
    """CIDEr-D (pycocoevalcap's Cider: n = 1..4, sigma 6, clipping, x10) on already tokenized text.

    Same id rules as :func:`caption_scores`; pure Python, no Java, fast enough per epoch.
    """
    gts = _collapse(_checked_references(references))
    res = _collapse(_checked_candidates(references, candidates))
    return float(pycocoevalcap.cider.cider.Cider().compute_score(gts, res)[0])


def coco_results(candidates: dict[int, str]) -> list[dict]:
    """Candidates in the COCO results format: [{"image_id": id, "caption": text}] sorted by id."""
    return [{"image_id": int(i), "caption": candidates[i]} for i in sorted(candidates)]
