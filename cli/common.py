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


class StoreLocation(click.ParamType):
    """A store given as a local directory (which must exist) or a URL (``s3://bucket/prefix``,
    ``gs://…``, ``https://…``: checked when it is read)."""

    name = "store"

    def convert(self, value, param, ctx):
        from scatstore.stores.fs import is_url, redact

        if is_url(value):
            return value
        import os

        if not os.path.isdir(value):
            self.fail(f"{redact(value)}: no such store directory", param, ctx)
        return value


def parse_size(text: str | None) -> int | None:
    """``"20G"``, ``"512M"``, ``"1000000"`` -> bytes (None stays None)."""
    if text is None:
        return None
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 20G, 512M)") from None
    if n <= 0:
        raise click.BadParameter(f"{text!r}: a size must be > 0")
    return int(n)
