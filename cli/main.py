"""Entry point of the ``scatstore`` command."""
from __future__ import annotations

import click

from scatstore import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="scatstore")
def main() -> None:
    """Encode image datasets once into compact tensors and stream them into training."""


if __name__ == "__main__":
    main()
