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
