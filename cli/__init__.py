"""Command-line interface (``scatstore``): a thin layer over the library."""
