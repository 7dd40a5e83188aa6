"""Fake vendor SDKs for CI (tensorrt 10, cuda-python, pycuda, xir, vart, pyxrt), installed via monkeypatched sys.modules.

Each fake mirrors its documented API call for call (see each module's docstring for what and from where) and
computes with ONNX Runtime or numpy underneath, so a backend driven through it can be checked numerically.
"""

from __future__ import annotations

import sys
import types

from . import devmem


def hide(monkeypatch, *names: str) -> None:
    """Make `import name` raise ImportError, as on a machine without that SDK."""
    for name in names:
        for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)  # submodules too: they are looked up first
        monkeypatch.setitem(sys.modules, name, None)


def install_cuda_python(monkeypatch) -> types.ModuleType:
    """`cuda`, `cuda.bindings`, `cuda.bindings.runtime` → the fake runtime."""
    from . import cuda_runtime

    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cuda_runtime
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cuda_runtime)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cuda_runtime


def install_pycuda(monkeypatch) -> types.ModuleType:
    """`pycuda`, `pycuda.driver` → the fake driver (fresh per-thread context stacks)."""
    from . import pycuda_driver

    pycuda = types.ModuleType("pycuda")
    pycuda.driver = pycuda_driver
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda_driver)
    monkeypatch.setattr(pycuda_driver, "_initialized", False)
    return pycuda_driver


def install_tensorrt(monkeypatch, version: str = "10.3.0") -> types.ModuleType:
    from . import tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setattr(tensorrt, "__version__", version)
    tensorrt.LOG.clear()
    tensorrt.BUILDS[0] = 0
    return tensorrt


def install_vitis(monkeypatch, devices: int = 1):
    """`xir`, `vart`, `pyxrt` → the fakes; returns the vitis module (write_xmodel, ELECTRICAL, ...)."""
    from . import vitis

    for name in ("xir", "vart", "pyxrt"):
        monkeypatch.setitem(sys.modules, name, getattr(vitis, name))
    monkeypatch.setattr(vitis.pyxrt, "DEVICES", devices)
    return vitis


__all__ = ["devmem", "hide", "install_cuda_python", "install_pycuda", "install_tensorrt", "install_vitis"]
