"""edgeptycho.tools."""
