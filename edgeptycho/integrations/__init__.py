"""edgeptycho.integrations."""
