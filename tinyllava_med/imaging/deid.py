"""De-identification for exports: DICOM PS3.15 Basic Application Level Confidentiality Profile.

`deidentify(ds)` returns a de-identified copy: every attribute in `basic_profile.BASIC_PROFILE`
gets its action at any depth of nesting (X remove, Z empty, D dummy, U new UID); curves, overlay
data and comments and all private attributes are removed; instance UIDs are replaced by
`pydicom.uid.generate_uid` seeded with a salt, so one UID maps to one new UID (pass the same
`salt` to keep a batch of files consistent; by default each call draws a random one).
PatientIdentityRemoved and the Deidentification Method attributes are set.

Combined actions are resolved so the result stays conformant without knowing the IOD:
X/Z, Z/D and X/Z/D -> Z; X/D -> D; X/Z/U* (Referenced/Source Image Sequence) -> keep, with the
UIDs inside replaced by their own U rows; D on a sequence (Content Sequence) keeps its items,
de-identified by the same table. Not done (they are options beyond the Basic Profile or need
pixels): cleaning free text such as an SR TextValue, and text burned into the pixels
(BurnedInAnnotation "YES").
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from tinyllava_med.imaging.basic_profile import BASIC_PROFILE

_RESOLVED = {"X/Z": "Z", "Z/D": "Z", "X/Z/D": "Z", "X/D": "D", "X/Z/U*": "K"}
ACTIONS: dict[int, str] = {
    tag: _RESOLVED.get(action, action)
    for action, keywords in BASIC_PROFILE.items()
    for keyword in keywords
    if (tag := tag_for_keyword(keyword)) is not None
}
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UR": "",
    "UT": "ANONYMIZED",
}
_NUMERIC_VRS = {"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"}
METHOD = "DICOM PS3.15 Basic Application Confidentiality Profile"


def deidentify(ds: Dataset, *, salt: bytes | None = None) -> Dataset:
    """Return a copy of `ds` de-identified with the Basic Profile (see module docstring)."""
    out = copy.deepcopy(ds)
    salt_text = (salt if salt is not None else os.urandom(16)).hex()
    new_uids: dict[str, str] = {}

    def new_uid(old: str) -> str:
        if old not in new_uids:
            new_uids[old] = str(generate_uid(entropy_srcs=[salt_text, old]))
        return new_uids[old]

    _apply(out, new_uid)
    meta = getattr(out, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID") or new_uid(
            str(meta.MediaStorageSOPInstanceUID)
        )
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = Sequence([code])
    return out


def _action(tag: BaseTag) -> str | None:
    group, element = tag.group, tag.element
    if group & 0xFF00 == 0x5000 or (group & 0xFF00 == 0x6000 and element in (0x3000, 0x4000)):
        return "X"  # curves; overlay data and comments
    return ACTIONS.get(int(tag))


def _apply(ds: Dataset, new_uid: Callable[[str], str]) -> None:
    """Apply the profile to `ds` and, recursively, to the items of its sequences.

    Values that are removed or replaced are never decoded, so an invalid patient name cannot
    be echoed by pydicom's validation warnings into logs.
    """
    for tag in list(ds.keys()):
        action = _action(tag)
        if action == "X" or tag.is_private:
            del ds[tag]
            continue
        vr = _vr(ds, tag)
        if action == "Z":
            ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)
            continue
        if action == "D" and vr != "SQ":
            dummy = 0 if vr in _NUMERIC_VRS else _DUMMY.get(vr)
            ds[tag] = DataElement(tag, vr, dummy)
            continue
        if vr != "SQ" and action != "U":
            continue  # K, or not in the profile: kept as read
        try:
            elem = ds[tag]
        except Exception:  # an undecodable UID or sequence cannot be checked: drop it
            del ds[tag]
            continue
        if elem.VR == "SQ":  # D, K or unlisted: keep the items, de-identified
            for item in elem.value or ():
                _apply(item, new_uid)
        elif elem.value:  # U
            values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
            mapped = [new_uid(str(v)) for v in values]
            elem.value = mapped if len(mapped) > 1 else mapped[0]


def _vr(ds: Dataset, tag: BaseTag) -> str:
    """The element's VR as read, else the dictionary's (first choice when ambiguous)."""
    try:
        vr = ds.get_item(tag).VR
    except Exception:  # an element pydicom cannot even represent
        vr = None
    if vr and vr != "UN":
        return str(vr)
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        return "UN"
