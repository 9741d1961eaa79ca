"""Batched on-device SSL augmentation: the per-sample chain of :mod:`medssl.transforms.pipelines` applied to a
whole ``(B, C, D, H, W)`` batch on its device (CPU or CUDA), so the data loader only reads cached volumes.

Same distribution as the per-sample path for the same preset/overrides (tested statistically):
the geometry, masks, shuffles and Bézier curves call the very same pure functions of uniform random
numbers (:mod:`~medssl.transforms.views`, :mod:`~medssl.transforms.masking`,
:mod:`~medssl.transforms.genesis`); flips, rot90 and intensity stages mirror MONAI's parameter
distributions (``RandFlipd``, ``RandScaleIntensityd`` …) with per-sample parameters as ``(B,)`` tensors.

Randomness: one CPU ``torch.Generator`` (``self.generator``, seeded by ``seed``) draws every parameter;
voxel-sized random fields (noise, shuffle keys, noise fills) come from a generator on the images'
device re-seeded from it at each call, so ``state_dict()`` (the CPU generator state) fully restores
the stream on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from medssl.transforms.genesis import bezier_lut, bezier_remap, paint_mask
from medssl.transforms.intensity import gaussian_blur
from medssl.transforms.masking import fill_masked, patch_mask, ratio_mask, sample_boxes
from medssl.transforms.pipelines import DEFAULTS, resolve_params
from medssl.transforms.shuffle import cell_geometry, n_cells, shuffle_cells
from medssl.transforms.spatial import apply_axis, interp_matrix, rotate_batch
from medssl.transforms.views import crop_boxes, pad_extent

__all__ = ["BatchedSSLAugment", "crop_batch"]


def crop_batch(x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, roi_size: Sequence[int],
               flips: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample boxes of ``x`` ``(B, C, D, H, W)`` resampled to ``roi_size`` → ``(B, C, *roi_size)``.

    Trilinear with ``align_corners=True`` (the sample positions of MONAI ``Resize(align_corners=True)``
    after ``SpatialCrop``, the per-sample path), done separably as one batched matrix product per axis
    with ``(B, R, S)`` interpolation matrices (two non-zeros per row); an axis where every box has the
    roi's length is an exact copy by one ``index_select`` instead. Flips ``(B, 3)`` bool reverse the
    matrices' rows / indices, so they cost nothing. Measured ~3x faster than the former per-axis
    ``index_select`` + ``lerp`` (and ~7x faster than one 3D ``grid_sample``) on CPU for 32³ views of
    hippocampus volumes, 1 thread.
    """
    positions = []
    starts, sizes = starts.to(x.device), sizes.to(x.device)
    for a in range(3):
        r, s = int(roi_size[a]), x.shape[a + 2]
        o = torch.arange(r, device=x.device, dtype=torch.float64)
        step = (sizes[:, a, None].double() - 1) / max(r - 1, 1)
        pos = starts[:, a, None].double() + o * step  # (B, R) voxel positions along axis a
        if flips is not None:
            pos = torch.where(flips[:, a, None].to(x.device), pos.flip(1), pos)
        positions.append(pos)
    y = x
    for a in (2, 1, 0):
        pos, s = positions[a], x.shape[a + 2]
        i0 = pos.floor().long().clamp(0, s - 1)
        if bool((pos == i0).all()):  # every box has the roi's length here: an exact copy by indexing
            y = _take(y, a + 2, i0)
        else:
            y = apply_axis(y, a, interp_matrix(pos, s, x.dtype))
    return y


def _take(y: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``y`` indexed along ``dim`` by per-sample indices ``idx`` ``(B, R)``: one ``index_select`` of
    contiguous rows (faster than an element-wise ``gather`` with an expanded index)."""
    shp = list(y.shape)
    b, s, r = shp[0], shp[dim], idx.shape[1]
    if dim == y.ndim - 1:  # innermost axis: rows of one element, an expanded gather is faster
        return y.gather(dim, idx.view(b, *[1] * (y.ndim - 2), r).expand(*shp[:-1], r))
    p = 1
    for n in shp[:dim]:
        p *= n
    base = (torch.arange(p, device=y.device) * s).view(b, p // b, 1)  # (B, P/B, 1) first row of each slab
    rows = (base + idx[:, None, :]).reshape(-1)
    out = y.reshape(p * s, -1).index_select(0, rows)
    return out.view(*shp[:dim], r, *shp[dim + 1:])


class BatchedSSLAugment:
    """Whole-batch SSL augmentation producing the SSL batch contract keys (docs/CONTRACTS.md).

    Args:
        roi_size: view size ``(D, H, W)`` in voxels.
        seed: seed of ``self.generator``.
        **params: any key of :data:`medssl.transforms.pipelines.DEFAULTS` (crop scale/overlap, flips,
            rotations, intensity probabilities/ranges, masking, Genesis stages); missing keys take the
            defaults (which switch every stage off). Use :meth:`for_method` for the method presets.

    Call: ``aug(images)`` with ``images`` a ``(B, C, D, H, W)`` tensor or a list of ``(C, D_i, H_i, W_i)``
    tensors of different sizes (padded on their device), returns ``{"view1": (B, C, *roi_size), …}`` on
    the images' device. ``self.last_params`` holds the drawn boxes, flips and rotation labels (for tests).

    Raises:
        ValueError: unknown option or invalid value.
    """

    def __init__(self, roi_size: Sequence[int], seed: int = 0, **params: Any) -> None:
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown augmentation option(s) {unknown}; known: {sorted(DEFAULTS)}")
        self.roi_size = tuple(int(r) for r in roi_size)
        # resolve_params validates; "simclr" only names a preset to start from, every key is then overridden
        self.p = resolve_params("simclr", self.roi_size, **{**DEFAULTS, **params})
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._field_gens: dict[str, torch.Generator] = {}
        self.last_params: dict[str, torch.Tensor] = {}

    @classmethod
    def for_method(cls, method: str, roi_size: tuple[int, int, int], seed: int = 0,
                   **overrides: Any) -> BatchedSSLAugment:
        """The preset of ``method`` (``simclr``, ``triplet``, ``byol``, ``vicreg``, ``rotation``, ``mae``,
        ``genesis``, ``swin``) with ``overrides``; unknown names raise ``ValueError`` listing the known
        ones."""
        return cls(roi_size, seed=seed, **resolve_params(method, roi_size, **overrides))

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": CPU generator state}``: restores the whole random stream."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        on = {k: v for k, v in self.p.items() if v != DEFAULTS.get(k)}
        return f"{type(self).__name__}(roi_size={self.roi_size}, seed={self.seed}, {on})"

    # -- randomness -----------------------------------------------------------------------------------
    def _u(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def _field_gen(self, device: torch.device) -> torch.Generator:
        gen = self._field_gens.get(str(device))
        if gen is None:
            gen = self._field_gens[str(device)] = torch.Generator(device)
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        return gen

    # -- input ----------------------------------------------------------------------------------------
    def _inputs(self, images: torch.Tensor | Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Volumes, each one's centred padding offset ``(B, 3)`` (as MONAI ``SpatialPad(method="symmetric")``
        up to ``roi_size``) and padded extent ``(B, 3)``; nothing is copied."""
        is_tensor = isinstance(images, torch.Tensor)
        vols = [images[i] for i in range(images.shape[0])] if is_tensor else list(images)
        if not vols or any(v.ndim != 4 for v in vols):
            raise ValueError("images must be (B, C, D, H, W) or a non-empty list of (C, D, H, W) tensors")
        exts = torch.tensor([pad_extent(v.shape[1:], self.roi_size) for v in vols])
        shapes = torch.tensor([list(v.shape[1:]) for v in vols])
        return vols, (exts - shapes) // 2, exts

    def _regions(self, vols: list[torch.Tensor], lo: torch.Tensor, extent: torch.Tensor, starts: torch.Tensor,
                 sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy, per sample, the region of the largest box size of the batch that holds its box.

        A loop over B of one slice copy each (measured ~1.7 ms for B=32, 30³ regions, CPU; it spares copying
        whole volumes into a padded canvas); padding is the fill value. Returns the ``(B, C, *M)`` batch and
        the boxes' starts inside it.
        """
        m = sizes.amax(0)  # (3,) region size
        r = torch.minimum(starts, (extent - m).clamp(min=0))  # region start (padded coordinates)
        out = vols[0].new_full((len(vols), vols[0].shape[0], *m.tolist()), float(self.p["pad_value"]))
        for i, v in enumerate(vols):
            a = (r[i] - lo[i]).tolist()  # region start in the volume's own coordinates
            src = [slice(max(a[d], 0), min(a[d] + int(m[d]), v.shape[d + 1])) for d in range(3)]
            dst = [slice(sl.start - a[d], sl.stop - a[d]) for d, sl in enumerate(src)]
            out[i, :, dst[0], dst[1], dst[2]] = v[:, src[0], src[1], src[2]]
        return out, starts - r

    # -- stages ---------------------------------------------------------------------------------------
    def _where(self, apply: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(apply.to(old.device)[:, None, None, None, None], new, old)

    def _intensity(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """MONAI's intensity stages with per-sample parameters; stages that apply to only some samples
        run on that subset (index, compute, write back), scale+shift are one fused pass."""
        p, b = self.p, y.shape[0]
        dims = (1, 2, 3, 4)

        def draw(prob: float, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
            apply = self._u(b) < prob
            return apply, (lo + (hi - lo) * self._u(b)).to(device=y.device, dtype=y.dtype)

        def on(apply: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
            sel = apply.nonzero().flatten()
            if not sel.numel():
                return y
            idx = sel.to(y.device)
            y[idx] = fn(y[idx], sel)  # in place: y is always a fresh tensor owned by this call
            return y

        scale, shift = None, None
        if p["scale_prob"] > 0:  # RandScaleIntensityd: v * (1 + f), f ~ U(-a, a)
            apply, f = draw(p["scale_prob"], -p["scale_factor"], p["scale_factor"])
            scale = 1 + f * apply.to(f)
        if p["shift_prob"] > 0:  # RandShiftIntensityd: v + o, o ~ U(-a, a)
            apply, o = draw(p["shift_prob"], -p["shift_offset"], p["shift_offset"])
            shift = o * apply.to(o)
        if scale is not None or shift is not None:
            scale = torch.ones(b, device=y.device, dtype=y.dtype) if scale is None else scale
            shift = torch.zeros(b, device=y.device, dtype=y.dtype) if shift is None else shift
            y = y.mul_(scale.view(b, 1, 1, 1, 1)).add_(shift.view(b, 1, 1, 1, 1))  # in place: no new buffer
        if p["gamma_prob"] > 0:  # RandAdjustContrastd: ((v - min) / range) ** g * range + min
            apply, g = draw(p["gamma_prob"], *p["gamma"])

            def gamma(v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
                mn = v.amin(dim=dims, keepdim=True)
                rng = v.amax(dim=dims, keepdim=True) - mn
                return ((v - mn) / (rng + 1e-7)) ** g[sel.to(g.device)].view(-1, 1, 1, 1, 1) * rng + mn

            y = on(apply, gamma)
        if p["contrast_prob"] > 0:  # RandScaleIntensityFixedMeand: (v - mean) * (1 + f) + mean
            apply, f = draw(p["contrast_prob"], -p["contrast_factor"], p["contrast_factor"])

            def contrast(v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
                mean = v.mean(dim=dims, keepdim=True)
                return (v - mean) * (1 + f[sel.to(f.device)].view(-1, 1, 1, 1, 1)) + mean

            y = on(apply, contrast)
        if p["blur_prob"] > 0:  # RandGaussianSmoothd: sigma ~ U(lo, hi) per axis
            apply = self._u(b) < p["blur_prob"]
            lo, hi = p["blur_sigma"]
            sigma = lo + (hi - lo) * self._u(b, 3)
            y = on(apply, lambda v, sel: gaussian_blur(v, sigma[sel]))
        if p["noise_prob"] > 0:  # RandGaussianNoised: N(0, s), s ~ U(0, std)
            apply, sd = draw(p["noise_prob"], 0.0, p["noise_std"])

            def noise(v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
                n = torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
                return v + n * sd[sel.to(sd.device)].view(-1, 1, 1, 1, 1)

            y = on(apply, noise)
        return y

    def _restoration(self, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        p, (b, _, *shape) = self.p, y.shape
        dev = y.device
        mask = torch.zeros((b, *shape), dtype=torch.bool, device=dev) if self._has_mask() else None

        def masked_field(m: torch.Tensor) -> torch.Tensor:  # uniforms for the masked voxels only
            n = int(torch.count_nonzero(m)) * y.shape[1]
            return torch.rand(n, generator=gen, device=dev, dtype=y.dtype)

        if p["shuffle_prob"] > 0:  # cell size/offset per call; each sample's marginal = the per-sample path's
            apply = (self._u(b) < p["shuffle_prob"]).to(dev)
            cell, offset = cell_geometry(shape, p["shuffle_size"], self._u(3), self._u(3))
            n, _ = n_cells(shape, cell, offset)
            u_sel = torch.rand((b, n), generator=gen, device=dev, dtype=torch.float64)
            u_sel = torch.where(apply[:, None], u_sel, 2.0)  # samples not shuffled select no cell
            def u_keys(rows: int, nv: int) -> torch.Tensor:  # keys for the selected cells only
                return torch.rand((rows, nv), generator=gen, device=dev)

            y, m = shuffle_cells(y, cell, offset, u_sel, u_keys, float(p["shuffle_ratio"]))
            mask |= m
        if p["bezier_prob"] > 0:
            apply = self._u(b) < p["bezier_prob"]
            lut = bezier_lut(self._u(b, 4), self._u(b) < 0.5)
            y = self._where(apply, bezier_remap(y, lut.to(dev)), y)
        if p["paint_prob"] > 0:
            apply = (self._u(b) < p["paint_prob"]).to(dev)
            outpaint = self._u(b) < p["outpaint_prob"]
            kmax = int(p["paint_boxes"])
            n = 1 + torch.floor(self._u(b) * kmax).long()
            u_size, u_start = self._u(b, kmax, 3).to(dev), self._u(b, kmax, 3).to(dev)
            m = paint_mask(shape, outpaint.to(dev), n.to(dev), u_size, u_start)
            m &= apply[:, None, None, None]
            y = fill_masked(y, m, "noise", masked_field(m))
            mask |= m
        if p["mask"] == "cuboid":
            r = p["mask_ratio"]
            lo, hi = (float(r), float(r)) if isinstance(r, (int, float)) else (float(r[0]), float(r[1]))
            ratio = lo + (hi - lo) * self._u(b)
            k = int(p["max_cuboids"])
            starts, sizes = sample_boxes(shape, p["cuboid_size"], self._u(b, k, 3), self._u(b, k, 3))
            m = ratio_mask(starts.to(dev), sizes.to(dev), ratio.to(dev), shape)
            y = fill_masked(y, m, p["mask_fill"], masked_field(m) if p["mask_fill"] == "noise" else None)
            mask |= m
        elif p["mask"] == "patch":
            n = 1
            for s, q in zip(shape, p["patch_size"], strict=True):
                n *= s // q
            m = patch_mask(self._u(b, n).to(dev), p["mask_ratio"], shape, p["patch_size"])
            y = fill_masked(y, m, p["mask_fill"], masked_field(m) if p["mask_fill"] == "noise" else None)
            mask |= m
        return y, mask

    def _has_mask(self) -> bool:
        p = self.p
        return p["shuffle_prob"] > 0 or p["paint_prob"] > 0 or p["mask"] != "none"

    # -- call -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Augment a batch; returns the SSL batch dict (``view1``, … see the class docstring)."""
        p = self.p
        vols, lo, extent = self._inputs(images)
        b, dev = len(vols), vols[0].device
        v_n, k = int(p["n_views"]), int(p["n_candidates"])
        starts, sizes = crop_boxes(extent, self.roi_size, p["scale"], p["min_overlap"], p["max_overlap"],
                                   self._u(b, v_n), self._u(b, 3), self._u(b, k, 7) if v_n == 2 else None)
        gen = self._field_gen(dev)
        out: dict[str, torch.Tensor] = {}
        self.last_params = {"starts": starts, "sizes": sizes}
        for v in range(v_n):
            name = f"view{v + 1}"
            flips = self._u(b, 3) < p["flip_prob"] if p["flip_prob"] > 0 else None
            region, local = self._regions(vols, lo, extent, starts[:, v], sizes[:, v])
            y = crop_batch(region, local, sizes[:, v], self.roi_size, flips)  # RandFlipd per axis, folded
            if flips is not None:
                self.last_params[f"{name}_flips"] = flips
            if p["n_rotations"]:
                labels = torch.floor(self._u(b) * int(p["n_rotations"])).long()
                y = rotate_batch(y, labels.to(dev), int(p["n_rotations"]), p["rot_axes"])
                out[f"{name}_rot"] = labels.to(dev)
            y = self._intensity(y, gen)
            if p["targets"]:
                out[f"{name}_target"] = y
            y, mask = self._restoration(y, gen)
            out[name] = y
            if mask is not None:
                out[f"{name}_mask"] = mask[:, None].to(y.dtype)
        return out
