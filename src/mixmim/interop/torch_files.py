"""Reading ``.pt``/``.pth`` files without running code from them: every ``torch.load`` of the package
goes through :func:`load_torch_file`.

A pickle can name any Python callable and call it while it is read; ``torch.load(weights_only=True)``
accepts tensors, containers and numbers only. Release checkpoints hold a few more plain objects
(MixMIM's, MAE's and BEiT's ``args`` is an ``argparse.Namespace``, some hold NumPy scalars or arrays,
SimMIM's ``config`` is a yacs ``CfgNode``): those, and only those, are allowed (:data:`RELEASE_GLOBALS`);
a file that names anything else is refused with one line that says how to re-save its tensors. When a
``<file>.sha256`` lies beside the file (this project's checkpoints), the checksum is verified before
anything is unpickled.
"""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mixmim.utils.errors import UserError
from mixmim.utils.files import sha256_of


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file is missing, truncated, damaged, unsafe or of another architecture."""


class ReleaseConfigNode:
    """What a yacs ``CfgNode`` (SimMIM's ``config`` entry) is read as: an ordered dict of its keys and
    values, built without yacs (the weights-only reader fills only plain dict types)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return OrderedDict()


def _numpy_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    out: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # NumPy 2 pickles a dtype through its class (numpy.dtypes.Float64DType, ...).
    out += sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"} - {np.dtype}, key=str)
    for name in ("_reconstruct", "scalar"):  # files written by NumPy 1 name numpy.core, by NumPy 2 numpy._core
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out.append((getattr(core.multiarray, name), f"{module}.{name}"))
    return out


def release_globals() -> list[Any]:
    """The non-tensor objects release checkpoints are allowed to hold (and nothing that runs code)."""
    return [argparse.Namespace, (ReleaseConfigNode, "yacs.config.CfgNode"), *_numpy_globals()]


def verify_checksum(path: Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` has a ``.sha256`` beside it that it does not match
    (a file without one is not checked: a release file, or a checkpoint copied alone)."""
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        return
    expected = digest_file.read_text().split()
    if not expected or sha256_of(path) != expected[0]:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated (checksum mismatch with "
                              f"{digest_file.name}, {path.stat().st_size} bytes on disk)")


def load_torch_file(path: str | Path, what: str = "checkpoint", mmap: bool = False,
                    verified: bool = False) -> dict[str, Any]:
    """The dict saved in ``path``, on the CPU, read with ``weights_only=True`` (and the release
    globals above); the checksum beside it verified first (``verified``: the caller just did). Any
    failure is a one-line :class:`CheckpointError` naming the file: missing, damaged, not a PyTorch
    file, holding code or objects that are not weights, or not a dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, expected a file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if not verified:
        verify_checksum(path)
    try:
        with torch.serialization.safe_globals(release_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(path)
        named = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
        reason = next((line.strip() for line in str(exc).splitlines()[::-1] if line.strip() and "torch.load" not in line
                       and "WeightsUnpickler" not in line), exc.__class__.__name__)
        detail = str(exc)
        if found or any(word in detail for word in ("GLOBAL", "unrecognized function", "Can only", "allowlist")):
            raise CheckpointError(
                f"{what} {path} holds Python objects that are not weights{named}; mixmim never runs code from a "
                "checkpoint. If you trust the file, re-save its tensors: python -c \"import torch; "
                f"torch.save(torch.load('{path}', weights_only=False)['model'], 'weights.pt')\"") from None
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch file or truncated ({reason})") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # the command line names the path and the reason
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError, IndexError,
            MemoryError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split()).split(". ")[0][:200] or exc.__class__.__name__
        raise CheckpointError(f"cannot read {what} {path}: not a PyTorch file or truncated ({reason})") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} {path} holds a {type(state).__name__}, expected a dict of tensors "
                              "(a state dict, or a checkpoint dict with a 'model' entry)")
    return dict(state)


def _is_zip(path: Path) -> bool:
    # torch.load's mmap needs the zip format (torch >= 1.6 writes it); older files are read whole.
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a refused file names beyond what is allowed (for the message; reads, runs nothing)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # an old (non-zip) file or a damaged one: the message says less
        return []
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in release_globals()}
    return [g for g in found if g not in allowed]


def load_release(path: str | Path, target: str = "auto") -> dict[str, torch.Tensor]:
    """A release checkpoint (MixMIM/MixMAE pretraining or fine-tuning ``.pth``) as a state dict in this
    project's names, read without running code: ``create_pretrainer("mixmim", "mixmim_base")
    .load_state_dict(mixmim.load_release("mixmim_base_300e.pth"))``. ``target`` as in
    :func:`mixmim.interop.official.convert_official`."""
    from mixmim.interop.official import convert_official

    return convert_official(load_torch_file(path, "release checkpoint"), target=target)
