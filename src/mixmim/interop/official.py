"""Checkpoints of the public MixMIM/MixMAE release in and out of this project's names."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

# release prefix -> ours, for the decoder of the pretraining model
_DECODER_RENAMES = {
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.pos_embed",
    "decoder_embed.": "decoder.embed.",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}


def _unwrap(checkpoint: Mapping) -> dict[str, Tensor]:
    for key in ("model", "state_dict", "module"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def is_pretraining_state(state: Mapping[str, Tensor]) -> bool:
    return any(k == "mask_token" or k.startswith("decoder_") for k in state)


def convert_official(checkpoint: Mapping, target: str = "auto") -> dict[str, Tensor]:
    """Turn a release state dict (or a release file's dict, whose ``"model"`` entry holds it) into
    this project's names.

    ``target``: ``"pretrainer"`` (names of ``create_pretrainer``), ``"encoder"`` (names of the encoder
    or classifier; the decoder is dropped), or ``"auto"``: a pretraining checkpoint goes to the
    pretrainer, a fine-tuning one to the classifier. ``relative_position_index`` buffers are dropped
    (they are rebuilt from the window size).
    """
    if target not in ("auto", "pretrainer", "encoder"):
        raise ValueError(f"target={target!r}: expected 'auto', 'pretrainer' or 'encoder'")
    state = _unwrap(checkpoint)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    pretraining = is_pretraining_state(state)
    if target == "auto":
        target = "pretrainer" if pretraining else "encoder"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("relative_position_index") or key.endswith("attn_mask"):
            continue
        decoder_name = next((new + key[len(old):] for old, new in _DECODER_RENAMES.items() if key.startswith(old)),
                            None)
        if decoder_name is not None:
            if target == "pretrainer":
                out[decoder_name] = value
            continue
        if target == "pretrainer":
            if key.startswith("head."):
                continue
            out["encoder." + key] = value
        else:
            out[key] = value
    return out


def to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`convert_official` for a pretrainer or classifier state dict (release names,
    without the rebuildable index buffers)."""
    reverse = {new: old for old, new in _DECODER_RENAMES.items()}
    out = {}
    for key, value in state.items():
        name = next((old + key[len(new):] for new, old in reverse.items() if key.startswith(new)), None)
        if name is None:
            name = key[len("encoder."):] if key.startswith("encoder.") else key
        out[name] = value
    return out
