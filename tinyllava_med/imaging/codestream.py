"""Image size declared inside a compressed frame (JPEG, JPEG-LS, JPEG 2000), read before decoding.

A codestream carries its own width and height and a decoder allocates for those, not for the
DICOM Rows and Columns: a few kilobytes whose JPEG 2000 SIZ marker claims a million columns
take the decoder half a minute and gigabytes. `declared_size` reads the frame header (JPEG and
JPEG-LS SOF segment, JPEG 2000 SIZ segment) so `dicom.py` can refuse such a frame first.
"""

from __future__ import annotations

import struct

# Start-of-frame markers: SOF0-SOF15 except DHT (C4), JPG (C8), DAC (CC); JPEG-LS SOF55 (F7).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ
_SCAN_LIMIT = 1 << 16


def declared_size(frame: bytes) -> tuple[int, int] | None:
    """(columns, rows) a JPEG, JPEG-LS or JPEG 2000 frame declares; None if not found."""
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_size(frame)
    at = frame.find(_J2K_START, 0, _SCAN_LIMIT)  # bare codestream or inside a JP2 box
    if at >= 0 and at + 24 <= len(frame):
        xsiz, ysiz, x_offset, y_offset = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return max(0, xsiz - x_offset), max(0, ysiz - y_offset)
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """Walk the marker segments after SOI up to the first SOF; read its Y (rows) and X."""
    pos = 2
    while pos + 4 <= min(len(frame), _SCAN_LIMIT):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 9 > len(frame):
                return None
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return columns, rows
        if marker == 0xDA:  # a scan before any frame header
            return None
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None
