"""Unit tests run as the pyshim binary would: its RuntimeIdentity installed (the entry point
does that before anything else), so code that asks for the identity or the App finds them."""

from shim.cli import IDENTITY
from shim.framework.app import install

install(IDENTITY)
