import contextlib
import io

import pytest

from sae_vision_ext import cli


def _help(argv):
    """stdout of ``sae-vision ARGV``, which must end with code 0 (a subcommand's --help exits, the top level
    returns)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    assert code == 0
    return out.getvalue()


def test_top_level_help_lists_every_subcommand():
    text = _help(["--help"])
    for name in cli.SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_help_with_an_example(name):
    text = _help([name, "--help"])
    assert f"sae-vision {name}" in text
    assert "example" in text.lower()


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
