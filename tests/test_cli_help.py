"""`hrseg --help` and each subcommand's --help as a newcomer reads them: plain text, every
argument explained, option defaults shown, one example each (that parses); and `hrseg table`
on a folder that is not there says so in one line."""
import argparse
import shlex

import pytest

from hrseg import cli


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = sorted(_subparsers())


def test_top_level_help_is_plain_text_with_everyday_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "``" not in out and ":func:" not in out          # no reST markup
    assert out.splitlines()[2].startswith("hrseg: train 3D CT segmentation")
    assert "everyday commands:" in out and "hrseg run" in out
    assert max(len(line) for line in out.splitlines()) <= 100


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_help_has_an_example_that_parses(name):
    sub = _subparsers()[name]
    text = sub.format_help()
    assert "``" not in text
    example = text.split("example:\n", 1)[1].strip().splitlines()[0]
    argv = shlex.split(example)
    assert argv[:2] == ["hrseg", name]
    args = cli.build_parser().parse_args(argv[1:])      # a typo'd option would exit here
    assert args.command == name


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_argument_is_explained(name):
    sub = _subparsers()[name]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        label = "/".join(action.option_strings) or action.metavar or action.dest
        assert action.help, f"hrseg {name} {label}: no help"
        if not action.option_strings:
            assert action.metavar and action.metavar.isupper(), f"{name} {label}: a METAVAR"


def test_phantom_options_show_their_defaults_and_the_size():
    text = " ".join(_subparsers()["phantom"].format_help().split())   # argparse's wrapping
    assert "--cases CASES number of cases (default: 24)" in text
    assert "(default: data/phantom)" in text and "(default: 0)" in text
    assert "(default: 512" in text                           # --shape: the default grid
    assert "58 MB" in text and "0.9 GB" in text and "--task {lits,kits}" in text


def test_table_of_a_missing_folder_says_no_such_folder(tmp_path, capsys):
    missing = tmp_path / "nonexist"
    assert cli.main(["table", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"hrseg table: error: no such folder: {missing}"]
    assert not missing.exists()
    (tmp_path / "empty").mkdir()                      # a folder without runs: the other line
    assert cli.main(["table", str(tmp_path / "empty")]) == 2
    assert "no run with an evaluation" in capsys.readouterr().err
