"""The `tinyllava-med` command as a user runs it (subprocesses, real files, tiny model)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
VERBS = [
    "serve",
    "ask",
    "convert",
    "quantize",
    "train",
    "memory",
    "eval",
    "data",
    "demo-model",
    "db",
    "apikey",
    "settings",
]


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "tinyllava_med.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_help_lists_every_verb():
    out = cli("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout, verb


def readme_commands() -> list[str]:
    """Every `tinyllava-med ...` command the README shows: code-block lines (joined across
    trailing backslashes) and inline code spans."""
    text = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    spans = re.findall(r"`([^`\n]*tinyllava-med [^`\n]*)`", text)
    lines = [ln for ln in text.splitlines() if ln.startswith("    ") and "tinyllava-med " in ln]
    return [c for c in spans + lines if not c.lstrip().startswith("#")]


def test_every_readme_command_parses():
    """A newcomer copies the README's commands as written: each must be one the parser
    accepts (it once rejected `data convert --dataset D SRC DST` and `db restore
    --images-only DIR`: options before a positional that had a default)."""
    from tinyllava_med.cli import build_parser

    commands = readme_commands()
    assert len(commands) > 25
    parser = build_parser()
    refused = []
    for command in commands:
        words = shlex.split(command, comments=True)
        at = next(i for i, w in enumerate(words) if w.endswith("tinyllava-med"))
        try:
            parser.parse_args(words[at + 1 :])
        except SystemExit:
            refused.append(command)
    assert not refused


def test_options_and_positionals_in_any_order():
    """Options may come before or after a step's positional arguments."""
    from tinyllava_med.cli import build_parser

    parse = build_parser().parse_args
    for words in (
        ["data", "convert", "--dataset", "slake", "in", "out", "--link"],
        ["data", "convert", "in", "out", "--dataset", "slake", "--link"],
    ):
        args = parse(words)
        assert (args.src, args.dst, args.dataset, args.link) == ("in", "out", "slake", True)
    for words in (
        ["db", "restore", "--images-only", "/b"],
        ["db", "restore", "/b", "--images-only"],
    ):
        args = parse([*words, "--database-url", "sqlite:///x.db"])
        assert (args.source, args.images_only, args.database_url) == ("/b", True, "sqlite:///x.db")
    assert parse(["apikey", "revoke", "--database-url", "u", "k1"]).key_id == "k1"
    assert parse(["db", "downgrade", "0010"]).revision == "0010"
    for words in (
        ["db", "restore"],
        ["db", "downgrade"],
        ["apikey", "create"],
        ["data", "convert", "a"],
    ):
        with pytest.raises(SystemExit):
            parse(words)


def test_a_bad_setting_or_argument_says_what_is_wrong_without_a_traceback(tmp_path):
    """An ops engineer's typo in an environment variable or a flag: one line naming the setting
    and its variable, exit 2, and no value echoed (a DATABASE_URL holds a password); `-v`
    keeps the traceback."""
    env = {"TINYLLAVA_MED_DATA_DIR": str(tmp_path), "TINYLLAVA_MED_MAX_QUEUE": "lots"}
    out = cli("serve", "--port", "99999", env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "setting port (TINYLLAVA_MED_PORT" in out.stderr
    assert "setting max_queue (TINYLLAVA_MED_MAX_QUEUE" in out.stderr and "lots" not in out.stderr
    # a check of several settings together names no one setting: its message alone (it was
    # "setting  (TINYLLAVA_MED_, or its flag)")
    pull = {"TINYLLAVA_MED_DATA_DIR": str(tmp_path), "TINYLLAVA_MED_DIMSE_PULL": "PACS@h:104"}
    out = cli("pacs", "check", env=pull)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "tinyllava-med: settings: Value error, dimse_pull needs dimse_port" in out.stderr
    assert "TINYLLAVA_MED_," not in out.stderr
    out = cli("data", "phantom", "--out", str(tmp_path / "p"), "--n", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "n must be >= 1" in out.stderr
    out = cli("-v", "data", "phantom", "--out", str(tmp_path / "p"), "--n", "0")
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_settings_prints_what_serve_would_use_with_secrets_hidden(tmp_path):
    """`tinyllava-med settings`: each setting as its variable and the value in effect (what
    reached a container), and no credential: the database's password, a PACS's header values
    and URL password, the remote engine's key."""
    secrets = ["s3cret/db+x==", "Basic b3J0aGFuYzpwdw==", "pacs-pw", "tlm_remote_key"]
    env = {
        "TINYLLAVA_MED_DATA_DIR": str(tmp_path),
        "TINYLLAVA_MED_DATABASE_URL": f"postgresql://tlm:{secrets[0]}@db:5432/tlm",
        "TINYLLAVA_MED_DICOMWEB_PUSH_HEADERS": json.dumps({"Authorization": secrets[1]}),
        "TINYLLAVA_MED_DICOMWEB_PULL_URL": f"https://ris:{secrets[2]}@pacs/dicom-web",
        "TINYLLAVA_MED_REMOTE_API_KEY": secrets[3],
        "TINYLLAVA_MED_MAX_QUEUE": "16",
        "TINYLLAVA_MED_AUTO_REPORT_PROMPTS": json.dumps({"CT": "Décrivez."}),
        "TINYLLAVA_MED_REQUEST_TIMEOUT": "912",  # misspelt: ignored, but not in silence
        "TINYLLAVA_MED_MODELS_DIR": "/srv/models",  # compose's, from docker/.env: no warning
    }
    out = cli("settings", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "tinyllava-med: warning: TINYLLAVA_MED_REQUEST_TIMEOUT is not a setting and is ignored "
        "(did you mean TINYLLAVA_MED_REQUEST_TIMEOUT_S?); `tinyllava-med settings` lists them"
    ]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert lines["TINYLLAVA_MED_MAX_QUEUE"] == "16"
    assert lines["TINYLLAVA_MED_SHUTDOWN_GRACE_S"] == "130.0"  # request_timeout_s + 10
    assert lines["TINYLLAVA_MED_PORT"] == "8000" and lines["TINYLLAVA_MED_GRADIO"] == "false"
    assert lines["TINYLLAVA_MED_DATABASE_URL"] == "postgresql://tlm:***@db:5432/tlm"
    assert lines["TINYLLAVA_MED_DICOMWEB_PULL_URL"] == "https://ris:***@pacs/dicom-web"
    assert json.loads(lines["TINYLLAVA_MED_DICOMWEB_PUSH_HEADERS"]) == {"Authorization": "***"}
    assert lines["TINYLLAVA_MED_REMOTE_API_KEY"] == "***"
    assert json.loads(lines["TINYLLAVA_MED_AUTO_REPORT_PROMPTS"]) == {"CT": "Décrivez."}
    from tinyllava_med.server.settings import Settings

    assert len(lines) == len(Settings.model_fields)  # every setting, one line each
    as_json = json.loads(cli("settings", "--json", env=env).stdout)
    assert as_json == lines
    for secret in secrets:
        assert secret not in out.stdout + out.stderr


def test_ask_ct_small_json(tiny_model_dir, tiny_lm):
    out = cli(
        "ask",
        CT_SMALL,
        "Which organ is shown?",
        "--model",
        str(tiny_model_dir),
        "--json",
        "--max-new-tokens",
        "4",
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("answer", "model", "variant", "quantization", "latency_ms", "tokens"):
        assert key in body
    assert body["quantization"] == "none" and body["image"]["kind"] == "dicom"
    # the subprocess answers exactly what the same model answers in-process, within 4 tokens
    from pathlib import Path

    from tinyllava_med.imaging import load_study_file
    from tinyllava_med.model.generate import SamplingParams, generate

    image = load_study_file(Path(CT_SMALL).read_bytes()).image
    expected = generate(tiny_lm, [image], ["Which organ is shown?"], SamplingParams(4))[0]
    assert body["answer"] == expected.text
    assert body["tokens"] == {"prompt": expected.prompt_tokens, "completion": expected.new_tokens}
    assert body["tokens"]["completion"] <= 4


def test_ask_png_plain_and_bad_file(tiny_model_dir, tmp_path):
    from PIL import Image

    png = tmp_path / "x.png"
    Image.new("L", (50, 30), 100).save(png)
    out = cli(
        "ask",
        str(png),
        "Is there a fracture?",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "3",
    )
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM but not really" * 10)
    out = cli("ask", str(bad), "q", "--model", str(tiny_model_dir))
    assert out.returncode == 2 and "error: bad.dcm" in out.stderr
    out = cli("ask", CT_SMALL, "q", "--model", "no-such-variant")
    assert out.returncode != 0 and "known variants" in out.stderr


def test_db_upgrade_and_apikey_create(tmp_path):
    env = {"TINYLLAVA_MED_DATA_DIR": str(tmp_path)}
    assert cli("db", "upgrade", env=env).returncode == 0
    out = cli("apikey", "create", "--role", "radiologist", env=env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("tlm_") and " " not in key
    assert (tmp_path / "tinyllava_med.db").is_file()
    key_id = out.stdout.split()[3]  # "created radiologist key <id> (shown once):"

    listed = cli("apikey", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "active" in listed.stdout
    assert listed.stdout.splitlines()[0].split() == [
        "id",
        "role",
        "key",
        "state",
        "last",
        "used",
        "name",
    ]
    assert key not in listed.stdout and key[20:] not in listed.stdout  # never the key

    revoked = cli("apikey", "revoke", key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in cli("apikey", "list", env=env).stdout
    again = cli("apikey", "revoke", key_id, env=env)
    assert again.returncode == 0 and "was revoked already" in again.stdout
    assert cli("apikey", "revoke", "no-such-id", env=env).returncode != 0
    assert cli("apikey", "create", env=env).returncode != 0  # --role is required to create
    # both changes are in the audit log, made by the operator at the console
    import sqlite3

    with sqlite3.connect(tmp_path / "tinyllava_med.db") as db:
        rows = db.execute("SELECT actor, action, resource_id FROM audit_events").fetchall()
    assert rows == [("cli", "apikey.create", key_id), ("cli", "apikey.revoke", key_id)]

    # a key that expires says so when made and when listed
    out = cli("apikey", "create", "--role", "pacs", "--expires-in-days", "7", env=env)
    assert out.returncode == 0 and "expires 20" in out.stdout, out.stdout + out.stderr
    expiring = out.stdout.split()[3]
    line = next(ln for ln in cli("apikey", "list", env=env).stdout.splitlines() if expiring in ln)
    assert "expires 20" in line

    for days in ("0", "-5", "1.5"):  # 0 made a key that never expired
        out = cli("apikey", "create", "--role", "pacs", "--expires-in-days", days, env=env)
        assert out.returncode == 2 and "--expires-in-days" in out.stderr, out.stdout + out.stderr
    assert cli("apikey", "list", env=env).stdout.count("pacs") == 2  # made neither

    # the last active admin key is kept (as the API keeps it: 409), unless forced
    admin = cli("apikey", "create", "--role", "admin", env=env).stdout.split()[3]
    refused = cli("apikey", "revoke", admin, env=env)
    assert refused.returncode != 0 and "last active admin key" in refused.stderr
    assert "active" in next(
        ln for ln in cli("apikey", "list", env=env).stdout.splitlines() if admin in ln
    )
    forced = cli("apikey", "revoke", "--force", admin, env=env)
    assert forced.returncode == 0 and f"revoked admin key {admin}" in forced.stdout


def test_console_commands_on_a_database_they_cannot_use_say_why_in_one_line(tmp_path):
    """On a schema a newer version migrated, `apikey list`, `import` and `db release-images`
    printed a MigrationError traceback (`serve` and `db upgrade` said it in a line)."""
    import sqlite3

    env = {"TINYLLAVA_MED_DATA_DIR": str(tmp_path)}
    assert cli("db", "upgrade", env=env).returncode == 0
    with sqlite3.connect(tmp_path / "tinyllava_med.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0099'")
    db.close()
    for args in (
        ("apikey", "list"),
        ("apikey", "create", "--role", "pacs"),
        ("import", str(CT_SMALL)),
        ("db", "release-images", "--days", "30"),
    ):
        out = cli(*args, env=env)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "0099" in out.stderr, (args, out.stderr)


def test_phantom_generate_score_round_trip(tiny_model_dir, tmp_path):
    ph = tmp_path / "ph"
    out = cli("data", "phantom", "--out", str(ph), "--n", "10", "--seed", "7")
    assert out.returncode == 0, out.stderr
    answers = tmp_path / "answers.jsonl"

    def eval_generate(*extra: str):
        return cli(
            "eval",
            "generate",
            "--model",
            str(tiny_model_dir),
            "--questions",
            str(ph / "test.json"),
            "--images",
            str(ph / "images"),
            "--out",
            str(answers),
            *extra,
        )

    out = eval_generate("--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    gt = json.loads((ph / "test.json").read_text())
    assert {x["question_id"] for x in lines} == {e["id"] for e in gt}
    assert all(x["metadata"]["quantization"] == "none" for x in lines)
    # resumable: a second run answers nothing new; one with another limit is refused
    out = eval_generate("--max-new-tokens", "3")
    assert json.loads(out.stdout.strip().splitlines()[-1])["skipped"] == len(gt)
    out = eval_generate()
    assert out.returncode == 2 and "answers of another model or decoding" in out.stderr
    out = eval_generate("--max-new-tokens", "3", "--template", "llava_v1")
    assert out.returncode == 2 and 'template "v1" there, "llava_v1" here' in out.stderr
    other = tmp_path / "llava_v1.jsonl"
    out = eval_generate("--max-new-tokens", "3", "--template", "llava_v1", "--out", str(other))
    assert out.returncode == 0, out.stderr
    assert {json.loads(x)["metadata"]["template"] for x in other.read_text().splitlines()} == {
        "llava_v1"
    }
    # drop one answer: the scorer reports it missing instead of shifting the pairs
    answers.write_text("\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    scores = tmp_path / "scores.json"
    out = cli(
        "eval",
        "score",
        "--gt",
        str(ph / "test.json"),
        "--pred",
        str(answers),
        "--json",
        str(scores),
    )
    assert out.returncode == 1 and "1 questions have no answer" in out.stderr, out.stderr
    scored = json.loads(scores.read_text())
    assert scored["missing"] == [lines[0]["question_id"]]
    # the report says which model answered (it did not: a file of another variant looked alike)
    (who,) = scored["answered_by"]
    assert who["model"] == lines[1]["metadata"]["model"] and who["answers"] == len(lines) - 1
    assert who["model_weights"].startswith("sha256:") and who["quantization"] == "none"
    assert f"answered by {who['model']}" in out.stdout
    # a file of two models' answers is scored, and said to be mixed
    other_lines = [json.loads(x) for x in other.read_text().splitlines()]
    answers.write_text("\n".join(json.dumps(x) for x in lines[:3] + other_lines[3:]) + "\n")
    out = cli("eval", "score", "--gt", str(ph / "test.json"), "--pred", str(answers))
    assert out.returncode == 1 and "answers are of 2 models" in out.stderr, out.stderr
    assert "answers of 2 models are mixed" in out.stdout
    out = cli(
        "eval", "score", "--gt", str(ph / "test.json"), "--pred", str(answers), "--allow-partial"
    )
    assert out.returncode == 0, out.stderr


def test_train_cli_overrides(tiny_model_dir, tmp_path):
    ph = tmp_path / "ph"
    assert cli("data", "phantom", "--out", str(ph), "--n", "6", "--seed", "1").returncode == 0
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(
        f"stage: instruct\nmodel: {tiny_model_dir}\ndata_path: {ph / 'train.json'}\n"
        f"image_folder: {ph / 'images'}\noutput_dir: {tmp_path / 'out'}\n"
        "per_device_train_batch_size: 4\ngradient_accumulation_steps: 1\nlearning_rate: 1e-3\n"
    )
    out = cli(
        "train",
        "--stage",
        "instruct",
        "--config",
        str(cfg),
        "--max-steps",
        "2",
        "--set",
        "language_model.mode=lora",
        "lora.r=4",
        "disable_tqdm=true",
    )
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "out" / "tinyllava_med.json").read_text())
    assert meta["training"]["config"]["language_model"]["mode"] == "lora"
    assert meta["training"]["config"]["max_steps"] == 2
    assert meta["training"]["stage"] == "instruct"
    # the stage is only recorded: one that contradicts the config's is refused, before training
    out = cli("train", "--stage", "downstream", "--config", str(cfg), "--max-steps", "2")
    assert out.returncode == 2
    assert "--stage downstream, but stage.yaml configures the instruct stage" in out.stderr


def test_quantize_then_ask_and_memory(tiny_model_dir, tmp_path):
    # the label: the scheme, and what the tiny model's cpu-int8 output check also put in int8
    for method, quant in (("cpu-int8", "cpu-int8+tower+lm_head"), ("nf4", "4bit")):
        dst = tmp_path / method
        out = cli("quantize", str(tiny_model_dir), str(dst), "--method", method)
        assert out.returncode == 0, out.stderr
        out = cli(
            "ask",
            CT_SMALL,
            "Is there a fracture?",
            "--model",
            str(dst),
            "--json",
            "--max-new-tokens",
            "3",
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["quantization"] == quant
    report = tmp_path / "mem.json"
    out = cli("memory", "--model", str(tiny_model_dir), "--new-tokens", "4", "--json", str(report))
    assert out.returncode == 0, out.stderr
    mem = json.loads(report.read_text())
    assert mem["static_bytes"] > 0 and mem["dynamic_bytes"] > 0


def test_db_downgrade_and_a_schema_newer_than_the_code(tmp_path):
    """Rolling a version back: `db downgrade REV` (run by the newer version) takes the schema to
    the older version's revision. A schema a newer version migrated is refused, by `db upgrade`
    and by `serve` alike, with what to do instead of alembic's "Can't locate revision"."""
    import sqlite3

    from tinyllava_med.server.db import migrate

    db = tmp_path / "t.db"
    env = {"TINYLLAVA_MED_DATA_DIR": str(tmp_path), "TINYLLAVA_MED_DATABASE_URL": f"sqlite:///{db}"}
    assert cli("db", "upgrade", env=env).returncode == 0
    out = cli("db", "downgrade", "0010", env=env)
    assert out.returncode == 0 and out.stdout.strip() == "database is at revision 0010", out
    out = cli("db", "upgrade", env=env)
    assert out.returncode == 0 and migrate.current_revision(f"sqlite:///{db}") == (
        migrate.head_revision()
    )
    head = migrate.head_revision()
    assert out.stdout.strip() == f"database upgraded from revision 0010 to {head}, the latest"
    out = cli("db", "upgrade", env=env)
    assert out.stdout.strip() == f"database is at the latest revision ({head}) already"

    with sqlite3.connect(db) as conn:  # as a newer version would leave it
        conn.execute("UPDATE alembic_version SET version_num = '0999'")
    out = cli("db", "upgrade", env=env)
    assert out.returncode == 1, out
    assert "revision 0999, which this version does not know" in out.stderr
    assert f"db downgrade {migrate.head_revision()}" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(migrate.MigrationError, match="a newer version of the server migrated it"):
        migrate.require_head(f"sqlite:///{db}")


def test_bitsandbytes_advice_to_fetch_kernels_is_dropped(tmp_path, monkeypatch, caplog, capsys):
    """bitsandbytes, imported on a CPU, asks to `pip install kernels` (fetched from the Hub at
    run time) and falls back to its own code; every command drops that notice, and only it."""
    import logging

    from tinyllava_med.cli import main

    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path))
    assert main(["settings"]) == 0
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
            "'kernels'. Please make sure you already `pip install kernels`"
        )
        logger.warning("another notice")
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["another notice"]


def test_a_wrong_model_path_or_device_is_one_line_not_a_traceback(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """What a user mistypes or a copy loses: a model that is not there, a folder that is no
    checkpoint, a checkpoint missing or with a damaged file, a device this machine lacks, a
    questions file or image folder that is not there, values no run can use, and Ctrl-C. Each
    says what is wrong in one line (exit 2; 130 for Ctrl-C), before loading a model where it
    can; `-v` keeps the traceback."""
    import shutil

    from tinyllava_med import cli as cli_module
    from tinyllava_med.cli import main

    monkeypatch.setenv("TINYLLAVA_MED_DATA_DIR", str(tmp_path / "data"))
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (32, 32), 80).save(png)

    def run(*args: str) -> str:
        code = main(list(args))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (args, code, err)
        return err

    ask = ("ask", str(png), "Organ?")
    assert "a folder, not a file" in run("ask", str(tmp_path), "Organ?")
    assert "no such folder" in run("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert "neither a folder nor a known variant" in run(*ask, "--model", "nosuch")
    assert "is not a checkpoint folder (it has no config.json)" in run(
        *ask, "--model", str(tmp_path)
    )
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    assert "a file is missing or damaged" in run(*ask, "--model", str(broken))
    shutil.copy(tiny_model_dir / "model.safetensors", broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert "SafetensorError" in run(*ask, "--model", str(broken))
    assert "unknown device 'tpu'" in run(*ask, "--model", str(tiny_model_dir), "--device", "tpu")
    if not __import__("torch").cuda.is_available():
        assert "no CUDA GPU" in run(*ask, "--model", str(tiny_model_dir), "--device", "cuda")

    eval_args = ("eval", "generate", "--model", str(broken), "--out", str(tmp_path / "a.jsonl"))
    err = run(*eval_args, "--questions", str(tmp_path / "nope.json"), "--images", str(tmp_path))
    assert f"No such file or directory: {tmp_path / 'nope.json'}" in err  # before the model
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Q?"}) + "\n")
    err = run(*eval_args, "--questions", str(questions), "--images", str(tmp_path / "nope"))
    assert "Not a directory" in err
    err = run(
        "eval", "compare", "--variants", str(tiny_model_dir), f"{tiny_model_dir}:9bit",
        "--questions", str(questions), "--images", str(tmp_path), "--out-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert "unknown quantization '9bit'" in err and not (tmp_path / "c").exists()
    err = run("train", "--stage", "downstream", "--config", "nope.yaml")
    assert "No such file or directory: nope.yaml" in err

    for bad in (("--batch-size", "0"), ("--temperature", "-1"), ("--top-p", "2")):
        with pytest.raises(SystemExit) as refused:
            main(["eval", "generate", "--questions", "q", "--images", ".", "--out", "o", *bad])
        assert refused.value.code == 2 and bad[0] in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_ask", interrupted)  # the parser names it when built
    assert main(list(ask)) == 130
    assert capsys.readouterr().err.strip() == "tinyllava-med: interrupted"


def test_train_refuses_step_counts_that_mean_something_else_and_finds_shipped_configs():
    """transformers reads `max_steps` 0 as one step and -2 as no limit (an hour of training
    for a typo); a shipped config is found by its name with or without `.yaml`, as its
    comment writes it, and `deepspeed=zero3.json` names the shipped ZeRO-3 config."""
    from pydantic import ValidationError

    from tinyllava_med.training.config import CONFIG_DIR, TrainConfig

    for steps in (0, -2):
        with pytest.raises(ValidationError, match="max_steps"):
            TrainConfig.from_yaml("tinyllava-1.5b-downstream", max_steps=steps)
    assert TrainConfig.from_yaml("tinyllava-1.5b-downstream", max_steps=-1).max_steps == -1
    by_file = TrainConfig.from_yaml("tinyllava-1.5b-downstream.yaml")
    assert by_file == TrainConfig.from_yaml("tinyllava-1.5b-downstream")
    zero3 = TrainConfig.from_yaml("tinyllava-1.5b-downstream", deepspeed="zero3.json")
    assert zero3.deepspeed == str(CONFIG_DIR / "zero3.json")
