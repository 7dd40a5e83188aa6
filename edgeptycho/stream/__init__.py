"""edgeptycho.stream."""
