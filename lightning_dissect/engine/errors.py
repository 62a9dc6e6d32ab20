"""The error a user's input or configuration can cause anywhere in the engine.

It lives in a module of its own because the capture of layer outputs, the
passes over the probe set, the synchronizers and the package's edges all raise
it; none of them has to import another just for the exception.
"""

from __future__ import annotations


class DissectionError(ValueError):
    """A configuration or input error that names the layer or argument at fault."""
