"""De-identification: the DICOM PS3.15 Basic Application Level Confidentiality Profile.

:func:`deidentify_dataset` applies Table E.1-1 (see :mod:`pipelines.imaging.deid_table`)
at every nesting level, removes all private attributes, curves and overlay
data/comments, remaps UIDs consistently through a :class:`UIDMap`, and records
what was done (PatientIdentityRemoved, DeidentificationMethod and its code
sequence, LongitudinalTemporalInformationModified).

Combined action codes
---------------------
The table's combined codes mean "the first unless the IOD needs the attribute".
This module does not know each IOD's Type 1/2 requirements, so it resolves them
towards keeping the attribute present, which is conformant for every IOD and
removes the same information: ``X/Z`` -> Z, ``Z/D``, ``X/D`` and ``X/Z/D`` -> D,
``X/Z/U*`` -> U for UIDs (sequences are kept and the UIDs inside replaced).

Sequences
---------
``X`` removes a sequence, ``Z`` empties it, ``U*``/``K`` keep it and clean its
items with the same table. ``D`` and ``C`` on a sequence keep its items but, as
there is no dummy "item", also replace every free-text, name, date and time
value inside with a dummy, so content the table does not list cannot leak.

UIDs
----
Only the UIDs the table marks ``U`` (and the File Meta's
MediaStorageSOPInstanceUID) are replaced; class UIDs, transfer syntaxes and
coding-scheme UIDs identify no one and are kept. The replacement is a ``2.25.``
UID (PS3.5 B.2) whose UUID is HMAC-SHA256(salt, uid) truncated to 128 bits: the
same for the same salt, so references between instances stay intact. (pydicom's
``generate_uid(prefix=None, entropy_srcs=...)`` does not do this: with no prefix
it ignores the entropy sources and returns a random UUID.)
Keep the salt secret; without it the mapping cannot be inverted.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import secrets
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from pipelines.imaging.deid_table import BASIC_PROFILE, Action
from pipelines.imaging.volume import ImageError

__all__ = [
    "BASIC_PROFILE_CODE",
    "BurnedInAnnotationError",
    "DeidError",
    "UIDMap",
    "deidentify_dataset",
    "main_deid",
    "profile_action",
]

log = logging.getLogger(__name__)

#: DCM 113100, the code for this profile in DeidentificationMethodCodeSequence.
BASIC_PROFILE_CODE: Final = ("113100", "DCM", "Basic Application Confidentiality Profile")
_METHOD = "Basic Application Confidentiality Profile (clinfuse)"  # LO: <= 64 chars

def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword!r} in the E.1-1 table is not a DICOM keyword pydicom knows")
    return Tag(tag)


_BY_TAG: Final[dict[BaseTag, Action]] = {_tag(kw): a for kw, a in BASIC_PROFILE.items()}

# Combined codes resolved towards keeping the attribute (module docstring).
_RESOLVED: Final[dict[str, str]] = {
    "X/Z": "Z", "Z/D": "D", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}

_TEXT_VRS: Final = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "AE", "CS"})
# Inside a D/C sequence these are replaced too; CS stays (codes, not free text).
_DEEP_CLEAN_VRS: Final = frozenset(
    {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "UR", "AE", "DA", "DT", "TM", "AS"})
_STRING_VRS: Final = _DEEP_CLEAN_VRS | {"CS", "DS", "IS", "UI"}
_BYTES_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_INT_VRS: Final = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "AT"})
_FLOAT_VRS: Final = frozenset({"FL", "FD"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: Final[dict[str, Any]] = {
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
    "DS": "0", "IS": "0", "CS": "ANONYMIZED",
}

OnBurnedIn = Literal["refuse", "flag"]


class DeidError(ValueError):
    """A dataset this module will not de-identify; the message says why and what to do."""


class BurnedInAnnotationError(DeidError):
    """The image declares burned-in annotation, which this profile cannot remove."""

    def __init__(self, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}BurnedInAnnotation is YES: identifying text may be in the pixels, which "
            "the Basic Profile does not clean. Mask the pixels first, or pass "
            "on_burned_in='flag' to de-identify the header and review the image by hand.")


class UIDMap:
    """Consistent, salted UID replacement: the same UID and salt give the same new UID.

    Parameters
    ----------
    salt : str
        Secret; a different salt gives unlinkable UIDs.

    Attributes
    ----------
    mapping : dict of str to str
        Every UID replaced so far.
    """

    def __init__(self, salt: str) -> None:
        if not salt:
            raise ValueError("salt must be a non-empty string")
        self.salt = salt
        self.mapping: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        uid = str(uid).strip().rstrip("\x00")
        if not uid:
            return uid
        new = self.mapping.get(uid)
        if new is None:
            # generate_uid(prefix=None, ...) ignores entropy_srcs (it returns a random
            # UUID), so derive the 2.25 UUID ourselves: HMAC keeps salt and UID apart.
            digest = hmac.new(self.salt.encode(), uid.encode(), hashlib.sha256).digest()
            new = f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"
            self.mapping[uid] = new
        return new


def profile_action(tag: int | BaseTag) -> Action | None:
    """The Table E.1-1 action for ``tag`` (including curve/overlay groups), or None."""
    t = Tag(tag)
    group, elem = t.group, t.element
    if 0x5000 <= group <= 0x501E and group % 2 == 0:
        return "X"  # Curve Data (50xx,xxxx), retired
    if 0x6000 <= group <= 0x601E and group % 2 == 0 and elem in (0x3000, 0x4000):
        return "X"  # Overlay Data / Overlay Comments (60xx,3000/4000)
    return _BY_TAG.get(t)


def _dummy_value(elem: DataElement, uid_map: UIDMap) -> Any:
    vr = elem.VR
    if vr == "UI":
        return _remap(elem.value, uid_map)
    if vr in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[vr]
    if vr in _TEXT_VRS:
        return _DUMMY_TEXT
    if vr in _INT_VRS:
        return 0
    if vr in _FLOAT_VRS:
        return 0.0
    if vr in _BYTES_VRS:
        return b"\x00\x00"  # even length, as DICOM requires
    return _DUMMY_TEXT


def _remap(value: Any, uid_map: UIDMap) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return uid_map(value)
    return [uid_map(str(v)) for v in value]  # multi-valued, e.g. FailedSOPInstanceUIDList


def _items(elem: DataElement) -> Iterator[Dataset]:
    for item in elem.value or ():
        if isinstance(item, Dataset):
            yield item


def _clean(ds: Dataset, uid_map: UIDMap, *, deep: bool) -> None:
    """Apply the profile to ``ds`` and, recursively, to every sequence item."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if tag.is_private:
            del ds[tag]
            continue
        action = profile_action(tag)
        code = _RESOLVED.get(action, action) if action is not None else None
        if code == "X":
            del ds[tag]
        elif elem.VR == "SQ":
            if code == "Z":
                elem.value = Sequence()
                continue
            # D/C: keep the items, but no free text may survive inside them.
            inner_deep = deep or code in ("D", "C")
            for item in _items(elem):
                _clean(item, uid_map, deep=inner_deep)
        elif code == "Z":
            # "" for strings so the in-memory value matches what a re-read gives.
            elem.value = "" if elem.VR in _STRING_VRS else None
        elif code in ("D", "C"):
            elem.value = _dummy_value(elem, uid_map)
        elif code in ("U", "U*"):
            if elem.VR == "UI":
                elem.value = _remap(elem.value, uid_map)
            else:
                elem.value = None
        elif code is None and deep and elem.VR in _DEEP_CLEAN_VRS and not elem.is_empty:
            elem.value = _dummy_value(elem, uid_map)
        # "K" and unlisted attributes are kept.


def _set_method(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    methods = [str(m) for m in (ds.get("DeidentificationMethod") or [])] \
        if not isinstance(ds.get("DeidentificationMethod"), str) \
        else [ds.DeidentificationMethod]
    if _METHOD not in methods:
        methods.append(_METHOD)
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    codes = ds.get("DeidentificationMethodCodeSequence") or Sequence()
    if not any(str(c.get("CodeValue")) == BASIC_PROFILE_CODE[0]
               and str(c.get("CodingSchemeDesignator")) == BASIC_PROFILE_CODE[1]
               for c in codes):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = BASIC_PROFILE_CODE
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    # Dates are removed or replaced by the profile, so say so (PS3.3 C.12.1).
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def deidentify_dataset(ds: Dataset, uid_map: UIDMap, *, on_burned_in: OnBurnedIn = "refuse",
                       in_place: bool = False) -> Dataset:
    """De-identify one dataset with the Basic Application Level Confidentiality Profile.

    Parameters
    ----------
    ds : pydicom.Dataset
    uid_map : UIDMap
        Shared by every instance of a study (or a whole export) so references agree.
    on_burned_in : {"refuse", "flag"}
        What to do when BurnedInAnnotation is YES: raise, or de-identify the
        header anyway (the attribute stays YES, which flags the image).
    in_place : bool
        Modify ``ds`` itself instead of a deep copy.

    Returns
    -------
    pydicom.Dataset

    Raises
    ------
    BurnedInAnnotationError
        BurnedInAnnotation is YES and ``on_burned_in`` is "refuse".
    ValueError
        ``on_burned_in`` is not one of the options.
    """
    if on_burned_in not in ("refuse", "flag"):
        raise ValueError(f"on_burned_in must be 'refuse' or 'flag', got {on_burned_in!r}")
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
    if burned_in and on_burned_in == "refuse":
        raise BurnedInAnnotationError(getattr(ds, "filename", None) or None)
    out = ds if in_place else copy.deepcopy(ds)
    _clean(out, uid_map, deep=False)
    _set_method(out)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                        "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID",
                        "PrivateInformation"):
            if keyword in meta:
                delattr(meta, keyword)
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        elif "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = uid_map(meta.MediaStorageSOPInstanceUID)
    if burned_in:
        log.warning("BurnedInAnnotation is YES in %s: header de-identified, pixels not",
                    out.get("SOPInstanceUID", "?"))
    return out


def _output_path(dst: Path, ds: Dataset, index: int) -> Path:
    # Named by the new UIDs only: source file and folder names may identify someone.
    parts = [str(ds.get(k) or "unknown") for k in ("StudyInstanceUID", "SeriesInstanceUID")]
    name = str(ds.get("SOPInstanceUID") or f"instance-{index:06d}")
    return dst.joinpath(*parts, f"{name}.dcm")


def main_deid(src: Path, dst: Path, salt: str | None, *,
              on_burned_in: OnBurnedIn = "refuse") -> int:
    """``clinfuse deid SRC DST``: write de-identified copies of the DICOM files under SRC.

    Outputs go to ``DST/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
    (the new UIDs). One UID map covers the whole run, so studies stay consistent;
    without ``salt`` a random one is used and the UIDs cannot be linked to another run.

    Returns
    -------
    int
        0 when every DICOM file was written; 1 when any was refused or failed, or
        none was found; 2 when DST is inside SRC.
    """
    from pipelines.imaging.discovery import read_dicom

    src, dst = Path(src), Path(dst)
    if not src.exists():
        sys.stderr.write(f"error: {src}: no such file or folder\n")
        return 1
    if src.is_dir() and (dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents):
        sys.stderr.write(f"error: {dst} is inside {src}; choose an output outside the input\n")
        return 2
    uid_map = UIDMap(salt or secrets.token_hex(16))
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    written = refused = failed = skipped = 0
    for index, path in enumerate(files):
        try:
            ds = read_dicom(path)
        except ImageError as e:
            skipped += 1
            log.debug("skipped %s: %s", path, e.reason)
            continue
        if "DirectoryRecordSequence" in ds:
            skipped += 1  # a DICOMDIR lists the old paths and UIDs; not carried over
            continue
        try:
            out = deidentify_dataset(ds, uid_map, on_burned_in=on_burned_in, in_place=True)
            target = _output_path(dst, out, index)
            target.parent.mkdir(parents=True, exist_ok=True)
            out.save_as(target)
        except BurnedInAnnotationError as e:
            refused += 1
            sys.stderr.write(f"refused: {e}\n")
            continue
        except Exception as e:  # one bad file must not stop the export
            failed += 1
            sys.stderr.write(f"failed: {path}: {type(e).__name__}: {e}\n")
            continue
        written += 1
        if on_burned_in == "flag" and str(out.get("BurnedInAnnotation", "")).upper() == "YES":
            sys.stderr.write(f"flagged: {target}: BurnedInAnnotation YES, review the pixels\n")
    sys.stdout.write(f"{written} file(s) de-identified into {dst}; {refused} refused, "
                     f"{failed} failed, {skipped} not DICOM\n")
    return 0 if written and not refused and not failed else 1
