"""The runc application: containerd.runc.v1 options and the runc/crun OCI runtime backends,
built on shim.framework."""
