"""What the scale-wise sampler needs from a backbone (VAR and the embedded tiny model; Switti, text-to-image).

A backbone generates an image as K token maps of growing side ``patch_nums[k]``. The sampler drives it one scale
at a time through a :class:`Rollout`: ask for the conditional and unconditional logits of the current scale (one
forward pass over a 2B batch that shares the KV cache: conditional rows first, unconditional rows after), choose
the tokens, hand them back, and after the last scale decode the images. Once no later scale is guided the sampler
may call ``drop_uncond``: from then on the backbone runs the B conditional rows only (Switti's pipeline does so
after its CFG off-scale).

A condition is a class label (:class:`ScaleWiseBackbone`) or a prompt (:class:`TextToImageBackbone`). A
:class:`BitwiseBackbone` (Infinity) gives a pair of logits per bit of a token, V = 2·d, and takes the token whose
binary digits are the drawn bits (most significant first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class Alternation:
    """The logits / take alternation of a rollout over 2B rows (B conditional first) until the unconditional half is
    dropped, shared by every backbone's rollout: ``x_BlC`` is the next scale's input (None after the last), ``k``
    the current scale."""

    def __init__(self, B: int, first_2BlC: Tensor):
        self.B, self.x_BlC, self.k = B, first_2BlC, 0
        self.pending = False     # logits given, tokens not yet taken
        self.dropped = False     # the unconditional half is gone

    def _input(self) -> Tensor:
        """The current scale's input, checking that logits() alternates with take()."""
        if self.pending or self.x_BlC is None:
            raise RuntimeError("logits() must alternate with take(), for the K scales")
        return self.x_BlC

    def _give(self, logits_BlV: Tensor) -> tuple[Tensor, Tensor | None]:
        """The scale's logits as (cond, uncond), uncond None once dropped."""
        self.pending = True
        if self.dropped:
            return logits_BlV, None
        return logits_BlV[:self.B], logits_BlV[self.B:]

    def _check_take(self) -> None:
        if not self.pending:
            raise RuntimeError("take() needs the logits of the current scale first")

    def _advance(self, K: int) -> bool:
        """After the tokens of scale k are taken: the next scale, and whether there is one (else no input)."""
        self.k += 1
        self.pending = False
        if self.k == K:
            self.x_BlC = None
        return self.k < K

    def _set_input(self, x_BlC: Tensor) -> None:
        """The next scale's input of the B conditional rows, repeated for the unconditional half unless dropped."""
        self.x_BlC = x_BlC if self.dropped else x_BlC.repeat(2, 1, 1)


class Rollout(Protocol):
    """One batch of B images being generated; calls alternate ``logits``, ``take``, ... , then ``decode``."""

    def logits(self) -> tuple[Tensor, Tensor | None]:
        """Conditional and unconditional logits of the current scale, each (B, pn*pn, V) float32; the unconditional
        ones are None after :meth:`drop_uncond`."""
        ...

    def drop_uncond(self) -> None:
        """Before a scale's ``logits``: from now on compute the conditional rows only (the unconditional half of
        the batch and of its caches is freed). The conditional logits do not change."""
        ...

    def take(self, idx_Bl: Tensor) -> None:
        """Commit the chosen tokens (B, pn*pn) int64 of the current scale and move to the next scale."""
        ...

    def decode(self) -> Tensor:
        """After the last scale: images (B, 3, H, W) float in [0, 1], on the backbone's device."""
        ...


@runtime_checkable
class ScaleWiseBackbone(Protocol):
    """A class-conditional scale-wise autoregressive image generator."""

    @property
    def patch_nums(self) -> tuple[int, ...]:
        """Side of the token map of each scale, coarse to fine."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_classes(self) -> int:
        """Valid labels are 0 .. num_classes - 1 (the unconditional branch uses the backbone's null class)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def start(self, labels_B: Tensor) -> Rollout:
        """Begin generating one image per label (B,) int64 on ``device``."""
        ...


@runtime_checkable
class TextToImageBackbone(Protocol):
    """A text-conditioned scale-wise autoregressive image generator (Switti): a condition is a prompt."""

    @property
    def patch_nums(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def null_prompt(self) -> str:
        """The prompt the unconditional branch encodes (Switti: the empty prompt)."""
        ...

    @property
    def device(self) -> torch.device: ...

    def start(self, prompts: Sequence[str]) -> Rollout:
        """Begin generating one image per prompt."""
        ...


@runtime_checkable
class BitwiseBackbone(TextToImageBackbone, Protocol):
    """A text-to-image backbone whose tokens are d bits (Infinity): its logits are (B, l, 2·d), a pair per bit."""

    @property
    def bits_per_token(self) -> int: ...
