"""Prompts: the text each template feeds the model equals what the original code built."""

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinyllava_med.model.prompts import (
    TEMPLATES,
    build_prompt,
    chat_template,
    conversation_segments,
    stop_strings,
)

V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
    "Is there a fracture? ASSISTANT:"
)


def test_v1_literal():
    assert build_prompt("v1", "Is there a fracture?") == V1
    # `<image>` anywhere in the question (VQA-RAD files) is moved to the front, as the originals do
    assert build_prompt("v1", "<image>\nIs there a fracture?") == V1
    assert build_prompt("v1", "Is there a fracture? <image>") == V1


def test_llava_v1_literal():
    """TinyLLaVA-Med-F's VQA scripts asked with LLaVA's `conv_llava_v1`: "human", not "user"."""
    assert build_prompt("llava_v1", "Is there a fracture?") == V1.replace("user", "human")
    assert build_prompt("llava_v1", "Which side?", [("Is there a nodule?", "yes")]).endswith(
        "human's questions. USER: <image>\nIs there a nodule? ASSISTANT: yes</s>USER: Which side? "
        "ASSISTANT:"
    )
    assert stop_strings("llava_v1") == ("</s>",)


def test_mistral_instruct_literal():
    assert (
        build_prompt("mistral_instruct", "What modality?")
        == "[INST] <image>\nWhat modality? [/INST]"
    )
    assert (
        build_prompt("mistral_instruct", "And the organ?", [("What modality?", "CT")])
        == "[INST] <image>\nWhat modality? [/INST] CT </s>[INST] And the organ? [/INST]"
    )


def test_v1_multi_turn_and_phi():
    text = build_prompt("v1", "Which side?", [("Is there a nodule?", "yes")])
    assert text.endswith("ASSISTANT: yes</s>USER: Which side? ASSISTANT:")
    assert build_prompt("phi", "q").endswith("USER: <image>\nq ASSISTANT:")
    assert stop_strings("phi") == ("<|endoftext|>",)


def test_segments_mark_only_answers():
    segs = conversation_segments("v1", [("q1", "a1"), ("q2", "a2")])
    assert [s for s, is_answer in segs if is_answer] == [" a1</s>", " a2</s>"]
    with pytest.raises(ValueError, match="only the last turn"):
        conversation_segments("v1", [("q1", None), ("q2", "a2")])


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "plain"])
def test_chat_template_renders_build_prompt(template):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(chat_template(template))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What modality?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "CT"}]},
        {"role": "user", "content": [{"type": "text", "text": "Which organ?"}]},
    ]
    assert tpl.render(messages=messages) == build_prompt(
        template, "Which organ?", [("What modality?", "CT")]
    )


def test_unknown_template():
    with pytest.raises(ValueError, match="known: v1"):
        build_prompt("chatml", "q")


def test_llava_med_v1_literal():
    """LLaVA-Med v1.0 `simple`: example exchange, image after the question, prompt ends at ###."""
    assert build_prompt("llava_v1_med", "What is shown?") == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions.###Human: Hi!"
        "###Assistant: Hi there!  How can I help you today?\n###Human: What is shown?\n"
        "<im_start><image><im_end>###"
    )
    from tinyllava_med.model.prompts import clean_answer

    assert clean_answer("llava_v1_med", "Assistant: a chest x-ray") == "a chest x-ray"
    # a byte-fallback token decodes to a control character, which no database text holds
    assert clean_answer("v1", "\x00no\x07 acute\tfinding\x7f\n\x1b.") == "no acute\tfinding\n."


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "plain"])
def test_an_image_token_in_earlier_turns_leaves_one_image(template):
    """A chat client sends earlier turns back as it got them: `<image>` in an earlier answer or
    question (a pasted prompt) must not make a second image (the prompt was refused, a 500)."""
    prompt = build_prompt(template, "<image> and now?", [("first <image>", "see <image> here")])
    assert prompt.count("<image>") == 1
    assert "see  here" in prompt  # the answer keeps its words
