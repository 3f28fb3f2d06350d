"""The server's one validated configuration: `TINYLLAVA_MED_*` environment variables, flags override.

    TINYLLAVA_MED_DATA_DIR=/srv/tlm TINYLLAVA_MED_QUANT=4bit tinyllava-med serve
    Settings(model="tinyllava-med-fq4", port=9000)      # what the CLI builds from its flags

With no configuration at all: the bundled demo model, SQLite under `./data`, 127.0.0.1:8000,
authentication on. Everything the server reads from the environment is a field here; nothing
else in the package reads `os.environ` for server configuration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tinyllava_med.model.registry import Quant

MiB = 1024 * 1024
Dtype = Literal["auto", "fp32", "bf16", "fp16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
SUPPORTED_DATABASES = ("sqlite", "postgresql")
# a DICOM AE title (PS3.5 §6.2, VR AE): printable ASCII but backslash, not all spaces
AE_TITLE = r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$"
DIMSE_TARGET = r"^[!-\[\]-~][ -\[\]-~]{0,15}@[^:@\s]+:\d{1,5}$"  # "AET@host:port"
_PEER = re.compile(r"^(\*|[ -\[\]-~]{1,16}(@[^@\s]+)?)$")


PREFIX = "TINYLLAVA_MED_"  # every setting's environment variable begins so
TURN_CHARS = 20  # what a conversation turn costs besides its text (`max_conversation_chars`)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        extra="forbid",  # a misspelt override (`Settings(prot=1)`) is an error, not ignored
        validate_default=True,
    )

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(
        default=Path("./data"), description="SQLite database, stored images, models"
    )
    database_url: str = Field(
        default="", description="SQLAlchemy URL; default: sqlite:///{data_dir}/tinyllava_med.db"
    )

    # --- model ---------------------------------------------------------------------------------
    model: str = Field(default="demo", min_length=1, description="variant name, folder or hub id")
    quant: Quant | None = Field(default=None, description="None: the variant's own quantization")
    device: str = Field(default="auto", min_length=1, description="auto, cpu, cuda, cuda:1 ...")
    dtype: Dtype = "auto"

    # --- where inference runs ---------------------------------------------------------------
    engine: Literal["local", "remote"] = Field(
        default="local", description="local: load `model` here; remote: forward to `remote_url`"
    )
    remote_url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL (vLLM, SGLang, transformers serve, another "
        "tinyllava-med), e.g. http://gpu-box:8000/v1",
    )
    remote_model: str | None = Field(default=None, description="default: the remote's first")
    remote_api_key: SecretStr | None = None
    remote_max_concurrency: int = Field(default=8, gt=0, description="requests in flight")

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    tls_certfile: Path | None = Field(
        default=None,
        description="serve HTTPS with this PEM certificate (chain); needs tls_keyfile. Keys, "
        "reports and images then never cross the hospital network in clear text",
    )
    tls_keyfile: Path | None = Field(default=None, description="the certificate's PEM private key")

    # --- limits (bad input gets a 4xx naming the limit) ----------------------------------------
    max_upload_bytes: int = Field(default=64 * MiB, gt=0, description="per request body")
    max_files_per_upload: int = Field(default=64, gt=0)
    max_import_files: int = Field(
        default=10_000, gt=0, description="files in one media import (a CD), ZIP members counted"
    )
    max_import_bytes: int = Field(
        default=4 * 1024 * MiB, gt=0, description="bytes in one media import, ZIPs unpacked"
    )
    max_pixels: int = Field(default=8192 * 8192, gt=0, description="rows x columns of one frame")
    max_side: int = Field(
        default=8192,
        gt=0,
        description="the longer of rows and columns (the model pads images to a square on it)",
    )
    max_frames: int = Field(default=1024, gt=0, description="frames in one multi-frame DICOM")
    max_decoded_bytes: int = Field(
        default=1024 * MiB,
        gt=0,
        description="decoded bytes one file may declare (all frames), and a deflated DICOM's "
        "inflated size",
    )
    decode_memory_mb: int = Field(
        default=2048,
        gt=0,
        description="memory all image decodes at once may take (estimated per file before it "
        "is decoded); a large image waits up to 5 s for its share (4 at most wait), then 503 "
        "decode_busy (DICOM: 0xA700). One file larger than this is decoded alone",
    )
    max_question_chars: int = Field(default=2000, gt=0)
    max_conversation_chars: int = Field(
        default=6000,
        gt=0,
        description="a chat-completions conversation's turns together, the question's included "
        f"(each turn counts {TURN_CHARS} characters more, for its role markers): a LLaVA "
        "model's context holds about 2048 tokens, up to 729 of them the image's",
    )
    max_new_tokens: int = Field(default=512, gt=0, description="the most a request may ask for")
    default_max_new_tokens: int = Field(
        default=128, gt=0, description="when a request does not say"
    )
    request_timeout_s: float = Field(default=120.0, gt=0)
    shutdown_grace_s: float | None = Field(
        default=None,
        gt=0,
        description="how long a stopping server (SIGTERM, Ctrl-C) lets the answers and uploads "
        "in flight finish before it cancels them; meanwhile it takes no new connection and "
        "/readyz answers 503 (None: request_timeout_s + 10, so no answer accepted before the "
        "stop is cut). A service manager must wait longer before it kills the process: "
        "compose's stop_grace_period, systemd's TimeoutStopSec",
    )
    render_cache_mb: int = Field(
        default=256, ge=0, description="decoded images kept in memory (0: decode every time)"
    )
    pixel_cache_mb: int = Field(
        default=128,
        ge=0,
        description="the model's pixel values of recent images kept in memory, so follow-up "
        "questions skip the image processor (0: process every time)",
    )

    prefix_cache_mb: int | None = Field(
        default=None,
        ge=0,
        description="attention caches of recent prompts up to their image, so a follow-up "
        "question about an image computes only its own words: on a CPU most of an answer's "
        "time; and of the template's opening (system prompt), which every question shares "
        "(None: 256 on a CPU, caching up to the image for towers of 256 image tokens or more "
        "and only the opening for smaller ones; 0 on a GPU; 0: off)",
    )

    # --- batching ------------------------------------------------------------------------------
    max_batch_size: int = Field(
        default=8,
        gt=0,
        description="rows per generate; fewer when the measured time per row says a batch would "
        "take over a third of request_timeout_s (a real model on a CPU)",
    )
    batch_window_ms: float = Field(
        default=50.0,
        ge=0,
        description="the longest a forming batch waits for requests on their way; for ones "
        "only expected back from the last batch, no longer than that batch took; after a batch "
        "that took longer than four windows, up to a quarter of that batch's time (at most "
        "0.5 s)",
    )
    max_queue: int = Field(default=64, gt=0, description="waiting requests before 503")
    warmup: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="before taking requests, generate one batch of each size 1 to "
        "max_batch_size, so no request pays for a batch size's first use; auto: on a GPU only "
        "(on a CPU a new batch size costs no more than later ones, and a real model's batch of "
        "8 takes minutes there); /readyz says loading meanwhile",
    )

    # --- operations ----------------------------------------------------------------------------
    readiness_probe_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="how long an answer (or probe) counts as proof that the model works; "
        "/readyz on a server idle for longer runs a one-token probe",
    )
    readiness_probe_wait_s: float = Field(
        default=5.0,
        gt=0,
        description="the longest /readyz waits for its probe before answering from the last "
        "evidence (keep it below the health check's timeout; a CPU model's probe takes longer)",
    )
    auth_disabled: bool = Field(
        default=False,
        description="every caller is an admin, without a key: only for local experiments, so "
        "only with a loopback host (127.0.0.1, ::1, localhost)",
    )
    api_key_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="lifetime of new keys (API and CLI) unless they say otherwise; none: keys "
        "do not expire (the first admin key never does)",
    )
    auth_cache_s: float = Field(
        default=10.0,
        ge=0,
        description="verified keys are remembered this long; a key revoked on another replica "
        "stops working within it (0: look every request up)",
    )
    allow_remote_image_urls: bool = Field(
        default=False,
        description="chat image_url may be an http(s) URL, of a host in remote_image_hosts "
        "(off: data URIs only)",
    )
    remote_image_hosts: list[str] = Field(
        default_factory=list,
        description="with allow_remote_image_urls: the hosts (`host` or `host:port`) chat image "
        "URLs may name; the server fetches them from inside the hospital network, so name the "
        "image servers only (a PACS's WADO); `*` allows any host",
    )
    log_level: LogLevel = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, for a log collector"
    )
    access_log: bool = Field(
        default=False,
        description="a log line per HTTP request (uvicorn's); off by default: the audit log "
        "records every access to studies and reports, /metrics counts requests by route and "
        "status, and the line costs about a fifth of the throughput at full load",
    )
    gradio: bool = Field(
        default=False, description="mount the Gradio demo at /demo (an API key asks each question)"
    )

    # --- hospital integration ------------------------------------------------------------------
    institution_name: str = Field(
        default="Unspecified institution",
        min_length=1,
        max_length=64,
        description="in SRs (institution, verifying organization) and FHIR (performer)",
    )
    auto_report_prompts: dict[str, str] = Field(
        default_factory=dict,
        description='question asked of every study stored over STOW-RS, by modality ("*": any '
        'other), e.g. {"CT": "Describe the findings."}; empty: no automatic reports',
    )
    auto_report_delay_s: float = Field(
        default=60.0,
        ge=0,
        description="answer a study once no instance of it arrived for this long (each one "
        "postpones it): a series sent over a minute gets one report, not one per pause (2 s "
        "made two drafts of one slow series)",
    )
    job_workers: int = Field(default=1, ge=0, description="job threads in this process (0: none)")
    job_max_attempts: int = Field(
        default=8,
        ge=1,
        description="with the 5 s backoff base, retries span about 10 minutes: a PACS restart "
        "does not fail a push for good",
    )
    job_retry_base_s: float = Field(default=5.0, ge=0, description="backoff: base * 2^attempt")
    job_lease_s: float = Field(
        default=600.0, gt=0, description="a running job whose worker is silent this long is retried"
    )
    job_poll_s: float = Field(default=1.0, gt=0)
    image_sweep_grace_s: float = Field(
        default=600.0,
        ge=0,
        description="a deleted study's files are removed this long after the deletion (when no "
        "other study holds them and no upload stored them again meanwhile), by a job",
    )
    image_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="release the pixel data of studies that received no image for this many "
        "days and have no draft report (the PACS keeps the images; the study, its reports and "
        "SRs stay, and retrieving or sending the study again brings the images back for as long "
        "again); unset: keep everything",
    )
    image_retention_draft_days: float | None = Field(
        default=None,
        gt=0,
        description="with image_retention_days: a draft report nobody has changed for this many "
        "days no longer keeps its study's pixel data (a site that reads on the PACS and never "
        "signs here keeps every automatic draft); unset: a draft keeps them",
    )
    dicomweb_push_url: str | None = Field(
        default=None,
        description="DICOMweb base URL that receives the SR of every automatic "
        "report and of every signed report (STOW-RS), e.g. http://pacs:8042/dicom-web",
    )
    dicomweb_push_headers: dict[str, str] = Field(
        default_factory=dict, description='e.g. {"Authorization": "Basic ..."}'
    )
    dicomweb_pull_url: str | None = Field(
        default=None,
        description="DICOMweb base URL of the PACS that POST /v1/studies/retrieve searches "
        "(QIDO-RS) and fetches from (WADO-RS), e.g. http://pacs:8042/dicom-web",
    )
    dicomweb_pull_headers: dict[str, str] = Field(
        default_factory=dict, description='e.g. {"Authorization": "Basic ..."}'
    )
    dimse_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="also receive studies over DICOM DIMSE (C-STORE, C-ECHO) on this port of "
        "`host`, e.g. 11112; off unless set, and then `dimse_peers` must name who may send",
    )
    dimse_ae_title: str = Field(
        default="TINYLLAVA_MED",
        min_length=1,
        max_length=16,
        pattern=AE_TITLE,
        description="this server's AE title: the called AE title senders must use, and the "
        "calling one of its own C-STOREs",
    )
    dimse_peers: list[str] = Field(
        default_factory=list,
        description='who may send over DIMSE, which has no keys: "AET" (from any address), '
        '"AET@host" (from that host only), or "*" (anyone who reaches the port)',
    )
    dimse_pull: str | None = Field(
        default=None,
        pattern=DIMSE_TARGET,
        description="the PACS's query/retrieve SCP that POST /v1/studies/retrieve asks by "
        'C-FIND and C-MOVE (to this server\'s dimse_port) instead of DICOMweb: "AET@host:port"',
    )
    dimse_tls: bool = Field(
        default=False,
        description="DICOM TLS (PS3.15 BCP 195) on dimse_port, presenting tls_certfile, and for "
        "this server's own associations (DIMSE_PUSH, DIMSE_PULL), checking the PACS's "
        "certificate against dimse_tls_ca (or the system's CAs)",
    )
    dimse_tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle that signs the PACS's certificates; when set, dimse_port also "
        "requires each sender to present a certificate it signed (mutual TLS)",
    )
    dimse_max_associations: int = Field(default=8, ge=1, description="at once, over all peers")
    dimse_push: str | None = Field(
        default=None,
        pattern=DIMSE_TARGET,
        description="send SRs and rejection notes to the PACS by C-STORE instead of STOW-RS: "
        '"AET@host:port", e.g. "ORTHANC@pacs:4242"',
    )

    @property
    def base_url(self) -> str:
        """Where `serve` listens, as a client on this host reaches it."""
        scheme = "https" if self.tls_certfile else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def pulls_from_pacs(self) -> bool:
        """POST /v1/studies/retrieve has a PACS to ask, over DICOMweb or DIMSE."""
        return bool(self.dicomweb_pull_url or self.dimse_pull)

    @property
    def pushes_to_pacs(self) -> bool:
        """Reports' SRs (and rejection notes) go to a PACS, over DICOMweb or DIMSE."""
        return bool(self.dicomweb_push_url or self.dimse_push)

    @field_validator("quant", mode="before")
    @classmethod
    def _auto_quant(cls, v: Any) -> Any:
        # The CLI's `--quant auto` and an empty environment variable both mean "variant default".
        return None if v in ("auto", "") else v

    @field_validator(
        "dimse_port",
        "dimse_push",
        "dimse_pull",
        "tls_certfile",
        "tls_keyfile",
        "dimse_tls_ca",
        "image_retention_days",
        "image_retention_draft_days",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # Compose passes an unset variable on as "" (`${TINYLLAVA_MED_DIMSE_PORT:-}`).
        return None if v == "" else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, v: Path) -> Path:
        # Resolved once, so a later chdir cannot move the database or the images.
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.allow_remote_image_urls and not self.remote_image_hosts:
            raise ValueError(
                "allow_remote_image_urls needs remote_image_hosts: the hosts whose images the "
                "server may fetch (a URL naming any other address of the network is refused)"
            )
        if self.auth_disabled and self.host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"auth_disabled makes every caller an admin; it is refused with host {self.host} "
                "(only 127.0.0.1, ::1 or localhost): create keys instead (`tinyllava-med apikey "
                "create`)"
            )
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tinyllava_med.db'}"
        scheme = self.database_url.split(":", 1)[0].split("+", 1)[0]
        if scheme == "postgres":
            scheme = "postgresql"
        if scheme not in SUPPORTED_DATABASES:
            raise ValueError(
                f"database_url: expected a sqlite:// or postgresql:// URL, got scheme {scheme!r}"
            )
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: set both or neither")
        if self.dimse_tls and self.tls_certfile is None:
            raise ValueError("dimse_tls needs tls_certfile and tls_keyfile (the certificate shown)")
        for tls_file in (self.tls_certfile, self.tls_keyfile, self.dimse_tls_ca):
            if tls_file is not None and not tls_file.is_file():
                raise ValueError(f"TLS file not found: {tls_file}")
        bad_peers = [
            p for p in self.dimse_peers if not _PEER.match(p) or not p.split("@")[0].strip()
        ]
        if bad_peers:
            raise ValueError(f'dimse_peers: expected "AET", "AET@host" or "*", got {bad_peers}')
        if self.dimse_pull and self.dimse_port is None:
            raise ValueError(
                "dimse_pull needs dimse_port: the PACS moves the study to this server's "
                "Storage SCP (and must know it as a DICOM modality, and be in dimse_peers)"
            )
        if self.dimse_port is not None and not self.dimse_peers:
            raise ValueError(
                'dimse_port needs dimse_peers: the AE titles that may send (e.g. ["PACS"] or '
                '["PACS@10.0.0.5"]; "*" for anyone who reaches the port)'
            )
        if self.image_retention_draft_days is not None and self.image_retention_days is None:
            raise ValueError(
                "image_retention_draft_days needs image_retention_days (how old a study must be "
                "before its pixel data is released at all)"
            )
        if self.engine == "remote" and not self.remote_url:
            raise ValueError("engine 'remote' needs remote_url (the remote's /v1 base URL)")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @property
    def drain_s(self) -> float:
        """How long a stopping server waits for the requests in flight (`shutdown_grace_s`)."""
        if self.shutdown_grace_s is not None:
            return self.shutdown_grace_s
        return self.request_timeout_s + 10.0

    @property
    def images_dir(self) -> Path:
        """Where uploaded image files live, content-addressed by sha256."""
        return self.data_dir / "images"


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# the project's variables of this prefix that are no server settings: docker/.env's for compose
# (every line of it reaches the container), the dataset download's, the tests'
OTHER_VARIABLES = frozenset(
    PREFIX + name
    for name in (
        "CERTS_DIR",
        "CPUS",
        "DIMSE_HOST_PORT",
        "HTTP_PORT",
        "IMAGE",
        "MODELS_DIR",
        "REPLICAS",
        "DATA_BASE_URL",
        "DOCS_SCREENSHOTS",
        "TEST_POSTGRES_URL",
    )
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each `TINYLLAVA_MED_*` variable in `environ` that is no setting, naming the
    closest one: pydantic-settings ignores it, so a misspelt retention or timeout would
    otherwise leave its default in force without a word. Names only, never values."""
    import difflib

    settings = [PREFIX + name.upper() for name in Settings.model_fields]
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in settings or upper in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, settings, n=1, cutoff=0.6)
        out.append(
            f"{name} is not a setting and is ignored"
            + (f" (did you mean {close[0]}?)" if close else "")
            + "; `tinyllava-med settings` lists them"
        )
    return out


# the password of a URL's user info (`postgresql://user:password@host/db`), up to its `@`
# before any space: a password from `openssl rand -base64` may hold `/`, which SQLAlchemy takes
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^@\s]*@")
HIDDEN = "***"


def without_password(text: str) -> str:
    """`text` with any URL's password (`scheme://user:password@host`) hidden."""
    return _URL_PASSWORD.sub(rf"\1{HIDDEN}@", text)


def shown(settings: Settings) -> dict[str, str]:
    """Each setting as its environment variable with the value in effect, as the variable
    would give it, secrets hidden: keys, the values of request headers (credentials), and a
    URL's password (the database's, a PACS's). An unset setting whose default follows from
    others shows that value (`shutdown_grace_s`); one that follows from the hardware the model
    is loaded on (`prefix_cache_mb`) stays empty."""
    out: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name == "shutdown_grace_s":
            value = settings.drain_s
        if isinstance(value, SecretStr):
            text = HIDDEN
        elif name.endswith("_headers"):
            text = json.dumps(dict.fromkeys(value, HIDDEN))
        elif value is None:
            text = ""
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict | list):
            text = json.dumps(value, ensure_ascii=False)
        else:
            text = without_password(str(value))
        out[f"TINYLLAVA_MED_{name.upper()}"] = text
    return out
