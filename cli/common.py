"""What the commands share: the one-line fatal error and the checked ``--device`` type."""
from __future__ import annotations

import sys
from typing import NoReturn

import click


def fail(message: str, code: int = 2) -> NoReturn:
    """``scatstore: error: MESSAGE`` on stderr, then exit ``code`` (2: bad input or usage)."""
    click.echo(f"scatstore: error: {message}", err=True)
    sys.exit(code)


class DeviceParam(click.ParamType):
    """A torch device checked when the command line is read (``auto`` allowed where a command
    picks one itself): ``--device cuda`` without a usable GPU is a usage error, not a failure
    in the middle of a job."""

    name = "device"

    def __init__(self, allow_auto: bool = False):
        self.allow_auto = allow_auto

    def convert(self, value, param, ctx):
        if value == "cpu" or (self.allow_auto and value == "auto"):
            return value  # no torch import for the common case
        from scatstore.devices import usable_device

        try:
            usable_device(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value
