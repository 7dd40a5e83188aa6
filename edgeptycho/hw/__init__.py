"""The hardware abstraction layer: one Backend interface over CPU, Jetson, Alveo, server GPU and emulators.

Vendor SDKs are imported lazily inside the one file that wraps each, so this package imports anywhere.
"""

from .base import Allocator, Backend, BackendUnavailable, HostAllocator, TensorSpec, Ticket
from .registry import BACKENDS, list_backends, load_profile, open_backend, open_with_fallback

__all__ = [
    "BACKENDS", "Allocator", "Backend", "BackendUnavailable", "HostAllocator", "TensorSpec", "Ticket",
    "list_backends", "load_profile", "open_backend", "open_with_fallback",
]
