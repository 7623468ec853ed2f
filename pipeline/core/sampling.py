"""The scale-wise guided sampler: one loop for every backbone, CFG / IGG / mixed guidance, per-scale signals.

At each scale k of K the backbone gives conditional and unconditional logits (one forward pass over a 2B batch that
shares the KV cache); :func:`pipeline.core.guidance.guide` combines them with the schedule's ratio; VAR's top-k then
top-p filtering and one multinomial draw (seeded generator) choose the tokens. The diagnostics of
:mod:`pipeline.core.metrics` are computed from the tensors already there, no extra forward pass.

With ``top_k=1`` and the same weights the tokens equal those of VAR's ``autoregressive_infer_cfg`` (CFG:
``w_cfg=cfg, w_igg=None``) and of the IGG authors' fork (IGG and mixed).

A condition is a class label, or a prompt for a text-to-image backbone (Switti). Switti's pipeline guides the scales
``turn_on_cfg_start_si <= k < turn_off_cfg_start_si`` on VAR's ramp: here ``schedule="interval"`` with
``interval_start``, ``interval_end``; with ``drop_uncond`` the unconditional half of the batch (and of its caches)
is dropped once no later scale is guided, and ``last_scale_temp`` divides the logits of the scales after the
interval, as Switti's pipeline does; its tokens are then reproduced token for token (CFG), and IGG and mixed
guidance apply inside the same interval. Its edge cases too: with on == off no scale is guided and the temperature
divides the logits from that scale on (not before); with on > off no scale is guided either, and the temperature
starts at the on scale (:func:`tempered_from`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.backbones.base import BitwiseBackbone, ScaleWiseBackbone, TextToImageBackbone
from pipeline.core.guidance import INTERVAL_SCHEDULES, guide, schedule_ratio
from pipeline.core.metrics import bit_pairs, divergence, evenness, vocab_evenness
from pipeline.core.seeds import derive_seed

if TYPE_CHECKING:
    from pipeline.config.schema import SweepConfig


@dataclass
class ScaleSignals:
    """Diagnostics of one scale, each per image."""

    token_evenness: Tensor   # (B,) evenness(guided - uncond)
    vocab_evenness: Tensor   # (B,) vocab_evenness(guided)
    div_uncond: Tensor       # (B,) divergence(guided, uncond), bits
    div_cond: Tensor         # (B,) divergence(guided, cond), bits
    magnitude_Bhw: Tensor    # (B, pn, pn) per-token L2 norm of the nudge (guided - uncond)  # noqa: N815
    # After drop_uncond the unconditional logits are not computed: the signals of those scales take uncond = cond.


@dataclass
class SampleResult:
    images: Tensor           # (B, 3, H, W) float32 in [0, 1], on CPU
    indices: list[Tensor]    # per scale (B, pn*pn) int64
    signals: list[ScaleSignals]


@dataclass
class ScaleStep:
    """What the sampler saw at scale k, handed to the optional ``callback`` (tensors on the backbone's device)."""

    k: int
    pn: int
    ratio: float | None      # the schedule's value; None: no guidance at this scale
    cond: Tensor             # (B, l, V) conditional logits
    uncond: Tensor           # (B, l, V) unconditional logits (the conditional ones after drop_uncond)
    guided: Tensor           # (B, l, V) float32 guided logits, before top-k / top-p filtering
    idx: Tensor              # (B, l) int64 chosen tokens
    signals: ScaleSignals | None   # None when sampling with_signals=False


def scale_signals(cond_BlV: Tensor, uncond_BlV: Tensor, guided_BlV: Tensor, pn: int,
                  bits: int | None = None) -> ScaleSignals:
    """Diagnostics of one scale from its logits (B, pn*pn, V); all results on CPU. A bitwise backbone's (``bits``
    per token, V = 2·bits): evenness and divergence of its bits' distributions (:func:`bit_pairs`), the nudge's
    magnitude over all 2·bits logits (IGG's nudge)."""
    nudge_BlV = guided_BlV - uncond_BlV.float()
    guided, uncond, cond = (guided_BlV, uncond_BlV, cond_BlV) if bits is None else (   # the distributions drawn
        bit_pairs(guided_BlV, bits), bit_pairs(uncond_BlV, bits), bit_pairs(cond_BlV, bits))
    return ScaleSignals(
        token_evenness=evenness(nudge_BlV).cpu(),
        vocab_evenness=vocab_evenness(guided).cpu(),
        div_uncond=divergence(guided, uncond).cpu(),
        div_cond=divergence(guided, cond).cpu(),
        magnitude_Bhw=nudge_BlV.norm(dim=-1).view(-1, pn, pn).cpu(),
    )


def sample_top_k_top_p(logits_BlV: Tensor, *, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """VAR's filtering and draw: keep the top_k largest logits (0: all), then the smallest set of largest
    probabilities whose mass reaches top_p (0: all), then one multinomial draw per token.

    Args:
        logits_BlV: (B, l, V) float logits (not modified).
        top_k: number of logits kept per token; 0 disables.
        top_p: nucleus mass in [0, 1]; 0 disables.
        generator: random source (None: torch's global one).

    Returns:
        (B, l) int64 token indices.
    """
    B, l, V = logits_BlV.shape
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, float("-inf"))
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted_BlV[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(drop_sorted_BlV.scatter(-1, order_BlV, drop_sorted_BlV), float("-inf"))
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=generator).view(B, l)


def sample_bits(logits_BlV: Tensor, bits: int, *, top_k: int = 0, top_p: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Infinity's bitwise draw: logits (B, l, 2·bits) are a pair per bit; each bit is drawn from its pair by
    :func:`sample_top_k_top_p` (so top_k >= 2 keeps both, top_k = 1 is greedy; top_p drops the less likely value of
    a bit when its probability is at most 1 − top_p), in the official order (token by token, bit by bit).

    Returns:
        (B, l) int64 token indices: the bits as binary digits, the first bit most significant.
    """
    B, l, _ = logits_BlV.shape
    bit_Bld = sample_top_k_top_p(bit_pairs(logits_BlV, bits), top_k=top_k, top_p=top_p,
                                 generator=generator).view(B, l, bits)
    return (bit_Bld << torch.arange(bits - 1, -1, -1, device=bit_Bld.device)).sum(-1)


def _labels_tensor(labels: Tensor | Sequence[int], backbone: ScaleWiseBackbone) -> Tensor:
    labels_B = torch.as_tensor(labels).flatten()
    if labels_B.numel() == 0:
        raise ValueError("labels is empty; pass one class label per image")
    if labels_B.is_floating_point() or labels_B.is_complex() or labels_B.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels_B.dtype}")
    if labels_B.min() < 0 or labels_B.max() >= backbone.num_classes:
        raise ValueError(f"labels must lie in 0..{backbone.num_classes - 1} (the backbone's classes); "
                         f"got {labels_B.min().item()}..{labels_B.max().item()}")
    return labels_B.to(backbone.device, torch.int64)


def _conditions(conditions: Tensor | Sequence[int] | Sequence[str],
                backbone: ScaleWiseBackbone | TextToImageBackbone) -> Tensor | list[str]:
    """The batch's conditions as the backbone takes them: a list of prompts, or labels (B,) int64 on its device."""
    if isinstance(backbone, TextToImageBackbone):
        prompts = [conditions] if isinstance(conditions, str) else list(conditions)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("this backbone is text-to-image: pass one prompt (str) per image")
        return prompts
    if isinstance(conditions, str) or (isinstance(conditions, Sequence) and any(isinstance(c, str)
                                                                                 for c in conditions)):
        raise ValueError("this backbone is class-conditional: pass class labels, not prompts")
    return _labels_tensor(conditions, backbone)


def tempered_from(schedule: str, K: int, *, start: int = 0, end: int | None = None) -> int:
    """The first scale index whose logits ``last_scale_temp`` divides (K: none), as Switti's pipeline chooses it.

    Its branches per scale k: ``k < on`` the conditional logits, else ``k < off`` guided, else (k past both) the
    logits over the temperature. So with ``schedule="interval"`` the temperature starts at ``max(start, end)``:
    the off scale after a guided interval, that same scale for an empty one (``start == end``), the on scale for a
    reversed one (``start > end``, which guides no scale); ``end=None`` (K) and the schedules that guide every
    scale never apply it.
    """
    if schedule not in INTERVAL_SCHEDULES:
        return K
    return max(start, K if end is None else end)


def check_sampling_args(top_k: int, top_p: float, window: int | None) -> None:
    """ValueError naming the argument if top_k, top_p or window is out of range."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 disables top-k filtering)")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must lie in [0, 1] (0 disables top-p filtering)")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1
                               or window % 2 == 0):
        raise ValueError(f"window={window!r} must be an odd integer >= 1, or None for global IGG")


def sample(
    backbone: ScaleWiseBackbone | TextToImageBackbone,
    labels: Tensor | Sequence[int] | Sequence[str],
    *,
    w_cfg: float | None,
    w_igg: float | None,
    window: int | None = None,
    schedule: str | Sequence[float | None] = "linear",
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    interval_start: int = 0,
    interval_end: int | None = None,
    amp_dtype: torch.dtype = torch.float16,
    with_signals: bool = True,
    callback: Callable[[ScaleStep], None] | None = None,
    last_scale_temp: float | None = None,
    drop_uncond: bool = False,
) -> SampleResult:
    """Generate one image per label (or prompt) with guided scale-wise sampling.

    Args:
        backbone: a :class:`ScaleWiseBackbone` (e.g. from :func:`pipeline.backbones.var.load_var`) or a
            :class:`TextToImageBackbone` (:func:`pipeline.backbones.switti.load_switti`).
        labels: (B,) class labels in 0..num_classes-1, or B prompts for a text-to-image backbone.
        w_cfg: CFG weight (VAR's ``cfg``), or None to drop the CFG term.
        w_igg: IGG weight, or None to drop the IGG term.
        window: odd side of IGG's attention window on each scale's token map; None: global.
        schedule: ``linear`` (VAR's k/(K-1)), ``constant``, ``interval`` (the ramp inside the interval) or
            ``constant_interval`` (1 inside it, Infinity's ``[c, …, c, 1, …, 1]``); or the K ratios themselves, one per
            scale, None where a scale is not guided (Infinity's per-scale ``cfg_list``:
            :func:`pipeline.backbones.infinity.official_guidance`).
        top_k: keep the top_k logits per token; 0 disables.
        top_p: nucleus mass in [0, 1]; 0 disables.
        seed: seeds the sampler's own ``torch.Generator``; None uses torch's global random state.
        interval_start: with an interval schedule, first guided scale index.
        interval_end: with an interval schedule, guidance stops at this scale index (None: K).
        amp_dtype: autocast dtype on CUDA (float16 as VAR's evaluation, or bfloat16); CPU runs in float32.
        with_signals: compute the per-scale diagnostics; False leaves ``signals`` empty (FID batches).
        callback: called after each scale with a :class:`ScaleStep`.
        last_scale_temp: divides the logits of the scales from :func:`tempered_from` on, the off scale of the
            interval (Switti's ``last_scale_temp``, e.g. 0.1); None: no temperature. With the linear schedule every
            scale is guided.
        drop_uncond: once no later scale is guided, run the conditional half of the batch only (Switti's pipeline
            after its CFG off-scale): less compute, the same conditional logits. With an empty or reversed interval
            that is from the first scale on (Switti's pipeline runs the unused unconditional half until its off
            scale).

    Returns:
        :class:`SampleResult` with images (B, 3, H, W) in [0, 1] on CPU, indices per scale, signals per scale.
    """
    check_sampling_args(top_k, top_p, window)
    if last_scale_temp is not None and not (math.isfinite(last_scale_temp) and last_scale_temp > 0):
        raise ValueError(f"last_scale_temp={last_scale_temp!r} must be a positive number, or None for no temperature")
    conditions = _conditions(labels, backbone)
    patch_nums = backbone.patch_nums
    K = len(patch_nums)
    if isinstance(schedule, str):
        ratios = [schedule_ratio(schedule, k, K, start=interval_start, end=interval_end) for k in range(K)]
    elif len(schedule) == K and all(r is None or math.isfinite(r) for r in schedule):
        ratios = list(schedule)
    else:
        raise ValueError(f"schedule={schedule!r}: give a schedule name or one finite ratio (or None) per scale ({K})")
    bits = backbone.bits_per_token if isinstance(backbone, BitwiseBackbone) else None
    guided_until = max((k + 1 for k, r in enumerate(ratios) if r is not None), default=0)   # no guidance after
    temperature_from = tempered_from(schedule, K, start=interval_start, end=interval_end) \
        if isinstance(schedule, str) else K
    device = backbone.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if device.type == "cuda" else nullcontext()

    indices, signals = [], []
    with torch.no_grad(), autocast:
        rollout = backbone.start(conditions)
        for k, (pn, ratio) in enumerate(zip(patch_nums, ratios, strict=True)):
            if drop_uncond and k >= guided_until:
                rollout.drop_uncond()
            cond_BlV, uncond_BlV = rollout.logits()
            if uncond_BlV is None:
                uncond_BlV = cond_BlV
            if ratio is None:
                guided_BlV = cond_BlV.float()
                if last_scale_temp is not None and k >= temperature_from:
                    guided_BlV = guided_BlV / last_scale_temp
            else:
                guided_BlV = guide(cond_BlV, uncond_BlV, w_cfg=w_cfg, w_igg=w_igg, ratio=ratio, hw=(pn, pn),
                                   window=window)
            if bits is None:
                idx_Bl = sample_top_k_top_p(guided_BlV, top_k=top_k, top_p=top_p, generator=generator)
            else:
                idx_Bl = sample_bits(guided_BlV, bits, top_k=top_k, top_p=top_p, generator=generator)
            rollout.take(idx_Bl)
            signal = scale_signals(cond_BlV, uncond_BlV, guided_BlV, pn, bits) if with_signals else None
            indices.append(idx_Bl.cpu())
            if signal is not None:
                signals.append(signal)
            if callback is not None:
                callback(ScaleStep(k, pn, ratio, cond_BlV, uncond_BlV, guided_BlV, idx_Bl, signal))
        images = rollout.decode().float().cpu()
    return SampleResult(images=images, indices=indices, signals=signals)


def spread_prompts(num_images: int, prompts: Sequence[str]) -> list[str]:
    """The prompts of images 0 .. num_images-1 of a text-to-image sweep: image i gets ``prompts[i·P mod N]``, the
    N prompts spread as :func:`spread_labels` spreads classes (N images use every prompt once)."""
    return [prompts[i] for i in spread_labels(num_images, len(prompts)).tolist()]


def spread_labels(num_images: int, num_classes: int) -> Tensor:
    """(N,) labels, label i = i·P mod C with P ≈ 0.618·C coprime to C.

    Every C consecutive images hold each class once, any prefix is spread over the classes (a golden-ratio
    sequence), and the labels of N images are a prefix of those of more: a larger N extends a smaller one.
    """
    step = max(1, round(0.618 * num_classes))
    while math.gcd(step, num_classes) != 1:
        step += 1
    return torch.arange(num_images) * step % num_classes


@dataclass(frozen=True)
class Sampling:
    """How a sweep samples every candidate (besides its weights): schedule, its interval, top-k / top-p."""

    schedule: str = "linear"
    interval_start: int = 0
    interval_end: int | None = None
    top_k: int = 0
    top_p: float = 0.0
    last_scale_temp: float | None = None
    drop_uncond: bool = False
    prompts: str | None = None     # text-to-image: the CSV of the prompt set (pipeline.data.prompts)

    def guiding(self, interval: tuple[int, int | None] | None) -> Sampling:
        """This sampling with its guidance interval set to `interval` (start, end); None: unchanged."""
        if interval is None:
            return self
        return dataclasses.replace(self, interval_start=interval[0], interval_end=interval[1])

    def ratios(self, K: int) -> list[float | None]:
        """The guidance ratio of each of K scales (None: not guided), as :func:`sample` draws them."""
        return [schedule_ratio(self.schedule, k, K, start=self.interval_start, end=self.interval_end)
                for k in range(K)]

    @classmethod
    def of(cls, cfg: SweepConfig) -> Sampling:
        """A sweep's: its guidance schedule and interval, its backbone's top-k, top-p and Switti controls."""
        g, b = cfg.guidance, cfg.backbone
        return cls(schedule=g.schedule, interval_start=g.schedule_start, interval_end=g.schedule_end,
                   top_k=b.top_k, top_p=b.top_p, last_scale_temp=b.last_scale_temp, drop_uncond=b.drop_uncond,
                   prompts=b.prompts)


def sweep_conditions(backbone: ScaleWiseBackbone | TextToImageBackbone, num_images: int,
                     sampling: Sampling) -> Tensor | list[str]:
    """The conditions of images 0 .. num_images-1 of a sweep: :func:`spread_labels` of the backbone's classes, or
    for a text-to-image backbone :func:`spread_prompts` of ``sampling.prompts``."""
    if isinstance(backbone, TextToImageBackbone):
        if sampling.prompts is None:
            raise ValueError("a text-to-image backbone needs a prompt set: set backbone.prompts=CSV "
                             "(e.g. Switti's eval_prompts/coco.csv)")
        from pipeline.data.prompts import read_prompts

        return spread_prompts(num_images, read_prompts(sampling.prompts))
    return spread_labels(num_images, backbone.num_classes)


def seeded_batches(backbone: ScaleWiseBackbone | TextToImageBackbone, w_cfg: float | None, w_igg: float | None,
                   window: int | None, *, num_images: int, batch_size: int, seed: int, sampling: Sampling,
                   start: int = 0, with_signals: Callable[[int], bool] = lambda b: False,
                   ) -> Iterator[tuple[int, SampleResult]]:
    """Images ``start`` .. ``num_images``-1 of one candidate as a sweep draws them: conditions
    :func:`sweep_conditions`, batch b of ``batch_size`` images seeded ``derive_seed(seed, b)``; so images 0..N-1 are
    the same at any larger N, and a candidate's images pair with another's. Yields (b, result) from batch
    ``start // batch_size`` on."""
    conditions_N = sweep_conditions(backbone, num_images, sampling)
    for b in range(start // batch_size, math.ceil(num_images / batch_size)):
        conditions_B = conditions_N[b * batch_size:(b + 1) * batch_size]
        yield b, sample(backbone, conditions_B, w_cfg=w_cfg, w_igg=w_igg, window=window, schedule=sampling.schedule,
                        interval_start=sampling.interval_start, interval_end=sampling.interval_end,
                        top_k=sampling.top_k, top_p=sampling.top_p, seed=derive_seed(seed, b),
                        with_signals=with_signals(b), last_scale_temp=sampling.last_scale_temp,
                        drop_uncond=sampling.drop_uncond)
