"""Outside code that registers protocols, topologies, layer sets, datasets or architectures:
modules named by the ``ggans.plugins`` entry-point group of an installed package, or listed in
``$GGANS_PLUGINS`` (comma-separated module names), imported before the command line composes
its config."""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from ggans.errors import GGansError


def load() -> list[str]:
    """Import every plugin module; return their names."""
    names = [ep.value for ep in entry_points(group="ggans.plugins")]
    names += [m.strip() for m in os.environ.get("GGANS_PLUGINS", "").split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure is the plugin's, named in one line
            raise GGansError(
                f"GGANS_PLUGINS: cannot import {name} ({type(err).__name__}: {err})"
            ) from None
    return names
