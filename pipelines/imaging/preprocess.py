"""Volume -> model input: orientation, spacing, intensity window, fixed shape.

The steps are MONAI transforms over a :class:`monai.data.MetaTensor` that carries
the Volume's affine, so ``Orientationd`` and ``Spacingd`` act in patient space.
Everything is declared in a :class:`PreprocessConfig` that lives in the model's
config, and nothing is random, so the same Volume always gives the same tensor.

Each step appends a TorchIO-style record (step, arguments, package version) to
the output's ``meta["provenance"]``, after the Volume's own records.

Two implementations compute the same tensor. ``"monai"`` runs the MONAI transforms.
``"auto"`` (the default) asks MONAI, lazily, for every step's output grid and affine,
then resamples axis by axis in NumPy (:mod:`pipelines.imaging.separable`) where each
output axis reads from a single input axis. Orientation and Spacing grids always do
(Spacing keeps the input's axis directions), so in practice only 2-D and colour
volumes run the MONAI transforms. The two agree to float32 rounding (MONAI resamples
in float64); records from the NumPy path say ``package: clinfuse`` and name the MONAI
transform they reproduce. Only the MONAI path leaves an invertible
``applied_operations`` trace on the output.

Examples
--------
>>> cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), spatial_size=(32, 32, 16),
...                        windows={"CT": Window(-1000.0, 400.0)})
>>> tensor = Preprocess(cfg)(volume)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    Orientation,
    Orientationd,
    Resize,
    Resized,
    ResizeWithPadOrCrop,
    ResizeWithPadOrCropd,
    ScaleIntensityRange,
    Spacing,
    Spacingd,
    Transform,
)

from pipelines.imaging.separable import (
    AxisMap,
    affine_axis_maps,
    apply_maps,
    interpolate_map,
    shift_map,
)
from pipelines.imaging.volume import Volume

__all__ = [
    "Preprocess",
    "PreprocessConfig",
    "Preprocessd",
    "VolumeToTensor",
    "Window",
    "WindowByModality",
    "WindowByModalityd",
    "build_transforms",
]

_KEY = "image"
_DEFAULT_WINDOW = "default"
# The affine is RAS+ (Volume's convention); said explicitly so MONAI's default can't drift.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class Window:
    """Map intensities ``[a_min, a_max]`` linearly onto ``[b_min, b_max]``, clipped."""

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("a_min", "a_max", "b_min", "b_max"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not self.a_max > self.a_min:
            raise ValueError(f"window a_max must exceed a_min, got a_min={self.a_min}, "
                             f"a_max={self.a_max}")
        if not self.b_max > self.b_min:
            raise ValueError(f"window b_max must exceed b_min, got b_min={self.b_min}, "
                             f"b_max={self.b_max}")

    def to_dict(self) -> dict[str, float]:
        return {"a_min": self.a_min, "a_max": self.a_max, "b_min": self.b_min,
                "b_max": self.b_max}


@dataclass(frozen=True)
class PreprocessConfig:
    """How a model wants its image input; serialisable with to_dict/from_dict.

    Parameters
    ----------
    spatial_size : tuple of 3 int
        Output shape (X, Y, Z) after resampling.
    windows : mapping str -> Window
        Intensity window per Modality; the key ``"default"`` covers the rest.
    spacing : tuple of 3 float, optional
        Output voxel size in mm; None keeps the input spacing. Default (1, 1, 1).
    orientation : str
        Output axis codes. Default ``"RAS"``.
    interpolation : {"bilinear", "nearest"}
        Resampling mode for Spacing and, with ``fit="resize"``, Resize.
    fit : {"crop_pad", "resize"}
        Reach ``spatial_size`` by centred crop/zero-pad (keeps the spacing) or by
        resizing (keeps the field of view).
    channels : {1, 3}
        The model's input channels: 1 takes colour as BT.601 luma, 3 takes RGB
        (:class:`pipelines.imaging.colour.ToModelChannels`). Default 1.
    """

    spatial_size: tuple[int, int, int]
    windows: Mapping[str, Window]
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    orientation: str = "RAS"
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    fit: Literal["crop_pad", "resize"] = "crop_pad"
    channels: int = 1

    def __post_init__(self) -> None:
        size = tuple(self.spatial_size)
        if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"spatial_size must be 3 positive ints, got {self.spatial_size!r}")
        object.__setattr__(self, "spatial_size", size)
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"spacing must be 3 positive mm values, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        codes = self.orientation.upper()
        if len(codes) != 3 or sorted(
                "LRAPSI".index(c) // 2 if c in "LRAPSI" else -1 for c in codes) != [0, 1, 2]:
            raise ValueError(f"orientation must be 3 axis codes like 'RAS', got "
                             f"{self.orientation!r}")
        object.__setattr__(self, "orientation", codes)
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got "
                             f"{self.interpolation!r}")
        if self.fit not in ("crop_pad", "resize"):
            raise ValueError(f"fit must be 'crop_pad' or 'resize', got {self.fit!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if not self.windows:
            raise ValueError("windows must name at least one modality (or 'default')")
        windows = {str(k).upper() if k != _DEFAULT_WINDOW else k:
                   w if isinstance(w, Window) else Window(**w) for k, w in self.windows.items()}
        object.__setattr__(self, "windows", windows)

    def window_for(self, modality: str | None) -> Window:
        """The window of ``modality``, else the default one.

        Raises
        ------
        KeyError
            Neither the modality nor ``"default"`` has a window.
        """
        key = (modality or "").upper()
        if key in self.windows:
            return self.windows[key]
        if _DEFAULT_WINDOW in self.windows:
            return self.windows[_DEFAULT_WINDOW]
        raise KeyError(f"no intensity window for Modality {modality!r}; the config has "
                       f"{sorted(self.windows)} (add one, or a 'default')")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for YAML/JSON model configs."""
        return {
            "spatial_size": list(self.spatial_size),
            "windows": {k: w.to_dict() for k, w in self.windows.items()},
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "orientation": self.orientation,
            "interpolation": self.interpolation,
            "fit": self.fit,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (``channels`` defaults to 1)."""
        known = {"spatial_size", "windows", "spacing", "orientation", "interpolation", "fit",
                 "channels"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocess config keys {sorted(unknown)}; "
                             f"expected some of {sorted(known)}")
        args = dict(data)
        args["spatial_size"] = tuple(args["spatial_size"])
        if args.get("spacing") is not None:
            args["spacing"] = tuple(args["spacing"])
        args["windows"] = {k: Window(**w) for k, w in args["windows"].items()}
        return cls(**args)


def _record(step: str, *, package: str = "monai", **args: Any) -> dict[str, Any]:
    version = monai.__version__ if package == "monai" else _clinfuse_version()
    return {"step": step, "package": package, "version": version, "args": args}


@lru_cache(maxsize=1)
def _clinfuse_version() -> str:
    # Cached: importlib.metadata parses the package metadata on every call.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clinfuse")
    except PackageNotFoundError:
        return "unknown"


def _fast_record(step: str, **args: Any) -> dict[str, Any]:
    """A record for a step the NumPy path computed in place of MONAI's ``step``."""
    record = _record(step, package="clinfuse", **args)
    record["reproduces"] = f"monai {monai.__version__} {step}"
    return record


def _append(meta_tensor: MetaTensor, record: dict[str, Any]) -> None:
    meta_tensor.meta["provenance"] = [*meta_tensor.meta.get("provenance", []), record]


class VolumeToTensor(Transform):
    """Volume -> channel-first float32 MetaTensor with the Volume's affine.

    A 3-D volume gets one channel; a 4-D (X, Y, Z, T) volume puts T on the
    channel axis; a 2-D image becomes (1, X, Y, 1).
    """

    def __call__(self, volume: Volume) -> MetaTensor:  # type: ignore[override]
        array = _channel_first(volume)
        out = MetaTensor(torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32),
                         affine=torch.as_tensor(volume.affine, dtype=torch.float64),
                         meta=_tensor_meta(volume))
        _append(out, _record("VolumeToTensor", package="clinfuse", shape=list(array.shape)))
        return out


def _channel_first(volume: Volume) -> np.ndarray:
    """The volume's array as a (C, X, Y, Z) view: 2-D gets unit axes, 4-D T as channels.

    Colour's trailing RGB axis becomes the channels: (X, Y, 3) -> (3, X, Y, 1).
    """
    array = np.asarray(volume.array)
    if array.ndim == 2:
        return array[None, :, :, None]
    if array.ndim == 3 and volume.is_color:
        return np.moveaxis(array, -1, 0)[..., None]
    if array.ndim == 3:
        return array[None]
    return np.moveaxis(array, -1, 0)


def _tensor_meta(volume: Volume) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in volume.metadata.items()
                            if isinstance(v, str | int | float | bool)}
    meta["provenance"] = [dict(r) for r in volume.provenance]
    return meta


class WindowByModality(Transform):
    """Intensity window chosen by the image's Modality (ScaleIntensityRange, clipped).

    Parameters
    ----------
    windows : mapping str -> Window
        Per Modality, with optional ``"default"``.
    """

    def __init__(self, windows: Mapping[str, Window]) -> None:
        if not windows:
            raise ValueError(f"windows must be non-empty, got {windows!r}")
        self.windows = dict(windows)

    def __call__(self, img: MetaTensor, modality: str | None = None  # type: ignore[override]
                 ) -> MetaTensor:
        modality = modality if modality is not None else img.meta.get("Modality")
        key = (modality or "").upper()
        window = self.windows.get(key, self.windows.get(_DEFAULT_WINDOW))
        if window is None:
            raise KeyError(f"no intensity window for Modality {modality!r}; have "
                           f"{sorted(self.windows)}")
        if img.numel() and float(img.max()) == float(img.min()):
            _warn_constant(float(img.max()), img.meta.get("SeriesInstanceUID", "?"))
        out = ScaleIntensityRange(window.a_min, window.a_max, window.b_min, window.b_max,
                                  clip=True, dtype=np.float32)(img)
        assert isinstance(out, MetaTensor)
        args: dict[str, Any] = {"modality": modality, "clip": True, **window.to_dict()}
        _append(out, _record("ScaleIntensityRange", **args))
        return out


def _warn_constant(value: float, series: Any) -> None:
    warnings.warn(f"constant image (value {value}) for series {series}; the window maps it "
                  "to one value", RuntimeWarning, stacklevel=3)


class WindowByModalityd(MapTransform):
    """Dictionary form of :class:`WindowByModality`."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, windows: Mapping[str, Window],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = WindowByModality(windows)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class _Recorded(MapTransform):
    """Run a MONAI dict transform and record it on each key's MetaTensor."""

    def __init__(self, inner: MapTransform, **args: Any) -> None:
        super().__init__(inner.keys)
        self.inner = inner
        self.args = args

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        before = {k: list(data[k].meta.get("provenance", [])) for k in self.key_iterator(data)}
        d = dict(self.inner(data))
        for key in self.key_iterator(d):
            # MONAI copies meta between steps; rebuild from the pre-step history.
            d[key].meta["provenance"] = [*before[key],
                                         _record(type(self.inner).__name__, **self.args)]
        return d

    def __repr__(self) -> str:
        return f"{type(self.inner).__name__}({self.args})"


def build_transforms(config: PreprocessConfig, keys: Sequence[str] = (_KEY,)) -> Compose:
    """The MONAI Compose that :class:`Preprocess` runs on ``{key: MetaTensor}``."""
    steps: list[Any] = [_Recorded(Orientationd(keys, axcodes=config.orientation,
                                               labels=_RAS_LABELS),
                                  axcodes=config.orientation)]
    if config.spacing is not None:
        steps.append(_Recorded(Spacingd(keys, pixdim=config.spacing, mode=config.interpolation,
                                        padding_mode="zeros"),
                               pixdim=list(config.spacing), mode=config.interpolation))
    steps.append(WindowByModalityd(keys, config.windows))
    if config.fit == "crop_pad":
        steps.append(_Recorded(ResizeWithPadOrCropd(keys, spatial_size=config.spatial_size,
                                                    mode="constant"),
                               spatial_size=list(config.spatial_size), mode="constant"))
    else:
        mode = "trilinear" if config.interpolation == "bilinear" else "nearest"
        steps.append(_Recorded(Resized(keys, spatial_size=config.spatial_size, mode=mode),
                               spatial_size=list(config.spatial_size), mode=mode))
    return Compose(steps)


Implementation = Literal["auto", "monai"]
_IMPLEMENTATIONS = ("auto", "monai")


class Preprocess(Transform):
    """Volume -> model input tensor (C, X, Y, Z) float32, as the config declares.

    The result is a MetaTensor (a ``torch.Tensor``) whose ``affine`` places the
    output voxels and whose ``meta["provenance"]`` lists every step.

    Parameters
    ----------
    config : PreprocessConfig
    implementation : {"auto", "monai"}, default "auto"
        ``"auto"`` resamples axis by axis in NumPy where the grids allow it (see the
        module docstring), else runs MONAI; ``"monai"`` always runs the MONAI transforms.
    """

    def __init__(self, config: PreprocessConfig, *,
                 implementation: Implementation = "auto") -> None:
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got "
                             f"{implementation!r}")
        self.config = config
        # Not `backend`: MONAI's Transform uses that name for its array libraries.
        self.implementation = implementation
        self.to_tensor = VolumeToTensor()
        self.transforms = build_transforms(config)
        self._geometry = _LazyGeometry(config)

    def __call__(self, volume: Volume) -> MetaTensor:  # type: ignore[override]
        window = self.config.window_for(volume.metadata.get("Modality"))  # fail before work
        with np.errstate(all="raise", under="ignore"):
            if self.implementation == "auto":
                fast = self._axis_aligned(volume, window)
                if fast is not None:
                    return fast
            out = self.transforms({_KEY: self.to_tensor(volume)})[_KEY]
        result = out.to(torch.float32)
        assert isinstance(result, MetaTensor)
        return result

    def _axis_aligned(self, volume: Volume, window: Window) -> MetaTensor | None:
        """The NumPy path, or None where it does not apply (colour, 2-D, sheared grids)."""
        if volume.is_color or np.ndim(volume.array) not in (3, 4):
            return None
        cfg = self.config
        data = _channel_first(volume)
        if data.dtype != np.float32:
            data = data.astype(np.float32)  # keeps the memory order; VolumeToTensor's cast
        src_affine = np.asarray(volume.affine, dtype=np.float64)
        mid_affine, mid_shape, out_affine, out_shape = self._geometry(data.shape, src_affine)
        maps = affine_axis_maps(np.linalg.solve(src_affine, mid_affine), data.shape[1:],
                                mid_shape, cfg.interpolation)
        fit_maps = self._fit_maps(mid_affine, mid_shape, out_affine, out_shape)
        if maps is None or fit_maps is None:
            return None
        image = apply_maps(data, maps)
        if image.size and image.max() == image.min():
            _warn_constant(float(image.max()), volume.metadata.get("SeriesInstanceUID", "?"))
        # ScaleIntensityRange's arithmetic, in place and in the same order; multiplying
        # by 1 and adding 0 change no value, so the usual [0, 1] target skips them.
        image -= window.a_min
        image /= window.a_max - window.a_min
        if window.b_max - window.b_min != 1.0:
            image *= window.b_max - window.b_min
        if window.b_min != 0.0:
            image += window.b_min
        np.clip(image, window.b_min, window.b_max, out=image)
        image = apply_maps(image, fit_maps)

        records = [_fast_record("Orientationd", axcodes=cfg.orientation)]
        if cfg.spacing is not None:
            records.append(_fast_record("Spacingd", pixdim=list(cfg.spacing),
                                        mode=cfg.interpolation))
        records.append(_fast_record("ScaleIntensityRange",
                                    modality=volume.metadata.get("Modality"), clip=True,
                                    **window.to_dict()))
        if cfg.fit == "crop_pad":
            records.append(_fast_record("ResizeWithPadOrCropd",
                                        spatial_size=list(cfg.spatial_size), mode="constant"))
        else:
            records.append(_fast_record("Resized", spatial_size=list(cfg.spatial_size),
                                        mode=_resize_mode(cfg)))
        meta = _tensor_meta(volume)
        meta["provenance"] += [
            _record("VolumeToTensor", package="clinfuse", shape=list(data.shape)), *records]
        return MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(out_affine),
                          meta=meta)

    def _fit_maps(self, mid_affine: np.ndarray, mid_shape: tuple[int, ...],
                  out_affine: np.ndarray, out_shape: tuple[int, ...]) -> list[AxisMap] | None:
        if self.config.fit == "resize":
            mode = self.config.interpolation
            return [interpolate_map(d, mid_shape[d], out_shape[d], mode) for d in range(3)]
        # Pad/crop moves the grid by whole voxels: read the shift off the two affines.
        shift = np.linalg.solve(mid_affine, out_affine)
        offsets = np.rint(shift[:3, 3])
        if not np.allclose(shift[:3, :3], np.eye(3), atol=1e-6) or \
                not np.allclose(shift[:3, 3], offsets, atol=1e-4):
            return None
        return [shift_map(d, int(offsets[d]), mid_shape[d], out_shape[d]) for d in range(3)]


def _resize_mode(config: PreprocessConfig) -> str:
    return "trilinear" if config.interpolation == "bilinear" else "nearest"


class _LazyGeometry:
    """Output grids of Orientation, Spacing and the fit step, from MONAI, without data.

    MONAI's lazy mode computes each transform's output shape and affine without
    touching voxels, so the NumPy path lands on exactly the grid the MONAI path would.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.orient = Orientation(axcodes=config.orientation, labels=_RAS_LABELS, lazy=True)
        self.spacing = None if config.spacing is None else Spacing(
            pixdim=config.spacing, mode=config.interpolation, padding_mode="zeros", lazy=True)
        self.fit: Transform = (
            ResizeWithPadOrCrop(spatial_size=config.spatial_size, mode="constant", lazy=True)
            if config.fit == "crop_pad" else
            Resize(spatial_size=config.spatial_size, mode=_resize_mode(config), lazy=True))

    def __call__(self, shape: tuple[int, ...], affine: np.ndarray
                 ) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, tuple[int, ...]]:
        # A zero-stride stand-in of the right shape: lazy transforms read only its size.
        probe = MetaTensor(torch.zeros(()).expand(*shape), affine=torch.as_tensor(affine))
        mid = self.orient(probe)
        if self.spacing is not None:
            mid = self.spacing(mid)
        end = self.fit(mid)

        def grid(t: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
            assert isinstance(t, MetaTensor)
            affine = np.asarray(t.peek_pending_affine(), dtype=np.float64)
            return affine, tuple(int(s) for s in t.peek_pending_shape())

        return (*grid(mid), *grid(end))


class Preprocessd(MapTransform):
    """Dictionary form of :class:`Preprocess`: each key holds a Volume (e.g. per modality)."""

    def __init__(self, keys: Sequence[Hashable] | Hashable, config: PreprocessConfig,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preprocess = Preprocess(config)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.preprocess(d[key])
        return d
