"""edgeptycho: real-time streaming ptychographic phase retrieval on edge hardware."""

__version__ = "0.1.0"
