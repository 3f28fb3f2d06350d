"""C-STORE rate into the server's DIMSE Storage SCP, with and without TCP_NODELAY on the sender.

pynetdicom leaves Nagle's algorithm on, so a sender's small PDUs wait for the peer's delayed ACK.
The server's own associations (`dimse.associate`: SR pushes, retrieves, `pacs check`) turn it
off (`dimse.no_delay`); this measures what that is worth, side by side in one run: the same
server (SQLite in a temporary folder, no model: receiving needs none), the same CT slices (copies
of pydicom's CT_small with new UIDs), one association per mode, alternating rounds. It also times
STOW-RS (10 instances per request) into the same server, for scale.

    python bench/dimse_store.py --md bench/results/dimse_store_cpu.md
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pydicom
from machine import cpu_name  # bench/, this script's folder
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from api_helpers import free_port, live_server, multipart_related  # noqa: E402

from tinyllava_med.server import dimse  # noqa: E402
from tinyllava_med.server.app import create_app  # noqa: E402
from tinyllava_med.server.db.migrate import upgrade  # noqa: E402
from tinyllava_med.server.settings import Settings  # noqa: E402

CT = Path(get_testdata_file("CT_small.dcm", download=False))


def slices(n: int) -> list[pydicom.Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(CT)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def c_store_rate(port: int, n: int, nodelay: bool) -> float:
    ae = AE(ae_title="BENCH")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="TINYLLAVA_MED")
    assert assoc.is_established
    if nodelay:
        dimse.no_delay(assoc)
    data = slices(n)
    start = time.perf_counter()
    for ds in data:
        assert assoc.send_c_store(ds).Status == 0x0000
    seconds = time.perf_counter() - start
    assoc.release()
    return n / seconds


def stow_rate(base: str, key: str, n: int) -> float:
    parts = []
    for ds in slices(n):
        buf = io.BytesIO()
        ds.save_as(buf)
        parts.append(buf.getvalue())
    start = time.perf_counter()
    for i in range(0, n, 10):
        body, ctype = multipart_related(*parts[i : i + 10])
        r = httpx.post(
            f"{base}/dicomweb/studies",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": ctype},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=100, help="per round and mode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    url = f"sqlite:///{tmp}/bench.db"
    upgrade(url)
    port = free_port()
    settings = Settings(
        data_dir=tmp / "data",
        database_url=url,
        model="no-model-needed",  # loading fails; receiving and filing need no model
        dimse_port=port,
        dimse_peers=["*"],
    )
    app = create_app(settings)
    rates: dict[str, list[float]] = {"nagle": [], "nodelay": [], "stow": []}
    with live_server(app, ready_path=None) as base:
        key = app.state.first_admin_key
        for _ in range(args.rounds):
            rates["nagle"].append(c_store_rate(port, args.instances, nodelay=False))
            rates["nodelay"].append(c_store_rate(port, args.instances, nodelay=True))
            rates["stow"].append(stow_rate(base, key, args.instances))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["nodelay"] / med["nagle"]
    lines = [
        "# C-STORE into the DIMSE Storage SCP: sender with and without TCP_NODELAY",
        "",
        f"Command: `python bench/dimse_store.py --instances {args.instances} "
        f"--rounds {args.rounds}`",
        "",
        f"Machine: {cpu_name()}, CPU only; one server process (SQLite), sender in the same "
        "process over loopback. Median of the rounds, instances per second:",
        "",
        "| sender | instances/s | per round |",
        "| --- | ---: | --- |",
        *(
            f"| {name} | {med[k]:.1f} | {', '.join(f'{r:.1f}' for r in rates[k])} |"
            for k, name in (
                ("nagle", "pynetdicom default (Nagle on)"),
                ("nodelay", "TCP_NODELAY (`dimse.no_delay`, as the server's own associations)"),
                ("stow", "STOW-RS, 10 instances per request (for scale)"),
            )
        ),
        "",
        f"TCP_NODELAY on the sender: **{ratio:.1f}x** the instances per second.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
        args.md.with_suffix(".json").write_text(json.dumps({"rates": rates, "median": med}))


if __name__ == "__main__":
    main()
