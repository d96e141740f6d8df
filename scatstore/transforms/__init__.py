"""Transforms: the scattering transform, uint8 quantization, coefficient-space flips, and the
encode *methods* that turn preprocessed images into stored samples."""
from .flip import flip_coefficients
from .methods import METHODS, make_method
from .quantize import dequantize_uint8, quantize_uint8
from .scattering import Scattering2D, scattering_channels, scattering_output_size

__all__ = ["Scattering2D", "scattering_channels", "scattering_output_size", "quantize_uint8",
           "dequantize_uint8", "flip_coefficients", "make_method", "METHODS"]
