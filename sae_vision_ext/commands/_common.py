"""What every ``sae-vision`` command shares: config dataclasses become flags one way (simple_parsing, as
SAELens's own CLI does), one-line user errors with exit code 2, and ``KEY=VALUE`` lists.

A command's flags are its config dataclass's fields (``--training-rows``) plus the short aliases declared on
the field (``--rows``); the same field has the same flag in every command. ``--config FILE`` (YAML / JSON with
the same field names) sets the defaults, flags override it. Building a parser imports neither torch nor
SAELens, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import simple_parsing
from simple_parsing import DashVariant

from sae_vision_ext.errors import UserError

CONFIG_DEST = "config"


class HelpFormatter(simple_parsing.SimpleHelpFormatter):
    """simple_parsing's formatter (defaults and types shown) with the examples epilog kept as written."""


class ArgumentParser(simple_parsing.ArgumentParser):
    """simple_parsing's parser, able to keep fields a command does not use out of its ``--help``.

    simple_parsing creates the argparse actions only when parsing starts (``_preprocessing``, the step
    SAELens's own CLI also extends), so the hidden ones are marked there.
    """

    def __init__(self, *args: Any, hidden: Sequence[str] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.hidden = set(hidden)

    def error(self, message: str) -> NoReturn:
        """One line, like every other user error (no usage block: ``--help`` shows it)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _preprocessing(self, *args: Any, **kwargs: Any) -> None:
        super()._preprocessing(*args, **kwargs)
        for action in self._actions:
            if action.dest.partition(".")[2] in self.hidden:
                action.help = argparse.SUPPRESS


def new_parser(prog: str, description: str, epilog: str = "", hidden: Sequence[str] = ()) -> ArgumentParser:
    return ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
        add_option_string_dash_variants=DashVariant.DASH,
        add_config_path_arg=False,
        hidden=hidden,
    )


def add_config(
    parser: simple_parsing.ArgumentParser, cls: type, defaults: Any = None, dest: str = CONFIG_DEST
) -> None:
    """Every command-line field of the dataclass ``cls`` as flags (defaults from ``defaults``, an
    instance)."""
    parser.add_arguments(cls, dest=dest, default=defaults)


def config_file_defaults(argv: Sequence[str]) -> dict[str, Any]:
    """The mapping in ``--config FILE`` (YAML or JSON), or ``{}``."""
    path = flag_value(argv, "--config")
    if not path:
        return {}
    from sae_vision_ext.training.config import load_config_file

    try:
        return load_config_file(path)
    except FileNotFoundError as err:
        raise UserError(f"config file not found: {path}") from err
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read config file {path}: {err}") from err


def flag_value(argv: Sequence[str], *flags: str) -> str | None:
    """The value given to any of ``flags`` (read before the full parser exists, e.g. to set its defaults)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(*flags, dest="value")
    known, _ = pre.parse_known_args(list(argv))
    return known.value


def given_fields(
    parser: argparse.ArgumentParser, argv: Sequence[str], dest: str = CONFIG_DEST
) -> dict[str, str]:
    """``{field name: the flag the user typed}`` for the ``dest`` dataclass fields set on the command line."""
    typed = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    given = {}
    for action in parser._actions:
        prefix, _, name = action.dest.partition(".")
        used = [flag for flag in typed if flag in action.option_strings]
        if prefix == dest and name and used:
            given[name] = used[0]
    return given


def refuse_hidden(
    parser: argparse.ArgumentParser, argv: Sequence[str], hide: Sequence[str], command: str
) -> None:
    flags = [flag for name, flag in given_fields(parser, argv).items() if name in hide]
    if flags:
        raise UserError(f"{', '.join(flags)} has no effect on `sae-vision {command}`")


def key_values(items: Sequence[str], what: str) -> dict[str, Any]:
    """``["k=32", "k_levels=[64,128]"]`` -> ``{"k": 32, "k_levels": [64, 128]}`` (values read as YAML)."""
    from sae_vision_ext.training.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what} {item!r} must look like KEY=VALUE, e.g. k=32")
        out[key.strip()] = parse_value(value)
    return out


def sae_section(architecture: str, items: Sequence[str], expansion: int | None,
                base: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """``(sae config fields, expansion)`` from ``--architecture``, ``--sae KEY=VALUE ...`` and ``--expansion``
    (d_sae = expansion x d_in, default 8) over ``base`` (a config file's ``sae`` section)."""
    sae = {**(base or {}), "architecture": architecture, **key_values(items, "--sae")}
    if expansion is not None:
        if expansion <= 0:
            raise UserError(
                f"--expansion must be a positive integer (d_sae = expansion x d_in), got {expansion}"
            )
        if "d_sae" in sae:
            raise UserError("give --expansion or --sae d_sae=N, not both")
    return sae, expansion or 8


def say(message: str) -> None:
    """Progress notes go to stderr; results go to stdout."""
    print(message, file=sys.stderr, flush=True)


# Exceptions that mean "the user asked for something that cannot be done", not "the program is broken".
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               KeyError)  # fmt: skip


def one_line_errors(command: str) -> Callable:
    """Decorate a command's ``run``: user errors become one line on stderr and exit code 2 (no traceback)."""

    def decorate(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def wrapped(*args: Any, **kwargs: Any) -> int:
            try:
                return int(run(*args, **kwargs) or 0)
            except USER_ERRORS as err:
                message = err.args[0] if isinstance(err, KeyError) and err.args else err
                print(f"sae-vision {command}: error: {message}", file=sys.stderr)
                return 2

        return wrapped

    return decorate


def parse(parser: simple_parsing.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` where a bad value is exit code 2 with argparse's one-line message."""
    try:
        return parser.parse_args(list(argv))
    except (ValueError, TypeError) as err:  # simple_parsing raises these for values it cannot decode
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    clean = {k: v for k, v in payload.items() if not hasattr(v, "shape")}
    Path(path).write_text(json.dumps(clean, indent=2, default=str))


def dataclass_to_dict(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
