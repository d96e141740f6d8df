"""Transforms: the scattering transform (and, later, quantization and the encode methods)."""
from .scattering import Scattering2D, scattering_channels, scattering_output_size

__all__ = ["Scattering2D", "scattering_channels", "scattering_output_size"]
