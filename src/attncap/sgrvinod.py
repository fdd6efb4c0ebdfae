"""Import sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning checkpoint as an attncap model folder.

That repository's ``utils.save_checkpoint`` pickles whole objects (``models.Encoder``,
``models.DecoderWithAttention``, optimizers) with ``torch.save``. Unpickling such a file normally
imports and runs the classes it names. Here it is read by :class:`RestrictedUnpickler`: tensors
and storages are rebuilt by torch's own functions, every module or optimizer it names becomes an
inert :class:`StandIn` that only records its state, and any other global (``os.system``,
``builtins.eval``...) stops the import with one line before anything runs. Both ``torch.save``
formats are read (the zip default and the legacy one of old torch versions) through
``torch.load(pickle_module=...)``, which leaves every ``find_class`` to this unpickler.

The weights are then moved into attncap's one model (:mod:`attncap.model` with the options that
reproduce that model, see :func:`model_config`) and its vocabulary order
(``<pad> <start> <end> <unk>`` first: the embedding and output rows are permuted, which is exact).
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import config as config_lib
from .config import DecodeConfig, ModelConfig, RunConfig
from .encoders import build_encoder
from .errors import AttncapError
from .files import atomic_folder, read_json, write_json
from .model import Captioner
from .vocab import END, PAD, SPECIALS, START, UNK, Vocab

# What sgrvinod's decoder is, as options of attncap's model (dimensions come from the weights).
SGRVINOD_MODEL = dict(decoder="lstm", project_regions=False, attention_score="relu", gate=True,
                      gate_vector=True, output_layers=1, init_from_features=True,
                      init_activation="none")
MODEL_CLASSES = frozenset({"models.Encoder", "models.DecoderWithAttention", "models.Attention"})
# Module prefixes whose classes may appear (as inert stand-ins): the torch.nn layers the models
# hold, torchvision's ResNet blocks, and the optimizers saved beside them.
STAND_IN_PREFIXES = ("torch.nn.modules.", "torchvision.models.resnet", "torch.optim.")
# Callables the pickle may invoke: torch's own tensor rebuilders and plain containers.
REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,  # how old torch versions rebuilt one
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    # old torch: every module held ``_backend = torch.nn.backends.thnn._get_thnn_function_backend()``
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): lambda: None,
}


class StandIn:
    """A pickled module or optimizer, never built: ``state`` is what its ``__setstate__`` got."""

    path = ""  # the class it stands in for, "models.DecoderWithAttention"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.path}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds tensors and module state only and refuses every other global."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 writes Python 2 names (__builtin__.set); pickle's own find_class maps them back
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        path = f"{module}.{name}"
        if (module, name) in REBUILDERS:
            return REBUILDERS[module, name]
        if path in MODEL_CLASSES or (module.startswith(STAND_IN_PREFIXES) and name[:1].isupper()):
            if path not in self._stand_ins:
                self._stand_ins[path] = type(name, (StandIn,), {"path": path})
            return self._stand_ins[path]
        raise AttncapError(f"refusing to import: the checkpoint names {path}, which is neither a "
                           "tensor nor part of sgrvinod's models; nothing from it was run")


class _RestrictedPickle:
    """What ``torch.load(pickle_module=...)`` needs of a pickle module."""

    Unpickler = RestrictedUnpickler
    __name__ = "attncap.sgrvinod"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict, modules as :class:`StandIn` objects, tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise AttncapError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy files: "source code of class ... has changed"
            data = torch.load(path, map_location="cpu", pickle_module=_RestrictedPickle,
                              weights_only=False)
    except AttncapError:
        raise
    except Exception as exc:  # unpickling raises many types for a file that is not a checkpoint
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise AttncapError(f"checkpoint {path} cannot be read as a torch.save file ({reason})") from None
    expected = {"encoder": "models.Encoder", "decoder": "models.DecoderWithAttention"}
    if not isinstance(data, dict) or any(getattr(data.get(k), "path", None) != v for k, v in expected.items()):
        raise AttncapError(f"checkpoint {path} is not sgrvinod's: expected a dict with 'encoder' "
                           "(models.Encoder) and 'decoder' (models.DecoderWithAttention)")
    return data


def module_state(module: StandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict the module would have had: parameters, persistent buffers, children's."""
    state = module.state if isinstance(getattr(module, "state", None), dict) else {}
    skip = state.get("_non_persistent_buffers_set", set())
    out = {prefix + k: v.detach() for k, v in state.get("_parameters", {}).items() if v is not None}
    out.update({prefix + k: v for k, v in state.get("_buffers", {}).items()
                if v is not None and k not in skip})
    for name, child in state.get("_modules", {}).items():
        if isinstance(child, StandIn):
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def vocab_order(word_map: dict) -> tuple[Vocab, list[int]]:
    """attncap's vocabulary and, for each of its ids, the id sgrvinod's model gives that word."""
    if not isinstance(word_map, dict) or not all(isinstance(i, int) for i in word_map.values()):
        raise AttncapError("the word map must be a JSON object {word: id}")
    missing = [w for w in SPECIALS if w not in word_map]
    if missing:
        raise AttncapError(f"the word map has no {', '.join(missing)}; is it a WORDMAP_*.json?")
    if sorted(word_map.values()) != list(range(len(word_map))):
        raise AttncapError(f"the word map's ids must be 0..{len(word_map) - 1}, each once")
    words = sorted((w for w in word_map if w not in SPECIALS), key=word_map.get)
    order = [word_map[w] for w in (PAD, START, END, UNK, *words)]
    return Vocab(SPECIALS + tuple(words)), order


def _get(weights: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in weights:
        raise AttncapError(f"the checkpoint's {where} has no {key}; is it sgrvinod's models.py?")
    return weights[key].float()


def model_config(decoder: dict[str, torch.Tensor], dropout: float) -> tuple[ModelConfig, int]:
    """attncap's options for the decoder's weights, and the region size D."""
    A, D = _get(decoder, "attention.encoder_att.weight", "decoder").shape
    H = _get(decoder, "decode_step.weight_hh", "decoder").shape[1]
    E = _get(decoder, "embedding.weight", "decoder").shape[1]
    cfg = ModelConfig(embed_dim=E, proj_dim=D, attention_dim=A, hidden_dim=H, dropout=dropout,
                      **SGRVINOD_MODEL)
    return cfg, D


def decoder_weights(decoder: dict[str, torch.Tensor], order: list[int], E: int) -> dict[str, torch.Tensor]:
    """sgrvinod's decoder state dict -> attncap's :class:`Captioner` state dict (ids in ``order``)."""
    g = lambda k: _get(decoder, k, "decoder")  # noqa: E731
    rows = torch.tensor(order)
    w_ih = g("decode_step.weight_ih")                          # (4H, E + D): [embedding; context]
    return {
        "embed.weight": g("embedding.weight")[rows],
        "attention.key.weight": g("attention.encoder_att.weight"),
        "attention.key.bias": g("attention.encoder_att.bias"),
        "attention.score.weight": g("attention.full_att.weight"),  # its bias cancels in the softmax
        "word_gates.weight": w_ih[:, :E], "word_gates.bias": g("decode_step.bias_ih"),
        "context_gates.weight": w_ih[:, E:],
        # one matmul on h: attention query (A), recurrent gates (4H), gate f_beta (D)
        "hidden.weight": torch.cat([g("attention.decoder_att.weight"), g("decode_step.weight_hh"),
                                    g("f_beta.weight")]),
        "hidden.bias": torch.cat([g("attention.decoder_att.bias"), g("decode_step.bias_hh"),
                                  g("f_beta.bias")]),
        "init_h.weight": g("init_h.weight"), "init_h.bias": g("init_h.bias"),
        "init_c.weight": g("init_c.weight"), "init_c.bias": g("init_c.bias"),
        "fc2.weight": g("fc.weight")[rows], "fc2.bias": g("fc.bias")[rows],
    }


def resnet_blocks(encoder: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Bottleneck blocks per ResNet stage (children 4..7 of ``resnet``): (3, 4, 23, 3) for ResNet-101."""
    counts = [1 + max((int(m.group(1)) for k in encoder if (m := re.match(rf"resnet\.{s}\.(\d+)\.", k))),
                      default=-1) for s in range(4, 8)]
    if min(counts) < 1:
        raise AttncapError("the checkpoint's encoder is not a ResNet trunk (resnet.4 .. resnet.7)")
    return tuple(counts)


def _attr(module: StandIn | None, name: str, default: Any) -> Any:
    """A plain attribute the pickled object had (``p`` of a Dropout), or ``default``."""
    state = getattr(module, "state", None)
    return state.get(name, default) if isinstance(state, dict) else default


def import_checkpoint(checkpoint: str | Path, word_map: str | Path, out: str | Path) -> Path:
    """Write an attncap model folder (``model.safetensors``, ``encoder.safetensors``, ``config.json``,
    ``vocab.json``, ``README.md``) from sgrvinod's checkpoint and its ``WORDMAP_*.json``."""
    from .export import MARKER, check_output

    check_output(out, Path(checkpoint))
    data = read_checkpoint(checkpoint)
    vocab, order = vocab_order(read_json(word_map, "word map"))
    decoder = module_state(data["decoder"])
    dropout = float(_attr(_attr(data["decoder"], "_modules", {}).get("dropout"), "p", 0.5))
    model_cfg, D = model_config(decoder, dropout)
    if (V := decoder["embedding.weight"].shape[0]) != len(vocab):
        raise AttncapError(f"the word map has {len(vocab)} words but the checkpoint's embedding {V}: "
                           "pass the WORDMAP_*.json the model was trained with")
    model = Captioner(model_cfg, len(vocab), D)
    _load(model, decoder_weights(decoder, order, model_cfg.embed_dim), "decoder")
    encoder_weights = {f"backbone.{k}": v for k, v in module_state(data["encoder"]).items()}
    blocks = resnet_blocks(module_state(data["encoder"]))
    encoder = build_encoder("resnet101_sgrvinod", pretrained=False, blocks=blocks)
    for key, value in encoder.state_dict().items():  # torch 0.4.0 batch norms did not count batches
        if key.endswith("num_batches_tracked"):
            encoder_weights.setdefault(key, torch.zeros_like(value))
    if (grid := _attr(data["encoder"], "enc_image_size", 14)) != encoder.spec.grid:
        raise AttncapError(f"the checkpoint's encoder pools to {grid}x{grid}; only 14x14 is supported")
    _load(encoder, encoder_weights, "encoder")
    s = encoder.spec
    if D != s.dim:
        raise AttncapError(f"the checkpoint's decoder reads {D}-d regions, its ResNet makes {s.dim}")
    info = {"name": s.name, "image_size": s.image_size, "grid": s.grid, "dim": s.dim, "trainable": False,
            "pretrained": True, "precision": "fp32", "colour_stats": False, "blocks": list(blocks)}
    cfg = RunConfig(encoder=config_lib.EncoderConfig(name=s.name, precision="fp32"), model=model_cfg,
                    decode=DecodeConfig(beam_size=3, max_len=50))  # its caption.py: beam 3, 50 steps
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()},
                  str(tmp / "encoder.safetensors"))
        write_json(tmp / "config.json", {"run": config_lib.to_dict(cfg), "vocab_size": len(vocab),
                                         "feature_dim": D, "encoder": info})
        vocab.save(tmp / "vocab.json")
        (tmp / "README.md").write_text(_card(data, model_cfg, blocks, len(vocab)), encoding="utf-8")
        write_json(tmp / MARKER, {"format": "sgrvinod", "source": os.path.abspath(checkpoint)})
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
    return out


def _load(module: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise AttncapError(f"the checkpoint's {what} weights do not fit sgrvinod's architecture "
                           f"({reason})") from None


def _card(data: dict, cfg: ModelConfig, blocks: tuple[int, ...], vocab_size: int) -> str:
    bleu = data.get("bleu-4")
    scored = f" Its validation BLEU-4 when saved: {bleu:.4f}." if isinstance(bleu, (int, float)) else ""
    return f"""# attncap captioning model (imported)

sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning model, imported by `attncap import sgrvinod`:
a fine-tuned ResNet (blocks {list(blocks)}) pooled to 14x14x2048 regions at 256 px, attention
{cfg.attention_dim}, LSTM {cfg.hidden_dim}, embedding {cfg.embed_dim}, {vocab_size} words.{scored}

Use it like any attncap model: `attncap caption IMAGE --run THIS_FOLDER`, `attncap serve THIS_FOLDER`,
`attncap export THIS_FOLDER --format onnx --out DIR`, or `attncap.load("THIS_FOLDER")` in Python.
Everything here is safetensors or JSON: loading runs no code from the files.
"""
