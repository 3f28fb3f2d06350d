"""What the server keeps of an exception where people read it (`logs.error_text`): a job's
`last_error` is listed to every key that reads studies, and goes to the log."""

from __future__ import annotations

import logging

import pytest
import requests
from pydicom.valuerep import DA

from tinyllava_med.server.logs import error_text
from tinyllava_med.server.storage import ImageStore


def raised(call) -> BaseException:
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


def test_a_dicom_librarys_message_is_not_kept_as_it_quotes_values():
    """pydicom's message quotes the value it could not read: a patient's birth date."""
    text = error_text(raised(lambda: DA("1961/03/17")))
    assert "1961" not in text
    assert text.startswith("ValueError (raised in pydicom.") and "not kept" in text


def test_an_http_error_keeps_its_status_not_its_url():
    """A PACS's refusal: its status helps whoever reads the job; the URL of a query may hold an
    accession number."""
    answer = requests.Response()
    answer.status_code = 409
    answer.url = "http://pacs/dicom-web/studies?AccessionNumber=ACC-31337"
    text = error_text(raised(answer.raise_for_status))
    assert "ACC-31337" not in text and text.startswith("HTTPError (HTTP 409, raised in requests.")


def test_the_packages_own_and_the_systems_messages_are_kept():
    assert error_text(raised(lambda: ImageStore.path(ImageStore.__new__(ImageStore), "x"))) == (
        "ValueError: not a sha256 hex digest"
    )

    def refused():
        raise ConnectionRefusedError(111, "Connection refused")

    assert error_text(raised(refused)) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_a_logged_traceback_keeps_its_frames_and_drops_other_libraries_messages(caplog):
    """What a 500 or a failed job logs: the whole chain with its frames, each message as
    `error_text` keeps it (the server installs this for every record: `quiet_libraries`)."""
    from tinyllava_med.server.logs import quiet_libraries, scrubbed_traceback

    birth_date = "/".join(("1961", "03", "17"))  # data: in no source line of a frame

    def read_header():
        try:
            DA(birth_date)
        except ValueError as e:
            raise LookupError("the header of study 7 cannot be read") from e

    error = raised(read_header)
    text = scrubbed_traceback(error)
    assert "1961" not in text
    assert text.count("Traceback (most recent call last):") >= 2  # pydicom chains its own too
    assert "direct cause" in text and "in read_header" in text and "DA(birth_date)" in text
    assert text.splitlines()[-1].startswith("LookupError (raised in")  # not this package's
    quiet_libraries()
    with caplog.at_level(logging.ERROR):
        try:
            read_header()
        except LookupError:
            logging.getLogger("tinyllava_med.test").exception("a request failed")
    (record,) = caplog.records
    assert "1961" not in (record.exc_text or "") and "ValueError (raised in pydicom." in (
        record.exc_text or ""
    )


@pytest.mark.parametrize(("server_level", "log_format"), [("DEBUG", "text"), ("INFO", "json")])
def test_libraries_stay_quiet_when_the_server_logs_more(server_level, log_format):
    """`serve`'s order: the app quiets the libraries, then the root logger goes down to
    TINYLLAVA_MED_LOG_LEVEL and uvicorn applies the log config. dicomweb-client's request lines
    (the QIDO URL with an accession number, the PACS's Basic credentials) and pynetdicom's line
    per received instance (its SOP Instance UID) must not follow it down."""
    import logging.config

    from tinyllava_med.server.logs import (
        LIBRARY_LEVELS,
        json_log_config,
        quiet_libraries,
        text_log_config,
    )

    saved = {name: logging.getLogger(name).level for name in LIBRARY_LEVELS}
    root_level, root_handlers = logging.getLogger().level, logging.getLogger().handlers[:]
    try:
        for name in LIBRARY_LEVELS:  # as a fresh process finds them
            logging.getLogger(name).setLevel(logging.NOTSET)
        quiet_libraries()
        logging.getLogger().setLevel(server_level)
        logging.config.dictConfig(
            json_log_config(server_level) if log_format == "json" else text_log_config()
        )
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger().addHandler(handler)  # beside the config's own handlers
        logging.getLogger("dicomweb_client.web").debug(
            "GET: /studies?AccessionNumber=ACC123 {'Authorization': 'Basic c2VjcmV0'}"
        )
        logging.getLogger("urllib3.connectionpool").debug("GET /studies?PatientID=PID9 200")
        logging.getLogger("pynetdicom.events").info("Received Store Request: 1.2.3.4.5")
        logging.getLogger("tinyllava_med.server.test").info("the server's own line")
        logging.getLogger().removeHandler(handler)
        text = "\n".join(seen)
        assert "ACC123" not in text and "c2VjcmV0" not in text and "PID9" not in text
        assert "1.2.3.4.5" not in text
        assert "the server's own line" in text  # the server's own INFO still gets through
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        logging.getLogger().setLevel(root_level)
        logging.getLogger().handlers[:] = root_handlers


def test_access_lines_name_the_route_and_only_the_servers_ids(tmp_path):
    """An access line names the route's template, keeping the server's ids (UUIDs, a job's
    number) and nothing else a client put in the path: a DICOM UID, a name or an accession
    number where an id goes, a path of no route."""
    from tinyllava_med.server.app import create_app
    from tinyllava_med.server.logs import NoQueryString, name_routes_of
    from tinyllava_med.server.settings import Settings

    app = create_app(
        Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path}/x.db"),
        model="unused",  # no lifespan runs: only the routes are read
    )
    name_routes_of(app)
    study = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    cases = {
        ("GET", f"/v1/studies/{study}?x=ACC-1"): f"/v1/studies/{study}",
        ("GET", "/v1/studies/DOE%5EJANE%20PID-4711"): "/v1/studies/{study_id}",
        ("GET", "/v1/reports/ACC-4711-DOE"): "/v1/reports/{report_id}",
        ("POST", "/dicomweb/studies/1.2.840.99.1"): "/dicomweb/studies/{study_uid}",
        ("GET", "/dicomweb/studies/1.2.840.99.1/series/1.2.840.99.2"): "(no route)",
        ("GET", "//dicomweb/studies/1.2.840.99.4"): "(no route)",
        ("GET", "/v1/jobs/48"): "/v1/jobs/48",
        ("GET", "/v1/jobs/ACC48"): "/v1/jobs/{job_id}",
        ("GET", "/v1/studies?accession_number=ACC-1"): "/v1/studies",
        ("GET", "/healthz"): "/healthz",
    }
    for (method, path), named in cases.items():
        record = logging.LogRecord(
            "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', None, None
        )
        record.args = ("127.0.0.1:5", method, path, "1.1", 200)
        NoQueryString().filter(record)
        assert record.args[2] == named, (path, record.args[2])
