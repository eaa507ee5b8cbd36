"""The declared colour policy: how an image's colour meets a model's input channels.

Radiographs exported from viewers and published data sets arrive as RGB, RGBA or
palette PNG/JPEG/TIFF far more often than as grey, and ultrasound and secondary
captures arrive as RGB (or YBR) DICOM. The loaders have already made every colour
image RGB on a trailing axis (palette expanded, alpha dropped, CMYK/YCbCr/YBR
converted; :mod:`pipelines.imaging.planar`). This transform then fits the image to
the model:

- a one-channel model gets ITU-R BT.601 luma, ``Y = 0.299 R + 0.587 G + 0.114 B``
  (the weights of the JPEG/JFIF and Pillow "L" conversion), as float32, so a grey
  picture stored as RGB gives back exactly its grey values;
- a three-channel model takes colour as is, and grey replicated to three channels;
- grey stays grey for a one-channel model, 16-bit values included.

What was done is recorded in the Volume's metadata (``ColourPolicy``) and provenance,
and so in the preprocessed tensor's meta, whether or not anything changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import Transform

from pipelines.imaging.volume import Volume

__all__ = ["BT601_WEIGHTS", "LUMA_POLICY", "ToModelChannels"]

#: ITU-R BT.601 luma weights for R, G and B.
BT601_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
LUMA_POLICY = "colour -> ITU-R BT.601 luma (Y = 0.299 R + 0.587 G + 0.114 B)"


class ToModelChannels(Transform):
    """Volume -> Volume with the channels a model takes (1: grey, 3: RGB).

    Parameters
    ----------
    channels : {1, 3}
        The model's input channels (``image.channels`` in its config).
    """

    def __init__(self, channels: int = 1) -> None:
        if channels not in (1, 3):
            raise ValueError(f"image channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.channels = int(channels)

    def __call__(self, volume: Volume) -> Volume:  # type: ignore[override]
        metadata: dict[str, Any] = dict(volume.metadata)
        array = volume.array
        if self.channels == 1 and volume.is_color:
            array = np.tensordot(np.asarray(array, dtype=np.float32), BT601_WEIGHTS,
                                 axes=([-1], [0]))
            metadata.pop("ColorChannels", None)
            metadata["PhotometricInterpretation"] = "MONOCHROME2"
            policy = LUMA_POLICY
        elif self.channels == 1:
            policy = "grey kept (values unchanged)"
        elif volume.is_color:
            policy = "colour kept as RGB (3 channels)"
        else:
            if array.ndim == 4:
                raise ValueError("a 4-D grey volume cannot be replicated to 3 colour channels")
            array = np.repeat(np.asarray(array)[..., None], 3, axis=-1)
            metadata["ColorChannels"] = 3
            metadata["PhotometricInterpretation"] = "RGB"
            policy = "grey replicated to 3 channels"
        metadata["ColourPolicy"] = policy
        record = {"step": "ToModelChannels", "package": "clinfuse",
                  "arguments": {"channels": self.channels, "policy": policy}}
        return Volume(np.ascontiguousarray(array), volume.affine, metadata,
                      [*volume.provenance, record])
