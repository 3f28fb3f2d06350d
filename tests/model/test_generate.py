"""Generation on the real tiny model: greedy, batched with left padding, streaming, cancelling."""

import gc

import pytest
import torch
from PIL import Image

from tinyllava_med.model.generate import (
    GenerationCancelled,
    SamplingParams,
    generate,
    prepare_image,
    stream,
)


def _images():
    return [Image.new("L", (40, 30), 30), Image.new("RGB", (32, 32), (200, 10, 10))]


def test_batched_equals_single(tiny_lm):
    qs = ["Is there a fracture?", "What is the modality of this image, please?"]
    params = SamplingParams(max_new_tokens=6)
    batched = generate(tiny_lm, _images(), qs, params)
    singles = [
        generate(tiny_lm, [im], [q], params)[0] for im, q in zip(_images(), qs, strict=False)
    ]
    assert [a.text for a in batched] == [a.text for a in singles]
    assert all(a.new_tokens <= 6 for a in batched)
    # different prompt lengths: left padding must not leak into the shorter row
    assert batched[0].prompt_tokens < batched[1].prompt_tokens


def test_prepared_pixel_values_answer_as_the_images_do(tiny_lm):
    """An image given as `prepare_image`'s pixel values (what the server caches) gets the same
    answer and prompt as the image itself, also mixed with a plain image in one batch."""
    qs = ["Is there a fracture?", "What is the modality of this image, please?"]
    params = SamplingParams(max_new_tokens=6)
    plain = generate(tiny_lm, _images(), qs, params)
    pixels = [prepare_image(tiny_lm, im) for im in _images()]
    assert pixels[0].shape == (3, 32, 32) and pixels[0].dtype == tiny_lm.model.dtype
    for images in (pixels, [pixels[0], _images()[1]]):
        got = generate(tiny_lm, images, qs, params)
        assert [(a.text, a.prompt_tokens, a.new_tokens) for a in got] == [
            (a.text, a.prompt_tokens, a.new_tokens) for a in plain
        ]


def test_a_batch_leaves_no_tensor_to_the_cyclic_garbage_collector(tiny_lm):
    """Reference counting frees everything a batch allocated, streamed or cancelled alike: a
    serving process collects young objects rarely (`settle_heap`), which must not keep a
    batch's tensors (on a GPU, its KV cache) alive until the next collection."""
    qs = ["Is there a fracture?", "What is the modality of this image, please?"]
    generate(tiny_lm, _images(), qs, SamplingParams(max_new_tokens=4))  # first-call caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        generate(tiny_lm, _images(), qs, SamplingParams(max_new_tokens=4))
        list(stream(tiny_lm, _images()[0], qs[0], SamplingParams(max_new_tokens=4)))
        with pytest.raises(GenerationCancelled):
            generate(
                tiny_lm, _images(), qs, SamplingParams(max_new_tokens=4), should_stop=lambda: True
            )
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert cyclic == []


def test_greedy_is_deterministic_and_limits_per_row(tiny_lm):
    ims, qs = _images(), ["a?", "b?"]
    p = [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=5)]
    first = generate(tiny_lm, ims, qs, p)
    again = generate(tiny_lm, ims, qs, p)
    assert [a.text for a in first] == [a.text for a in again]
    assert first[0].new_tokens <= 2 and first[1].new_tokens <= 5


def test_rows_must_share_sampling(tiny_lm):
    with pytest.raises(ValueError, match="share temperature"):
        generate(
            tiny_lm,
            _images(),
            ["a", "b"],
            [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7)],
        )


def test_stream_yields_deltas_then_answer(tiny_lm):
    events = list(
        stream(tiny_lm, _images()[0], "Is there a fracture?", SamplingParams(max_new_tokens=8))
    )
    *deltas, final = events
    assert isinstance(final.text, str)
    assert "".join(deltas) == final.text  # exactly: no stray space, nothing past the end


def test_streamed_rows_add_up_to_their_answers(tiny_lm):
    """In a batch whose rows have different token limits, each row's deltas concatenate to
    exactly its final answer (cut at its own limit, stripped, cut at stop strings)."""
    sent: dict[int, str] = {0: "", 1: ""}

    def on_token(row: int, delta: str) -> None:
        sent[row] += delta

    p = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=9)]
    answers = generate(tiny_lm, _images(), ["a?", "b?"], p, on_token=on_token)
    assert [sent[0], sent[1]] == [a.text for a in answers]


@pytest.mark.parametrize(
    "template, text, final, visible",
    [
        ("v1", " yes", False, "yes"),
        ("v1", "yes ", False, "yes"),  # trailing space held back until more text comes
        ("v1", "yes</", False, "yes"),  # maybe the start of the stop string </s>
        ("v1", "yes</s> more", False, "yes"),
        ("llava_v1_med", "Assis", False, ""),  # maybe the role prefix the answer drops
        ("llava_v1_med", "Assistant: ct ##", False, "ct"),
        ("llava_v1_med", "Assistant: ct ###", False, "ct"),
        ("v1", "yes ", True, "yes"),
    ],
)
def test_visible_text_while_streaming(template, text, final, visible):
    from tinyllava_med.model.generate import _visible
    from tinyllava_med.model.prompts import stop_strings

    assert _visible(template, text, stop_strings(template), final) == visible


def test_should_stop_cancels(tiny_lm):
    with pytest.raises(GenerationCancelled):
        generate(
            tiny_lm,
            _images()[:1],
            ["q"],
            SamplingParams(max_new_tokens=20),
            on_token=lambda r, d: None,
            should_stop=lambda: True,
        )


def test_model_sees_the_image(tiny_lm):
    """Different images give different next-token logits (the image tokens are wired in)."""
    proc = tiny_lm.processor
    from tinyllava_med.model.prompts import build_prompt

    text = build_prompt(tiny_lm.template, "What is shown?")
    logits = []
    for im in _images():
        inputs = proc(images=[im.convert("RGB")], text=[text], return_tensors="pt")
        with torch.no_grad():
            logits.append(tiny_lm.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-6])
def test_a_temperature_too_small_to_divide_by_decodes_greedily(tiny_lm, temperature):
    """Logits divided by 1e-300 overflow to inf and sampling from them fails; temperatures
    below MIN_TEMPERATURE decode greedily instead (as vLLM does), in the params themselves so a
    report records what was done."""
    qs = ["Is there a fracture?", "What is the modality of this image, please?"]
    tiny = SamplingParams(max_new_tokens=6, temperature=temperature, top_p=1e-300)
    assert tiny.temperature == 0.0 and tiny.key() == (0.0, 1e-300)
    greedy = generate(tiny_lm, _images(), qs, SamplingParams(max_new_tokens=6))
    assert [a.text for a in generate(tiny_lm, _images(), qs, tiny)] == [a.text for a in greedy]
    assert SamplingParams(temperature=1e-5).temperature == 1e-5  # the threshold itself samples
