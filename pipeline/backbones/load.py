"""One entry point from a backbone's configuration to a loaded backbone, whatever its kind (VAR or Switti)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.backbones.base import ScaleWiseBackbone, TextToImageBackbone

if TYPE_CHECKING:
    from pipeline.config.schema import BackboneConfig

KINDS = ("var", "switti", "infinity")   # backbone.kind: class-conditional VAR state dicts | text-to-image Switti Hub
#                                         folders | text-to-image Infinity (.pth files or shards, a flan-t5-xl folder)


def checkpoint_keys(b: BackboneConfig) -> tuple[str, ...]:
    """The ``backbone.*`` keys naming what the backbone reads from disk (files or Hub folders)."""
    return {"var": ("vae_ckpt", "var_ckpt"), "infinity": ("vae_ckpt", "var_ckpt", "text_encoder")}.get(
        b.kind, ("vae_ckpt", "var_ckpt", "text_encoder", "text_encoder_2"))


def load_backbone(b: BackboneConfig, device: str | torch.device = "cpu") -> ScaleWiseBackbone | TextToImageBackbone:
    """VAR from ``vae_ckpt`` + ``var_ckpt`` state dicts, or Switti from the Hub folders ``var_ckpt`` (the
    transformer), ``vae_ckpt`` (VQVAE-Switti), ``text_encoder`` (CLIP-L) and ``text_encoder_2`` (bigG), or
    Infinity from ``var_ckpt`` (its .pth, or the 8B's folder of shards), ``vae_ckpt`` (the BSQ VAE's .pth) and
    ``text_encoder`` (flan-t5-xl)."""
    if b.kind == "infinity":
        from pipeline.backbones.infinity import load_infinity

        return load_infinity(b.var_ckpt, b.vae_ckpt, b.text_encoder, patch_nums=b.patch_nums, device=device,
                             tau=b.tau[0] if len(b.tau) == 1 else b.tau, negative_prompt=b.negative_prompt)
    if b.kind == "switti":
        from pipeline.backbones.switti import load_switti

        return load_switti(b.var_ckpt, b.vae_ckpt, b.text_encoder, b.text_encoder_2, device=device)
    if b.kind != "var":
        raise ValueError(f"backbone.kind={b.kind!r} is unknown; choose one of {', '.join(KINDS)}")
    from pipeline.backbones.var import load_var

    return load_var(b.vae_ckpt, b.var_ckpt, device=device)


def num_conditions(b: BackboneConfig) -> int | None:
    """How many conditions a sweep's images cycle through (:func:`pipeline.core.sampling.sweep_conditions`): the classes
    of a VAR checkpoint (read from its class embedding, memory-mapped: no weights are loaded), or the prompts of a
    text-to-image backbone's prompt set (None without one)."""
    if b.kind != "var":
        if b.prompts is None:
            return None
        from pipeline.data.prompts import read_prompts

        return len(read_prompts(b.prompts))
    state = torch.load(b.var_ckpt, map_location="cpu", weights_only=True, mmap=True)
    return int(state["class_emb.weight"].shape[0]) - 1
