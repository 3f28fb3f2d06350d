"""`/metrics` is valid Prometheus exposition (checked by the real `promtool`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

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
