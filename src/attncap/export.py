"""Export a trained model for use outside this toolkit.

Three formats:

* ``folder``: a self-contained model folder (``model.safetensors``, ``encoder.safetensors``,
  ``config.json``, ``vocab.json``, ``README.md`` card) with no training state, which
  :func:`attncap.load` reads back into a ready :class:`~attncap.api.ImageCaptioner`.
* ``hub``: the same folder as a Hugging Face model repository: the card has the Hub's YAML front
  matter, the training config and the commands, and ``training_config.json`` is added
  (:mod:`attncap.hub`); ``attncap.load("org/name")`` reads it back from the Hub.
* ``onnx``: the decoder cut at the same seams :mod:`attncap.decoding` uses, so any ONNX runtime can
  run greedy or beam search with its own loop: ``encode.onnx`` (encoder features -> projected
  regions, attention keys and the initial state) and ``step.onnx`` (one word step). Both have a
  dynamic batch axis. The CNN that makes the features is not part of the graphs (unless it is a
  trainable one, then ``encode.onnx`` takes pixels): the ``encoder`` entry of ``config.json`` and
  ``onnx.json`` names it, with its input size and grid.

Folders are built beside their final name and swapped into place, so a failed export leaves
nothing half-written. Every export holds ``attncap-export.json``; an existing output folder is
replaced only when it is such an earlier export (or empty): a user's own folder is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .checkpoint import load_model
from .config import RunConfig
from .errors import AttncapError, require
from .files import atomic_folder, read_json, write_json
from .model import Captioner, Memory, State
from .vocab import Vocab
from .hub import write_hub_files
from .predict import ENCODER_WEIGHTS, Predictor, resolve_model_dir

OPSET = 18
MARKER = "attncap-export.json"      # in every export: what made it (and that it may be replaced)
OLD_CARD = "# attncap captioning model"  # how the card of an export made before the marker begins


def _copy_model_files(source: Path, dest: Path,
                      names: tuple[str, ...] = ("model.safetensors", "config.json", "vocab.json")) -> None:
    """The checkpoint's weights, config and vocabulary (already validated by loading them)."""
    for name in names:
        shutil.copyfile(source / name, dest / name)
        os.chmod(dest / name, 0o644)


def export_folder(source: str | Path, out: str | Path) -> Path:
    """Write a self-contained model folder that :func:`attncap.load` reads back.

    ``source``: a run directory, a checkpoint folder or another export. The frozen encoder's weights
    are included, so loading needs neither the encoder's package nor a download.
    """
    return _model_folder(source, out, "folder")


def export_hub(source: str | Path, out: str | Path) -> Path:
    """Write a Hugging Face model repository: the ``folder`` export, a card with the Hub's YAML
    front matter, the training config and commands (see :mod:`attncap.hub`)."""
    return _model_folder(source, out, "hub")


def _model_folder(source: str | Path, out: str | Path, fmt: str) -> Path:
    model_dir = resolve_model_dir(source)
    check_output(out, model_dir)
    predictor = Predictor(model_dir, device="cpu")
    out = Path(out)
    with atomic_folder(out) as tmp:
        _copy_model_files(model_dir, tmp)
        if predictor.encoder is not None:
            weights = {k: v.detach().cpu().contiguous() for k, v in predictor.encoder.state_dict().items()}
            save_file(weights, str(tmp / ENCODER_WEIGHTS))
            os.chmod(tmp / ENCODER_WEIGHTS, 0o644)
        card = model_card(predictor, _scores(Path(source)))
        if fmt == "hub":
            card = write_hub_files(tmp, Path(source), predictor, card)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _mark(tmp, fmt, model_dir)
    return out


def _scores(source: Path) -> dict | None:
    """The run's test scores when ``source`` is a run directory that was evaluated."""
    path = source / "eval" / "scores.json"
    return read_json(path, "scores") if path.is_file() else None


def model_card(predictor: Predictor, scores: dict | None) -> str:
    """A short README for the exported folder: what the model is, how to load it, its limits."""
    info, cfg, d = predictor.describe(), predictor.cfg, predictor.cfg.data
    data = (f"the built-in shapes world ({d.train_images} training images, seed {d.seed})"
            if d.dataset == "shapes" else f"COCO-format captions from {d.captions or 'a user dataset'}")
    score_lines = "\n".join(f"| {k} | {v} |" for k, v in (scores or {}).items())
    scores_text = (f"Test split scores (beam {cfg.decode.beam_size}):\n\n| metric | value |\n|---|---|\n"
                   f"{score_lines}\n" if scores else "No evaluation scores were recorded for this run.\n")
    encoder = info["encoder"] + (" plus colour histograms" if info["colour_stats"] else "")
    return f"""# attncap captioning model

A Show, Attend and Tell captioner exported by attncap: {encoder} features on a
{info['grid']}x{info['grid']} grid, a {info['decoder'].upper()} decoder (hidden size {info['hidden_dim']})
with attention, and a vocabulary of {info['vocab_size']} words.

Trained on {data}. It can only describe what such data contains; on other pictures its
captions are fluent guesses, not descriptions.

## Use

```python
import attncap

captioner = attncap.load("path/to/this/folder")
best = captioner("picture.jpg", beam={cfg.decode.beam_size})
print(best.text, best.score)   # best.attention: one (g, g) map per word
best.plot("attention.png"); best.gif("attention.gif")
```

or `attncap serve THIS_FOLDER` for the web page and HTTP API.

## Files

| file | what |
|---|---|
| model.safetensors | decoder weights (projection, attention, recurrent cell, output layers) |
| encoder.safetensors | frozen image encoder weights (a trainable encoder is in model.safetensors) |
| config.json | the run config, vocabulary size, feature size and encoder description |
| vocab.json | the word list; a word's id is its position |

Everything is safetensors or JSON: loading runs no code from the files.

{scores_text}"""


# --- ONNX ----------------------------------------------------------------------------------------

class _EncodeGraph(nn.Module):
    """features (B, R, D) -> regions (B, R, P), keys (B, R, A), h (B, H), c (B, H) or (B, 0)."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor):
        memory = self.model.encode(features)
        state = self.model.init_state(memory)
        # Unprojected regions (model.project_regions false) are the input itself, and an output
        # that is an input would lose one of the names.
        return memory.regions.clone(), memory.keys, state.h, state.c


class _StepGraph(nn.Module):
    """words (B,), h, c, regions, keys -> log_probs (B, V), alpha (B, R), h_next, c_next."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, words, h, c, regions, keys):
        log_probs, alpha, state = self.model.step(Memory(regions, keys), State(h, c), words)
        # A GRU passes c through unchanged; an output that is an input would lose one of the names.
        return log_probs, alpha, state.h, state.c.clone()


STEP_INPUTS = ["words", "h", "c", "regions", "keys"]
STEP_OUTPUTS = ["log_probs", "alpha", "h_next", "c_next"]
ENCODE_OUTPUTS = ["regions", "keys", "h", "c"]


def _example_input(model: Captioner, info: dict, batch: int) -> tuple[str, torch.Tensor]:
    """What encode.onnx takes: cached features, or uint8 pixels when the encoder is trainable."""
    if info["trainable"]:
        size = info["image_size"]
        return "pixels", torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    grid = info["grid"]
    return "features", torch.rand(batch, grid * grid, model.feature_dim) * 4  # (B, R, D)


def _export_graph(module: nn.Module, args: tuple, names: list[str], outputs: list[str],
                  path: Path) -> None:
    """torch.onnx.export (the torch.export based exporter) with every input's first axis dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple({0: batch} for _ in names)  # by position: input names need not match forward()'s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis renaming and deprecations
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False,
                          external_data=False, optimize=False)  # ONNX Runtime optimises on load


def export_onnx(source: str | Path, out: str | Path) -> Path:
    """Write ``encode.onnx``, ``step.onnx``, ``onnx.json`` (the interface), ``config.json``,
    ``vocab.json`` and ``README.md`` into ``out``. Needs the ``onnx`` extra (torch's exporter
    writes the graphs with onnx and onnxscript)."""
    require("onnx", "attncap export --format onnx")
    model_dir = resolve_model_dir(source)
    check_output(out, model_dir)
    model, vocab, cfg, info = load_model(model_dir, "cpu")  # the frozen CNN is not exported
    out = Path(out)
    name, example = _example_input(model, info, batch=2)
    with atomic_folder(out) as tmp, torch.no_grad():
        _export_graph(_EncodeGraph(model), (example,), [name], ENCODE_OUTPUTS, tmp / "encode.onnx")
        memory = model.encode(example)
        state = model.init_state(memory)
        words = torch.full((2,), vocab.start, dtype=torch.long)
        _export_graph(_StepGraph(model), (words, state.h, state.c, *memory), STEP_INPUTS,
                      STEP_OUTPUTS, tmp / "step.onnx")
        _copy_model_files(model_dir, tmp, ("config.json", "vocab.json"))  # the graphs hold the weights
        interface = onnx_interface(vocab, cfg, info, name)
        write_json(tmp / "onnx.json", interface)
        (tmp / "README.md").write_text(_onnx_card(interface), encoding="utf-8")
        _mark(tmp, "onnx", model_dir)
    return out


def onnx_interface(vocab: Vocab, cfg: RunConfig, info: dict, input_name: str) -> dict:
    """What a runtime needs to drive the two graphs: names, shapes, special ids and decoding defaults."""
    d = cfg.decode
    return {
        "encode": {"inputs": {input_name: "float32 (B, R, D)" if input_name == "features"
                              else "uint8 (B, 3, S, S)"},
                   "outputs": {"regions": "(B, R, P)", "keys": "(B, R, A)", "h": "(B, H)",
                               "c": "(B, H) for an LSTM, (B, 0) for a GRU"}},
        "step": {"inputs": {"words": "int64 (B,) previous word ids, <start> first", "h": "(B, H)",
                            "c": "(B, H) or (B, 0)", "regions": "(B, R, P)", "keys": "(B, R, A)"},
                 "outputs": {"log_probs": "(B, V) log-probabilities of the next word",
                             "alpha": "(B, R) attention over the regions",
                             "h_next": "(B, H)", "c_next": "(B, H) or (B, 0)"}},
        "special_ids": {"pad": vocab.pad, "start": vocab.start, "end": vocab.end, "unk": vocab.unk},
        "mask_before_choosing": ["pad", "start"],
        "mask_end_before_min_len": "end is impossible until a caption has decode.min_len words",
        "mask_unk": not d.allow_unk,  # decode.allow_unk false: unk is masked like pad and start
        "block_trigrams": ("when decode.block_trigrams: mask every word that would complete a trigram "
                           "already in the caption (the third word of each earlier trigram whose first "
                           "two words are the caption's last two)"),
        "decode": {"beam_size": d.beam_size, "max_len": d.max_len, "min_len": d.min_len,
                   "length_penalty": d.length_penalty, "allow_unk": d.allow_unk,
                   "block_trigrams": d.block_trigrams},
        "encoder": {k: info[k] for k in ("name", "image_size", "grid", "dim", "trainable", "precision")
                    if k in info},
        "opset": OPSET,
    }


def _onnx_card(interface: dict) -> str:
    spec = json.dumps(interface["special_ids"])
    return f"""# attncap captioning model (ONNX)

`encode.onnx` turns encoder features into the decoder's memory and initial state; `step.onnx`
advances every caption of a batch by one word. Greedy decoding:

1. `regions, keys, h, c = encode(features)`; `words = [start] * B`
2. repeat up to `max_len`: `log_probs, alpha, h, c = step(words, h, c, regions, keys)`; set the
   `pad` and `start` columns of `log_probs` to -inf (and `end` too while a caption has fewer than
   `decode.min_len` words); `words = argmax(log_probs)`; stop a caption at `end`.

attncap's own decoding also masks `unk` unless `decode.allow_unk` (`mask_unk` in `onnx.json`:
{str(interface['mask_unk']).lower()}) and, with `decode.block_trigrams` (here
{str(interface['decode']['block_trigrams']).lower()}), every word that would repeat a trigram of
the caption: the third word of each earlier trigram whose first two words are the last two written.

Beam search keeps K rows per image and reorders `h`, `c`, `regions`, `keys` by the surviving
beams. Special ids: {spec}. `vocab.json` maps ids to words, `onnx.json` lists every input and
output, `config.json` names the image encoder ({interface['encoder']['name']}) whose features the
graphs expect.
"""


FORMATS: dict[str, Callable[[str | Path, str | Path], Path]] = {"folder": export_folder,
                                                               "hub": export_hub,
                                                               "onnx": export_onnx}


def check_output(out: str | Path, model_dir: Path) -> None:
    """Refuse an output that is not ours to replace: a file, or a non-empty folder that is not an
    earlier export (``--out ~/models`` or ``--out RUN`` must never lose what is there)."""
    out = Path(out)
    if out.resolve() == model_dir.resolve() or out.resolve() in model_dir.resolve().parents:
        raise AttncapError(f"export output {out} holds the model being exported; choose another folder")
    if out.is_file() or out.is_symlink():
        raise AttncapError(f"export output {out} is a file; --out takes a folder (new, empty, or an "
                           "earlier attncap export)")
    if out.is_dir() and any(out.iterdir()) and not _is_export(out):
        raise AttncapError(f"export output {out} is a folder with other files in it and not an attncap "
                           "export; refusing to replace it: choose a new or empty folder")


def _is_export(folder: Path) -> bool:
    if (folder / MARKER).is_file():
        return True
    card = folder / "README.md"
    return card.is_file() and card.read_text(encoding="utf-8", errors="replace").startswith(OLD_CARD)


def export_model(source: str | Path, out: str | Path, fmt: str) -> Path:
    """Export ``source`` (run directory, checkpoint or model folder) to ``out`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise AttncapError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt](source, out)


def _mark(folder: Path, fmt: str, source: Path) -> None:
    write_json(folder / MARKER, {"format": fmt, "attncap": __version__, "source": str(source)})
