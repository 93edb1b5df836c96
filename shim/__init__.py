"""pyshim: a containerd runtime v2 shim in async Python (runtime type io.containerd.pyshim.v2)."""

__version__ = "0.1.0"
