"""The reusable shim framework: serving containerd's Task API, the start/delete/-info command
line, stdio, reaping, mounts, cgroups and the exit-ordering rules. It imports nothing from an
app (shim.runc) and knows its app only through shim.framework.app.App."""
