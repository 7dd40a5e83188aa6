"""The hardware abstraction layer: one Backend interface over CPU, Jetson, Alveo, server GPU and emulators.

Vendor SDKs are imported lazily inside the one file that wraps each, so this package imports anywhere.
"""

from .base import Allocator, Backend, BackendUnavailable, HostAllocator, TensorSpec, Ticket

__all__ = ["Allocator", "Backend", "BackendUnavailable", "HostAllocator", "TensorSpec", "Ticket"]
