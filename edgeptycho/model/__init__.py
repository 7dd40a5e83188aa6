"""edgeptycho.model."""
