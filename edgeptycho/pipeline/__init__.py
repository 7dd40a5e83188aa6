"""edgeptycho.pipeline."""
