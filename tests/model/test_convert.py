"""`convert` and the served processor against tiny checkpoints in the originals' exact formats.

Each case writes a tiny original checkpoint (config fields, weight names, files, tower folder,
tokenizer as the original code saved them), converts it, loads it with the Auto classes, and
compares next-token logits with the same weights run by hand the original way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaTokenizer

from tinyllava_med.model.convert import ConversionError, convert_checkpoint, detect_format
from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.model.prefixes import MIN_TEMPLATE_PREFIX, template_prefix
from tinyllava_med.model.processor import (
    ImageProcessorSpec,
    batch_inputs,
    build_image_processor,
    build_processor,
    image_token_count,
    output_pixels,
    pixel_values,
)
from tinyllava_med.model.prompts import build_prompt

try:  # tests/model may or may not be a package
    from . import original_formats as of
except ImportError:
    import original_formats as of  # type: ignore[no-redef]

QUESTION = "Is there a nodule in the left lung?"
BUILDERS = {
    "llava_mistral": of.build_llava_med_v15,
    "llava": of.build_llava_med_v10,
    "tiny_llava_llama": lambda root: of.build_tiny_llava(root, "llama"),
    "tiny_llava_phi": lambda root: of.build_tiny_llava(root, "phi"),
    "tiny_llava_stablelm": lambda root: of.build_tiny_llava(root, "stablelm"),
    "tinyllava": of.build_factory,
    "tinyllava_qwen2": lambda root: of.build_factory(root, "qwen2"),
    "tinyllava_gemma": lambda root: of.build_factory(root, "gemma"),
}


class Workshop:
    """Builds each original once and converts it once per option set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.originals: dict[str, of.Original] = {}
        self.converted: dict[tuple, Path] = {}

    def original(self, case: str) -> of.Original:
        if case not in self.originals:
            self.originals[case] = BUILDERS[case](self.root / "src" / case)
        return self.originals[case]

    def convert(self, case: str, **options: object) -> tuple[of.Original, Path]:
        orig = self.original(case)
        key = (case, tuple(sorted(options.items())))
        if key not in self.converted:
            dst = self.root / "served" / f"{case}-{len(self.converted)}"
            if case == "llava_mistral":  # config names the hub id; the tower is a local folder
                options.setdefault("vision_tower_path", orig.tower_folder)
            self.converted[key] = convert_checkpoint(orig.folder, dst, **options)  # type: ignore[arg-type]
        return orig, self.converted[key]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Workshop:
    return Workshop(tmp_path_factory.mktemp("convert"))


def sample_image(width: int = 23, height: int = 14, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _load(dst: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(dst)


def _served_inputs(processor, template: str, question: str = QUESTION, image=None):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == build_prompt(template, question)
    return processor(text=text, images=image or sample_image(), return_tensors="pt")


def _collapse(ids: list[int], image_id: int, marker: int = of.IMAGE_TOKEN_INDEX) -> list[int]:
    """Served ids with the run of image tokens written as the originals' single marker."""
    out: list[int] = []
    for t in ids:
        if t == image_id:
            if not out or out[-1] != marker:
                out.append(marker)
        else:
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Logits: converted model == original arrangement


@pytest.mark.parametrize(
    "case",
    [
        "llava_mistral",
        "tiny_llava_llama",
        "tiny_llava_phi",
        "tiny_llava_stablelm",
        "tinyllava",
        "tinyllava_qwen2",
        "tinyllava_gemma",
    ],
)
def test_logits_match_original(shop: Workshop, case: str) -> None:
    orig, dst = shop.convert(case)
    model, processor = _load(dst)
    inputs = _served_inputs(processor, orig.template)
    ids = of.tokenizer_image_token(build_prompt(orig.template, QUESTION), orig.encode, orig.bos_id)
    image_id = model.config.image_token_id
    assert _collapse(inputs["input_ids"][0].tolist(), image_id) == ids

    with torch.no_grad():
        served = model(**inputs).logits[0, -1]
    reference = of.original_logits(orig, ids, of.original_pixels(orig, sample_image()))
    vocab = reference.shape[0]
    assert (served[:vocab] - reference).abs().max().item() < 1e-5
    assert served.argmax().item() == reference.argmax().item()
    # The image matters: another image moves the logits far beyond the tolerance.
    other = of.original_logits(orig, ids, of.original_pixels(orig, sample_image(seed=1)))
    assert (other - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    ("case", "template", "end"),
    [("tinyllava_qwen2", "phi", "<|endoftext|>"), ("tinyllava_gemma", "gemma", "<eos>")],
)
def test_factory_qwen2_and_gemma_get_their_templates(shop, case, template, end) -> None:
    """TinyLLaVA_Factory's `qwen2_base` template is Phi's text and end of turn, its `gemma` that
    text ending each answer with `<eos>`: the converted folder names it and renders it."""
    from tinyllava_med.model.prompts import conversation_segments, stop_strings

    _, dst = shop.convert(case)
    meta = ServedMeta.load(dst)
    assert meta is not None and meta.template == template
    processor = AutoProcessor.from_pretrained(dst)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A lung."}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    prompt = build_prompt(template, QUESTION, [("What?", "A lung.")])
    assert processor.apply_chat_template(messages, tokenize=False) == prompt
    assert f"ASSISTANT: A lung.{end}USER: {QUESTION} ASSISTANT:" in prompt
    assert stop_strings(template) == (end,)
    segments = conversation_segments(template, [("What?", "A lung.")])
    assert [t for t, answer in segments if answer] == [f" A lung.{end}"]


def test_llava_med_v10_logits(shop: Workshop) -> None:
    """LLaVA-Med v1.0: question first, then `<im_start>` + patches + `<im_end>`, whole prompt
    tokenized at once, patch-token embeddings replaced by the linear projector's output; the
    image is not padded (CLIP shortest edge + centre crop only)."""
    orig, dst = shop.convert("llava")
    model, processor = _load(dst)
    start = (
        of.V1_MED_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n###"
        f"Human: {QUESTION}\n<im_start>"
    )
    end = "<im_end>###"
    patches = (orig.image_size // 4) ** 2
    reference_ids = orig.encode(start + "<im_patch>" * patches + end)
    patch_id = orig.encode("<im_patch>")[1]
    served = processor(text=start + "<image>" + end, images=sample_image(), return_tensors="pt")
    image_id = model.config.image_token_id
    expected = [image_id if t == patch_id else t for t in reference_ids]
    assert served["input_ids"][0].tolist() == expected

    with torch.no_grad():
        logits = model(**served).logits[0, -1]
    pixels = of.original_pixels(orig, sample_image())
    assert torch.allclose(served["pixel_values"], pixels, atol=1e-6)
    reference = of.original_logits(orig, reference_ids, pixels, tower="tower", image_id=patch_id)
    assert (logits[: reference.shape[0]] - reference).abs().max().item() < 1e-5
    meta = ServedMeta.load(dst)
    assert meta is not None and meta.vision_weights == "tower" and meta.template == "llava_v1_med"


@pytest.mark.parametrize("case", ["tiny_llava_llama", "tinyllava"])
def test_vision_weights_from_tower_folder(shop: Workshop, case: str) -> None:
    """`vision_weights="tower"` serves what the original code ran (tower read from its folder);
    the default serves the checkpoint's (fine-tuned) tower: both exact, and they differ."""
    orig, dst = shop.convert(case, vision_weights="tower", vision_tower_path=_tower_dir(shop, case))
    model, processor = _load(dst)
    inputs = _served_inputs(processor, orig.template)
    ids = of.tokenizer_image_token(build_prompt(orig.template, QUESTION), orig.encode, orig.bos_id)
    pixels = of.original_pixels(orig, sample_image())
    with torch.no_grad():
        served = model(**inputs).logits[0, -1]
    from_tower = of.original_logits(orig, ids, pixels, tower="tower")
    vocab = from_tower.shape[0]
    assert (served[:vocab] - from_tower).abs().max().item() < 1e-5
    if case == "tiny_llava_llama":
        from_checkpoint = of.original_logits(orig, ids, pixels, tower="checkpoint")
        assert (from_checkpoint - from_tower).abs().max().item() > 1e-3
        assert model.config.vision_config.num_hidden_layers == 2  # 3-layer tower minus the last
    meta = ServedMeta.load(dst)
    assert meta is not None and meta.vision_weights == "tower"


def _tower_dir(shop: Workshop, case: str) -> Path:
    orig = shop.original(case)
    if case != "tinyllava":
        return orig.tower_folder
    folder = shop.root / "factory-siglip-tower"  # Factory names a hub id: give the tower locally
    if not folder.exists():
        written = of.write_tower_folder(folder, orig.tower_config, seed=99)
        orig.tower_from_folder = written
    return folder


# ---------------------------------------------------------------------------------------------
# What the served folder says about itself


def test_served_config_and_meta(shop: Workshop) -> None:
    orig, dst = shop.convert("tiny_llava_llama")
    config = json.loads((dst / "config.json").read_text())
    assert config["vision_feature_layer"] == -1
    assert config["vision_feature_select_strategy"] == "full"
    assert config["vision_config"]["num_hidden_layers"] == 2
    assert config["vision_config"]["vision_use_head"] is False
    assert config["projector_hidden_act"] == "gelu"
    meta = ServedMeta.load(dst)
    assert meta is not None
    assert (meta.template, meta.source_format, meta.vision_weights) == (
        "v1",
        "tiny_llava",
        "checkpoint",
    )
    assert meta.source_hash and meta.source_hash.startswith("sha256:")
    assert "2 layers of 3" in (meta.notes or "")
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.pad_token is not None

    _, mistral = shop.convert("llava_mistral")
    config = json.loads((mistral / "config.json").read_text())
    assert (
        config["vision_feature_layer"] == -2
        and config["vision_feature_select_strategy"] == "default"
    )
    assert config["text_config"]["vocab_size"] % 64 == 0
    assert config["image_seq_length"] == 16  # 16 px / patch 4, CLS dropped


def test_vocabulary_padding(shop: Workshop) -> None:
    orig, dst = shop.convert("llava_mistral")
    model, processor = _load(dst)
    vocab = orig.llm.config.vocab_size
    image_id = model.config.image_token_id
    assert image_id == vocab  # appended after the sentencepiece vocabulary
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] % 64 == 0 and embed.shape[0] > vocab
    mean = orig.llm.get_input_embeddings().weight.mean(0)
    assert torch.allclose(embed[vocab:], mean.expand(embed.shape[0] - vocab, -1), atol=1e-6)
    # Phi-2 / StableLM-2 style: rows beyond the tokenizer already; <image> takes one, no growth.
    orig, dst = shop.convert("tiny_llava_phi")
    config = json.loads((dst / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == orig.llm.config.vocab_size


def test_dtype_kept_or_cast(shop: Workshop) -> None:
    _, dst = shop.convert("tiny_llava_phi", dtype="bf16")
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    _, dst = shop.convert("tiny_llava_phi")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"


def test_detect_format(shop: Workshop) -> None:
    expected = {
        "llava_mistral": "llava_mistral",
        "llava": "llava",
        "tiny_llava_phi": "tiny_llava",
        "tiny_llava_stablelm": "tiny_llava",
        "tinyllava": "tinyllava",
    }
    for case, fmt in expected.items():
        assert detect_format(shop.original(case).folder) == fmt
    _, dst = shop.convert("tiny_llava_phi")
    assert detect_format(dst) == "served"
    with pytest.raises(ConversionError, match="already in the served format"):
        convert_checkpoint(dst, shop.root / "again")


# ---------------------------------------------------------------------------------------------
# Every weight exactly once


def _copy(shop: Workshop, case: str, name: str) -> Path:
    folder = shop.root / name
    shutil.copytree(shop.original(case).folder, folder)
    return folder


def _edit_safetensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("model-*.safetensors")):
        state = load_file(str(path))
        edit(state, path.name)
        save_file(state, str(path), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    weight_map = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            weight_map |= dict.fromkeys(f.keys(), path.name)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_leftover_weight_fails_naming_it(shop: Workshop) -> None:
    folder = _copy(shop, "llava_mistral", "leftover")

    def add(state, name):
        if name.startswith("model-00001"):
            state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
            state["vision_resampler.probe"] = torch.zeros(2)

    _edit_safetensors(folder, add)
    with pytest.raises(ConversionError, match=r"vision_resampler\.probe"):
        convert_checkpoint(
            folder,
            shop.root / "leftover-out",
            vision_tower_path=shop.original("llava_mistral").tower_folder,
        )

    def drop_resampler(state, name):
        state.pop("vision_resampler.probe", None)

    _edit_safetensors(folder, drop_resampler)
    with pytest.raises(ConversionError, match=r"model\.mm_projector\.4\.weight"):
        convert_checkpoint(
            folder,
            shop.root / "leftover-out",
            vision_tower_path=shop.original("llava_mistral").tower_folder,
        )


def test_missing_weight_fails_naming_it(shop: Workshop) -> None:
    folder = _copy(shop, "llava_mistral", "missing")

    def drop(state, name):
        state.pop("model.mm_projector.2.bias", None)
        state.pop("model.layers.1.mlp.up_proj.weight", None)

    _edit_safetensors(folder, drop)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(
            folder,
            shop.root / "missing-out",
            vision_tower_path=shop.original("llava_mistral").tower_folder,
        )
    assert "model.multi_modal_projector.linear_2.bias" in str(error.value)
    assert "model.language_model.layers.1.mlp.up_proj.weight" in str(error.value)


def test_tower_with_wrong_layer_count_fails(shop: Workshop) -> None:
    folder = _copy(shop, "tiny_llava_llama", "wrong-layers")
    config = json.loads((folder / "config.json").read_text())
    tower = shop.root / "siglip-4-layers"
    of.write_tower_folder(tower, of.tiny_siglip_config(layers=4), seed=5)
    config["mm_vision_tower"] = str(tower)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="2 layers, expected 3"):
        convert_checkpoint(folder, shop.root / "wrong-layers-out")


# ---------------------------------------------------------------------------------------------
# Tokenization around the image


def test_prompt_ids_multi_turn_llava_med(shop: Workshop) -> None:
    """LLaVA-Med's fast legacy tokenizer prepends `▁` after every special token (also `</s>`)."""
    orig, dst = shop.convert("llava_mistral")
    processor = AutoProcessor.from_pretrained(dst)
    history = [("What is this image?", "A chest x-ray.")]
    prompt = build_prompt("mistral_instruct", QUESTION, history)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": history[0][0]}]},
        {"role": "assistant", "content": [{"type": "text", "text": history[0][1]}]},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == prompt
    served = processor(text=prompt, images=sample_image(), return_tensors="pt")["input_ids"][
        0
    ].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    original = of.tokenizer_image_token(prompt, orig.encode, orig.bos_id)
    assert _collapse(served, image_id) == original
    tokens = processor.tokenizer.convert_ids_to_tokens(served)
    at = tokens.index("<image>")
    assert (
        tokens[0] == "<s>"
        and tokens[1].startswith("▁")
        and tokens[at - 1] == "▁"
        and tokens[at + 16 : at + 18] == ["▁", "<0x0A>"]
    )


def test_prompt_ids_tinyllava_single_turn_and_multi_turn(shop: Workshop) -> None:
    """TinyLLaVA used the slow LlamaTokenizer with `legacy: false`, called once per chunk: every
    chunk starts with `▁`, but a piece after `</s>` inside a chunk does not. The served
    tokenizer, loaded as transformers loads it, gives the same ids for one turn and for several."""
    orig, dst = shop.convert("tiny_llava_llama")
    processor = AutoProcessor.from_pretrained(dst)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    slow_legacy_false = of.slow_legacy_false_encoder(orig.folder)

    def original(prompt: str) -> list[int]:
        return of.tokenizer_image_token(prompt, slow_legacy_false, orig.bos_id)

    def served(prompt: str) -> list[int]:
        ids = processor(text=prompt, images=sample_image(), return_tensors="pt")["input_ids"]
        return _collapse(ids[0].tolist(), image_id)

    single = build_prompt("v1", QUESTION)
    assert served(single) == original(single)
    history = [("What is this image?", "A chest x-ray."), ("Which side?", "The left lung.")]
    multi = build_prompt("v1", QUESTION, history)
    got, want = served(multi), original(multi)
    assert got == want
    # Each earlier turn's </s> is followed by "USER" without the dummy prefix, as originally;
    # the legacy tokenizer (LLaVA-Med's) would have put one there.
    eos = [i for i, t in enumerate(got) if t == processor.tokenizer.eos_token_id]
    assert len(eos) == 2
    after = processor.tokenizer.convert_ids_to_tokens([got[i + 1] for i in eos])
    assert all(not t.startswith("▁") for t in after), after
    assert got != of.tokenizer_image_token(multi, orig.encode, orig.bos_id)
    # A `</s>` typed inside a question is split off the same way; and texts as they reach the
    # tokenizer: led by spaces, by a special token, spaces around one
    odd = build_prompt("v1", "mass</s>or not?", history)
    assert served(odd) == original(odd)
    for text in (" Hello</s> x", "  two  spaces", "</s>USER: a", "a </s> b", "x</s>", "<s>y"):
        assert processor.tokenizer(text)["input_ids"] == slow_legacy_false(text), text
    # transformers 5's own LlamaTokenizer(legacy=False) is not that: it gives no extra `▁` to a
    # text led by a space
    fast_legacy_false = LlamaTokenizer.from_pretrained(orig.folder)
    assert fast_legacy_false(" Hello").input_ids != slow_legacy_false(" Hello")
    tok = processor.tokenizer
    answer = tok("The left lung.</s>", add_special_tokens=False)["input_ids"]
    assert tok.decode(answer, skip_special_tokens=True) == "The left lung."


@pytest.mark.parametrize(
    "case", ["llava_mistral", "tiny_llava_llama", "tiny_llava_phi", "tiny_llava_stablelm"]
)
def test_training_ids_start_as_the_served_prompt(shop: Workshop, case: str) -> None:
    """A training sample's prompt is tokenized as the server tokenizes a question: Llama's and
    Mistral's start with BOS, Phi-2's and StableLM-2's with no special token (their BOS is
    defined but never added, at inference nor in the original training)."""
    from tinyllava_med.training.data import encode_conversation, num_image_tokens

    orig, dst = shop.convert(case)
    processor = AutoProcessor.from_pretrained(dst)
    served = _served_inputs(processor, orig.template)["input_ids"][0].tolist()
    ids, labels = encode_conversation(
        processor.tokenizer, orig.template, [(QUESTION, "yes")], num_image_tokens(processor)
    )
    assert ids[: len(served)] == served
    assert labels[: len(served)] == [-100] * len(served)  # the prompt is not supervised


@pytest.mark.parametrize(
    "case", ["llava_mistral", "tiny_llava_llama", "tiny_llava_phi", "tiny_llava_stablelm"]
)
def test_training_ids_of_a_conversation_are_the_served_ids(shop: Workshop, case: str) -> None:
    """A multi-turn training sample has the ids the server gives the same conversation's text
    (each answer and the next question in context, not tokenized alone); only the answers and
    their end markers are supervised. For TinyLLaVA (`legacy: false`) that is also what the
    original's chunked slow tokenizer gave."""
    from tinyllava_med.model.prompts import conversation_segments
    from tinyllava_med.training.data import encode_conversation, num_image_tokens

    orig, dst = shop.convert(case)
    processor = AutoProcessor.from_pretrained(dst)
    tok = processor.tokenizer
    turns = [("What is this image?", "A chest x-ray."), (QUESTION, "No."), ("Size?", "3 cm")]
    segments = conversation_segments(orig.template, list(turns))
    text = "".join(t for t, _ in segments)
    served = processor(text=text, images=sample_image(), return_tensors="pt")["input_ids"]
    ids, labels = encode_conversation(tok, orig.template, turns, num_image_tokens(processor))
    assert ids == served[0].tolist()
    supervised = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    answers = "".join(t for t, is_answer in segments if is_answer)
    assert tok.decode(supervised).strip() == answers.strip()
    if case == "tiny_llava_llama":
        want = of.tokenizer_image_token(
            text, of.slow_legacy_false_encoder(orig.folder), orig.bos_id
        )
        assert _collapse(ids, tok.convert_tokens_to_ids("<image>")) == want


# ---------------------------------------------------------------------------------------------
# The processor


@pytest.mark.parametrize(
    ("spec", "pad"),
    [
        ("clip", True),
        ("siglip", True),
        ("clip", False),
        (
            ImageProcessorSpec(
                (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), center_crop=False, cls_token=False
            ),
            True,
        ),
    ],
)
def test_image_processor_matches_expand2square_reference(spec, pad: bool) -> None:
    from tinyllava_med.model.processor import VISION_SPECS

    resolved = VISION_SPECS[spec] if isinstance(spec, str) else spec
    processor = build_image_processor(resolved, 32, pad=pad)
    for size in [(45, 20), (17, 40), (32, 32)]:
        image = sample_image(*size, seed=sum(size))
        got = processor(image, return_tensors="pt")["pixel_values"]
        want = of.reference_pixels(
            image,
            resolved.image_mean,
            resolved.image_std,
            32,
            center_crop=resolved.center_crop,
            pad=pad,
        )
        assert got.shape == (1, 3, 32, 32)
        assert torch.allclose(got, want, atol=1e-5), (spec, pad, size)


@pytest.mark.parametrize("case", ["llava_mistral", "llava", "tinyllava"])
def test_batch_inputs_from_pixel_values_equal_the_processor(shop: Workshop, case: str) -> None:
    """The server's split (per-image `pixel_values` ahead, `batch_inputs` per batch) feeds the
    model exactly what the served processor would: CLIP with CLS (LLaVA-Med v1.5), v1.0's
    `<im_start>` wrapping, SigLIP (TinyLLaVA); prompts of different lengths, left padding."""
    orig, dst = shop.convert(case)
    processor = AutoProcessor.from_pretrained(dst, backend="pil")
    processor.tokenizer.padding_side = "left"
    images = [sample_image(23, 14, seed=3), sample_image(9, 31, seed=4), sample_image(seed=5)]
    prompts = [
        build_prompt(orig.template, QUESTION),
        build_prompt(orig.template, "What is the modality?", [("Which organ?", "chest")]),
        build_prompt(orig.template, "Is there a fracture in the left knee?"),
    ]
    want = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    got = batch_inputs(processor, prompts, [pixel_values(processor, im) for im in images])
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (want["input_ids"] == processor.tokenizer.pad_token_id).any()  # padding was tested
    h, w = want["pixel_values"].shape[-2:]
    assert output_pixels(processor) == h * w  # what the engine weighs to prepare on the loop
    with pytest.raises(ValueError, match="exactly one"):
        batch_inputs(processor, ["no image here"], [pixel_values(processor, images[0])])


class _Store(dict):
    def get(self, key, *, count_miss=False):
        return super().get(key)

    def put(self, key, value):
        self[key] = value


@pytest.mark.parametrize("case", ["llava_mistral", "llava", "tinyllava"])
def test_follow_up_questions_reuse_the_prompt_up_to_the_image(
    shop: Workshop, case: str, monkeypatch
) -> None:
    """A lone question about an image whose attention cache up to the image is stored computes
    only its own words: the vision tower does not run again, and every answer (first question,
    follow-ups, one with an earlier turn) is exactly the answer without the cache. For each
    original prompt format: CLIP with CLS and SigLIP put the image before the question, so
    follow-ups share it; LLaVA-Med v1.0 puts it after the question (`<im_start>` wrapping), so
    only the same question again (a regenerated answer) does."""
    from tinyllava_med.model.generate import SamplingParams, generate
    from tinyllava_med.model.load import load_model
    from tinyllava_med.model.prefixes import cache_bytes

    _, dst = shop.convert(case)
    lm = load_model(str(dst), quant="none", device="cpu")
    tower_runs = []
    tower = lm.model.model.vision_tower
    monkeypatch.setattr(tower, "forward", _counting(tower.forward, tower_runs))
    image, params = sample_image(23, 14, seed=3), SamplingParams(max_new_tokens=6)
    store = _Store()
    asks = [
        ("Which organ is shown?", []),
        ("Is there a fracture in the left knee?", []),
        ("What is the modality?", [("Which organ?", "chest")]),
    ]
    for i, (question, history) in enumerate(asks):
        want = generate(lm, [image], [question], params, histories=[history])[0]
        runs = len(tower_runs)
        got = generate(
            lm, [image], [question], params, histories=[history], prefixes=store, image_keys=["x"]
        )[0]
        assert (got.text, got.prompt_tokens, got.new_tokens) == (
            want.text,
            want.prompt_tokens,
            want.new_tokens,
        )
        image_first = case != "llava"
        assert len(tower_runs) - runs == (1 if i == 0 or not image_first else 0)
    runs = len(tower_runs)
    again = generate(lm, [image], [asks[0][0]], params, prefixes=store, image_keys=["x"])[0]
    assert (
        len(tower_runs) == runs
        and again.text == generate(lm, [image], [asks[0][0]], params)[0].text
    )
    assert len(store) == (1 if image_first else 3)
    assert all(cache_bytes(cache) > 0 for cache in store.values())
    # a batch: rows of different lengths (padding between each prefix and its own words), one
    # image already stored and one new, one row with an earlier turn
    other = sample_image(9, 31, seed=4)
    questions = ["Is there a fracture in the left knee?", "Which organ?"]
    histories = [[], [("Which organ?", "chest")]]
    want = generate(lm, [image, other], questions, params, histories=histories)
    runs, stored, before = len(tower_runs), len(store), set(store)
    got = generate(
        lm,
        [image, other],
        questions,
        params,
        histories=histories,
        prefixes=store,
        image_keys=["x", "y"],
    )
    assert [(a.text, a.prompt_tokens) for a in got] == [(a.text, a.prompt_tokens) for a in want]
    opening = (None, tuple(template_prefix(lm).tolist()))
    if image_first:
        assert len(tower_runs) - runs == 1 and len(store) == stored + 1  # only the new image
    else:  # images at different places: only the template's opening is shared
        assert len(tower_runs) - runs == 1 and set(store) - before == {opening}
    before, had = set(store), opening in store
    generate(lm, [image], ["a?"], params, prefixes=store, image_keys=[None])
    # an unnamed image is not cached; the template's opening is, where it is long enough to pay
    pays = not had and len(opening[1]) >= MIN_TEMPLATE_PREFIX
    assert set(store) - before == ({opening} if pays else set())


@pytest.mark.parametrize("case", ["llava_mistral", "llava", "tinyllava"])
def test_an_image_prefilled_ahead_serves_its_first_question(
    shop: Workshop, case: str, monkeypatch
) -> None:
    """`prefill_image` stores what a question about the image would: the first question then
    runs no vision tower and answers exactly as without it, alone or with an earlier turn. LLaVA-
    Med v1.0 puts the image after the question, so no prompt up to the image is shared: it is
    refused there (and `image_prefix_shared` says so)."""
    from tinyllava_med.model.generate import SamplingParams, generate, prepare_image
    from tinyllava_med.model.load import load_model
    from tinyllava_med.model.prefixes import image_prefix_shared, prefill_image

    _, dst = shop.convert(case)
    lm = load_model(str(dst), quant="none", device="cpu")
    image, params, store = sample_image(17, 29, seed=5), SamplingParams(max_new_tokens=6), _Store()
    if case == "llava":
        assert not image_prefix_shared(lm)
        with pytest.raises(ValueError, match="up to the image"):
            prefill_image(lm, prepare_image(lm, image), "x", store)
        assert not store
        return
    assert image_prefix_shared(lm)
    assert prefill_image(lm, prepare_image(lm, image), "x", store)
    assert not prefill_image(lm, prepare_image(lm, image), "x", store)  # held already
    assert len(store) == 1
    tower_runs: list[int] = []
    tower = lm.model.model.vision_tower
    monkeypatch.setattr(tower, "forward", _counting(tower.forward, tower_runs))
    for question, history in [
        ("Which organ is shown?", []),
        ("Any fracture?", [("Organ?", "knee")]),
    ]:
        got = generate(
            lm, [image], [question], params, histories=[history], prefixes=store, image_keys=["x"]
        )[0]
        runs = len(tower_runs)
        want = generate(lm, [image], [question], params, histories=[history])[0]
        assert len(tower_runs) == runs + 1  # without the store the tower runs
        assert (got.text, got.prompt_tokens, got.new_tokens) == (
            want.text,
            want.prompt_tokens,
            want.new_tokens,
        )
    assert tower_runs == [1, 1] and len(store) == 1


@pytest.mark.parametrize("case", ["llava_mistral", "llava", "tinyllava"])
def test_every_question_shares_the_template_opening(shop: Workshop, case: str, monkeypatch):
    """Rows whose images are not named reuse the attention cache of their template's opening
    (the system prompt; for LLaVA-Med v1.0 also its example exchange), computed once for all
    questions: the tower still sees every image, and every answer (a batch with padding and an
    earlier turn) is exactly the answer without the cache. LLaVA-Med v1.5's opening, `[INST]`,
    is too short to be worth a cache."""
    from tinyllava_med.model.generate import SamplingParams, generate
    from tinyllava_med.model.load import load_model

    _, dst = shop.convert(case)
    lm = load_model(str(dst), quant="none", device="cpu")
    tower_runs: list[int] = []
    tower = lm.model.model.vision_tower
    monkeypatch.setattr(tower, "forward", _counting(tower.forward, tower_runs))
    images = [sample_image(23, 14, seed=3), sample_image(9, 31, seed=4)]
    questions = ["Is there a fracture in the left knee?", "Which organ?"]
    histories = [[], [("Which organ?", "chest")]]
    params, store = SamplingParams(max_new_tokens=6), _Store()
    want = generate(lm, images, questions, params, histories=histories)
    for _ in range(2):  # computing the opening, then reusing it
        runs = len(tower_runs)
        got = generate(lm, images, questions, params, histories=histories, prefixes=store)
        assert [(a.text, a.prompt_tokens, a.new_tokens) for a in got] == [
            (a.text, a.prompt_tokens, a.new_tokens) for a in want
        ]
        assert len(tower_runs) - runs == 1  # both images in one tower call
    opening = template_prefix(lm)
    if case == "llava_mistral":
        assert len(opening) < MIN_TEMPLATE_PREFIX and not store
    else:
        assert list(store) == [(None, tuple(opening.tolist()))]
        text = lm.processor.tokenizer.decode(opening, skip_special_tokens=True)
        assert text.strip().startswith("A chat between")


def _counting(forward, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return counted


def test_output_pixels_reads_plain_dict_sizes_too() -> None:
    """Image processors from older configs may hold plain dicts, not `SizeDict`s."""
    from types import SimpleNamespace as NS

    clip = NS(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert output_pixels(NS(image_processor=NS(**vars(clip), do_center_crop=True))) == 336 * 336
    assert output_pixels(NS(image_processor=NS(size={"height": 384, "width": 384}))) == 384 * 384
    assert output_pixels(NS(image_processor=NS(size={"shortest_edge": 224}))) == 224 * 224


def test_processor_image_token_counts() -> None:
    assert image_token_count(336, 14, cls_token=True, strategy="default") == 576
    assert image_token_count(384, 14, cls_token=False, strategy="full") == 729
    assert image_token_count(384, 14, cls_token=False, strategy="default") == 728  # Factory "patch"
    assert image_token_count(64, 16, cls_token=False, strategy="full") == 16  # the bundled demo


def test_build_processor_round_trip(tmp_path: Path) -> None:
    from tinyllava_med.model.tiny import build_tokenizer

    tokenizer = build_tokenizer(of.CORPUS * 3, vocab_size=400)
    processor = build_processor(
        tokenizer, template="v1", vision="siglip", image_size=64, num_image_tokens=16
    )
    assert processor.patch_size == 16
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    out = loaded(
        text=build_prompt("v1", QUESTION), images=sample_image(70, 50), return_tensors="pt"
    )
    assert out["pixel_values"].shape == (1, 3, 64, 64)
    assert int((out["input_ids"] == loaded.image_token_id).sum()) == 16
    with pytest.raises(ValueError, match="image tokens"):
        build_processor(
            tokenizer,
            template="v1",
            vision="clip",
            image_size=336,
            patch_size=14,
            num_image_tokens=729,
        )


# ---------------------------------------------------------------------------------------------
# Real shapes, from the released configs (no weights: the model is built on the meta device)

LLAVA_MED_V15_CONFIG = {
    "architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 1024,
    "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_patch_merge_type": "flat",
}  # fmt: skip
TINYLLAVA_15B_CONFIG = {
    "architectures": ["TinyLlavaLlamaForCausalLM"], "model_type": "tiny_llava",
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05, "vocab_size": 32000, "tie_word_embeddings": False,
    "mm_vision_tower": "/home/authors/models/siglip-so400m-patch14-384",
    "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_hidden_size": 1152,
    "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "fmt", "tokens", "layers", "template"),
    [
        (LLAVA_MED_V15_CONFIG, "llava_mistral", 576, 24, "mistral_instruct"),
        (TINYLLAVA_15B_CONFIG, "tiny_llava", 729, 26, "v1"),
    ],
)
def test_real_shaped_plans(tmp_path: Path, config, fmt, tokens, layers, template) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tinyllava_med.model.convert_formats import (
        format_of_config,
        plan_conversion,
        served_vision_config,
    )

    assert format_of_config(config) == fmt
    plan = plan_conversion(fmt, config, tmp_path)
    assert plan.template == template and plan.pad
    count = image_token_count(
        plan.image_size,
        plan.patch_size,
        cls_token=plan.image_spec.cls_token,
        strategy=plan.strategy,
    )
    assert count == tokens
    keep = plan.vision_config["num_hidden_layers"] - int(plan.drop_last_layer)
    assert keep == layers
    vision = served_vision_config(plan, keep, use_head=False)
    llava = LlavaConfig(
        vision_config=vision,
        text_config=plan.text_config,
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.strategy,
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava)
    params = sum(p.numel() for p in model.parameters())
    assert 7.4e9 < params < 7.7e9 if fmt == "llava_mistral" else 1.4e9 < params < 1.6e9
