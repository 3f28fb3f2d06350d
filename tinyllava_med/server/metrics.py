"""Prometheus metrics: one registry per app, names with units, labels without patient data.

Names follow vLLM where they overlap (`time_to_first_token_seconds`, `generation_tokens_total`,
`num_requests_waiting`) with the `tinyllava_med_` prefix. GPU memory comes from NVML (used /
total per device, as DCGM's framebuffer gauges) and from the torch allocator (allocated,
reserved, peak); without a GPU those series are absent, never an error.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tinyllava_med.server.db.crud import Backlog
from tinyllava_med.server.lru import ByteLRU

log = logging.getLogger(__name__)

# up to a CPU server's request timeout (600 s in the CPU compose files)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PREFIX = "tinyllava_med_"


class GpuCollector(Collector):
    """GPU memory at scrape time: NVML per device and the torch CUDA allocator."""

    def __init__(self) -> None:
        self._nvml = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = True
        except Exception as e:  # no driver / no library: GPU series are simply absent
            log.debug("NVML unavailable: %s", e)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml:
            import pynvml

            used = GaugeMetricFamily(
                PREFIX + "gpu_memory_used_bytes", "GPU memory used (NVML)", labels=["gpu"]
            )
            total = GaugeMetricFamily(
                PREFIX + "gpu_memory_total_bytes", "GPU memory total (NVML)", labels=["gpu"]
            )
            try:
                for i in range(pynvml.nvmlDeviceGetCount()):
                    info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
                    used.add_metric([str(i)], float(info.used))
                    total.add_metric([str(i)], float(info.total))
                yield used
                yield total
            except Exception as e:
                log.warning("NVML read failed: %s", e)
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        fams = {
            "allocated": GaugeMetricFamily(
                PREFIX + "torch_cuda_allocated_bytes", "torch allocator: allocated", labels=["gpu"]
            ),
            "reserved": GaugeMetricFamily(
                PREFIX + "torch_cuda_reserved_bytes", "torch allocator: reserved", labels=["gpu"]
            ),
            "peak": GaugeMetricFamily(
                PREFIX + "torch_cuda_peak_allocated_bytes",
                "torch allocator: peak allocated",
                labels=["gpu"],
            ),
        }
        for i in range(torch.cuda.device_count()):
            fams["allocated"].add_metric([str(i)], float(torch.cuda.memory_allocated(i)))
            fams["reserved"].add_metric([str(i)], float(torch.cuda.memory_reserved(i)))
            fams["peak"].add_metric([str(i)], float(torch.cuda.max_memory_allocated(i)))
        yield from fams.values()


class CacheCollector(Collector):
    """Hits, misses and size of the server's in-memory caches (decoded renderings, the model's
    pixel values), read at scrape time; labelled by cache name only."""

    def __init__(self) -> None:
        self.caches: dict[str, ByteLRU[Any]] = {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily(
            PREFIX + "cache_hits", "Cache lookups answered", labels=["cache"]
        )
        misses = CounterMetricFamily(
            PREFIX + "cache_misses", "Cache lookups that had to compute", labels=["cache"]
        )
        size = GaugeMetricFamily(PREFIX + "cache_bytes", "Bytes held by a cache", labels=["cache"])
        for name, cache in self.caches.items():
            hits.add_metric([name], float(cache.hits))
            misses.add_metric([name], float(cache.misses))
            size.add_metric([name], float(cache.bytes))
        yield from (hits, misses, size)


class DataVolumeCollector(Collector):
    """Space on the filesystem of the data directory (images, SQLite, the built demo) at scrape
    time, named as node_exporter's `node_filesystem_{avail,size}_bytes`: a hospital box often
    has no node_exporter, and a full disk refuses every upload (507). Absent until a directory
    is watched."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.path is None:
            return
        try:
            usage = shutil.disk_usage(self.path)
        except OSError as e:  # the volume is gone: the series go missing, the scrape works
            log.warning("cannot read the data volume's space: %s", type(e).__name__)
            return
        yield GaugeMetricFamily(
            PREFIX + "data_filesystem_avail_bytes",
            "Bytes available to the server on the data directory's filesystem",
            value=float(usage.free),
        )
        yield GaugeMetricFamily(
            PREFIX + "data_filesystem_size_bytes",
            "Size of the data directory's filesystem in bytes",
            value=float(usage.total),
        )


def _database_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        PREFIX + "database_up", "1 when the database answered this scrape's query", value=value
    )


class BacklogCollector(Collector):
    """What waits, read from the database at scrape: studies by status with the arrival of the
    oldest one not signed yet (what radiologists have still to read), and due jobs by kind with
    the time the longest-waiting one became due (automatic reports a slow model has not caught
    up with). Every server process sharing a database exports the same values. Absent until
    watched, and while the database does not answer (the scrape still works); `database_up`
    says which (1 when this scrape's query answered, else 0)."""

    def __init__(self) -> None:
        self.read: Callable[[], Backlog] | None = None
        self.job_kinds: tuple[str, ...] = ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.read is None:
            return
        try:
            backlog = self.read()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail with the database
            log.warning("cannot read the backlog from the database: %s", type(e).__name__)
            yield _database_up(0)
            return
        yield _database_up(1)
        studies = GaugeMetricFamily(
            PREFIX + "studies",
            "Studies here by status (received: no report yet; reported: a draft awaits a "
            "signature; signed: every report signed)",
            labels=["status"],
        )
        for status, n in backlog.studies.items():
            studies.add_metric([status], n)
        yield studies
        oldest = GaugeMetricFamily(
            PREFIX + "studies_oldest_unsigned_timestamp_seconds",
            "When the oldest study not signed yet arrived, by status (absent when there is none)",
            labels=["status"],
        )
        for status, at in backlog.oldest_unsigned.items():
            oldest.add_metric([status], at.timestamp())
        yield oldest
        due = GaugeMetricFamily(
            PREFIX + "jobs_waiting",
            "Background jobs due and not yet running, by kind",
            labels=["kind"],
        )
        for kind in sorted({*self.job_kinds, *backlog.jobs_due}):
            due.add_metric([kind], backlog.jobs_due.get(kind, 0))
        yield due
        if backlog.oldest_due is not None:
            yield GaugeMetricFamily(
                PREFIX + "jobs_oldest_due_timestamp_seconds",
                "When the longest-waiting due job became due",
                value=backlog.oldest_due.timestamp(),
            )
        expiry = GaugeMetricFamily(
            PREFIX + "api_key_next_expiry_timestamp_seconds",
            "When the first API key in use (not revoked, used at least once) of each role expires "
            "or expired (in the last 7 days); absent for a role whose keys in use never expire. "
            "A PACS whose key expired is refused with 401",
            labels=["role"],
        )
        for role, at in sorted(backlog.keys_expire.items()):
            expiry.add_metric([role], at.timestamp())
        yield expiry


class Metrics:
    """All of the server's metrics, on a registry of its own (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        r.register(GpuCollector())
        self._caches = CacheCollector()
        self._data_volume = DataVolumeCollector()
        r.register(self._data_volume)
        self._backlog = BacklogCollector()
        r.register(self._backlog)
        r.register(self._caches)
        self.requests = Counter(
            PREFIX + "http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from submission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from submission to the full answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens", registry=r
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens", registry=r)
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting", "Requests queued or running in the engine", registry=r
        )
        self.request_timeout = Gauge(
            PREFIX + "request_timeout_seconds",
            "The server's request timeout (TINYLLAVA_MED_REQUEST_TIMEOUT_S): what slow means here",
            registry=r,
        )
        self.queue_limit = Gauge(
            PREFIX + "queue_limit",
            "Requests the engine holds before new ones get 503 queue_full (MAX_QUEUE)",
            registry=r,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Requests per generate call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            PREFIX + "batch_duration_seconds",
            "Duration of one batched generate call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            PREFIX + "cancelled_requests",
            "Requests cancelled (client gone) before they finished",
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "rejected_requests", "Requests rejected", ["reason"], registry=r
        )
        self.prefills = Counter(
            PREFIX + "image_prefills",
            "Images prepared ahead of their questions, by outcome (done; cached: held already; "
            "skipped: questions were waiting or a newer image was asked for; abandoned: stopped "
            "for a question about another image or a newer image; failed)",
            ["outcome"],
            registry=r,
        )
        self.model_info = Gauge(
            PREFIX + "model_info",
            "The served model (value 1)",
            ["model", "variant", "quantization"],
            registry=r,
        )
        self.model_ready = Gauge(PREFIX + "model_ready", "1 when the model answers", registry=r)
        self.reports_signed = Counter(
            PREFIX + "reports_signed",
            "Reports signed, by status (final: signed; amended: corrected after signing), the "
            "variant that answered, and whether the signed text differs from the model's answer "
            "(how often radiologists change the model's drafts)",
            ["status", "variant", "changed"],
            registry=r,
        )
        self.jobs = Counter(
            PREFIX + "jobs",
            "Background job runs by kind and outcome (done, retry, failed; gone: deleted with "
            "its study while it ran)",
            ["kind", "outcome"],
            registry=r,
        )
        self.images_released = Counter(
            PREFIX + "images_released",
            "Images whose pixel data the retention job released (their studies, reports and "
            "DICOM headers kept)",
            registry=r,
        )
        self.dimse_instances = Counter(
            PREFIX + "dimse_instances",
            "Instances received over DIMSE C-STORE, by outcome (stored; already: held before, "
            "acknowledged again; not_kept: no image, an SR or a PDF, acknowledged with a "
            "warning; failed)",
            ["outcome"],
            registry=r,
        )
        self.dimse_associations = Counter(
            PREFIX + "dimse_associations",
            "DIMSE associations asked for, by outcome (accepted; refused: calling AE title or "
            "address not in dimse_peers; dropped: a connection closed before it could ask, from "
            "an address of no peer or one holding too many idle connections)",
            ["outcome"],
            registry=r,
        )
        self.rejected.labels("queue_full")  # from 0: a first burst counts in rate()
        for outcome in ("stored", "already", "not_kept", "failed"):
            self.dimse_instances.labels(outcome)
        for outcome in ("accepted", "refused", "dropped"):
            self.dimse_associations.labels(outcome)

    # EngineMetrics protocol
    def on_batch(self, size: int, seconds: float, new_tokens: int, prompt_tokens: int) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.generation_tokens.inc(new_tokens)
        self.prompt_tokens.inc(prompt_tokens)

    def on_queue(self, depth: int) -> None:
        self.waiting.set(depth)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_answer(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def on_cancel(self, n: int) -> None:
        self.cancelled.inc(n)

    def on_prefill(self, outcome: str) -> None:
        self.prefills.labels(outcome).inc()

    def on_signed(self, status: str, variant: str, text: str, answer: str) -> None:
        changed = "true" if text.strip() != answer.strip() else "false"
        self.reports_signed.labels(status, variant, changed).inc()

    def set_model(self, info: dict[str, Any]) -> None:
        self.model_info.clear()
        self.model_info.labels(
            str(info.get("model")), str(info.get("variant")), str(info.get("quantization"))
        ).set(1)

    def watch_cache(self, name: str, cache: ByteLRU[Any]) -> None:
        """Export `cache` as `tinyllava_med_cache_*{cache="name"}`."""
        self._caches.caches[name] = cache

    def watch_data_dir(self, path: Path) -> None:
        """Export the space of `path`'s filesystem (`DataVolumeCollector`)."""
        self._data_volume.path = path

    def watch_backlog(self, read: Callable[[], Backlog], job_kinds: Iterable[str]) -> None:
        """Export what `read()` finds waiting at each scrape (`BacklogCollector`); every kind
        in `job_kinds` from 0."""
        self._backlog.read = read
        self._backlog.job_kinds = tuple(job_kinds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
