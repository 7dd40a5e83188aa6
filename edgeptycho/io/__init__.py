"""edgeptycho.io."""
