"""Every key of every config section set to bad values, through --set and through config files.

The keys come from the dataclasses themselves, so a new setting is swept as soon as it exists.
Whether a value is allowed comes from the rules (``config.check``); an allowed value must load,
a rejected one must end the CLI with status 2, one ``error:`` line naming the key, no traceback
and no run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from attncap import config as config_lib
from attncap.cli import main
from attncap.pipeline import run_config

HUGE = 10**12
KEYS = [(section, f.name, config_lib.field_kind(f))
        for section, klass in config_lib.SECTIONS.items() for f in dataclasses.fields(klass)]


def text_values(kind: type) -> list[str]:
    """What a user might type after ``--set key=``: 0, -1, huge, the wrong type, nothing."""
    wrong = {int: "2.5", float: "abc", bool: "maybe", str: "no-such-choice"}[kind]
    return ["0", "-1", str(HUGE), wrong, ""] + (["nan", "inf", "-inf"] if kind is float else [])


def file_values(kind: type) -> list:
    """The same in a config file, where values carry a type: a wrong one looks almost right."""
    wrong = {int: "3", float: "0.5", bool: "true", str: ["a"]}[kind]
    return [0, -1, HUGE, wrong, ""] + ([math.nan, math.inf] if kind is float else [])


def toml_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return json.dumps(value)  # ints, strings and lists of strings are spelled alike in TOML


def write_config(path, section: str, key: str, value):
    if path.suffix == ".json":
        path.write_text(json.dumps({section: {key: value}}))
    else:
        path.write_text(f"[{section}]\n{key} = {toml_value(value)}\n")
    return path


def assert_rejected(capsys, argv: list[str], run, key: str, problem: str, source: str) -> None:
    """Status 2, one line ``error: SOURCE: PROBLEM`` naming the key, no traceback, no run folder."""
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2 and len(lines) == 1, (argv, captured.err)
    assert lines[0] == f"error: {source}: {problem.removeprefix('config: ')}", argv
    assert key in lines[0] and "Traceback" not in captured.err + captured.out
    assert not run.exists(), f"{argv} created {run}"


@pytest.mark.parametrize("section, key, kind", KEYS, ids=[f"{s}.{k}" for s, k, _ in KEYS])
def test_bad_values_are_one_line_errors_or_accepted_by_the_rules(section, key, kind, tmp_path, capsys):
    run, name = tmp_path / "new", f"{section}.{key}"
    rejected = 0
    for value in text_values(kind):
        problem = config_lib.check({section: {key: value}}, from_text=True)
        if problem is None:
            cfg = run_config(run, None, {section: {key: value}})
            assert getattr(getattr(cfg, section), key) == config_lib._parse(value, kind) and not run.exists()
        else:
            rejected += 1
            assert_rejected(capsys, ["prepare", "--run", str(run), "--quiet", "--set", f"{name}={value}"],
                            run, name, problem, "command line")
    for n, value in enumerate(file_values(kind)):
        problem = config_lib.check({section: {key: value}})
        for suffix in (".toml", ".json"):
            path = write_config(tmp_path / f"c{n}{suffix}", section, key, value)
            if problem is None:
                assert run_config(run, str(path)) is not None and not run.exists()
            else:
                rejected += 1
                assert_rejected(capsys, ["prepare", "--run", str(run), "--quiet", "--config", str(path)],
                                run, name, problem, str(path))
    assert rejected >= 2 + 2 * (kind is not str), f"{name}: its rule lets almost anything through"


@pytest.mark.parametrize("text", ["[1, 2]", "42", '"train"', '{"train": 3}'])
def test_config_file_that_is_not_a_table_of_tables(text, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(text)
    run = tmp_path / "new"
    assert main(["prepare", "--run", str(run), "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and "must be a table of" in lines[0]
    assert not run.exists()


def test_real_entry_point_prints_no_traceback(tmp_path):
    """A few bad settings through ``python -m attncap.cli``, run side by side."""
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    dropout = write_config(tmp_path / "d.toml", "model", "dropout", 1.5)
    cases = {"a": (["prepare", "--set", "train.batch_size=0"], "train.batch_size"),
             "b": (["train", "--set", "decode.max_len=0"], "decode.max_len"),
             "c": (["features", "--config", str(listed)], "must be a table of"),
             "d": (["demo", "--config", str(dropout)], "model.dropout")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "attncap.cli", *argv, "--run", str(tmp_path / name)],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "Traceback" not in out + err, (name, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, err)
        assert not (tmp_path / name).exists()
