"""`eval generate`: answer a VQA question file with a model, one jsonl line per question.

Reads LLaVA-Med / VQA-RAD conversation files (`conversations` or the misspelt `conversatons`,
`<image>` anywhere in the question) and LLaVA-Med's `qa50` jsonl (`question_id`, `text`,
`image`). Writes `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` like
LLaVA-Med. Batched, greedy by default, resumable; a failed item is written as failed. Images
are read as the server reads uploads (`imaging.load_image_file`: DICOM, 16-bit PNG stretched,
the same pixel limits); 8-bit PNG and JPEG give the same pixels as a plain PIL conversion.
A run resumes only a file of its own answers: the same weights, quantization, template,
decoding and padding (`RESUME_KEYS`).

`grayscale_pad="llava-med"` pads grayscale images as LLaVA-Med's `model_vqa.py` did when its
published scores were made: `process_images` fills an `L` image's square with one gray,
`int(255 * mean(image_mean))` (114 for CLIP), where its training, and the server, use the
mean colour (122, 116, 104) on RGB. Its random one-pixel shift of the image is not copied.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from tinyllava_med.imaging import ImagingError, load_image_file
from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.prefixes import cache_bytes, image_prefixes_pay, prefix_cache_size_mb
from tinyllava_med.model.prompts import IMAGE_TOKEN
from tinyllava_med.server.lru import ByteLRU

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    question_id: str
    image: str
    text: str  # the question without the image placeholder


def read_questions(path: str | Path) -> list[Question]:
    """Questions of a conversation json (list) or a qa50-style jsonl file."""
    raw = Path(path).read_text()
    if raw.lstrip().startswith("["):
        entries = json.loads(raw)
    else:
        entries = [json.loads(line) for line in raw.splitlines() if line.strip()]
    out = []
    for e in entries:
        convs = e.get("conversations", e.get("conversatons"))
        if convs is not None:
            first = next(c for c in convs if c.get("from") in ("human", "user"))
            text, qid = first["value"], e["id"]
        elif "text" in e:
            text, qid = e["text"], e.get("question_id", e.get("id"))
        else:
            raise ValueError(f"entry {e.get('id')!r} of {path} has neither conversations nor text")
        out.append(Question(str(qid), e["image"], text.replace(IMAGE_TOKEN, "").strip()))
    return out


# what an answer's metadata must share with this run's for the run to resume its file: the
# same weights, quantization, prompt template and decoding (a code version alone may differ)
RESUME_KEYS = ("model_weights", "quantization", "template", "decoding", "grayscale_pad")
GRAYSCALE_PADS = ("mean", "llava-med")


def llava_med_gray(lm: LoadedModel) -> int:
    """The gray LLaVA-Med's evaluation padded grayscale images with (`process_images`)."""
    mean = list(lm.processor.image_processor.image_mean)
    return int(255 * sum(mean) / len(mean))


def stored_as_grayscale(path: Path) -> bool:
    """Whether the file is a one-channel 8-bit image (PIL mode `L`), as LLaVA-Med's evaluation
    saw it before its processor made it RGB; a DICOM file (not a PIL image) is not."""
    try:
        with Image.open(path) as f:
            return f.mode == "L"
    except (OSError, ValueError):
        return False


def pad_grayscale(image: Image.Image, gray: int) -> Image.Image:
    """`image` centred on a square of `gray` (each channel); a square image as it is."""
    if image.width == image.height:
        return image
    side = max(image.size)
    fill: int | tuple[int, ...] = gray if image.mode == "L" else (gray,) * len(image.getbands())
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def answered_ids(out_path: Path, run: dict[str, Any] | None = None) -> set[str]:
    """Question ids already written (successfully) to `out_path`, for resuming. With `run`
    (this run's answer metadata), a line written by another model or decoding is a ValueError:
    resuming would mix two models' answers in one file under one name."""
    if not out_path.is_file():
        return set()
    done = set()
    for line in out_path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the question is asked again
        meta = item.get("metadata", {})
        if run is not None and (other := _differs(meta, run)):
            raise ValueError(
                f"{out_path} holds answers of another model or decoding ({other}); a run "
                "resumes only its own answers: write to another file, or delete this one to "
                "start over"
            )
        if not meta.get("failed"):
            done.add(str(item["question_id"]))
    return done


def _differs(meta: dict[str, Any], run: dict[str, Any]) -> str:
    """Which of `RESUME_KEYS` an answer's metadata has otherwise than this run ('' if none).
    Quantizations are compared by scheme: with the same weights that is the same model, and a
    file an earlier version wrote says `cpu-int8` where this one says `cpu-int8+tower+lm_head`."""

    def seen(answer: dict[str, Any], key: str) -> Any:
        value = answer.get(key)
        return value.split("+")[0] if key == "quantization" and isinstance(value, str) else value

    return "; ".join(
        f"{key} {json.dumps(meta.get(key))} there, {json.dumps(run.get(key))} here"
        for key in RESUME_KEYS
        if seen(meta, key) != seen(run, key)
    )


def generate_answers(
    lm: LoadedModel,
    questions_path: str | Path,
    images_dir: str | Path,
    out_path: str | Path,
    *,
    params: SamplingParams = SamplingParams(max_new_tokens=1024),  # LLaVA-Med's model_vqa.py
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
    prefix_cache_mb: int | None = None,
    grayscale_pad: str = "mean",
) -> dict[str, int]:
    """Answer every question not yet in `out_path`; returns counts (answered, failed, skipped).
    `grayscale_pad`: "mean" as the model's processor pads, or "llava-med" (module docstring).

    `prefix_cache_mb`: attention caches of prompt prefixes that questions share, as the server
    keeps them (None: `prefix_cache_size_mb`'s default): the template's opening, and each
    image's prompt up to the image where that pays (`image_prefixes_pay`; PhantomVQA asks 8
    questions about each image). Answers are the same either way."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    questions = read_questions(questions_path)[:limit]
    if grayscale_pad not in GRAYSCALE_PADS:
        raise ValueError(f"grayscale_pad {grayscale_pad!r}: expected one of {GRAYSCALE_PADS}")
    meta_base: dict[str, Any] = {**lm.info, "decoding": asdict(params)}
    gray = llava_med_gray(lm) if grayscale_pad == "llava-med" else None
    if gray is not None:  # absent otherwise, as in files written before the option
        meta_base["grayscale_pad"] = gray
    done = answered_ids(out, json.loads(json.dumps(meta_base)))  # as read back from a line
    todo = [q for q in questions if q.question_id not in done]
    counts = {"answered": 0, "failed": 0, "skipped": len(questions) - len(todo)}
    size_mb = prefix_cache_size_mb(lm, prefix_cache_mb)
    store = ByteLRU(size_mb * 1024 * 1024, cache_bytes) if size_mb else None
    by_image = store is not None and image_prefixes_pay(lm)
    with open(out, "a") as f, tqdm(total=len(todo), disable=not progress, desc="answers") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            images: list[Image.Image | None] = []
            for q in batch:
                try:  # as the server reads uploads: DICOM, 16-bit PNG, pixel limits
                    path = Path(images_dir) / q.image
                    image = load_image_file(path)  # RGB, as the server gives the model
                    if gray is not None and stored_as_grayscale(path):
                        image = pad_grayscale(image, gray)
                    images.append(image)
                except (OSError, ValueError, ImagingError) as e:
                    log.warning("question %s: image unreadable: %s", q.question_id, e)
                    images.append(None)
            ok = [(q, im) for q, im in zip(batch, images, strict=True) if im is not None]
            answers = generate(
                lm,
                [im for _, im in ok],
                [q.text for q, _ in ok],
                params,
                prefixes=store,
                image_keys=[q.image for q, _ in ok] if by_image else None,  # one folder: a
                # file's name names its content
            )
            by_id = {q.question_id: a for (q, _), a in zip(ok, answers, strict=True)}
            for q in batch:
                ans = by_id.get(q.question_id)
                meta = dict(meta_base)
                if ans is None:
                    meta.update(failed=True, error="image unreadable")
                    counts["failed"] += 1
                else:
                    meta.update(
                        latency_ms=round(ans.latency_ms / len(ok), 3),
                        prompt_tokens=ans.prompt_tokens,
                        new_tokens=ans.new_tokens,
                        finish_reason=ans.finish_reason,
                    )
                    counts["answered"] += 1
                line = {
                    "question_id": q.question_id,
                    "prompt": q.text,
                    "text": ans.text if ans else "",
                    "answer_id": uuid.uuid4().hex,
                    "model_id": lm.name,
                    "metadata": meta,
                }
                f.write(json.dumps(line) + "\n")
            f.flush()
            bar.update(len(batch))
    return counts
