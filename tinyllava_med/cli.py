"""`tinyllava-med`: one verb per job, each a thin call into a subpackage.

tinyllava-med serve                                   # demo model, SQLite under ./data, :8000
tinyllava-med ask CT_small.dcm "Which organ is shown?" --json
tinyllava-med convert ./llava-med-v1.5-mistral-7b ./data/models/llava-med
tinyllava-med demo-model                              # train the bundled demo (~4 min, CPU)
tinyllava-med db backup /mnt/backup                   # database + image files, while serving
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyllava_med import __version__
from tinyllava_med.model.prompts import TEMPLATES

QUANT_CHOICES = ["none", "8bit", "4bit", "cpu-int8"]


# --- verbs -------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    from tinyllava_med.imaging import ImagingError, load_study_file
    from tinyllava_med.model.generate import SamplingParams, generate

    path = Path(args.file)
    if not path.is_file():
        what = (
            "a folder, not a file (ask about one image file)" if path.is_dir() else "no such file"
        )
        print(f"error: {path}: {what}", file=sys.stderr)
        return 2
    try:
        study = load_study_file(path.read_bytes(), frame=args.frame)
    except ImagingError as e:
        print(f"error: {path.name}: {e.message}", file=sys.stderr)
        return 2
    lm = _load_model_for_cli(args)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
    )
    ans = generate(lm, [study.image], [args.question], params)[0]
    if args.json:
        out = {
            "answer": ans.text,
            **lm.info,
            "latency_ms": round(ans.latency_ms, 2),
            "tokens": {"prompt": ans.prompt_tokens, "completion": ans.new_tokens},
            "finish_reason": ans.finish_reason,
            "image": {"kind": study.kind, "frame": study.frame, "n_frames": study.n_frames},
        }
        print(json.dumps(out))
    else:
        print(ans.text)
    return 0


def _load_model_for_cli(args: argparse.Namespace) -> Any:
    from tinyllava_med.model.load import load_model

    quant = None if args.quant in (None, "auto") else args.quant
    if args.model == "demo":
        from tinyllava_med.training.demo import ensure_demo_model

        ensure_demo_model()
    return load_model(args.model, quant=quant, device=args.device, dtype=args.dtype)


def cmd_convert(args: argparse.Namespace) -> int:
    from tinyllava_med.model.convert import convert_checkpoint

    out = convert_checkpoint(
        args.src,
        args.dst,
        source_format=args.source_format,
        vision_tower_path=args.vision_tower,
        vision_weights=args.vision_weights,
    )
    print(f"converted {args.src} -> {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tinyllava_med.quantize.commands import quantize_command

    return quantize_command(
        args.src,
        args.dst,
        method=args.method,
        skip_modules=args.skip,
        check_questions=args.check_questions,
        check_images=args.check_images,
        check_prompts=args.check_prompts,
        int8_modules=args.int8,
    )


def cmd_memory(args: argparse.Namespace) -> int:
    from tinyllava_med.quantize.commands import memory_command

    return memory_command(
        model=None if args.paper_table else args.model,
        quant=None if args.quant in (None, "auto") else args.quant,
        device=args.device,
        batch=args.batch,
        new_tokens=args.new_tokens,
        paper_table=args.paper_table,
        measure=not args.computed_only,
        json_path=args.json,
        md_path=args.markdown,
        png_path=args.png,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from tinyllava_med.training.config import TrainConfig, parse_overrides
    from tinyllava_med.training.trainer import run_stage

    overrides = parse_overrides(args.set or [])
    for flag in (
        "model",
        "data_path",
        "image_folder",
        "output_dir",
        "max_steps",
        "resume_from_checkpoint",
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[flag] = {"true": True, "false": False}.get(str(value).lower(), value)
    cfg = TrainConfig.from_yaml(args.config, stage=args.stage, **overrides)
    out = run_stage(cfg)
    print(f"stage {cfg.stage} done: served checkpoint at {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_cmd == "generate":
        from tinyllava_med.eval.generate import generate_answers, read_questions
        from tinyllava_med.model.generate import SamplingParams

        read_questions(args.questions)  # a wrong path is said before the model loads
        if not Path(args.images).is_dir():
            raise NotADirectoryError(20, "Not a directory", args.images)
        lm = _load_model_for_cli(args)
        lm.template = args.template or lm.template
        counts = generate_answers(
            lm,
            args.questions,
            args.images,
            args.out,
            params=SamplingParams(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p
            ),
            batch_size=args.batch_size,
            limit=args.limit,
            grayscale_pad=args.grayscale_pad,
        )
        print(json.dumps(counts))
        return 1 if counts["failed"] else 0
    if args.eval_cmd == "score":
        from tinyllava_med.eval.metrics import score_files
        from tinyllava_med.eval.report import write_report

        report = score_files(args.gt, args.pred, args.candidates)
        write_report(report, args.json, args.markdown)
        print(report.to_markdown())
        # LLaVA-Med's run_eval.py asserts that every question has its answer
        problems = [
            *([f"{len(report.missing)} questions have no answer"] if report.missing else []),
            *(
                [f"the answers are of {len(report.answered_by)} models"]
                if len(report.answered_by) > 1
                else []
            ),
        ]
        if problems and not args.allow_partial:
            print(
                f"tinyllava-med eval score: {'; '.join(problems)}: the scores do not stand for "
                "one model on the whole set (--allow-partial to accept them)",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.eval_cmd == "judge":
        from tinyllava_med.eval.judge import judge_markdown, run_judge

        summary = run_judge(
            args.questions,
            args.answers,
            args.reference,
            endpoint=args.endpoint,
            model=args.judge_model,
            out_path=args.out,
            cache_dir=args.cache_dir,
            api_key_env=args.api_key_env,
            max_rps=args.max_rps,
        )
        print(judge_markdown(summary))
        return 0
    from tinyllava_med.eval.compare import compare_variants

    out = compare_variants(
        args.variants,
        questions=args.questions,
        images=args.images,
        out_dir=Path(args.out_dir),
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    print(out.read_text())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_cmd == "phantom":
        from tinyllava_med.training.phantom import generate_phantom

        summary = generate_phantom(Path(args.out), n=args.n, seed=args.seed)
        print(json.dumps(summary.to_dict()))
        return 0
    from tinyllava_med.training.datasets import (
        DatasetLayoutError,
        DownloadError,
        convert_dataset,
        download_llava_med,
    )

    if args.data_cmd == "merge":
        from tinyllava_med.training.datasets.merge import merge_datasets

        try:
            print(json.dumps(merge_datasets(args.dst, args.sources)))
        except DatasetLayoutError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    if args.data_cmd == "download":
        try:
            report = download_llava_med(
                args.what,
                args.out,
                base_url=args.base_url,
                images=args.images,
                verify=not args.no_verify,
            )
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(report.to_dict()))
        return 0
    try:
        converted = convert_dataset(
            args.dataset,
            args.src,
            args.dst,
            link=args.link,
            lang=None if args.lang == "all" else args.lang,
        )
    except (DatasetLayoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(converted.to_dict()))
    return 0


def _server_settings(args: argparse.Namespace) -> Any:
    from tinyllava_med.server.settings import Settings, unknown_variables

    for warning in unknown_variables(os.environ):
        print(f"tinyllava-med: warning: {warning}", file=sys.stderr)

    overrides: dict[str, Any] = {}
    for flag, field in [
        ("model", "model"),
        ("database_url", "database_url"),
        ("host", "host"),
        ("port", "port"),
        ("device", "device"),
        ("dtype", "dtype"),
        ("gradio", "gradio"),
        ("dimse_port", "dimse_port"),
        ("tls_certfile", "tls_certfile"),
        ("tls_keyfile", "tls_keyfile"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "quant", None) not in (None, "auto"):
        overrides["quant"] = args.quant
    return Settings(**overrides)


def _listen_socket(
    host: str, port: int, flag: str = "--port, TINYLLAVA_MED_PORT"
) -> socket.socket | None:
    """A socket bound to the port, before the model loads: a port in use (another server, a
    second `serve`) is said at once, not after a minute of loading. None with the reason
    printed when it cannot be bound."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = (
            "is in use (another server, or a second serve?)"
            if e.errno == errno.EADDRINUSE
            else str(e)
        )
        print(
            f"tinyllava-med serve: cannot listen on {host} port {port}: {why}; stop the other "
            f"server or choose another port ({flag})",
            file=sys.stderr,
        )
        return None
    sock.set_inheritable(True)
    return sock


def _start_problem(settings: Any) -> str | None:
    """Why `serve` cannot start, in one line, or None: a data directory it cannot write or
    whose disk is full, a database it cannot reach or at another schema (PostgreSQL: `db
    upgrade` first; SQLite, which `serve` migrates itself: not while another server uses it,
    which would go on writing by the older version's rules, nor while another program holds
    its write lock)."""
    from sqlalchemy.exc import OperationalError

    from tinyllava_med.server.db.migrate import (
        MigrationError,
        current_revision,
        head_revision,
        refuse_unknown,
        require_head,
    )
    from tinyllava_med.server.db.session import sqlite_write_held
    from tinyllava_med.server.storage import MIN_FREE_BYTES, alone_on, storage_free

    data_dir = settings.data_dir
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot make the data directory {data_dir}: {e.strerror}"
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return f"cannot write the data directory {data_dir} (read-only, or another owner's)"
    free = storage_free(data_dir)
    if free < MIN_FREE_BYTES:
        return f"the disk of {data_dir} is full ({free // 1024} KiB free): free some space first"
    try:
        if not settings.database_url.startswith("sqlite"):
            require_head(settings.database_url)
            return None
        refuse_unknown(settings.database_url)  # a newer version's schema: said as such
        revision, head = current_revision(settings.database_url), head_revision()
    except MigrationError as e:
        return str(e)
    except OperationalError as e:  # the message names host and port, never the password
        return f"cannot reach the database: {e.orig}"
    if revision not in (None, head) and not alone_on(data_dir):
        return (
            f"the database is at revision {revision} and this version migrates it to "
            f"{head}, but another server or command uses {data_dir}: stop it first (an "
            "older server would go on writing by its own rules)"
        )
    if sqlite_write_held(settings.database_url):
        return (
            "another program held the SQLite database's write lock for 6 s (a sqlite3 shell or "
            "a tool with a transaction left open, or one writing without a pause): every write "
            "would fail; end its transaction first"
        )
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from tinyllava_med.server.app import create_app, http_server

    settings = _server_settings(args)
    sock = _listen_socket(settings.host, settings.port)
    if sock is None:
        return 1
    if settings.dimse_port is not None:  # the Storage SCP binds it as the app starts
        dimse = _listen_socket(settings.host, settings.dimse_port, "--dimse-port")
        if dimse is None:
            sock.close()
            return 1
        dimse.close()
    problem = _start_problem(settings)
    if problem is not None:  # said here in one line, before "serving on": the app's start
        # would fail with a traceback
        print(f"tinyllava-med serve: {problem}", file=sys.stderr)
        sock.close()
        return 1
    from tinyllava_med.server.logs import say

    app = create_app(settings, own_process=True)
    base = settings.base_url
    say(
        f"serving on {base} (model: {settings.model}, "
        f"database: {settings.database_url.split('://', 1)[0]})"
        + (f"; Gradio demo at {base}/demo" if settings.gradio else ""),
        settings.log_format,
    )
    logging.getLogger().setLevel(settings.log_level)  # TINYLLAVA_MED_LOG_LEVEL
    from tinyllava_med.server.logs import json_log_config, name_routes_of, text_log_config

    name_routes_of(app)

    # uvicorn applies it as it starts, before the model loads
    log_config = text_log_config()
    if settings.log_format == "json" or not sys.stderr.isatty():
        # tqdm bars ("Loading weights") are not log records: a service's or container's log
        # would keep each redraw
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if settings.log_format == "json":
        log_config = json_log_config(settings.log_level)
    server = http_server(
        app,
        settings,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        log_config=log_config,
    )
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's exit status when it could not start


def cmd_db(args: argparse.Namespace) -> int:
    from tinyllava_med.server.db.migrate import MigrationError, current_revision, downgrade, upgrade

    settings = _server_settings(args)
    if args.db_cmd in ("backup", "restore", "release-images"):
        from tinyllava_med.server import console

        if args.db_cmd == "backup":
            return console.make_backup(settings, args.dest, args.verify, args.keep)
        if args.db_cmd == "restore":
            return console.restore_backup(settings, args.source, args.images_only)
        return console.release_images(settings, args.days, args.draft_days)
    from tinyllava_med.server.storage import DataDirInUse, sole_user

    try:
        if args.db_cmd == "downgrade":
            # a server on the newer schema would fail request by request (missing columns)
            with sole_user(settings.data_dir):
                downgrade(
                    settings.database_url,
                    args.revision,
                    clear_long_accession_numbers=args.clear_long_accession_numbers,
                    accept_data_loss=args.accept_data_loss,
                )
            print(f"database is at revision {current_revision(settings.database_url)}")
            return 0
        before = current_revision(settings.database_url)
        upgrade(settings.database_url)
        after = current_revision(settings.database_url)
    except (MigrationError, DataDirInUse) as e:
        print(f"tinyllava-med db {args.db_cmd}: {e}", file=sys.stderr)
        return 1
    if before == after:
        print(f"database is at the latest revision ({after}) already")
    else:  # what an operator checks before and after an update
        print(f"database upgraded from revision {before or 'none (empty)'} to {after}, the latest")
    return 0


def _whole_days(value: str) -> int:
    """A key's lifetime: 1 day or more (0 was taken as "not given": a key that never expired)."""
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {value!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, got {value}")
    return days


def _days(value: str) -> float:
    """A positive number of days: `--days -1` would release what arrived a moment ago."""
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if not days > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be more than 0 days, got {value}")
    return days


def cmd_pacs(args: argparse.Namespace) -> int:
    from tinyllava_med.server.console import pacs_check

    return pacs_check(_server_settings(args))


def cmd_settings(args: argparse.Namespace) -> int:
    """The settings `serve` would run with here (environment and defaults), one
    `TINYLLAVA_MED_*=value` line each, secrets hidden: what reached the server's container."""
    from tinyllava_med.server.settings import shown

    values = shown(_server_settings(args))
    if args.json:
        print(json.dumps(values, indent=2, ensure_ascii=False))
    else:
        for name, value in values.items():
            print(f"{name}={value}")
    return 0


def cmd_apikey(args: argparse.Namespace) -> int:
    """create (the key is printed once), list (never the keys), revoke KEY_ID."""
    from tinyllava_med.server.console import apikey

    return apikey(_server_settings(args), args)


def cmd_import(args: argparse.Namespace) -> int:
    """File a CD, USB stick, folder or ZIP on this machine as the server's import does."""
    from tinyllava_med.server.console import import_paths

    return import_paths(_server_settings(args), args.paths)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from tinyllava_med.training.demo import build_demo_model

    overrides = {"max_time_s": None} if args.no_time_limit else None
    out = build_demo_model(
        Path(args.out) if args.out else None, force=True, train_overrides=overrides
    )
    from tinyllava_med.model.meta import ServedMeta

    meta = ServedMeta.load(out)
    run = ((meta.training if meta else None) or {}).get("run") or {}
    scores = json.loads((out / "demo_eval.json").read_text())["summary"]
    print(
        f"demo model written to {out}: {run.get('steps', '?')} of {run.get('max_steps', '?')} "
        f"training steps; PhantomVQA test split: closed accuracy "
        f"{scores['closed_accuracy']:.1%}, open recall {scores['open_recall']:.1%}"
    )
    return 0  # a build the time budget cut short was logged as a warning (`build_demo_model`)


# --- parser ------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{value}: must be 0 (greedy) or more")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: must be above 0 and at most 1")
    return value


def _model_args(p: argparse.ArgumentParser, default_model: str | None = "demo") -> None:
    p.add_argument("--model", default=default_model, help="variant name, folder or hub id")
    p.add_argument(
        "--quant",
        choices=[*QUANT_CHOICES, "auto"],
        default="auto",
        help="quantization at load time (default: the variant's own)",
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyllava-med",
        description="Serve, convert, train, quantize and evaluate small medical LLaVA models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(
        name: str, help: str, fn: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        return p

    p = verb("serve", "run the REST server and web client (default: demo model, SQLite)", cmd_serve)
    _model_args(p, default_model=None)
    p.add_argument("--database-url", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument(
        "--gradio",
        action="store_true",
        default=None,  # None: TINYLLAVA_MED_GRADIO decides
        help="also serve the Gradio demo at /demo (each question needs an API key)",
    )
    p.add_argument("--tls-certfile", default=None, help="serve HTTPS: PEM certificate")
    p.add_argument("--tls-keyfile", default=None, help="serve HTTPS: PEM private key")
    p.add_argument(
        "--dimse-port",
        type=int,
        default=None,
        help="also receive studies by DICOM C-STORE on this port (needs TINYLLAVA_MED_DIMSE_PEERS)",
    )

    p = verb("ask", "answer one question about one DICOM/PNG/JPEG file", cmd_ask)
    p.add_argument("file")
    p.add_argument("question")
    _model_args(p)
    p.add_argument("--frame", type=int, default=None, help="frame of a multi-frame DICOM")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=_temperature, default=0.0)
    p.add_argument("--top-p", type=_top_p, default=1.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = verb(
        "convert",
        "convert an original LLaVA-Med / TinyLLaVA checkpoint to the served format",
        cmd_convert,
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--from",
        dest="source_format",
        default=None,
        choices=["llava_mistral", "llava", "tiny_llava", "tinyllava"],
    )
    p.add_argument("--vision-tower", default=None, help="folder of the original vision tower")
    p.add_argument("--vision-weights", default="checkpoint", choices=["checkpoint", "tower"])

    p = verb(
        "quantize",
        "write a quantized checkpoint (nf4, int8, cpu-int8)",
        cmd_quantize,
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--method", choices=["nf4", "int8", "cpu-int8"], required=True)
    p.add_argument(
        "--skip",
        nargs="*",
        default=None,
        metavar="MODULE",
        help="module paths kept in higher precision (default: vision tower, projector, lm_head; "
        "cpu-int8 then also quantizes the tower and lm_head where the output check passes)",
    )
    p.add_argument(
        "--int8",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="with --method nf4: module paths given LLM.int8 instead of nf4, e.g. "
        "model.vision_tower (-92%% static memory against LLaVA-Med fp16 at the real shapes, "
        "where all-nf4 costs answers); they win over the default --skip list, and may not "
        "overlap a --skip given",
    )
    p.add_argument(
        "--check-questions",
        default=None,
        metavar="FILE",
        help="cpu-int8 output check: a VQA question file (eval's formats) of your own images "
        "(default: PhantomVQA phantoms)",
    )
    p.add_argument("--check-images", default=None, metavar="DIR", help="its images")
    p.add_argument(
        "--check-prompts", type=int, default=8, metavar="N", help="prompts the check runs (8)"
    )

    p = verb(
        "train",
        "run one training stage (HF Trainer; wrap in `accelerate launch` for GPUs)",
        cmd_train,
    )
    p.add_argument("--stage", choices=["alignment", "instruct", "downstream"], required=True)
    p.add_argument("--config", required=True, help="YAML file, or a shipped config name")
    p.add_argument("--model", default=None)
    p.add_argument("--data-path", default=None)
    p.add_argument("--image-folder", default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument(
        "--resume",
        dest="resume_from_checkpoint",
        default=None,
        help="checkpoint folder, or 'true' for the latest in output_dir",
    )
    p.add_argument(
        "--set",
        nargs="*",
        metavar="KEY=VALUE",
        help="override any config field, e.g. language_model.mode=lora lora.r=16",
    )

    p = verb("memory", "measure static and dynamic memory", cmd_memory)
    _model_args(p)
    p.add_argument("--paper-table", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--markdown", default=None)
    p.add_argument("--png", default=None, help="paper table: bar chart")
    p.add_argument(
        "--computed-only",
        action="store_true",
        help="paper table: compute every row from shapes, measure nothing",
    )

    p = verb("eval", "VQA evaluation: generate answers, score, judge, compare variants", cmd_eval)
    ev = p.add_subparsers(dest="eval_cmd", required=True, metavar="STEP")
    g = ev.add_parser("generate", help="answer a question file (LLaVA-Med answers jsonl)")
    _model_args(g)
    g.add_argument("--questions", required=True, help="conversation json or qa50 jsonl")
    g.add_argument("--images", required=True, help="image folder")
    g.add_argument("--out", required=True, help="answers jsonl (resumed if it exists)")
    g.add_argument("--batch-size", type=_positive, default=16)
    g.add_argument("--limit", type=_positive, default=None)
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=1024,
        help="as LLaVA-Med's model_vqa.py (1024); `eval score` lists the answers it cut",
    )
    g.add_argument("--temperature", type=_temperature, default=0.0)
    g.add_argument("--top-p", type=_top_p, default=1.0)
    g.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="prompt template instead of the model's own: TinyLLaVA-Med-F's paper asked with "
        "llava_v1 at --temperature 0.2 (its model_vqa_science.py defaults)",
    )
    g.add_argument(
        "--grayscale-pad",
        choices=("mean", "llava-med"),
        default="mean",
        help="the square a non-square grayscale image is padded to: the model's mean colour, "
        "as trained and served (default), or llava-med: one gray, 114 for CLIP, as LLaVA-Med's "
        "model_vqa.py padded when its published scores were made",
    )
    sc = ev.add_parser("score", help="LLaVA-Med metrics (+ strict variants), paired by id")
    sc.add_argument("--gt", required=True)
    sc.add_argument("--pred", required=True)
    sc.add_argument("--candidates", default=None)
    sc.add_argument("--json", default=None)
    sc.add_argument("--markdown", default=None)
    sc.add_argument(
        "--allow-partial",
        action="store_true",
        help="exit 0 when questions have no answer or answers of several models are mixed",
    )
    j = ev.add_parser("judge", help="LLaVA-Med GPT-4 protocol on an OpenAI-compatible endpoint")
    j.add_argument("--questions", required=True)
    j.add_argument("--answers", required=True)
    j.add_argument("--reference", default=None)
    j.add_argument("--endpoint", required=True)
    j.add_argument("--model", dest="judge_model", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--cache-dir", default="./data/judge-cache")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY")
    j.add_argument("--max-rps", type=float, default=1.0)
    c = ev.add_parser("compare", help="generate + score several variants, one table")
    c.add_argument(
        "--variants",
        nargs="+",
        required=True,
        help="NAME_OR_PATH[:QUANT] ..., e.g. demo demo:4bit demo:cpu-int8",
    )
    c.add_argument("--questions", required=True)
    c.add_argument("--images", required=True)
    c.add_argument("--out-dir", required=True)
    c.add_argument("--limit", type=_positive, default=None)
    c.add_argument("--batch-size", type=_positive, default=32)
    c.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="short answers, to compare variants with each other; each table row says how "
        "many answers the limit cut",
    )
    c.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")

    p = verb("data", "download, convert or synthesise datasets", cmd_data)
    steps = p.add_subparsers(dest="data_cmd", required=True, metavar="STEP")
    d = steps.add_parser("download", help="LLaVA-Med's data files (and, with --images, figures)")
    d.add_argument("--out", default="./data/llava_med", help="folder (default: %(default)s)")
    d.add_argument(
        "--what",
        nargs="+",
        default=["eval"],
        choices=[
            "alignment",
            "instruct-60k",
            "instruct-60k-inline",
            "instruct-10k",
            "fig-captions",
            "eval",
            "image-urls",
        ],
    )
    d.add_argument("--images", action="store_true", help="also fetch PMC figures")
    d.add_argument("--base-url", default=None)
    d.add_argument("--no-verify", action="store_true", help="skip sha256")
    c = steps.add_parser("convert", help="VQA-RAD, SLAKE or PathVQA into LLaVA-Med's format")
    c.add_argument("src", help="the dataset as released")
    c.add_argument("dst", help="the converted dataset's folder")
    c.add_argument("--dataset", choices=["vqa-rad", "slake", "pathvqa"], required=True)
    c.add_argument("--link", action="store_true", help="hard-link images")
    c.add_argument(
        "--lang", default="en", choices=["en", "zh", "all"], help="SLAKE: one language, or all"
    )
    m = steps.add_parser(
        "merge", help="converted VQA sets as one training set (TinyLLaVA-Med-F's downstream data)"
    )
    m.add_argument("dst", help="the merged set's folder (train.json, images/)")
    m.add_argument("sources", nargs="+", help="folders `data convert` wrote")
    ph = steps.add_parser("phantom", help="synthesise PhantomVQA")
    ph.add_argument("--out", default="./data/phantom", help="folder (default: %(default)s)")
    ph.add_argument("--n", type=int, default=6000, help="number of images")
    ph.add_argument("--seed", type=int, default=0)

    p = verb("demo-model", "train the bundled demo model on PhantomVQA", cmd_demo_model)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--no-time-limit",
        action="store_true",
        help="train all steps however long they take (no 300 s budget): the same weights on "
        "every machine of the same CPU type and thread count",
    )

    p = verb(
        "db", "database migrations, backups and restores, and releasing old images now", cmd_db
    )
    steps = p.add_subparsers(dest="db_cmd", required=True, metavar="STEP")
    steps.add_parser("upgrade", help="run the migrations")
    d = steps.add_parser("downgrade", help="go back to an older version's revision")
    d.add_argument(
        "revision",
        help="that of the version rolled back to, e.g. 0010 (back the database up first)",
    )
    d.add_argument(
        "--clear-long-accession-numbers",
        action="store_true",
        help="below 0008: empty accession numbers longer than 16 characters (else refused: "
        "cut short, one could be another order's)",
    )
    d.add_argument(
        "--accept-data-loss",
        action="store_true",
        help="drop what the older revision cannot hold (refused otherwise, naming it: "
        "amendments, key expiry, released images' state, weights digests, ...)",
    )
    d = steps.add_parser("backup", help="copy the database and images (safe while serving)")
    d.add_argument("dest", help="the folder to back up into")
    d.add_argument(
        "--verify",
        action="store_true",
        help="read every file an earlier run copied and replace a damaged one (a copy of the "
        "right size is otherwise kept as it is)",
    )
    d.add_argument(
        "--keep",
        type=_positive,
        default=None,
        metavar="N",
        help="SQLite: after a complete backup, remove all but the N newest in DEST, and the "
        "image files none of those refers to (default: remove nothing)",
    )
    d = steps.add_parser("restore", help="restore a backup, with the server stopped")
    d.add_argument("source", help="the backup's .db file (with --images-only: the backup's folder)")
    d.add_argument(
        "--images-only",
        action="store_true",
        help="only the image files the database refers to (PostgreSQL, after pg_restore)",
    )
    d = steps.add_parser("release-images", help="release now what the hourly job would")
    d.add_argument(
        "--days",
        type=_days,
        default=None,
        help="studies that received no image for this long (default IMAGE_RETENTION_DAYS)",
    )
    d.add_argument(
        "--draft-days",
        type=_days,
        default=None,
        help="also studies whose drafts nobody changed for this long "
        "(default IMAGE_RETENTION_DRAFT_DAYS; unset: a draft keeps its study)",
    )
    for d in steps.choices.values():
        d.add_argument("--database-url", default=None)

    p = verb(
        "import",
        "file the DICOM images of a CD, USB stick, folder or ZIP into the server's database "
        "(one import may bring several studies; what is not an image is skipped)",
        cmd_import,
    )
    p.add_argument("paths", nargs="+", help="a CD's mount point, a folder, a ZIP or files")
    p.add_argument("--database-url", default=None)

    p = verb("pacs", "check the PACS connections this server is configured for", cmd_pacs)
    p.add_argument("pacs_cmd", choices=["check"])

    p = verb(
        "settings",
        "print the settings `serve` would use here (from the environment and defaults; "
        "keys, header values and URL passwords hidden)",
        cmd_settings,
    )
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = verb("apikey", "manage API keys", cmd_apikey)
    steps = p.add_subparsers(dest="apikey_cmd", required=True, metavar="STEP")
    d = steps.add_parser("create", help="a new key, printed once")
    d.add_argument("--role", choices=["pacs", "radiologist", "admin"], required=True)
    d.add_argument("--name", default=None, help="a label for the key (default: the role)")
    d.add_argument(
        "--expires-in-days",
        type=_whole_days,
        default=None,
        help="the key is refused after this many days (default: API_KEY_DAYS, or never)",
    )
    steps.add_parser("list", help="every key (never the keys themselves)")
    d = steps.add_parser("revoke", help="refuse a key from now on")
    d.add_argument("key_id", help="the key's id (from `apikey list`)")
    d.add_argument(
        "--force",
        action="store_true",
        help="revoke even the last active admin key (the API then has no admin until one is "
        "created here)",
    )
    for d in steps.choices.values():
        d.add_argument("--database-url", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its messages may quote PHI values
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernels_notice)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        # a bad setting or argument, a path that is not there: what is wrong, not a traceback
        if args.verbose:
            raise
        print(_user_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written is whole (every command writes
        # files by replacing them, and answers files line by line)
        print("tinyllava-med: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        said = _operational_error(e)
        if said is None or args.verbose:
            raise
        print(said, file=sys.stderr)
        return 1


def _operational_error(e: Exception) -> str | None:
    """A database or data volume that refuses (a schema this version does not know, a locked or
    read-only database, a volume refusing writes), in one line: the operator's to fix, not a
    bug's traceback. None for anything else."""
    import errno
    import sqlite3

    database_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    try:  # the server extra: a command without it has no database to refuse
        from sqlalchemy.exc import OperationalError

        from tinyllava_med.server.db.migrate import MigrationError
    except ImportError:
        pass
    else:
        if isinstance(e, MigrationError):
            return f"tinyllava-med: {e}"
        database_errors += (OperationalError,)
    if isinstance(e, database_errors):
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        return f"tinyllava-med: the database refused: {reason}"
    if isinstance(e, OSError) and e.errno in (
        errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EIO
    ):  # fmt: skip
        return f"tinyllava-med: {e.strerror}: {e.filename or 'the data directory'}"
    return None


def _no_kernels_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes on a CPU asks to `pip install kernels`, a package that fetches kernels from
    the Hugging Face Hub at run time, and falls back to its own code, which is what this project
    measures and tests: on a clinic's offline machine the notice only misleads."""
    return "kernels-community" not in record.getMessage()


def _user_error(e: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(e, ValidationError) and e.title == "Settings":  # the environment or flags
        return "\n".join(
            f"tinyllava-med: setting {name} (TINYLLAVA_MED_{name.upper()}, or its flag): "
            f"{err['msg']}"
            if name
            else f"tinyllava-med: settings: {err['msg']}"  # a check of several together
            for err in e.errors()
            for name in [".".join(str(part) for part in err["loc"])]
        )
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # open("nope.json")
        return f"tinyllava-med: error: {e.strerror}: {e.filename}"
    return f"tinyllava-med: error: {e} (-v shows where)"


if __name__ == "__main__":
    sys.exit(main())
