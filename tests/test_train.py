import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from attncap.checkpoint import load_model, load_state
from attncap.encoders import build_encoder
from attncap.errors import AttncapError
from attncap.images import load_image
from attncap.pipeline import features_stage
from attncap.predict import Predictor
from attncap.train import train
from conftest import tiny_config


def weights(run, name="latest"):
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


def test_training_learns_logs_and_checkpoints(run_copy):
    cfg = tiny_config(train={"epochs": 3})
    state = train(run_copy, cfg, progress=False)
    assert state.epoch == 3 and state.step > 0
    records = [json.loads(l) for l in (run_copy / "train" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all({"val_loss", "val_CIDEr", "lr"} <= r.keys() for r in epochs)
    assert any((run_copy / "train" / "tb").glob("events.out.tfevents.*"))
    saved = load_state(run_copy / "checkpoints" / "latest")
    assert json.loads(saved["train_state"])["epoch"] == 3
    assert (run_copy / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("decoder", ["gru", "lstm"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(prepared_run, tmp_path, decoder):
    model_cfg = {"decoder": decoder}
    if decoder == "lstm":
        model_cfg.update(init_from_features=True, gate=True, dropout=0.3, alpha_c=1.0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        shutil.copytree(prepared_run, d)
    train(straight, tiny_config(train={"epochs": 3}, model=model_cfg), progress=False)
    train(split, tiny_config(train={"epochs": 3, "max_minutes": 1e-9}, model=model_cfg), progress=False)
    assert json.loads(load_state(split / "checkpoints" / "latest")["train_state"])["epoch"] == 1
    state = train(split, tiny_config(train={"epochs": 3}, model=model_cfg), progress=False)
    assert state.epoch == 3
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    logged = lambda run: [json.loads(l) for l in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
    assert strip(logged(straight)) == strip(logged(split))


def test_checkpoint_round_trip_and_corruption(run_copy):
    train(run_copy, tiny_config(train={"epochs": 1}), progress=False)
    ckpt = run_copy / "checkpoints" / "best"
    model, vocab, cfg, encoder = load_model(ckpt)
    again, _, _, _ = load_model(ckpt)
    feats = torch.randn(2, 49, encoder["dim"])
    inputs = torch.randint(1, len(vocab), (2, 6))
    torch.testing.assert_close(model(feats, inputs).logits, again(feats, inputs).logits, atol=1e-6, rtol=0)
    assert cfg.model.hidden_dim == 48 and encoder["name"] == "efficientnet_lite0"
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AttncapError, match="model.safetensors"):
        load_model(ckpt)
    (ckpt / "config.json").write_text('{"run": {}}')
    with pytest.raises(AttncapError, match="config.json"):
        load_model(ckpt)
    (run_copy / "checkpoints" / "latest" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(AttncapError, match="state.pt"):
        load_state(run_copy / "checkpoints" / "latest")


def test_small_cnn_trains_end_to_end_and_captions(prepared_run, tmp_path):
    run = tmp_path / "cnn"
    shutil.copytree(prepared_run / "data", run / "data")
    cfg = tiny_config(encoder={"name": "small_cnn"}, train={"epochs": 2})
    features_stage(run, cfg, progress=False)
    assert (run / "features" / "train.npy").stat().st_size > 48 * 3 * 128 * 128  # pixels, not features
    train(run, cfg, progress=False)
    first = weights(run)["encoder.body.0.weight"]
    init = build_encoder("small_cnn").body[0].weight.detach()  # seeded: the model's starting point
    assert not torch.allclose(first, init)  # the CNN was trained with the decoder
    predictor = Predictor.from_run(run)
    image = load_image(json.loads((run / "data" / "test.json").read_text())["images"][0]["file"])
    preds = predictor.caption([image], beam_size=2, n_best=2)[0]
    assert len(preds) == 2 and preds[0].score >= preds[1].score
    assert preds[0].attention.shape == (len(preds[0].words), 8, 8)


def test_resuming_with_another_model_is_a_clear_error(run_copy):
    train(run_copy, tiny_config(train={"epochs": 1}), progress=False)
    with pytest.raises(AttncapError, match="--no-resume"):
        train(run_copy, tiny_config(train={"epochs": 2}, model={"hidden_dim": 40}), progress=False)
    state = train(run_copy, tiny_config(train={"epochs": 1}, model={"hidden_dim": 40}), resume=False,
                  progress=False)
    assert state.epoch == 1


def test_scheduled_sampling_probability_starts_rises_every_k_epochs_and_stops_at_its_maximum():
    from attncap.config import TrainConfig
    from attncap.train import sample_probability

    cfg = TrainConfig(ss_start=3, ss_every=2, ss_step=0.1, ss_max=0.25)
    assert [round(sample_probability(cfg, e), 6) for e in range(9)] == [0, 0, 0.1, 0.1, 0.2, 0.2, 0.25, 0.25, 0.25]
    assert all(sample_probability(TrainConfig(), e) == 0.0 for e in range(50))  # off by default


def test_resume_with_scheduled_sampling_and_label_smoothing_is_exact(prepared_run, tmp_path, monkeypatch):
    """Epoch 1 teacher-forces on the fast path; epochs 2 and 3 sample (rows step by step) and the
    sampling's random numbers come back with the checkpoint."""
    from attncap.model import Captioner

    calls, original = [], Captioner._scheduled

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)
    monkeypatch.setattr(Captioner, "_scheduled", counted)
    model = {"decoder": "lstm", "init_from_features": True, "dropout": 0.3, "alpha_c": 0.05}
    schedule = {"epochs": 3, "ss_start": 2, "ss_every": 1, "ss_step": 0.25, "ss_max": 0.5, "label_smoothing": 0.1}
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        shutil.copytree(prepared_run, d)
    train(straight, tiny_config(train=schedule, model=model), progress=False)
    assert calls
    calls.clear()
    train(split, tiny_config(train={**schedule, "max_minutes": 1e-9}, model=model), progress=False)
    assert calls == []  # ss off in epoch 1: only the fast teacher-forcing path ran
    train(split, tiny_config(train=schedule, model=model), progress=False)
    a, b = weights(straight), weights(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    logged = lambda run: [json.loads(l) for l in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
    assert strip(logged(straight)) == strip(logged(split))
    epochs = [r for r in logged(straight) if "epoch" in r]
    assert [r["ss_prob"] for r in epochs] == [0.0, 0.25, 0.5]
    assert all("train_penalty" in r for r in logged(straight))


def test_logged_train_loss_is_the_cross_entropy_and_the_penalty_is_logged_beside_it(prepared_run, tmp_path):
    runs = {}
    for alpha_c in (0.0, 1.0):
        runs[alpha_c] = tmp_path / f"alpha{alpha_c}"
        shutil.copytree(prepared_run, runs[alpha_c])
        train(runs[alpha_c], tiny_config(train={"epochs": 1, "log_every": 1}, model={"alpha_c": alpha_c}),
              progress=False)
    off, on = ([json.loads(l) for l in (runs[a] / "train" / "metrics.jsonl").read_text().splitlines()]
               for a in (0.0, 1.0))
    assert off[0]["step"] == on[0]["step"] == 1
    assert off[0]["train_loss"] == on[0]["train_loss"]  # same weights at step 1: the same cross-entropy
    assert "train_penalty" not in off[0] and on[0]["train_penalty"] > 1.0  # eq. 14: summed over 49 regions
    epoch = on[-1]  # train and val loss are one quantity (cross-entropy), the penalty is apart
    assert abs(epoch["train_loss"] - epoch["val_loss"]) < 0.5 and epoch["train_penalty"] > 5.0


def test_a_weight_average_is_validated_checkpointed_and_resumed_exactly(prepared_run, tmp_path, monkeypatch):
    """train.ema: the checkpoints hold the moving average of the live weights after each step (made
    here by hand), validation scored it, and a resumed run continues average and live weights."""
    import attncap.train as train_lib
    from attncap.train import evaluate, open_splits

    cfg = tiny_config(train={"epochs": 3, "ema": 0.7})
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        shutil.copytree(prepared_run, d)
    live, real = [], train_lib.train_step

    def recording(t, loaded):
        out = real(t, loaded)
        live.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
        return out
    monkeypatch.setattr(train_lib, "train_step", recording)
    train(straight, cfg, progress=False)
    monkeypatch.undo()
    average = dict(live[0])  # the weights after the first step, then 0.7 x average + 0.3 x weights
    for w in live[1:]:
        average = {k: 0.7 * average[k] + 0.3 * w[k] for k in average}
    saved = weights(straight)
    for k in saved:
        torch.testing.assert_close(saved[k], average[k], atol=1e-6, rtol=0)
    assert max(float((saved[k] - live[-1][k]).abs().max()) for k in saved) > 1e-4  # not the live weights
    state = load_state(straight / "checkpoints" / "latest")
    assert state["averaged_steps"] == len(live)
    assert all(torch.equal(state["live_weights"][k], live[-1][k]) for k in saved)

    logged = lambda run: [json.loads(l) for l in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in logged(straight) if "epoch" in r), key=lambda r: r["val_CIDEr"])
    model, vocab, _, _ = load_model(straight / "checkpoints" / "best")
    _, _, splits = open_splits(straight)
    score = evaluate(model, splits["val"], vocab, cfg, torch.device("cpu"))["val_CIDEr"]
    assert score == pytest.approx(best["val_CIDEr"], abs=1e-5)  # validation scored the average

    train(split, tiny_config(train={"epochs": 3, "ema": 0.7, "max_minutes": 1e-9}), progress=False)
    with pytest.raises(AttncapError, match="train.ema 0.7 -> 0.9"):  # other weights than it scored
        train(split, tiny_config(train={"epochs": 3, "ema": 0.9}), progress=False)
    train(split, cfg, progress=False)
    resumed, resumed_live = weights(split), load_state(split / "checkpoints" / "latest")["live_weights"]
    for k in saved:
        torch.testing.assert_close(resumed[k], saved[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed_live[k], live[-1][k], atol=1e-6, rtol=0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
    assert strip(logged(straight)) == strip(logged(split))
