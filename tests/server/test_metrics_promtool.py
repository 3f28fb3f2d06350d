"""`/metrics` is valid Prometheus exposition (checked by the real `promtool`)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

from api_helpers import MR_SMALL, make_api, upload_ct, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file
from sqlalchemy import select

from tinyllava_med.server.db.models import Job, Study
from tinyllava_med.server.jobs import AUTO_REPORT, NEEDS_NO_MODEL

CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))


def test_promtool_accepts_metrics(sqlite_api):
    api = sqlite_api
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package `prometheus`; .ci/run installs it)"
    r = api.post(
        "/v1/studies",
        headers=api.h("pacs"),
        files=[("files", ("ct.dcm", CT_SMALL.read_bytes(), "application/dicom"))],
    )
    study = r.json()["id"]
    report = api.post(
        f"/v1/studies/{study}/questions",
        headers=api.h(),
        json={"question": "q", "max_new_tokens": 3},
    ).json()
    api.patch(f"/v1/reports/{report['id']}", headers=api.h(), json={"status": "final"})
    api.get("/v1/studies")  # a 401, counted by status
    text = api.get("/metrics").text
    for name in (
        "tinyllava_med_http_requests_total",
        "tinyllava_med_time_to_first_token_seconds",
        "tinyllava_med_generation_tokens_total",
        "tinyllava_med_num_requests_waiting",
        "tinyllava_med_batch_size",
        "tinyllava_med_model_info",
        "tinyllava_med_reports_signed_total",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    assert 'status="401"' in text and 'route="/v1/studies/{study_id}/questions"' in text
    # the answer's latency and tokens were recorded, not only declared (an alert and two
    # dashboard panels read them); readiness probes may add theirs
    values = _samples(api, "tinyllava_med_")
    assert values["tinyllava_med_e2e_request_latency_seconds_count"] >= 1
    assert values["tinyllava_med_e2e_request_latency_seconds_sum"] > 0
    assert values["tinyllava_med_prompt_tokens_total"] >= report["tokens"]["prompt"] > 0
    assert values["tinyllava_med_generation_tokens_total"] >= report["tokens"]["completion"]
    # a first burst of rejections must count in rate(): the series exists from 0
    assert values['tinyllava_med_rejected_requests_total{reason="queue_full"}'] == 0
    # the queue's limit beside its depth: the saturation alert is relative to each server's own
    limit = api.app.state.settings.max_queue
    assert f"tinyllava_med_queue_limit {float(limit)}" in text
    # and the request timeout beside the latency: the slow-answers alert is half of it
    timeout = api.app.state.settings.request_timeout_s
    assert f"tinyllava_med_request_timeout_seconds {float(timeout)}" in text
    # the upload decoded the image for the render cache; the question processed it once
    assert 'tinyllava_med_cache_hits_total{cache="rendered"} 1.0' in text
    assert 'tinyllava_med_cache_misses_total{cache="pixels"} 1.0' in text
    assert 'tinyllava_med_cache_misses_total{cache="prefixes"} 1.0' in text
    assert 'tinyllava_med_cache_bytes{cache="pixels"} 0.0' not in text
    assert "gpu_memory" not in text  # no GPU here: absent, not failing
    # the data volume's space, as node_exporter names it (a full disk refuses uploads)
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tinyllava_med_data_filesystem_")
    }
    usage = shutil.disk_usage(api.app.state.settings.data_dir)
    assert values["tinyllava_med_data_filesystem_size_bytes"] == usage.total
    assert abs(values["tinyllava_med_data_filesystem_avail_bytes"] - usage.free) < 256 * 2**20
    assert study not in text  # no resource ids (or patient data) in labels
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _samples(api, *prefixes: str) -> dict[str, float]:
    """`name{label="value"}` -> value, for the series whose names start with a prefix."""
    out = {}
    for family in text_string_to_metric_families(api.get("/metrics").text):
        for s in family.samples:
            if s.name.startswith(prefixes):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_show_what_waits_for_radiologists_and_jobs(tmp_path, database_url, tiny_lm):
    """The worklist's backlog and the job queue, read from the database at scrape, on SQLite
    and PostgreSQL: studies by status with the oldest unread one's arrival, due jobs by kind
    with the oldest one's due time; absent (not failing) while the database does not answer."""
    p = "tinyllava_med_"
    overrides = {
        "job_workers": 0,
        "auto_report_prompts": {"MR": "Describe the findings."},
        "auto_report_delay_s": 0,
    }
    for api in make_api(tmp_path, database_url, tiny_lm, **overrides):
        empty = _samples(api, p + "studies", p + "jobs_waiting", p + "jobs_oldest")
        assert empty == {
            p + 'studies{status="received"}': 0,
            p + 'studies{status="reported"}': 0,
            p + 'studies{status="signed"}': 0,
            **{f'{p}jobs_waiting{{kind="{k}"}}': 0 for k in (AUTO_REPORT, *NEEDS_NO_MODEL)},
        }, empty
        unread, reported, signed = (upload_ct(api, new_study=True)["id"] for _ in range(3))
        for study in (reported, signed):
            r = api.post(f"/v1/studies/{study}/questions", headers=api.h(), json={"question": "?"})
            assert r.status_code == 201, r.text
        r = api.patch(f"/v1/reports/{r.json()['id']}", headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text
        # a study imported with an automatic report to write; no job worker runs it
        r = api.post(
            "/v1/studies/import",
            headers=api.h("pacs"),
            files=[("files", ("IM1", MR_SMALL.read_bytes(), "application/dicom"))],
        )
        assert r.status_code == 201, r.text

        got = _samples(api, p + "studies", p + "jobs_waiting", p + "jobs_oldest")
        with api.app.state.session_factory() as s:
            first = s.get(Study, unread).created_at.timestamp()
            answered = s.get(Study, reported).created_at.timestamp()
            job = s.scalars(select(Job).where(Job.kind == "auto_report")).one()
        assert got[p + 'studies{status="received"}'] == 2  # the first upload and the import
        assert got[p + 'studies{status="reported"}'] == 1
        assert got[p + 'studies{status="signed"}'] == 1
        assert got[p + 'studies_oldest_unsigned_timestamp_seconds{status="received"}'] == first
        assert got[p + 'studies_oldest_unsigned_timestamp_seconds{status="reported"}'] == answered
        assert p + 'studies_oldest_unsigned_timestamp_seconds{status="signed"}' not in got
        assert got[p + 'jobs_waiting{kind="auto_report"}'] == 1
        assert got[p + "jobs_oldest_due_timestamp_seconds"] == job.run_after.timestamp()
        assert _samples(api, p + "database_up") == {p + "database_up": 1}

        # a new question about the signed study: its draft awaits a signature, as the worklist
        # says, until it is signed too
        r = api.post(f"/v1/studies/{signed}/questions", headers=api.h(), json={"question": "?"})
        assert r.status_code == 201, r.text
        assert api.get(f"/v1/studies/{signed}", headers=api.h()).json()["report_status"] == "draft"
        got = _samples(api, p + "studies")
        assert (got[p + 'studies{status="reported"}'], got[p + 'studies{status="signed"}']) == (
            2,
            0,
        )
        r = api.patch(f"/v1/reports/{r.json()['id']}", headers=api.h(), json={"status": "final"})
        assert r.status_code == 200, r.text
        got = _samples(api, p + "studies")
        assert (got[p + 'studies{status="reported"}'], got[p + 'studies{status="signed"}']) == (
            1,
            1,
        )

        def unreachable():
            raise ConnectionRefusedError  # as a database that is down

        api.app.state.metrics.watch_backlog(unreachable, ())
        r = api.get("/metrics")
        assert r.status_code == 200 and p + "studies" not in r.text
        assert _samples(api, p + "database_up") == {p + "database_up": 0}  # its alert's series
        assert p + "http_requests_total" in r.text


def test_a_job_whose_workers_died_on_every_attempt_counts_as_failed(tmp_path, sqlite_url, tiny_lm):
    """A job that crashes its process (say, out of memory) is found running past its lease
    with no attempt left, and failed by the next claim: it counts in jobs_total{outcome=
    "failed"}, which TinyLlavaMedJobsFailing watches; before, it failed without a count."""
    from tinyllava_med.server.db import crud
    from tinyllava_med.server.db.models import utcnow

    p = "tinyllava_med_"
    for api in make_api(tmp_path, sqlite_url, tiny_lm, job_workers=1, job_poll_s=0.05):
        failed = p + 'jobs_total{kind="sweep_images",outcome="failed"}'
        assert _samples(api, p + "jobs_total").get(failed, 0) == 0
        with api.app.state.session_factory.begin() as s:
            job = crud.enqueue_job(s, kind="sweep_images", payload={"hashes": []}, max_attempts=2)
            job.status, job.attempts, job.locked_by = "running", 2, "gone:1:0"
            job.locked_at = utcnow() - timedelta(seconds=api.app.state.settings.job_lease_s + 60)
            s.flush()
            job_id = job.id
        wait_for(
            lambda api=api, failed=failed: _samples(api, p + "jobs_total").get(failed) == 1,
            what="the abandoned job counted as failed",
        )
        with api.app.state.session_factory() as s:
            job = s.get(Job, job_id)
            assert (job.status, job.last_error) == ("failed", "the worker running this job stopped")


def test_metrics_say_when_the_first_api_key_in_use_expires(tmp_path, database_url, tiny_lm):
    """With TINYLLAVA_MED_API_KEY_DAYS a PACS's key expires, and from then on every STOW-RS is
    refused with 401: the soonest expiry among each role's keys in use is exported for its
    alert, and stays for a week after it passed (the alert must not clear as the 401s start).
    A key never used, revoked, or without an expiry does not count."""
    from tinyllava_med.server.auth import create_api_key
    from tinyllava_med.server.db.models import ApiKey

    name = "tinyllava_med_api_key_next_expiry_timestamp_seconds"
    for api in make_api(tmp_path, database_url, tiny_lm, job_workers=0):
        sessions = api.app.state.session_factory
        with sessions.begin() as s:
            soon, soon_key = create_api_key(s, role="pacs", name="pacs-a", expires_in_days=5)
            _, later_key = create_api_key(s, role="pacs", name="pacs-b", expires_in_days=40)
            create_api_key(s, role="pacs", name="spare", expires_in_days=1)  # never used
            _, gone_key = create_api_key(s, role="radiologist", name="old", expires_in_days=2)
            soon_id = soon.id
        assert name + '{role="pacs"}' not in _samples(api, name)  # none in use yet
        for key in (soon_key, later_key, gone_key):
            r = api.get("/v1/studies", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        with sessions.begin() as s:  # the radiologist's key revoked; the admin's never expires
            old = s.query(ApiKey).filter(ApiKey.name == "old").one()
            old.revoked_at = old.created_at
        with sessions() as s:
            expires = s.get(ApiKey, soon_id).expires_at.timestamp()
        assert _samples(api, name) == {name + '{role="pacs"}': expires}
        with sessions.begin() as s:  # it expired three days ago: its PACS is refused now
            key = s.get(ApiKey, soon_id)
            key.expires_at = key.created_at - timedelta(days=3)
            expired = key.expires_at.timestamp()
        assert _samples(api, name) == {name + '{role="pacs"}': expired}
