import pytest

from attncap import config as config_lib
from attncap.cli import main
from attncap.config import RunConfig
from attncap.errors import AttncapError


def test_overrides_are_typed_and_checked():
    cfg = config_lib.merge(RunConfig(), config_lib.parse_overrides(
        ["train.epochs=7", "train.lr=5e-4", "encoder.pretrained=false", "model.decoder=lstm"]),
        from_text=True)
    assert (cfg.train.epochs, cfg.train.lr, cfg.encoder.pretrained, cfg.model.decoder) == (7, 5e-4, False, "lstm")
    assert RunConfig().train.epochs != 7  # defaults are untouched (frozen dataclasses)
    with pytest.raises(AttncapError, match="unknown setting train.epoch"):
        config_lib.merge(RunConfig(), {"train": {"epoch": "3"}}, from_text=True)
    with pytest.raises(AttncapError, match="train.epochs must be int"):
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
    with pytest.raises(AttncapError, match="train.epochs must be int"):
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
    assert "data.top_k must be int" in capsys.readouterr().err
