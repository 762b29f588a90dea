"""The command lines a newcomer reads first: every --help shows its defaults, and a port out of range
is a usage error naming the flag, not an OverflowError from the socket layer."""

import argparse
import contextlib
import io

import pytest

from minimind.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for path, parser in _subparsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.help == argparse.SUPPRESS or default in (None, False, [])
                    or default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
                continue
            if f"default: {default}" not in " ".join(text.split()):
                missing.append(f"minimind {' '.join(path)} {action.option_strings[0]} (default {default!r})")
    assert not missing, missing


def test_serve_shows_its_host_and_port():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(out.getvalue().split())
    assert "--host" in text and "default: 127.0.0.1" in text and "default: 8000" in text


@pytest.mark.parametrize("value", ["99999", "0", "-1", "http"])
def test_serve_port_out_of_range_is_a_usage_error(tiny_ckpt, value):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["serve", "--ckpt", str(tiny_ckpt), "--port", value])
    assert e.value.code == 2
    assert "--port" in err.getvalue() and "Traceback" not in err.getvalue(), err.getvalue()
