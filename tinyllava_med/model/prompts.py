"""Prompt templates: the exact text each original model was fed, and its chat template.

`build_prompt(template, question)` returns the string the original code tokenized (with one
`<image>` placeholder). `CHAT_TEMPLATES` are the Jinja templates written into converted
processors so `apply_chat_template` produces that same string.
"""

from __future__ import annotations

import json
import re
from typing import Literal, get_args

Template = Literal["v1", "llava_v1", "phi", "gemma", "mistral_instruct", "llava_v1_med", "plain"]
TEMPLATES: tuple[str, ...] = get_args(Template)

IMAGE_TOKEN = "<image>"

V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# "human" in the system line: LLaVA's `conv_llava_v1`, which TinyLLaVA-Med-F's VQA scripts
# (`model_vqa_science.py`, `--conv-mode llava_v1` by default) asked with, although it trained with
# `v1` ("user"); otherwise as `v1`. Also LLaVA-Med v1.0's system line.
HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# LLaVA-Med v1.0 (`llava` on LLaMA, `--conv-mode simple`): a fixed example exchange, the image
# after the question wrapped in <im_start>/<im_end>, and a prompt that ends with the separator:
# the model writes "Assistant:" itself.
MED_V1_PREAMBLE = HUMAN_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
MED_V1_IMAGE = "<im_start>" + IMAGE_TOKEN + "<im_end>"

_STOP: dict[str, tuple[str, ...]] = {
    "v1": ("</s>",),
    "llava_v1": ("</s>",),
    "phi": ("<|endoftext|>",),  # also TinyLLaVA_Factory's `qwen2_base`: the same text
    "gemma": ("<eos>",),  # TinyLLaVA_Factory's `gemma`: `phi`'s text, Gemma's end of turn
    "mistral_instruct": ("</s>",),
    "llava_v1_med": ("###",),
    "plain": ("\n",),
}


def _turn_text(question: str) -> str:
    """The user turn as the originals built it: image first, then a newline, then the question."""
    question = question.replace(IMAGE_TOKEN, "").strip()
    return f"{IMAGE_TOKEN}\n{question}"


def conversation_segments(
    template: str, turns: list[tuple[str, str | None]]
) -> list[tuple[str, bool]]:
    """The conversation as (text, is_answer) pieces; joined, they are the original's text.

    `turns` are (question, answer) pairs; the last answer may be None (the prompt to answer).
    The image is attached to the first user turn, as in the originals. Training supervises
    exactly the `is_answer` pieces (the answer and its end-of-turn marker).
    """
    if template not in _STOP:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "plain":
        if len(turns) != 1:
            raise ValueError("the 'plain' template has exactly one turn")
        q, a = turns[0]
        return [(IMAGE_TOKEN, False)] + ([(a + "\n", True)] if a is not None else [])
    segs: list[tuple[str, bool]] = []
    for i, (q, a) in enumerate(turns):
        q = _turn_text(q) if i == 0 else q.replace(IMAGE_TOKEN, "").strip()
        if a is not None:  # an earlier answer a client sent back (chat): one image per prompt
            a = a.replace(IMAGE_TOKEN, "")
        if template in ("v1", "llava_v1", "phi", "gemma"):
            user = (_system(template) + " " if i == 0 else "") + f"USER: {q} ASSISTANT:"
            answer = f" {a}{_STOP[template][0]}"
        elif template == "mistral_instruct":
            user = f"[INST] {q} [/INST]"
            answer = f" {a} </s>"
        else:  # llava_v1_med: the image follows the question
            if i == 0:
                plain = q.replace(IMAGE_TOKEN, "").strip()
                user = f"{MED_V1_PREAMBLE}###Human: {plain}\n{MED_V1_IMAGE}###"
            else:
                user = f"Human: {q}###"
            answer = f"Assistant: {a}###"
        segs.append((user, False))
        if a is not None:
            segs.append((answer, True))
        elif i != len(turns) - 1:
            raise ValueError("only the last turn may be unanswered")
    return segs


def _system(template: str) -> str:
    """The system line of the `USER: ... ASSISTANT:` templates."""
    return HUMAN_SYSTEM if template == "llava_v1" else V1_SYSTEM


def build_prompt(template: str, question: str, history: list[tuple[str, str]] | None = None) -> str:
    """The text the original code fed the model for one image and `question`.

    `history` is earlier (question, answer) turns of the same conversation.
    """
    turns: list[tuple[str, str | None]] = [*(history or []), (question, None)]
    return "".join(text for text, _ in conversation_segments(template, turns))


# C0 controls but tab and line breaks, and DEL. No question, answer or report holds them:
# PostgreSQL text refuses NUL; DICOM text (ST/LT/UT), FHIR strings and XML (a FHIR narrative)
# the rest. A byte-fallback token (`<0x00>`) decodes to one, and a text pasted from a word
# processor may hold one (a vertical tab for a line break). Also lone surrogates (U+D800-DFFF),
# which JSON's `\ud800` escape can carry but no UTF-8 text (no database, no file) can hold.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def without_controls(text: str) -> str:
    """`text` without the control characters no report may hold."""
    return CONTROL.sub("", text)


def control_in(text: str) -> str | None:
    """The first control character `text` may not hold, as `U+000B`; None when it holds none."""
    found = CONTROL.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


def clean_answer(template: str, text: str) -> str:
    """The answer as a reader wants it: without the role name a template lets the model write,
    and without control characters."""
    text = without_controls(text).strip()
    if template == "llava_v1_med" and text.startswith("Assistant:"):
        text = text.removeprefix("Assistant:").strip()
    return text


def stop_strings(template: str) -> tuple[str, ...]:
    """Strings that end an answer for this template (besides the tokenizer's EOS)."""
    if template not in _STOP:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    return _STOP[template]


def _lit(text: str) -> str:
    """A Jinja string literal for `text` (Jinja accepts JSON's double-quoted escapes)."""
    return json.dumps(text)


def _jinja_user(text_expr: str, image: str | None = None) -> str:
    # Content may be a string or a list of {"type": "image"} / {"type": "text"} parts. The image
    # placeholder comes first, then a newline (as in the originals), unless `image` (a Jinja
    # literal) says what to append after the text instead.
    return (
        "{%- set ns = namespace(text='', image=false) -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set ns.image = true -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        + (
            "{%- if ns.image -%}{%- set ns.text = '<image>' + '\\n' + ns.text | trim -%}{%- endif -%}"
            if image is None
            else "{%- if ns.image -%}{%- set ns.text = ns.text | trim + "
            + image
            + " -%}{%- endif -%}"
        )
        + text_expr
    )


def chat_template(template: str) -> str:
    """A Jinja chat template that renders `build_prompt`'s text from chat messages."""
    if template in ("v1", "llava_v1", "phi", "gemma"):
        eos = _STOP[template][0]
        return (
            "{{- " + _lit(_system(template) + " ") + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            + _jinja_user("{{- 'USER: ' + ns.text + ' ASSISTANT:' -}}")
            + "{%- elif message['role'] == 'assistant' -%}"
            "{%- set ns2 = namespace(text='') -%}"
            "{%- if message['content'] is string -%}{%- set ns2.text = message['content'] -%}"
            "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
            "{%- set ns2.text = ns2.text + part['text'] -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- ' ' + ns2.text + '" + eos + "' -}}"
            "{%- endif -%}{%- endfor -%}"
        )
    if template == "mistral_instruct":
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            + _jinja_user("{{- '[INST] ' + ns.text + ' [/INST]' -}}")
            + "{%- elif message['role'] == 'assistant' -%}"
            "{%- set ns2 = namespace(text='') -%}"
            "{%- if message['content'] is string -%}{%- set ns2.text = message['content'] -%}"
            "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
            "{%- set ns2.text = ns2.text + part['text'] -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- ' ' + ns2.text + ' </s>' -}}"
            "{%- endif -%}{%- endfor -%}"
        )
    if template == "llava_v1_med":
        return (
            "{{- " + _lit(MED_V1_PREAMBLE + "###") + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            + _jinja_user("{{- 'Human: ' + ns.text + '###' -}}", image=_lit("\n" + MED_V1_IMAGE))
            + "{%- elif message['role'] == 'assistant' -%}"
            "{%- set ns2 = namespace(text='') -%}"
            "{%- if message['content'] is string -%}{%- set ns2.text = message['content'] -%}"
            "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
            "{%- set ns2.text = ns2.text + part['text'] -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- 'Assistant: ' + ns2.text + '###' -}}"
            "{%- endif -%}{%- endfor -%}"
        )
    if template == "plain":
        return "{{- '<image>' -}}"
    raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
