"""DIMSE: the Storage SCP, with pynetdicom as the modality or PACS that sends (the round trip
with a real Orthanc, both ways, is in test_orthanc.py)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time

import pydicom
import pytest
from api_helpers import CT_SMALL, MR_SMALL, free_port, make_api, self_signed, wait_for
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from tinyllava_med.server.db.models import Image, Job, Study
from tinyllava_med.server.dimse import PeerList, Target, decodable_transfer_syntaxes
from tinyllava_med.server.settings import Settings

AET = "TINYLLAVA_MED"
PATIENT = "CompressedSamples^CT1"  # CT_small's patient name: never in logs or statuses


def dimse_api(tmp_path, database_url, tiny_lm, **overrides):
    port = free_port()
    settings = {
        "dimse_port": port,
        "dimse_peers": ["MODALITY", "ROUTER@127.0.0.1", "FARAWAY@192.0.2.1"],
        "auto_report_prompts": {"CT": "Describe the findings."},
        "auto_report_delay_s": 600,  # queued, not run: these tests are about receiving
        **overrides,
    }
    for api in make_api(tmp_path, database_url, tiny_lm, **settings):
        api.dimse_port = port
        yield api


@pytest.fixture
def api(tmp_path, database_url, tiny_lm):
    yield from dimse_api(tmp_path, database_url, tiny_lm)


@pytest.fixture
def sqlite_api_dimse(tmp_path, sqlite_url, tiny_lm):
    yield from dimse_api(tmp_path, sqlite_url, tiny_lm)


def associate(api, calling="MODALITY", called=AET, contexts=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    if contexts is None:
        ae.requested_contexts = StoragePresentationContexts
    else:
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
    return ae.associate("127.0.0.1", api.dimse_port, ae_title=called)


def store_all(api, datasets, **kw):
    assoc = associate(api, **kw)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    return statuses


def rows(api, model):
    with api.app.state.session_factory() as s:
        return list(s.scalars(select(model)))


def audits(api, action):
    api.app.state.dimse.audited()  # the refusals so far are written
    r = api.get("/v1/audit", params={"action": action}, headers=api.h("admin"))
    assert r.status_code == 200, r.text
    return r.json()["data"]


def metric(api, name, outcome):
    text = api.get("/metrics").text
    line = f'tinyllava_med_{name}_total{{outcome="{outcome}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def test_echo_store_two_studies_then_again(api):
    assoc = associate(api, contexts=[(Verification, None)])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    ct, mr = pydicom.dcmread(CT_SMALL), pydicom.dcmread(MR_SMALL)
    statuses = store_all(api, [ct, mr])
    assert [s.Status for s in statuses] == [0x0000, 0x0000]
    assert store_all(api, [ct])[0].Status == 0x0000  # held already: acknowledged, not copied

    studies = {s.StudyInstanceUID: s for s in rows(api, Study)}
    assert set(studies) == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    images = rows(api, Image)
    assert sorted(i.SOPInstanceUID for i in images) == sorted(
        [ct.SOPInstanceUID, mr.SOPInstanceUID]
    )
    # the study is the API's like any other: listed, its image rendered
    listed = api.get("/v1/studies", headers=api.h()).json()["data"]
    assert {s["Modality"] for s in listed} == {"CT", "MR"}
    ct_study = studies[ct.StudyInstanceUID].id
    r = api.get(f"/v1/studies/{ct_study}/images/0", headers=api.h())
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # the CT's automatic report is queued; MR has no prompt
    jobs = rows(api, Job)
    assert [(j.kind, j.study_id, j.status) for j in jobs] == [("auto_report", ct_study, "queued")]

    events = audits(api, "study.dimse_store")
    assert len(events) == 2
    by_stored = {e["detail"]["stored"]: e for e in events}
    first, again = by_stored[2], by_stored[0]
    assert first["actor"] == "dimse:MODALITY" and first["outcome"] == "ok"
    assert first["status_code"] == 200 and first["resource_id"] is None  # two studies
    assert sorted(first["detail"]["studies"]) == sorted(s.id for s in studies.values())
    assert first["detail"]["jobs"] == [jobs[0].id]
    assert again["detail"]["already"] == 1 and again["detail"]["studies"] == []  # as STOW-RS:
    # "studies" lists those that got new instances
    assert metric(api, "dimse_instances", "stored") == 2
    assert metric(api, "dimse_instances", "already") == 1
    assert metric(api, "dimse_associations", "accepted") == 3


def test_an_aborted_association_keeps_and_audits_what_it_sent(sqlite_api_dimse):
    api = sqlite_api_dimse
    assoc = associate(api)
    assert assoc.send_c_store(pydicom.dcmread(CT_SMALL)).Status == 0x0000
    assoc.abort()  # the sender goes away without a release
    (event,) = wait_for(lambda: audits(api, "study.dimse_store"), what="the audit event")
    assert (event["detail"]["stored"], event["outcome"]) == (1, "ok")
    assert len(rows(api, Image)) == 1


def test_received_instances_are_spooled_under_the_data_directory(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """`serve` makes `data_dir/tmp` the process's temporary directory (`private_tmp`), so an
    instance received over DIMSE, study data, is spooled there and not in a shared /tmp; what a
    crashed run left there is removed at start, what another process is writing is not."""
    from tinyllava_med.server.dimse import StorageSCP
    from tinyllava_med.server.storage import private_tmp

    monkeypatch.setattr(tempfile, "tempdir", None)  # restored after the test
    data = tmp_path / "data"
    (data / "tmp" / "crashed").mkdir(parents=True)
    (data / "tmp" / "crashed" / "half.dcm").write_bytes(b"DICM")
    (data / "tmp" / "upload.part").write_bytes(b"x")
    (data / "tmp" / "in-use.dcm").write_bytes(b"DICM")  # another process's, being written
    an_hour_ago = time.time() - 3601
    for old in ("crashed", "upload.part"):
        os.utime(data / "tmp" / old, (an_hour_ago, an_hour_ago))
    tmp = private_tmp(data)
    assert tmp == data / "tmp" and [p.name for p in tmp.iterdir()] == ["in-use.dcm"]
    (tmp / "in-use.dcm").unlink()
    assert tmp.stat().st_mode & 0o777 == 0o700 and tempfile.gettempdir() == str(tmp)

    spooled = []
    on_store = StorageSCP._on_store

    def recording(self, event):
        spooled.append((event.dataset_path.parent, event.dataset_path.is_file()))
        return on_store(self, event)

    monkeypatch.setattr(StorageSCP, "_on_store", recording)
    for api in dimse_api(tmp_path, sqlite_url, tiny_lm):
        assert [s.Status for s in store_all(api, [pydicom.dcmread(CT_SMALL)])] == [0x0000]
    assert spooled == [(tmp, True)]
    assert list(tmp.iterdir()) == []  # and removed once filed


def test_an_object_over_the_limit_is_cut_off_as_it_arrives(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """An object far over `max_upload_bytes` closes the association once that much has
    arrived, not after all of it filled the disk, and its half-written file goes (as any an
    ended association leaves); the sender may associate again. (Before, any size was spooled
    whole, and an association that ended midway left its file until a restart.)"""
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    for api in dimse_api(tmp_path, sqlite_url, tiny_lm, max_upload_bytes=45_000):
        huge = _small_ct()
        huge.add_new(0x00290010, "LO", "TEST PADDING")
        huge.add_new(0x00291010, "OB", b"\0" * (8 << 20))  # 8 MiB against 45 kB (+1 MiB)
        assoc = associate(api)
        assert assoc.is_established
        status = assoc.send_c_store(huge)
        assert not status  # no answer: the connection was closed
        wait_for(lambda a=assoc: not a.is_alive(), what="the association to end")
        (event,) = wait_for(
            lambda api=api: audits(api, "study.dimse_store"), what="its audit event"
        )
        assert (event["detail"]["failed"], event["outcome"]) == (1, "invalid")
        wait_for(lambda: list(spool.iterdir()) == [], what="the partial file to go")
        assert rows(api, Image) == []
        assert store_all(api, [_small_ct()])[0].Status == 0x0000  # the next one is stored


def test_a_full_disk_refuses_with_out_of_resources(sqlite_api_dimse, monkeypatch, caplog):
    """No space on the data volume: the instance is refused with 0xA700 (Refused: Out of
    Resources), which a PACS reads as "try later", not as a bad instance."""
    import errno

    from tinyllava_med.server.storage import ImageStore

    api = sqlite_api_dimse

    def no_space(self, data, digest=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ImageStore, "put", no_space)
    (status,) = store_all(api, [pydicom.dcmread(CT_SMALL)])
    assert status.Status == 0xA700 and status.ErrorComment == "the server's storage is full"
    assert rows(api, Study) == [] and rows(api, Image) == []
    assert "storage full" in caplog.text and PATIENT not in caplog.text
    monkeypatch.undo()
    assert store_all(api, [pydicom.dcmread(CT_SMALL)])[0].Status == 0x0000  # space again


def test_compressed_instance_in_its_own_transfer_syntax(api):
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm", download=False))
    ts = ds.file_meta.TransferSyntaxUID
    assert ts in decodable_transfer_syntaxes()
    (status,) = store_all(api, [ds], contexts=[(ds.SOPClassUID, [ts])])
    assert status.Status == 0x0000
    (image,) = rows(api, Image)
    assert image.SOPInstanceUID == ds.SOPInstanceUID


def test_who_may_associate(api, caplog):
    caplog.set_level(logging.INFO)
    assert associate(api, calling="STRANGER").is_rejected
    assert associate(api, calling="FARAWAY").is_rejected  # allowed from another host only
    assert associate(api, called="SOMEONE_ELSE").is_rejected  # not our AE title
    ok = associate(api, calling="ROUTER")  # allowed from this host
    assert ok.is_established
    ok.release()

    denied = audits(api, "dimse.associate")
    assert sorted(e["actor"] for e in denied) == [
        "dimse:FARAWAY",
        "dimse:MODALITY",
        "dimse:STRANGER",
    ]
    assert {e["outcome"] for e in denied} == {"denied"}
    assert {e["detail"]["address"] for e in denied} == {"127.0.0.1"}
    # a wrong called AE title (a sender's setting) is audited too, saying so (it was not)
    wrong = next(e for e in denied if e["actor"] == "dimse:MODALITY")
    assert wrong["detail"]["reason"] == "called AE title 'SOMEONE_ELSE' is not this server's"
    assert metric(api, "dimse_associations", "refused") == 3
    assert metric(api, "dimse_associations", "accepted") == 1
    assert "STRANGER" in caplog.text


def idle_connection(api, source="127.0.0.2") -> socket.socket:
    """A TCP connection to the DIMSE port that never asks for an association (from another
    loopback address than the senders' 127.0.0.1)."""
    return socket.create_connection(
        ("127.0.0.1", api.dimse_port), timeout=10, source_address=(source, 0)
    )


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_do_not_keep_the_pacs_out(sqlite_api_dimse):
    """Connections that send nothing counted towards dimse_max_associations (8) until the ARTIM
    timer closed them (30 s), so 8 of them, reopened, kept every sender out. They now hold no
    place; an address keeps at most 16 of them, the rest closed at once and audited."""
    from tinyllava_med.server.dimse import PENDING_PER_ADDRESS

    api = sqlite_api_dimse
    scp = api.app.state.dimse

    def waiting() -> int:  # connection threads from 127.0.0.2 (none of them asks)
        return sum(a.requestor.address == "127.0.0.2" for a in scp._server.active_associations)

    idle = [idle_connection(api) for _ in range(PENDING_PER_ADDRESS)]
    try:
        wait_for(lambda: waiting() == PENDING_PER_ADDRESS, what="the idle connections' threads")
        idle += [idle_connection(api) for _ in range(3)]
        closed = [closed_by_server(sock) for sock in idle[PENDING_PER_ADDRESS:]]
        assert closed == [True] * 3
        ok = associate(api, calling="ROUTER")
        assert ok.is_established
        ok.release()
    finally:
        for sock in idle:
            sock.close()
    dropped = audits(api, "dimse.connect")
    assert len(dropped) == 3
    assert {e["actor"] for e in dropped} == {"dimse"}
    assert dropped[0]["detail"] == {
        "address": "127.0.0.2",
        "reason": f"{PENDING_PER_ADDRESS} connections from it have not asked for an association",
    }
    assert metric(api, "dimse_associations", "dropped") == 3
    # once they are closed, the address may connect again
    wait_for(lambda: not closed_by_server_soon(api), what="the idle connections to be settled")


def test_a_sender_may_open_its_associations_at_once_up_to_the_limit(sqlite_api_dimse):
    """A PACS sends with parallel associations from one address: all are accepted, up to
    dimse_max_associations (8) at once; one more is rejected as transient (local limit
    exceeded), and once one ends the next is accepted."""
    import threading

    api = sqlite_api_dimse
    held: list = [None] * 8

    def open_one(i: int) -> None:
        held[i] = associate(api, calling="ROUTER")

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert [a.is_established for a in held] == [True] * 8
        extra = associate(api, calling="ROUTER")
        assert extra.is_rejected
        rejection = extra.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (2, 3, 2)
        held.pop().release()
        wait_for(
            lambda: (a := associate(api, calling="ROUTER")).is_established and a.release() is None
        )
    finally:
        for a in held:
            a.release()
    assert audits(api, "dimse.connect") == []  # none of them was dropped


def test_a_refusal_the_database_cannot_record_closes_only_that_connection(
    tmp_path, sqlite_url, tiny_lm, monkeypatch, caplog
):
    """The audit of a refused connection was written on the one accepting thread, where a
    database error ended it: every sender then hung. It is written by a thread of its own."""
    from tinyllava_med.server.db import crud

    for api in dimse_api(tmp_path, sqlite_url, tiny_lm, dimse_peers=["ROUTER@127.0.0.1"]):

        def broken(*args, **kwargs):
            raise RuntimeError("database gone")

        monkeypatch.setattr(crud, "audit", broken)
        with idle_connection(api) as stranger:
            assert closed_by_server(stranger)
        ok = associate(api, calling="ROUTER")
        assert ok.is_established
        ok.release()
        wait_for(lambda: "a refusal could not be audited: RuntimeError" in caplog.text)


def closed_by_server_soon(api) -> bool:
    with idle_connection(api) as sock:
        sock.settimeout(0.3)
        try:
            return closed_by_server(sock)
        except TimeoutError:
            return False  # held open: admitted


def test_only_peers_addresses_may_connect_when_every_peer_names_its_host(
    tmp_path, sqlite_url, tiny_lm
):
    for api in dimse_api(tmp_path, sqlite_url, tiny_lm, dimse_peers=["ROUTER@127.0.0.1"]):
        with idle_connection(api) as stranger:
            assert closed_by_server(stranger)
        ok = associate(api, calling="ROUTER")
        assert ok.is_established
        ok.release()
        [dropped] = audits(api, "dimse.connect")
        assert dropped["detail"]["reason"] == "address not in dimse_peers"


def test_refused_associations_are_audited_at_most_20_a_minute_per_address(sqlite_api_dimse):
    """Each refused association wrote an audit row and a warning: a flood of them (710 in 20 s)
    filled the audit table with actors of the sender's choosing."""
    api = sqlite_api_dimse
    for i in range(25):
        assert associate(api, calling=f"X{i:03}").is_rejected
    assert metric(api, "dimse_associations", "refused") == 25
    assert len(audits(api, "dimse.associate")) == 20


def _small_ct(rows_=32) -> pydicom.Dataset:
    ds = pydicom.dcmread(CT_SMALL)
    pixels = ds.pixel_array[:rows_, :rows_].copy()
    ds.Rows = ds.Columns = rows_
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_bad_instances_fail_with_reasons_and_keep_what_is_stored(
    tmp_path, sqlite_url, tiny_lm, caplog
):
    caplog.set_level(logging.DEBUG)
    for api in dimse_api(
        tmp_path, sqlite_url, tiny_lm, max_pixels=64 * 64, max_upload_bytes=45_000
    ):
        small = _small_ct()
        assert store_all(api, [small])[0].Status == 0x0000

        too_big = pydicom.dcmread(CT_SMALL)  # 128 x 128 > max_pixels
        truncated = _small_ct()
        truncated.SOPInstanceUID = generate_uid()
        truncated.PixelData = truncated.PixelData[:100]
        no_pixels = pydicom.dcmread(CT_SMALL)
        del no_pixels.PixelData
        no_pixels.SOPInstanceUID = generate_uid()
        padded = _small_ct()  # few pixels, too many bytes
        padded.SOPInstanceUID = generate_uid()
        padded.add_new(0x00290010, "LO", "TEST PADDING")
        padded.add_new(0x00291010, "OB", b"\0" * 60_000)
        statuses = store_all(api, [too_big, truncated, no_pixels, padded])
        # no pixels: an object this server does not store (0x0122), not one it misread
        assert [s.Status for s in statuses] == [0xA700, 0xC000, 0x0122, 0xA700]
        assert "bytes" in statuses[3].ErrorComment and "bytes" not in statuses[0].ErrorComment
        for s in statuses:
            assert s.ErrorComment and PATIENT not in s.ErrorComment
        assert [i.SOPInstanceUID for i in rows(api, Image)] == [small.SOPInstanceUID]
        assert len(rows(api, Study)) == 1

        failed = [e for e in audits(api, "study.dimse_store") if e["detail"]["failed"]]
        assert len(failed) == 1
        assert failed[0]["outcome"] == "invalid" and failed[0]["status_code"] == 409
        assert failed[0]["detail"] == {
            "stored": 0,
            "already": 0,
            "failed": 4,
            "not_kept": 0,
            "studies": [],
            "jobs": [],
            "address": "127.0.0.1",
        }
        assert metric(api, "dimse_instances", "failed") == 4

        # an object that is no image (an SR in a study a PACS sends whole): received with a
        # warning, not kept, so the PACS's send does not fail (the CT above without pixels is
        # a broken image, and fails)
        sr = pydicom.dcmread(CT_SMALL)
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated"):
            delattr(sr, keyword)
        sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        sr.Modality = "SR"
        stripped = pydicom.dcmread(CT_SMALL)  # a CT without pixels or their description:
        for keyword in ("PixelData", "Rows", "Columns"):  # a broken image, still refused
            delattr(stripped, keyword)
        stripped.SOPInstanceUID = generate_uid()
        status, broken = store_all(
            api, [sr, stripped], contexts=[(sr.SOPClassUID, None), (stripped.SOPClassUID, None)]
        )
        assert status.Status == 0xB006 and status.ErrorComment == "not an image: received, not kept"
        assert broken.Status == 0x0122
        assert [i.SOPInstanceUID for i in rows(api, Image)] == [small.SOPInstanceUID]
        assert metric(api, "dimse_instances", "not_kept") == 1
        kept = [e for e in audits(api, "study.dimse_store") if e["detail"].get("not_kept")]
        assert [(e["detail"]["not_kept"], e["detail"]["failed"]) for e in kept] == [(1, 1)]
    assert PATIENT not in caplog.text


def test_dicom_tls_both_ways(tmp_path, sqlite_url, tiny_lm, caplog):
    """dimse_tls with a CA: a sender with a certificate it signed stores over TLS; one in clear
    text, or over TLS without a certificate, gets no association, and the log one line each.
    Our own C-ECHO (pacs check) to a TLS peer checks its certificate and shows ours."""
    import ssl

    from tinyllava_med.server.pacs_check import check

    cert, key = self_signed(tmp_path)
    tls = {"dimse_tls": True, "tls_certfile": cert, "tls_keyfile": key, "dimse_tls_ca": cert}

    def sender(port: int, certificate: bool):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        if certificate:
            ctx.load_cert_chain(str(cert), str(key))
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.network_timeout = 10
        ae.requested_contexts = StoragePresentationContexts
        return ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(ctx, "127.0.0.1"))

    peers = ["MODALITY", AET]  # AET: pacs check below calls from our own AE title
    for api in dimse_api(tmp_path, sqlite_url, tiny_lm, dimse_peers=peers, **tls):
        # a connection that never begins its handshake held pynetdicom's one accepting thread
        # (the handshake ran there), and with it every sender
        idle = idle_connection(api)
        assoc = sender(api.dimse_port, certificate=True)
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(CT_SMALL)).Status == 0x0000
        assoc.release()
        assert len(rows(api, Image)) == 1
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert not associate(api).is_established  # clear text
            assert not sender(api.dimse_port, certificate=False).is_established  # no certificate
            for reason in ("WRONG_VERSION_NUMBER", "PEER_DID_NOT_RETURN_A_CERTIFICATE"):
                line = f"DIMSE: a TLS connection failed ({reason}) and was closed"
                wait_for(lambda line=line: line in caplog.text, 10, line)
        assert "Traceback" not in caplog.text and "entire PDU" not in caplog.text

        ours = Settings(
            **tls, dimse_push=f"{AET}@127.0.0.1:{api.dimse_port}", data_dir=tmp_path / "x"
        )
        (echo,) = check(ours)
        assert echo.ok, echo.line()
        (clear,) = check(ours.model_copy(update={"dimse_tls": False}))
        assert not clear.ok
        idle.close()


def test_settings():
    with pytest.raises(ValidationError, match="dimse_peers"):
        Settings(dimse_port=11112)
    with pytest.raises(ValidationError, match="dimse_peers"):
        Settings(dimse_port=11112, dimse_peers=["NAME_LONGER_THAN_16"])
    with pytest.raises(ValidationError, match="dimse_ae_title"):
        Settings(dimse_ae_title="BACK\\SLASH")
    with pytest.raises(ValidationError, match="dimse_push"):
        Settings(dimse_push="ORTHANC@pacs")  # no port
    with pytest.raises(ValidationError, match="dimse_tls needs tls_certfile"):
        Settings(dimse_tls=True)
    with pytest.raises(ValidationError, match="dimse_pull needs dimse_port"):
        Settings(dimse_pull="ORTHANC@pacs:4242")
    pulls = Settings(dimse_pull="ORTHANC@pacs:4242", dimse_port=11112, dimse_peers=["ORTHANC"])
    assert pulls.pulls_from_pacs and not Settings().pulls_from_pacs
    s = Settings(dimse_push="ORTHANC@pacs.local:4242")
    assert s.pushes_to_pacs and Target.parse(s.dimse_push) == Target("ORTHANC", "pacs.local", 4242)
    assert not Settings().pushes_to_pacs


def test_compose_defaults_leave_dimse_off(monkeypatch):
    """docker/compose.yml passes unset variables on as "" (and the peers as "[]")."""
    for name, value in {"PORT": "", "PUSH": "", "PULL": "", "PEERS": "[]"}.items():
        monkeypatch.setenv(f"TINYLLAVA_MED_DIMSE_{name}", value)
    monkeypatch.setenv("TINYLLAVA_MED_DICOMWEB_PULL_URL", "")
    s = Settings()
    assert s.dimse_port is None and s.dimse_push is None and s.dimse_pull is None
    assert s.dimse_peers == [] and not s.pulls_from_pacs
    monkeypatch.setenv("TINYLLAVA_MED_DIMSE_PORT", "11112")
    monkeypatch.setenv("TINYLLAVA_MED_DIMSE_PEERS", '["ORTHANC"]')
    assert Settings().dimse_port == 11112


def test_peer_list():
    peers = PeerList(["PACS", "ROUTER@127.0.0.1", "ROUTER@localhost", "BOTH@127.0.0.1", "BOTH"])
    assert peers.allows("PACS", "10.1.2.3")
    assert peers.allows("ROUTER", "127.0.0.1") and not peers.allows("ROUTER", "10.1.2.3")
    assert peers.allows("BOTH", "10.1.2.3")  # also listed without a host
    assert not peers.allows("OTHER", "127.0.0.1")
    assert PeerList(["*"]).allows("ANYONE", "10.1.2.3")


def test_a_pacs_that_cannot_answer_a_query_is_a_502(tmp_path, sqlite_url, tiny_lm, monkeypatch):
    """dimse_pull pointing at a node without Query/Retrieve (here our own Storage SCP), a
    DICOMweb URL where nothing listens, and a PACS whose answer is not DICOM JSON: each is 502
    pacs_unavailable in the project's error shape, never a 500."""
    from api_helpers import assert_error
    from dicomweb_client.api import DICOMwebClient

    def ask(api):
        return api.post("/v1/studies/retrieve", json={"accession_number": "A1"}, headers=api.h())

    port = free_port()
    for api in dimse_api(
        tmp_path,
        sqlite_url,
        tiny_lm,
        dimse_port=port,
        dimse_peers=["*"],
        dimse_pull=f"{AET}@127.0.0.1:{port}",
    ):
        assert_error(ask(api), 502, "pacs_unavailable")
    for api in make_api(
        tmp_path / "web",
        sqlite_url.replace(".db", "-web.db"),
        tiny_lm,
        dicomweb_pull_url=f"http://127.0.0.1:{free_port()}/dicom-web",
    ):
        assert_error(ask(api), 502, "pacs_unavailable")  # nothing listens
        monkeypatch.setattr(DICOMwebClient, "search_for_studies", lambda *a, **k: [None])
        r = ask(api)  # an answer that is not a list of DICOM JSON objects
        assert_error(r, 502, "pacs_unavailable")
        assert "AttributeError" in r.json()["error"]["message"]


def test_our_associations_send_without_nagle_delay(tmp_path, sqlite_url, tiny_lm):
    """dimse.associate turns Nagle's algorithm off (bench/dimse_store.py: 2.9x instances/s)."""
    import socket

    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tinyllava_med.server.dimse import Target
    from tinyllava_med.server.dimse import associate as ours

    for api in dimse_api(tmp_path, sqlite_url, tiny_lm, dimse_peers=["*"]):
        settings = api.app.state.settings
        assoc = ours(Target(AET, "127.0.0.1", api.dimse_port), settings, Verification)
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_a_c_move_asks_by_study_uid_alone_and_moving_nothing_is_no_success(
    tmp_path, sqlite_url, tiny_lm, monkeypatch
):
    """The C-MOVE identifier holds the level and the unique keys only (an empty Accession
    Number beside them made older Orthancs match on it and move nothing): the study where the
    PACS lists no series, else each series of images, not the series without pixels (the
    Storage SCP refuses those, and a PACS ends the whole move at the first refusal). A PACS
    that answers success having moved nothing leaves the retrieve job failing, to be retried,
    not done with nothing stored; a study of reports only is done, with nothing to move."""
    from tinyllava_med.server import pull

    class Pacs:
        def __init__(self, completed: int, series: dict[str, str]) -> None:
            self.completed, self.series, self.asked = completed, series, []

        def send_c_find(self, query, sop_class):
            assert query.QueryRetrieveLevel == "SERIES" and query.StudyInstanceUID == "1.2.3.4"
            for uid, modality in self.series.items():
                found = pydicom.Dataset()
                found.SeriesInstanceUID, found.Modality = uid, modality
                pending = pydicom.Dataset()
                pending.Status = 0xFF00
                yield pending, found
            done = pydicom.Dataset()
            done.Status = 0x0000
            yield done, None

        def send_c_move(self, query, destination, sop_class):
            self.asked.append(query)
            final = pydicom.Dataset()
            final.Status = 0x0000
            final.NumberOfCompletedSuboperations = self.completed
            final.NumberOfFailedSuboperations = final.NumberOfWarningSuboperations = 0
            yield final, None

        def release(self):
            pass

    for api in make_api(tmp_path, sqlite_url, tiny_lm):  # the C-MOVE alone: no PACS needed
        settings, sessions = api.app.state.settings, api.app.state.session_factory
        for completed, series in ((0, {}), (2, {}), (2, {"1.5": "CT", "1.6": "SR", "1.7": "CT"})):
            pacs = Pacs(completed, series)
            monkeypatch.setattr(pull, "_associate", lambda settings, sop, pacs=pacs: pacs)
            if completed == 0:
                with pytest.raises(pull.PacsError, match="sent no instance"):
                    pull._c_move(settings, sessions, "1.2.3.4")
            else:
                result = pull._c_move(settings, sessions, "1.2.3.4")
                assert (result["stored"], result["failed"]) == (0, 0)
                assert result["skipped_series"] == (1 if series else 0)
            if not series:
                (query,) = pacs.asked
                assert sorted(el.keyword for el in query) == [
                    "QueryRetrieveLevel",
                    "StudyInstanceUID",
                ]
                assert (query.QueryRetrieveLevel, query.StudyInstanceUID) == ("STUDY", "1.2.3.4")
            else:
                assert [(q.QueryRetrieveLevel, q.SeriesInstanceUID) for q in pacs.asked] == [
                    ("SERIES", "1.5"),
                    ("SERIES", "1.7"),
                ]
                assert result["already"] == 4  # two series, two instances each, all held
        pacs = Pacs(0, {"1.6": "SR", "1.8": "KO"})
        monkeypatch.setattr(pull, "_associate", lambda settings, sop, pacs=pacs: pacs)
        result = pull._c_move(settings, sessions, "1.2.3.4")
        assert (result["stored"], result["skipped_series"], pacs.asked) == (0, 2, [])


def test_the_tls_failure_line_leaves_other_records_alone():
    """Only pynetdicom's two records for a failed TLS connection are turned into one line:
    other records, also those made while an SSL error is handled, pass as they are."""
    import ssl
    import sys

    from tinyllava_med.server.dimse import TLS_FAILURE_LINE

    def record(msg, level=logging.ERROR):
        return logging.LogRecord("pynetdicom.dul", level, "f", 1, msg, (), sys.exc_info())

    plain = record("Exception in DUL.run(), aborting association")
    assert TLS_FAILURE_LINE.filter(plain) and plain.levelno == logging.ERROR
    try:
        raise ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    except ssl.SSLError as exc:
        closed = record(TLS_FAILURE_LINE.CLOSED)
        assert not TLS_FAILURE_LINE.filter(closed)
        other = record("Exception in DUL.run(), aborting association")
        assert TLS_FAILURE_LINE.filter(other) and other.getMessage().startswith("Exception in")
        info = record("something else", logging.INFO)
        assert TLS_FAILURE_LINE.filter(info) and info.levelno == logging.INFO
        line = record(exc)
        assert TLS_FAILURE_LINE.filter(line)
        assert line.levelno == logging.WARNING and line.exc_info is None
        assert line.getMessage().startswith("DIMSE: a TLS connection failed (")
