"""CLIP score of text-to-image samples: how well each image matches its prompt, with CLIP weights from a local folder.

CLIPScore (Hessel et al., 2021) as torchmetrics and the text-to-image literature report it: ``100 · max(cos, 0)`` of
the CLIP image and text embeddings (projected, L2-normalised), per image; a set's score is the mean. The folder is a
Hub CLIP checkpoint (``transformers.CLIPModel`` + its tokenizer and image processor), e.g. openai/clip-vit-large-patch14
or laion/CLIP-ViT-H-14-laion2B-s32B-b79K (Switti's choice); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

REQUIRED = ("config.json", "preprocessor_config.json")


class ClipScorer:
    """A CLIP model, tokenizer and image processor loaded once from a local folder."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        folder = Path(folder)
        for name in REQUIRED:
            if not (folder / name).is_file():
                raise ValueError(f"clip score weights {folder}: missing {name}; download a Hub CLIP model into it "
                                 "(e.g. openai/clip-vit-large-patch14)")
        transformers_logging.disable_progress_bar()
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).float().eval().to(device)
        except (OSError, ValueError) as e:
            text = str(e).strip()
            raise ValueError(f"clip score weights {folder}: transformers cannot load it "
                             f"({text.splitlines()[0] if text else type(e).__name__})") from None
        self.model.requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images_B3HW: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image CLIP scores (B,) float32 on CPU of images (B, 3, H, W) float in [0, 1] against B prompts."""
        if images_B3HW.dim() != 4 or images_B3HW.shape[0] != len(prompts):
            raise ValueError(f"images {tuple(images_B3HW.shape)} and {len(prompts)} prompts: give one prompt per "
                             "image, images as (B, 3, H, W)")
        uint8_BHW3 = images_B3HW.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        pixels = self.processor(images=list(uint8_BHW3), return_tensors="pt")["pixel_values"].to(self.device)
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        image_BE = self.model.get_image_features(pixel_values=pixels)
        text_BE = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image_BE, text_BE = (getattr(e, "pooler_output", e) for e in (image_BE, text_BE))   # transformers 4 and 5
        cos_B = torch.nn.functional.cosine_similarity(image_BE.float(), text_BE.float(), dim=-1)
        return (100 * cos_B.clamp_min(0)).cpu()
