"""Header values read once per series: identical raw elements are converted once.

Every file of a series repeats most of its header byte for byte (Rows, PixelSpacing,
ImageOrientationPatient, the UIDs, the rescale), and pydicom converts each file's
copy anew, which costs more than reading the pixels of an uncompressed slice.
:func:`header_value` converts the first copy through pydicom as usual and hands
later files the same value when their raw bytes, VR and encoding are the same.

Only value representations whose conversion depends on nothing but those bytes are
shared (numbers, codes, UIDs, dates): text VRs depend on the dataset's character set.
Values are shared between datasets, so callers must treat them as read-only.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

__all__ = ["header_value"]

_SHARED_VRS = frozenset({"AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "SL", "SS",
                         "SV", "TM", "UI", "UL", "US", "UV"})
# Per-file values (positions, instance numbers) are remembered too; this bounds them.
_MAX_ENTRIES = 4096
_converted: dict[tuple[int, str, bytes, bool, bool], Any] = {}


@lru_cache(maxsize=256)
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"{keyword!r} is not a DICOM keyword")
    return tag


@lru_cache(maxsize=256)
def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def header_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, with repeated raw values converted only once.

    Parameters
    ----------
    ds : Dataset
    keyword : str
        A DICOM keyword, e.g. ``"PixelSpacing"``.
    default
        Returned when the element is absent.

    Raises
    ------
    ValueError
        ``keyword`` is not a DICOM keyword.
    """
    tag = _tag(keyword)
    try:
        elem = ds.get_item(tag)
    except KeyError:
        return default
    if elem is None:
        return default
    # Buffered (deferred) values and sequences are left to pydicom.
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR or _dictionary_vr(tag)
        if vr in _SHARED_VRS:
            key = (tag, vr, elem.value, elem.is_little_endian, elem.is_implicit_VR)
            try:
                return _converted[key]
            except KeyError:
                pass
            value = ds[tag].value
            if len(_converted) >= _MAX_ENTRIES:
                _converted.clear()
            _converted[key] = value
            return value
    return ds[tag].value if tag in ds else default
