"""Register the MixMIM encoders with timm when timm is imported, without importing it here.

``import mixmim`` must stay light (no torch, no timm: ``mixmim --help`` answers at once), yet after it
``timm.create_model("mixmim_base")`` and ``timm.create_model("local-dir:<export>")`` must know the
``mixmim_*`` names. So: if timm is already imported, register now; otherwise a finder on
``sys.meta_path`` waits for the import of ``timm`` and registers right after timm's own module code
has run (the post-import hook pattern of PEP 369, which was never added to the standard library).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "timm"


def _register() -> None:
    import mixmim.interop.timm_models  # noqa: F401  (its import registers mixmim_tiny ... mixmim_huge)


class _AfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``timm`` through the other finders, runs it, then registers the MixMIM models."""

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._loader is not None:
            return None
        sys.meta_path.remove(self)  # let the ordinary finders find the real timm
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        assert self._loader is not None  # find_spec set it before the import system calls this
        self._loader.exec_module(module)
        sys.meta_path.remove(self)
        _register()


def install() -> None:
    """Register now when timm is loaded, else once it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())
