import dataclasses
import json
import math
from pathlib import Path

import pytest

from attncap import config as config_lib
from attncap.cli import main
from attncap.config import DecodeConfig, EncoderConfig, ModelConfig, RunConfig, TrainConfig
from attncap.errors import AttncapError


def test_overrides_are_typed_and_checked():
    cfg = config_lib.merge(RunConfig(), config_lib.parse_overrides(
        ["train.epochs=7", "train.lr=5e-4", "encoder.pretrained=false", "model.decoder=lstm"]),
        from_text=True)
    assert (cfg.train.epochs, cfg.train.lr, cfg.encoder.pretrained, cfg.model.decoder) == (7, 5e-4, False, "lstm")
    assert RunConfig().train.epochs != 7  # defaults are untouched (frozen dataclasses)
    with pytest.raises(AttncapError, match="unknown setting train.epoch"):
        config_lib.merge(RunConfig(), {"train": {"epoch": "3"}}, from_text=True)
    with pytest.raises(AttncapError, match="train.epochs must be an integer"):
        config_lib.merge(RunConfig(), {"train": {"epochs": "many"}}, from_text=True)
    with pytest.raises(AttncapError, match="unknown section"):
        config_lib.merge(RunConfig(), {"trian": {"epochs": 1}})
    with pytest.raises(AttncapError, match="section.key=value"):
        config_lib.parse_overrides(["epochs=3"])


def test_toml_file_types_checked(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[train]\nepochs = 3\nlr = 1\n[model]\ndecoder = "lstm"\n')
    cfg = config_lib.load(good)
    assert cfg.train.epochs == 3 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nepochs = "3"\n')
    with pytest.raises(AttncapError, match="train.epochs must be an integer"):
        config_lib.load(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(AttncapError, match="broken.toml"):
        config_lib.load(broken)


def test_dict_round_trip():
    cfg = config_lib.merge(RunConfig(), {"decode": {"beam_size": 5}})
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_cli_rejects_unknown_options_and_bad_overrides(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochz", "3"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "three"])
    assert main(["prepare", "--run", str(tmp_path), "--set", "data.top_k=-"]) == 2
    assert "data.top_k must be an integer" in capsys.readouterr().err


# Values that crashed with a traceback (some only after an epoch of training) or were silently
# nonsense before every setting had its rule (issue 10), with the allowed range the error must give.
KNOWN_BAD = {
    "train.log_every=0": "an integer from 1 to",
    "train.batch_size=0": "an integer from 1 to",
    "decode.eval_batch_size=0": "an integer from 1 to",
    "decode.max_len=0": "an integer from 1 to",
    "encoder.batch_size=0": "an integer from 1 to",
    "model.dropout=1.5": "a number >= 0 and < 1",
    "train.lr=nan": "a number > 0 and <= 1",
    "train.grad_clip=inf": "a finite number >= 0",
    "train.min_lr_ratio=1.5": "a number from 0 to 1",
    "data.seed=-1": "an integer from 0 to 4294967295",
    "decode.beam_size=1000": "an integer from 1 to 50",
    "decode.min_len=0": "an integer from 1 to",
    "data.shapes_image_size=100000": "an integer from 64 to",
    "encoder.name=vgg16": "one of inception_v3, efficientnet_lite0, resnet101, small_cnn",
    "model.decoder=transformer": "one of gru, lstm",
    "train.precision=fp16": "one of fp32, bf16, auto",
    "encoder.precision=fp8": "one of fp32, bf16, auto",
    "data.dataset=flickr": "one of shapes, coco",
    "encoder.pretrained=": "true or false",
    "decode.n_best=5": "<= decode.beam_size (3)",
    "decode.min_len=31": "<= decode.max_len (30)",
}


@pytest.mark.parametrize("pair, allowed", KNOWN_BAD.items())
def test_known_bad_values_are_one_line_errors_naming_key_value_and_range(pair, allowed):
    key, _, value = pair.partition("=")
    with pytest.raises(AttncapError) as exc:
        config_lib.merge(RunConfig(), config_lib.parse_overrides([pair]), "command line", from_text=True)
    message = str(exc.value)
    assert message.startswith(f"command line: {key} must be {allowed}") and "\n" not in message
    assert message.endswith((f", got {value}", f", got {value!r}"))  # the bad value, as parsed


def test_python_api_is_checked_too_and_floats_stay_floats():
    for make, text in [(lambda: TrainConfig(batch_size=0), "train.batch_size must be an integer from 1"),
                       (lambda: ModelConfig(dropout=1.5), "model.dropout must be a number >= 0 and < 1"),
                       (lambda: DecodeConfig(beam_size=2, n_best=3), "decode.n_best must be <= decode.beam_size"),
                       (lambda: TrainConfig(epochs=True), "train.epochs must be an integer"),
                       (lambda: TrainConfig(lr="1e-3"), "train.lr must be a number"),
                       (lambda: EncoderConfig(pretrained=1), "encoder.pretrained must be true or false")]:
        with pytest.raises(AttncapError, match=text):
            make()
    assert isinstance(TrainConfig(lr=1).lr, float) and DecodeConfig(beam_size=5, n_best=5).n_best == 5


def test_zero_means_off_or_all_where_documented():
    zeros = {"data": ["num_examples"], "encoder": ["workers"], "model": ["dropout", "alpha_c"],
             "train": ["captions_per_image", "max_minutes", "threads", "weight_decay", "grad_clip",
                       "patience", "warmup_steps", "seed", "min_lr_ratio"],
             "decode": ["length_penalty"]}
    cfg = config_lib.merge(RunConfig(), {s: {k: "0" for k in keys} for s, keys in zeros.items()},
                           from_text=True)
    assert cfg.train.patience == 0 and cfg.train.grad_clip == 0.0 and cfg.data.num_examples == 0
    assert config_lib.check({"data": {"captions": "", "images": "", "splits": ""}}) is None  # "" = unset


def test_every_setting_has_a_rule_and_numbers_have_both_ends():
    for section, klass in config_lib.SECTIONS.items():
        for f in dataclasses.fields(klass):
            rule, kind = f.metadata["rule"], config_lib.field_kind(f)
            assert rule.accepts(f.default, kind), f"{section}.{f.name}: its default breaks its rule"
            if kind in (int, float):
                assert rule.lo is not None or rule.above is not None, f"{section}.{f.name} has no lower bound"
                assert not rule.accepts(-1, kind) and not rule.accepts(math.nan, float), f"{section}.{f.name}"
            if kind is int:
                assert rule.hi is not None, f"{section}.{f.name}: an integer needs an upper bound"


def test_encoder_and_decoder_choices_match_the_registries():
    from attncap.encoders import ENCODERS
    from attncap.model import DECODERS

    assert config_lib.ENCODER_NAMES == tuple(ENCODERS) and config_lib.DECODER_NAMES == tuple(DECODERS)


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"train"', "null", '{"train": 5}', '{"train": [1]}'])
def test_json_file_whose_top_level_or_section_is_not_a_table(tmp_path, text):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(AttncapError, match="must be a table of") as exc:
        config_lib.load(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    binary = tmp_path / "c.toml"
    binary.write_bytes(b"\xff\xfe[train]\n")
    with pytest.raises(AttncapError, match="cannot be parsed"):
        config_lib.load(binary)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({"train": {"lr": math.nan}}))
    with pytest.raises(AttncapError, match="train.lr must be a number > 0 and <= 1, got nan"):
        config_lib.load(nan)
    huge = tmp_path / "huge.json"
    huge.write_text('{"train": {"lr": 1%s}}' % ("0" * 400))
    with pytest.raises(AttncapError, match="train.lr must be a number > 0 and <= 1, got 1000"):
        config_lib.load(huge)


def test_shipped_config_files_and_the_demo_preset_are_valid(tmp_path):
    from attncap.pipeline import demo_config

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.toml")):
        config_lib.load(path)
    demo = demo_config(tmp_path / "new")
    assert demo.train.patience == 6 and demo.encoder.precision == "fp32" and not (tmp_path / "new").exists()
    assert demo.model.attention_dim == 256 and config_lib.RunConfig().model.attention_dim == 512  # the seed's
