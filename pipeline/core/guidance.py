"""Guidance for scale-wise autoregressive models: CFG, IGG (global or 2-D sliding window) and their mix.

At one scale the backbone gives conditional and unconditional logits for the ``l = h·w`` tokens of that scale.
With the guidance nudge ``Δ = cond − uncond`` (B, l, V)::

    guided = uncond + t_cfg · Δ + t_igg · (A · Δ)
    t_cfg  = 0 if w_cfg is None else 1 + ratio · w_cfg        (same for t_igg with w_igg)
    A      = row-softmax(Δ Δᵀ / √V)                          (B, l, l), per image, over the tokens of this scale

``w_cfg=c, w_igg=None`` is VAR's own CFG with ``cfg=c``; ``w_cfg=None, w_igg=c`` is the IGG authors' IGG
(Information-Grounding Guidance, "Not All Tokens are Guided Equal", arXiv 2509.23876). With a window ``s``
(odd, ≥ 1) token i attends only to the tokens j within ``(s−1)/2`` rows and columns of it on the h×w map
(tokens in row-major order); the windowed path never builds the l×l matrix: its memory is O(l·s² + l·V).

``ratio`` comes from a schedule over the K scales (:func:`schedule_ratio`); VAR's is the linear ramp k/(K−1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SCHEDULES = ("linear", "constant", "interval", "constant_interval")
INTERVAL_SCHEDULES = ("interval", "constant_interval")   # guide only the scales [start, end)


@dataclass(frozen=True)
class GuidanceKind:
    """One guidance kind: the weights it sets (the other term is dropped), whether it has IGG's window, the seed
    stream of its sampler, and how reports show it. Adding a kind is one entry of :data:`KINDS` plus its math."""

    name: str
    weights: tuple[str, ...]  # of w_cfg, w_igg
    seed: int  # its refinement sampler's stream (tuners.refine)
    colour: str  # matplotlib colour of its bars and curves
    label: str

    @property
    def windowed(self) -> bool:
        """Whether it has IGG's attention window."""
        return "w_igg" in self.weights

    @property
    def params(self) -> tuple[str, ...]:
        """Its Optuna parameters: the weights, and the window when it has one."""
        return (*self.weights, *(("window",) if self.windowed else ()))


KINDS = {k.name: k for k in (
    GuidanceKind("cfg", ("w_cfg",), 101, "tab:blue", "CFG alone"),
    GuidanceKind("igg", ("w_igg",), 102, "tab:orange", "IGG alone"),
    GuidanceKind("mixed", ("w_cfg", "w_igg"), 103, "tab:green", "CFG and IGG"),
)}


def _term_weight(w: float | None, ratio: float, name: str) -> float:
    """1 + ratio·w, or 0 when the term is dropped (w is None)."""
    if w is None:
        return 0.0
    if not math.isfinite(w):
        raise ValueError(f"{name}={w} is not a finite number; pass a finite guidance weight or None to drop the term")
    return 1.0 + ratio * w


def guide(
    cond_BlV: Tensor,
    uncond_BlV: Tensor,
    *,
    w_cfg: float | None,
    w_igg: float | None,
    ratio: float,
    hw: tuple[int, int] | None = None,
    window: int | None = None,
) -> Tensor:
    """Combine conditional and unconditional logits of one scale into guided logits.

    Args:
        cond_BlV: conditional logits (B, l, V), any float dtype.
        uncond_BlV: unconditional logits (B, l, V).
        w_cfg: CFG weight, or None to drop the CFG term.
        w_igg: IGG weight, or None to drop the IGG term.
        ratio: schedule value at this scale (VAR: k/(K−1)).
        hw: (h, w) of the token map, h·w = l; required with ``window``.
        window: odd side of the square attention window on the token map, or None for global attention.

    Returns:
        Guided logits (B, l, V), float32.
    """
    if cond_BlV.shape != uncond_BlV.shape or cond_BlV.dim() != 3:
        raise ValueError(
            f"cond_BlV {tuple(cond_BlV.shape)} and uncond_BlV {tuple(uncond_BlV.shape)} must both be (B, l, V)"
        )
    if not math.isfinite(ratio):
        raise ValueError(f"ratio={ratio} is not finite; pass the schedule's value at this scale")
    t_cfg = _term_weight(w_cfg, ratio, "w_cfg")
    t_igg = _term_weight(w_igg, ratio, "w_igg")
    if window is not None:
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window={window} must be an odd integer >= 1 (or None for global attention)")
        if hw is None:
            raise ValueError("window needs hw=(h, w), the token map of this scale")
    if hw is not None and hw[0] * hw[1] != cond_BlV.shape[1]:
        raise ValueError(f"hw={tuple(hw)} has {hw[0] * hw[1]} tokens but the logits have l={cond_BlV.shape[1]}")

    uncond_BlV = uncond_BlV.float()
    delta_BlV = cond_BlV.float() - uncond_BlV
    guided_BlV = torch.add(uncond_BlV, delta_BlV, alpha=t_cfg) if t_cfg else uncond_BlV.clone()
    if t_igg:
        if window is None:
            grounded_BlV = F.scaled_dot_product_attention(delta_BlV, delta_BlV, delta_BlV)
        else:
            assert hw is not None
            grounded_BlV = window_attention(delta_BlV, hw, window)
        guided_BlV.add_(grounded_BlV, alpha=t_igg)  # in place: guided_BlV is always a fresh tensor here
    return guided_BlV


def window_attention(x_BlV: Tensor, hw: tuple[int, int], window: int) -> Tensor:
    """Self-attention of each token over its s×s neighbourhood on the h×w map: softmax(x xᵀ/√V) x, windowed.

    Tokens outside the map do not exist (they are masked out, not zero-padded into the softmax). The loop runs over
    the s² offsets and works on views of the map (no padded copy), so memory is O(l·V + l·s²), never O(l²).

    Args:
        x_BlV: (B, l, V) float32, tokens in row-major order of the h×w map.
        hw: (h, w), h·w = l.
        window: odd side s of the window.

    Returns:
        (B, l, V) float32.
    """
    B, _, V = x_BlV.shape
    h, w = hw
    r = window // 2
    x_BhwV = x_BlV.reshape(B, h, w, V)
    scale = 1.0 / math.sqrt(V)
    offsets = [(_overlap(h, dy), _overlap(w, dx)) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    scores_Bhwo = x_BlV.new_full((B, h, w, len(offsets)), float("-inf"))
    for o, ((ys, yn), (xs, xn)) in enumerate(offsets):
        scores_Bhwo[:, ys, xs, o] = (x_BhwV[:, ys, xs] * x_BhwV[:, yn, xn]).sum(-1) * scale
    attn_Bhwo = torch.softmax(scores_Bhwo, dim=-1)
    out_BhwV = torch.zeros_like(x_BhwV)
    for o, ((ys, yn), (xs, xn)) in enumerate(offsets):
        out_BhwV[:, ys, xs].addcmul_(attn_Bhwo[:, ys, xs, o, None], x_BhwV[:, yn, xn])
    return out_BhwV.reshape(B, h * w, V)


def _overlap(n: int, d: int) -> tuple[slice, slice]:
    """Along one axis of n tokens: the tokens whose neighbour at offset d is on the map, and those neighbours."""
    lo = max(0, -d)
    hi = max(lo, min(n, n - d))
    return slice(lo, hi), slice(lo + d, hi + d)


def schedule_ratio(schedule: str, k: int, K: int, *, start: int = 0, end: int | None = None) -> float | None:
    """The guidance ratio at scale index k of K.

    - ``linear``: k/(K−1), VAR's ramp (1.0 when K = 1);
    - ``constant``: 1.0;
    - ``interval``: the linear ramp inside scale indices [start, end) (``end=None`` means K), ``None`` outside.
      An empty (``start == end``) or reversed (``start > end``) interval guides no scale: Switti's pipeline takes
      any ``turn_on_cfg_start_si`` and ``turn_off_cfg_start_si`` and guides only the scales ``on <= k < off``.
    - ``constant_interval``: 1.0 inside [start, end) (the same rules), ``None`` outside: Infinity's ``cfg_list`` of
      the form ``[c, …, c, 1, …, 1]`` (cfg 1 leaves a scale unguided), the constant schedule with an interval.

    ``None`` means no guidance at this scale: the sampler uses the conditional logits as they are (Switti's
    CFG on/off range).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if K < 1 or not 0 <= k < K:
        raise ValueError(f"scale index k={k} is outside 0..K-1 with K={K}")
    if schedule in INTERVAL_SCHEDULES:
        stop = K if end is None else end
        if not (0 <= start <= K and 0 <= stop <= K):
            raise ValueError(f"interval [start={start}, end={end}) must lie in 0..K={K} (end None: K)")
        if not start <= k < stop:
            return None
    if schedule in ("constant", "constant_interval"):
        return 1.0
    return k / (K - 1) if K > 1 else 1.0
