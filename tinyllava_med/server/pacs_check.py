"""`tinyllava-med pacs check`: can this server reach the PACS it is configured for? One line per
configured target, before the first study depends on it:

- `dicomweb_push_url` and `dicomweb_pull_url`: a QIDO-RS search for one study (with the
  configured headers), which both a STOW-RS and a WADO-RS origin of a PACS answer;
- `dimse_push` and `dimse_pull`: a C-ECHO from this server's AE title (the PACS may refuse an AE
  title it does not know, which is worth knowing too); for `dimse_pull` also a C-FIND for a
  study that does not exist, since a PACS may answer every C-ECHO and still refuse this AE
  title's queries (Orthanc does, for instance, when the caller's address is not the one it has
  for the AE title).

Nothing is stored or sent; the answers name no patient (a search's matches are not read).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinyllava_med.server.settings import Settings

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    setting: str
    target: str
    ok: bool
    detail: str
    seconds: float

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.setting} {self.target}: {self.detail} ({self.seconds * 1000:.0f} ms)"


def _dicomweb(url: str, headers: dict[str, str]) -> str:
    from tinyllava_med.server.pull import one_try_client

    one_try_client(url, headers, TIMEOUT_S).search_for_studies(limit=1)
    return "QIDO-RS answered"


def _echo(target: str, settings: Settings) -> str:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tinyllava_med.server.dimse import Target, associate

    assoc = associate(Target.parse(target), settings, Verification, timeout_s=TIMEOUT_S)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code != 0x0000:
        raise RuntimeError("C-ECHO got " + (f"status 0x{code:04X}" if code else "no answer"))
    return "C-ECHO answered"


def _echo_and_find(target: str, settings: Settings) -> str:
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    from tinyllava_med.server.dimse import Target, associate
    from tinyllava_med.server.pull import find_on, study_query

    _echo(target, settings)
    assoc = associate(Target.parse(target), settings, FIND, timeout_s=TIMEOUT_S)
    find_on(assoc, FIND, study_query(None, generate_uid()))  # matches nothing: no patient read
    return "C-ECHO and C-FIND answered"


def check(settings: Settings) -> list[Check]:
    """Each configured PACS target, tried once; empty when none is configured."""
    tries: list[tuple[str, str, Callable[[], str]]] = []
    for name, url, headers in (
        ("dicomweb_push_url", settings.dicomweb_push_url, settings.dicomweb_push_headers),
        ("dicomweb_pull_url", settings.dicomweb_pull_url, settings.dicomweb_pull_headers),
    ):
        if url:
            tries.append((name, url, partial(_dicomweb, url, headers)))
    if settings.dimse_push:
        tries.append(
            ("dimse_push", settings.dimse_push, partial(_echo, settings.dimse_push, settings))
        )
    if settings.dimse_pull:
        tries.append(
            (
                "dimse_pull",
                settings.dimse_pull,
                partial(_echo_and_find, settings.dimse_pull, settings),
            )
        )
    out = []
    for name, target, attempt in tries:
        start = time.perf_counter()
        try:
            detail, ok = attempt(), True
        except Exception as e:  # the reason, not a traceback: this is an operator's check
            detail, ok = f"{type(e).__name__}: {e}"[:300], False
        out.append(Check(name, target, ok, detail, time.perf_counter() - start))
    return out
