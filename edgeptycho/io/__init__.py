"""File formats: CXI 1.6 scans and reconstructions (cxi), ptychodus product files (ptychodus)."""

from .cxi import (
    CXIScan,
    open_scan,
    read_reconstruction,
    read_scan,
    write_reconstruction,
    write_scan,
)
from .ptychodus import product_metadata, read_product, write_product

__all__ = [
    "CXIScan", "open_scan", "read_scan", "write_scan", "read_reconstruction", "write_reconstruction",
    "read_product", "write_product", "product_metadata",
]
