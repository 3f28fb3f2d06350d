"""DICOM DIMSE for PACS and modalities that do not speak DICOMweb (pynetdicom): a Storage SCP
that files what it receives like STOW-RS does, and a C-STORE sender for the jobs' SRs and
rejection notes.

Receiving (`StorageSCP`, on `dimse_port` when set):
- C-ECHO, and C-STORE of every storage SOP class in the transfer syntaxes this server can decode
  (the uncompressed ones, and each compressed one whose pydicom decoder is installed).
- DIMSE has no keys, so an association is accepted only when it calls our AE title
  (`dimse_ae_title`) from a calling AE title in `dimse_peers` ("AET", "AET@host": from that
  host's addresses only, or "*"). A refusal is audited (`dimse.associate`, denied).
- `dimse_max_associations` counts associations asked for and accepted, not connections: one
  that sends nothing (until the ARTIM timer, `ACSE_TIMEOUT_S`, closes it) holds no place a
  PACS needs. Past the limit an association is rejected as transient (local limit exceeded),
  as pynetdicom's own limit does.
- Connections are checked before they get a thread (`_GuardedServer`): when every peer names
  its host, other addresses are closed at once; one address may hold `PENDING_PER_ADDRESS`
  connections that have not yet asked for an association, and all addresses `PENDING_MAX`
  (a sender asks at once; a PACS's parallel associations are far fewer). Such a refusal is
  audited (`dimse.connect`). Refusals are audited as HTTP's refused keys are, the first 20 a
  minute per address (`DenialLog`), written by a thread of their own, so a flood of them
  neither fills the audit table nor holds up the accepting thread, and a database that cannot
  take them costs only the rows.
- With TLS, the handshake happens in each connection's own thread: pynetdicom's runs it in
  the one accepting thread, where a connection that never began one stopped every sender. A
  TLS failure is one warning line (pynetdicom logged two errors and a traceback).
- Each instance is received into a temporary file (never whole in memory), refused above
  `max_upload_bytes` (0xA700 within `_PDU_SLACK` over it; beyond, the connection is closed as
  the data arrives, so the object never fills the disk: the sender sees an abort), decoded with
  the server's image limits and filed by
  `ingest.file_instances` (its study found or created by Study Instance UID, the automatic
  report queued) in its own transaction before the success status goes back, so "stored"
  means durable. Failures answer
  the Storage Service Class statuses STOW-RS uses (0xC000 cannot understand, 0xA700 out of
  resources, 0x0110 processing failure) with an Error Comment that names no patient data. An
  object that is no image (an SR, a PDF, a segmentation; STOW-RS: 0x0122) is acknowledged with
  the warning 0xB006 and not kept (`_not_kept`): a PACS sends a study whole.
- One audit event per association that sent instances (`study.dimse_store`, actor
  `dimse:<calling AE title>`): stored, already held, failed, studies, jobs.

Sending (`send`, for `dimse_push` = "AET@host:port"): one association per instance, accepted
statuses are success and the warnings; anything else raises, and the job retries.

TLS (`dimse_tls`, PS3.15 BCP 195): the port presents `tls_certfile`, and with `dimse_tls_ca` it
requires senders' certificates signed by that CA; our own associations (`associate`: pushes,
retrieves, `pacs check`) check the PACS's certificate and host name and present ours.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from tinyllava_med.imaging import ImagingError
from tinyllava_med.server.auth import DenialLog
from tinyllava_med.server.db import crud
from tinyllava_med.server.errors import storage_full
from tinyllava_med.server.ingest import (
    accession_conflicts_detail,
    decode,
    failure_reason,
    file_instances,
)
from tinyllava_med.server.stow import OUT_OF_RESOURCES, PROCESSING_FAILURE, Part

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from tinyllava_med.server.metrics import Metrics
    from tinyllava_med.server.settings import Settings
    from tinyllava_med.server.storage import ImageStore

log = logging.getLogger(__name__)

SUCCESS = 0x0000
ELEMENTS_DISCARDED = 0xB006  # a warning: received, some (here all) of its data not kept
WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}  # stored, with a remark (PS3.4 B.2.3)
UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


def decodable_transfer_syntaxes() -> list[str]:
    """The uncompressed syntaxes, then every compressed one pydicom can decode here."""
    from pydicom.uid import AllTransferSyntaxes

    out: list[str] = list(UNCOMPRESSED)
    for uid in AllTransferSyntaxes:
        if uid in out or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except NotImplementedError:  # no decoder at all for this syntax
            continue
    return out


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str | None  # None: any address

    @classmethod
    def parse(cls, text: str) -> Peer:
        if "@" in text:
            aet, _, host = text.rpartition("@")
            return cls(aet.strip(), host)
        return cls(text.strip(), None)


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        log.warning("dimse_peers: host %r does not resolve; its peer cannot connect", host)
        return set()


class PeerList:
    """Who may open an association; hosts are resolved once, at start."""

    def __init__(self, entries: list[str]) -> None:
        self.anyone = "*" in entries
        self.peers: dict[str, set[str] | None] = {}  # AE title -> its addresses (None: any)
        for peer in (Peer.parse(e) for e in entries if e != "*"):
            hosts = self.peers.setdefault(peer.ae_title, set())
            if peer.host is None:
                self.peers[peer.ae_title] = None
            elif hosts is not None:
                hosts |= _addresses(peer.host)

    def may_connect(self, address: str) -> bool:
        """Whether a connection from `address` may ask for an association at all: always,
        unless every peer names its host and none resolves to `address`."""
        if self.anyone or any(hosts is None for hosts in self.peers.values()):
            return True
        return any(address in hosts for hosts in self.peers.values() if hosts is not None)

    def allows(self, ae_title: str, address: str) -> bool:
        if self.anyone:
            return True
        if ae_title.strip() not in self.peers:
            return False
        hosts = self.peers[ae_title.strip()]
        return hosts is None or address in hosts


@dataclass
class _Received:
    """What one association has sent so far."""

    stored: int = 0
    already: int = 0
    failed: int = 0
    not_kept: int = 0  # objects without an image (an SR, a PDF), acknowledged with 0xB006
    accession_conflicts: int = 0  # filed under a study of another accession number
    studies: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)


# a dataset's bytes arrive in PDUs, with a few bytes of headers each, after its command set
_PDU_SLACK = 1 << 20


def _drop_partial_dataset(assoc: Any) -> None:
    """Remove the temporary file of a dataset an ended association left half received
    (pynetdicom writes it as it arrives and removes it only once a C-STORE handler has run)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    path = getattr(message, "_data_set_path", None)
    handle = getattr(message, "_data_set_file", None)
    if not isinstance(path, Path):
        return
    if handle is not None:
        handle.close()
    path.unlink(missing_ok=True)


# connections that have not yet asked for an association, from one address and from all (a
# sender asks at once; more are idle or worse): they cost a thread each, not a place
PENDING_PER_ADDRESS = 16
PENDING_MAX = 64
ACSE_TIMEOUT_S = 10


class _GuardedServer(ThreadedAssociationServer):
    """pynetdicom's server, with each connection checked (`admit`) before it gets a thread,
    and the TLS handshake (`tls`) done in that thread instead of the accepting one."""

    admit: Any = None  # (address) -> bool
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        # a read that stalls (half a PDU, half a TLS handshake) ends with the timeout pynetdicom
        # gives the sockets it opens itself, not never
        sock.settimeout(self.ae.network_timeout)
        if self.tls is not None:  # the handshake runs with the first read, in the connection's
            # own thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        try:  # an exception here would end the accepting thread (socketserver lets it out)
            return self.admit is None or bool(self.admit(str(client_address[0])))
        except Exception:
            log.exception("DIMSE: checking a new connection failed; it is closed")
            return False


class _TlsFailureLine(logging.Filter):
    """pynetdicom logs a TLS connection that fails (a sender in clear text, without a
    certificate, a port scan) as two errors and a traceback; this makes it one warning line.
    It runs as the record is made, inside pynetdicom's `except`, so the exception being handled
    is the one; records other than those two pass as they are."""

    CLOSED = "Connection closed before the entire PDU was received"

    def filter(self, record: logging.LogRecord) -> bool:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ssl.SSLError):
            return True
        if record.msg == self.CLOSED:
            return False
        if record.msg is not exc:  # pynetdicom logs the exception itself as the message
            return True
        reason = getattr(exc, "reason", None) or type(exc).__name__
        record.msg, record.args = "DIMSE: a TLS connection failed (%s) and was closed", (reason,)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


TLS_FAILURE_LINE = _TlsFailureLine()


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


class StorageSCP:
    """The DIMSE listener of one server process (`start`, `stop`)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ImageStore,
        metrics: Metrics,
    ) -> None:
        self.settings, self.sessions, self.store, self.metrics = (
            settings,
            session_factory,
            store,
            metrics,
        )
        self.peers = PeerList(settings.dimse_peers)
        self._received: dict[int, _Received] = {}
        self._incoming: dict[int, int] = {}  # by association: bytes since its last dataset
        self._lock = threading.Lock()
        self._server: Any = None
        self._asked: weakref.WeakSet[Any] = weakref.WeakSet()  # associations that asked
        self._holding: weakref.WeakSet[Any] = weakref.WeakSet()  # accepted, not yet ended
        self.denials = DenialLog()
        self._audits = ThreadPoolExecutor(1, thread_name_prefix="dimse-audit")
        ae = AE(ae_title=settings.dimse_ae_title)
        ae.require_called_aet = False  # `_on_requested` checks it, so the refusal is audited
        # pynetdicom counts connections, idle ones too; `_on_requested` counts associations
        ae.maximum_associations = settings.dimse_max_associations + PENDING_MAX
        # how long a connection may wait to ask (the ARTIM timer; pynetdicom's default, 30 s,
        # also kept the thread of one its sender had closed): a sender asks at once
        ae.acse_timeout = ACSE_TIMEOUT_S
        syntaxes = decodable_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, UNCOMPRESSED[:2])
        self.ae = ae

    def start(self) -> None:
        assert self.settings.dimse_port is not None
        # each dataset goes to a temporary file as it arrives, so memory does not hold a large
        # one, which `max_upload_bytes` then refuses, as it does an HTTP body
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
            (evt.EVT_CONN_CLOSE, self._on_end),  # a dropped connection ends it too (once)
        ]
        server: _GuardedServer = self.ae.make_server(  # type: ignore[assignment]
            (self.settings.host, self.settings.dimse_port),
            evt_handlers=handlers,
            server_class=_GuardedServer,
        )
        server.admit, server.tls = self._admit, server_tls(self.settings)
        if server.tls is not None:
            logging.getLogger("pynetdicom.dul").addFilter(TLS_FAILURE_LINE)  # once: a set
        threading.Thread(target=server.serve_forever, name="dimse-accept", daemon=True).start()
        self.ae._servers.append(server)  # as `start_server` does: `shutdown` takes it out
        self._server = server
        log.info(
            "DIMSE Storage SCP %s on %s:%d%s",
            self.settings.dimse_ae_title,
            self.settings.host,
            self.settings.dimse_port,
            " (TLS)" if self.settings.dimse_tls else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._audits.shutdown(wait=True)

    def audited(self, timeout: float = 30) -> None:
        """Wait until the refusals so far are in the audit log (they are written by a thread
        of their own)."""
        self._audits.submit(lambda: None).result(timeout)

    # --- events (each association runs in its own thread) --------------------------------------

    def _admit(self, address: str) -> bool:
        """Whether a new connection from `address` gets a thread (`_GuardedServer`)."""
        if not self.peers.may_connect(address):
            reason = "address not in dimse_peers"
        else:
            # the connections whose threads still run and that have not asked: counted from the
            # threads themselves, so one that ended any way at all counts no more
            with self._lock:
                waiting = [a for a in self._server.active_associations if a not in self._asked]
            pending = sum(str(a.requestor.address) == address for a in waiting)
            if pending < PENDING_PER_ADDRESS and len(waiting) < PENDING_MAX:
                return True
            reason = (
                f"{pending} connections from it have not asked for an association"
                if pending >= PENDING_PER_ADDRESS
                else f"{PENDING_MAX} connections have not asked for an association"
            )
        self.metrics.dimse_associations.labels("dropped").inc()
        self._audit_refusal("dimse", "dimse.connect", address, reason)
        return False

    def _audit_refusal(self, actor: str, action: str, address: str, reason: str) -> None:
        """Log and audit a refusal, the first 20 a minute from each address (`DenialLog`)."""
        skipped = self.denials.admit(address)
        if skipped is None:
            return
        log.warning("DIMSE %s refused (%s from %s): %s", action[6:], actor, address, reason)
        detail: dict[str, str | int] = {"address": address, "reason": reason}
        if skipped:
            detail["not_audited_before"] = skipped

        def write() -> None:
            try:
                with self.sessions.begin() as session:
                    crud.audit(
                        session,
                        actor=actor,
                        action=action,
                        resource_type="dimse",
                        resource_id=None,
                        outcome="denied",
                        status_code=403,
                        detail=detail,
                    )
            except Exception as e:
                log.error("DIMSE: a refusal could not be audited: %s", type(e).__name__)

        self._audits.submit(write)

    def _on_requested(self, event: evt.Event) -> None:
        with self._lock:
            self._asked.add(event.assoc)
        rq = event.assoc.requestor  # its ae_title is set after this event, from the request
        calling = str(rq.primitive.calling_ae_title if rq.primitive else "").strip()
        called = str(rq.primitive.called_ae_title if rq.primitive else "").strip()
        address = str(rq.address)
        if called != self.settings.dimse_ae_title:  # meant for another AE (a wrong setting)
            reason, diagnostic = f"called AE title {called!r} is not this server's", 0x07
        elif not self.peers.allows(calling, address):
            reason, diagnostic = "calling AE title not in dimse_peers", 0x03
        else:
            self._hold(event)
            return
        self.metrics.dimse_associations.labels("refused").inc()
        # permanent, service user: 0x03 calling AE title not recognised, 0x07 called AE title
        event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
        event.assoc.kill()  # as pynetdicom's own refusals: the reject goes out before the close
        self._audit_refusal(f"dimse:{calling}", "dimse.associate", address, reason)

    def _hold(self, event: evt.Event) -> bool:
        """Take one of `dimse_max_associations` places for an association asked for; False
        (it is rejected as transient, local limit exceeded) when all are taken."""
        with self._lock:
            if len(self._holding) < self.settings.dimse_max_associations:
                self._holding.add(event.assoc)
                return True
        self.metrics.dimse_associations.labels("refused").inc()
        log.warning(
            "DIMSE association refused: all %d places taken", self.settings.dimse_max_associations
        )
        # transient, service provider (presentation): 0x02 local limit exceeded
        event.assoc.acse.send_reject(0x02, 0x03, 0x02)
        event.assoc.kill()
        return False

    def _on_accepted(self, event: evt.Event) -> None:
        self.metrics.dimse_associations.labels("accepted").inc()

    def _state(self, event: evt.Event) -> _Received:
        with self._lock:
            return self._received.setdefault(id(event.assoc), _Received())

    def _on_data(self, event: evt.Event) -> None:
        """Count what arrives towards the dataset being received (written to disk as it comes:
        STORE_RECV_CHUNKED_DATASET); past `max_upload_bytes` the connection is closed then and
        there, rather than after the whole object has filled the disk."""
        key = id(event.assoc)
        with self._lock:
            size = self._incoming[key] = self._incoming.get(key, 0) + len(event.data)
        if size <= self.settings.max_upload_bytes + _PDU_SLACK:
            return
        with self._lock:
            self._incoming[key] = -(1 << 62)  # once
        self._state(event).failed += 1
        log.warning(
            "DIMSE association closed: a dataset over max_upload_bytes (%d) was arriving",
            self.settings.max_upload_bytes,
        )
        connection = event.assoc.dul.socket
        if connection is not None:
            connection.close()  # the peer sees the connection end: an abort

    def _on_store(self, event: evt.Event) -> Dataset:
        with self._lock:
            self._incoming.pop(id(event.assoc), None)  # the dataset has arrived: count anew
        got = self._state(event)
        try:  # received into a temporary file (STORE_RECV_CHUNKED_DATASET), removed after this
            path = event.dataset_path
            limit = self.settings.max_upload_bytes
            if path.stat().st_size > limit:
                return self._failed(got, OUT_OF_RESOURCES, f"larger than {limit} bytes")
            data = path.read_bytes()
        except OSError as e:
            return self._failed(got, 0xC000, f"cannot read the dataset ({type(e).__name__})")
        parts = [Part("application/dicom", data)]
        decoded = decode(parts, self.settings, self.store)
        if isinstance(decoded[0], ImagingError) and decoded[0].not_an_image:
            return self._not_kept(got)
        if isinstance(decoded[0], ImagingError):
            return self._failed(got, failure_reason(decoded[0]), decoded[0].message)
        try:
            result, studies, jobs = file_instances(
                self.sessions, self.store, self.settings, parts, decoded
            )
        except Exception as e:  # the message may quote stored values: log the type only
            if storage_full(e):  # Refused: Out of Resources, as the PACS should read it
                log.error("DIMSE C-STORE refused: storage full")
                return self._failed(got, OUT_OF_RESOURCES, "the server's storage is full")
            log.error("DIMSE C-STORE could not be filed: %s", type(e).__name__)
            return self._failed(got, PROCESSING_FAILURE, "the server could not store it")
        if result.failed:
            return self._failed(got, result.failed[0][2], "missing or mismatched UIDs")
        with self._lock:
            if result.already:
                got.already += 1
            else:
                got.stored += 1
            got.studies += [s for s in studies if s not in got.studies]
            got.accession_conflicts += result.accession_conflicts
            got.jobs += [j for j in jobs if j not in got.jobs]
        self.metrics.dimse_instances.labels("already" if result.already else "stored").inc()
        return _status(SUCCESS)

    def _not_kept(self, got: _Received) -> Dataset:
        """An object this server has no use for (no image: an SR, a PDF, a segmentation) in a
        study a PACS sends whole, as it sends back a study holding this server's own SRs. A
        failure status made the PACS fail the whole send (Orthanc: HTTP 500 for its job, the
        images stored all the same); a warning tells it the object was received and its data
        not kept (0xB006 Elements Discarded), which it counts as sent."""
        with self._lock:
            got.not_kept += 1
        self.metrics.dimse_instances.labels("not_kept").inc()
        return _status(ELEMENTS_DISCARDED, "not an image: received, not kept")

    def _failed(self, got: _Received, code: int, comment: str) -> Dataset:
        with self._lock:
            got.failed += 1
        self.metrics.dimse_instances.labels("failed").inc()
        return _status(code, comment)

    def _on_end(self, event: evt.Event) -> None:
        with self._lock:
            self._holding.discard(event.assoc)
        _drop_partial_dataset(event.assoc)
        with self._lock:
            self._incoming.pop(id(event.assoc), None)
            got = self._received.pop(id(event.assoc), None)
        if got is None:  # an echo, or nothing sent
            return
        received = got.stored + got.already + got.not_kept
        with self.sessions.begin() as session:
            crud.audit(
                session,
                actor=f"dimse:{str(event.assoc.requestor.ae_title).strip()}",
                action="study.dimse_store",
                resource_type="study",
                resource_id=got.studies[0] if len(got.studies) == 1 else None,
                outcome="ok" if received else "invalid",
                status_code=(202 if got.failed else 200) if received else 409,
                detail={
                    "stored": got.stored,
                    "already": got.already,
                    "failed": got.failed,
                    "not_kept": got.not_kept,
                    **accession_conflicts_detail(got.accession_conflicts),
                    "studies": got.studies,
                    "jobs": got.jobs,
                    "address": str(event.assoc.requestor.address),
                },
            )


# --- sending ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Target:
        aet, _, where = text.rpartition("@")
        host, _, port = where.rpartition(":")
        return cls(aet.strip(), host, int(port))


def no_delay(assoc: Any) -> None:
    """TCP_NODELAY on an association's socket. pynetdicom leaves Nagle's algorithm on, so a
    sender's small PDUs (the command, a dataset's last fragment) waited for the peer's delayed
    ACK, about 40 ms an instance (`bench/dimse_store.py`)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NoAssociation(RuntimeError):
    """The peer refused the association, or did not answer."""


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """The DIMSE port's TLS (`dimse_tls`): our certificate; senders' checked when a CA is set."""
    if not settings.dimse_tls:
        return None
    assert settings.tls_certfile is not None and settings.tls_keyfile is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    if settings.dimse_tls_ca is not None:
        ctx.load_verify_locations(settings.dimse_tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS for our own associations: the PACS's certificate checked (its host name too), ours
    presented in case it asks."""
    if not settings.dimse_tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.dimse_tls_ca)
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        ctx.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    return ctx


def associate(
    target: Target,
    settings: Settings,
    sop_class: str,
    syntaxes: list[str] | None = None,
    *,
    timeout_s: float = 30,
    dimse_timeout_s: float | None = None,
) -> Any:
    """An established association from our AE title to `target` for `sop_class` (pynetdicom's
    Association; the caller releases it), over TLS with `dimse_tls`, else NoAssociation."""
    ae = AE(ae_title=settings.dimse_ae_title)
    ae.acse_timeout = ae.network_timeout = timeout_s
    ae.dimse_timeout = dimse_timeout_s or timeout_s
    ae.add_requested_context(sop_class, syntaxes or UNCOMPRESSED[:2])
    tls = client_tls(settings)
    assoc = ae.associate(
        target.host,
        target.port,
        ae_title=target.ae_title,
        tls_args=(tls, target.host) if tls is not None else None,
    )
    if assoc.is_established:
        no_delay(assoc)
    else:
        raise NoAssociation(
            f"no DIMSE association with {target.ae_title}@{target.host}:{target.port} "
            f"({'rejected' if assoc.is_rejected else 'aborted or unreachable'})"
        )
    return assoc


def send(ds: Dataset, target: Target, settings: Settings, timeout_s: float = 30) -> int:
    """C-STORE `ds` to `target`; its status (success or a warning), else RuntimeError."""
    meta = getattr(ds, "file_meta", None)
    own = meta.get("TransferSyntaxUID") if meta is not None else None
    # pynetdicom re-encodes an uncompressed dataset in whichever of these the PACS accepts
    syntaxes = UNCOMPRESSED[:2] + ([own] if own and own not in UNCOMPRESSED[:2] else [])
    assoc = associate(target, settings, ds.SOPClassUID, syntaxes, timeout_s=timeout_s)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    if code is None:
        raise RuntimeError("the C-STORE got no response (timeout or aborted association)")
    if code != SUCCESS and code not in WARNINGS:
        raise RuntimeError(f"the PACS refused the C-STORE: status 0x{code:04X}")
    return code
