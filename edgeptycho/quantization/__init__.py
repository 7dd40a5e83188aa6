"""edgeptycho.quantization."""
