"""An exponential moving average of the weights (Polyak averaging), for the training phases.

With a decay ``d`` > 0 (``train.ema``, ``scst.ema``) the average starts as the weights after the
first step and then follows ``avg = d * avg + (1 - d) * weights`` after every step (torch's
:class:`~torch.optim.swa_utils.AveragedModel` with its EMA update). Validation, early stopping and
both checkpoints' ``model.safetensors`` use the average: it is what ``evaluate``, ``caption``,
``serve`` and ``export`` read. The weights the optimizer steps ("live") travel in ``state.pt`` of
the latest checkpoint with the number of steps averaged, so a resumed run continues both exactly.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """A moving average of ``model``'s weights with ``decay``; None when ``decay`` is 0 (off)."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def average_state(average: AveragedModel | None, model: torch.nn.Module) -> dict:
    """What ``state.pt`` needs to resume the average: the live weights and the steps averaged."""
    if average is None:
        return {}
    return {"live_weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "averaged_steps": int(average.n_averaged)}


def restore_average(average: AveragedModel | None, model: torch.nn.Module, saved: dict) -> None:
    """``model`` holds the checkpoint's averaged weights: copy them into ``average`` and put the
    saved live weights back into ``model``. (A resume that changes the decay is refused before.)"""
    if average is None:
        return
    average.module.load_state_dict(model.state_dict())
    average.n_averaged.fill_(int(saved["averaged_steps"]))
    model.load_state_dict(saved["live_weights"])
