"""mixmim: self-supervised pretraining of vision backbones by mixed and masked image modeling.

``import mixmim`` imports neither torch nor timm: the public functions below are loaded on first use,
and the ``mixmim_*`` encoders are registered with ``timm.create_model`` as soon as timm is imported.
"""

from __future__ import annotations

import importlib

from mixmim._timm_hook import install as _install_timm_hook

__version__ = "0.1.0"

_PUBLIC = {
    "convert_official": "mixmim.interop.official",
    "create_classifier": "mixmim.models.registry",
    "create_encoder": "mixmim.models.registry",
    "create_pretrainer": "mixmim.methods.factory",
    "load_release": "mixmim.interop.torch_files",
}
__all__ = [*sorted(_PUBLIC), "__version__"]

_install_timm_hook()


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixmim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
