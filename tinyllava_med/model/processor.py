"""The served processor: the one place that builds tokenizer + image processor + chat template.

`build_processor` returns a transformers `LlavaProcessor` that reproduces what the original code
fed its vision tower and LLM (FIDELITY.md):

- images: `LlavaImageProcessorPil`, padded to a centred square with colour `int(mean * 255)`
  (the originals' `expand2square`, `image_aspect_ratio: pad`), then CLIP-style (shortest edge +
  centre crop) or SigLIP-style (resize to a square) bicubic resize, rescale and normalise;
- text: the chat template of `prompts.chat_template(template)`, and `<image>` expanded to as many
  placeholder tokens as the tower yields features (576 for CLIP-336 without CLS, 729 for
  SigLIP-384, 16 for the bundled demo's 64 px / patch 16 tower).

`pixel_values` and `batch_inputs` split what the processor does for a batch in two: the costly
per-image half (pad, resize, normalise: 0.5 ms for a 128 px image, 70 ms for a 2000 px
radiograph on one CPU core) and the cheap per-batch half (expand the image token, tokenise,
stack). The server does the first as each request arrives, cached per image, so the engine's
batch does not wait for it; `batch_inputs(pixel_values(...))` equals the processor's own output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    BatchFeature,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from tinyllava_med.model.prompts import IMAGE_TOKEN, chat_template

SelectStrategy = Literal["default", "full"]


@dataclass(frozen=True)
class ImageProcessorSpec:
    """How an original vision tower saw its input (apart from the size, which varies per tower)."""

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    center_crop: bool  # True: resize shortest edge + centre crop (CLIP); False: resize to a square
    cls_token: bool  # the tower's output starts with a CLS token (CLIP) that is not a patch
    resample: int = PILImageResampling.BICUBIC


CLIP_SPEC = ImageProcessorSpec(tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD), True, True)
SIGLIP_SPEC = ImageProcessorSpec((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False, False)
VISION_SPECS: dict[str, ImageProcessorSpec] = {"clip": CLIP_SPEC, "siglip": SIGLIP_SPEC}


def add_image_token(tokenizer: PreTrainedTokenizerBase, token: str = IMAGE_TOKEN) -> int:
    """Make `token` a special, never-split token of `tokenizer` (added if missing); return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens(
            [AddedToken(token, special=True, normalized=False)], special_tokens=True
        )
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def image_token_count(
    image_size: int, patch_size: int, *, cls_token: bool, strategy: SelectStrategy
) -> int:
    """Features the tower + `vision_feature_select_strategy` yield (as `LlavaProcessor` counts them)."""
    count = (image_size // patch_size) ** 2 + int(cls_token)
    return count - 1 if strategy == "default" else count


def _patch_size_for(
    image_size: int, num_image_tokens: int, *, cls_token: bool, strategy: SelectStrategy
) -> int:
    grid_tokens = num_image_tokens - int(cls_token) + int(strategy == "default")
    side = math.isqrt(max(grid_tokens, 0))
    if side < 1 or side * side != grid_tokens or image_size % side:
        raise ValueError(
            f"{num_image_tokens} image tokens do not fit a square patch grid on {image_size} px "
            f"(cls_token={cls_token}, strategy={strategy!r}); pass patch_size instead"
        )
    return image_size // side


def build_image_processor(
    spec: ImageProcessorSpec, image_size: int, *, pad: bool = True
) -> LlavaImageProcessorPil:
    """The PIL image processor for one tower: pad to square (mean colour), resize, normalise."""
    square = {"height": image_size, "width": image_size}
    return LlavaImageProcessorPil(
        do_convert_rgb=True,
        do_pad=pad,
        do_resize=True,
        size={"shortest_edge": image_size} if spec.center_crop else dict(square),
        resample=spec.resample,
        do_center_crop=spec.center_crop,
        crop_size=dict(square),
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    vision: Literal["clip", "siglip"] | ImageProcessorSpec,
    image_size: int,
    patch_size: int | None = None,
    num_image_tokens: int | None = None,
    vision_feature_select_strategy: SelectStrategy | None = None,
    pad: bool = True,
    image_token: str = IMAGE_TOKEN,
) -> LlavaProcessor:
    """The served `LlavaProcessor` for a tower of `image_size` px.

    Give `patch_size` or `num_image_tokens` (or both, which must agree). The select strategy
    defaults to the model's: `"default"` (drop the CLS token) for CLIP, `"full"` for SigLIP;
    it must equal the model config's `vision_feature_select_strategy`. `pad=False` skips the
    pad-to-square step (originals without `image_aspect_ratio: pad`). `image_token` is added to
    `tokenizer` as a special token if missing.
    """
    spec = VISION_SPECS[vision] if isinstance(vision, str) else vision
    strategy: SelectStrategy = vision_feature_select_strategy or (
        "default" if spec.cls_token else "full"
    )
    if patch_size is None:
        if num_image_tokens is None:
            raise ValueError("build_processor needs patch_size or num_image_tokens")
        patch_size = _patch_size_for(
            image_size, num_image_tokens, cls_token=spec.cls_token, strategy=strategy
        )
    count = image_token_count(image_size, patch_size, cls_token=spec.cls_token, strategy=strategy)
    if num_image_tokens is not None and count != num_image_tokens:
        raise ValueError(
            f"image tokens: expected {num_image_tokens}, but {image_size} px / patch {patch_size} "
            f"(cls_token={spec.cls_token}, strategy={strategy!r}) gives {count}"
        )
    add_image_token(tokenizer, image_token)
    return LlavaProcessor(
        image_processor=build_image_processor(spec, image_size, pad=pad),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template(template),
        image_token=image_token,
        num_additional_image_tokens=int(spec.cls_token),
    )


def output_pixels(processor: LlavaProcessor) -> int:
    """Pixels per image that `pixel_values` makes (its cost grows with them as with the input's):
    the crop when it crops, else the resize target (a shortest edge counts as a square)."""
    ip = processor.image_processor
    dims = _dims(ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size)
    height, width = dims["height"], dims["width"]
    if height and width:
        return int(height * width)
    return int(dims["shortest_edge"] or 0) ** 2


def pixel_values(processor: LlavaProcessor, image: Image.Image) -> torch.Tensor:
    """What the vision tower sees of one image: the processor's pixel values, [3, H, W] float32.

    The same values, bit for bit, as `processor.image_processor(images=[image])`, computed
    directly where `_square_target` says its steps reduce to pad, resize, scale and normalise
    (every processor `build_image_processor` makes, when padded; the library's own path
    otherwise). A grayscale image (CT, MR, radiographs) is resized as one channel, not three:
    the channels are equal, and so are their resized values. On a server every question's image
    goes through here, small ones on the event loop: for a 128 px slice to the demo's 64 px this
    takes a quarter of the library's 0.8 ms, for a 512 px slice to 384 px half of its time.
    """
    ip = processor.image_processor
    side = _square_target(ip, image.size)
    if side is None:
        out = ip(images=[image.convert("RGB")], return_tensors="pt")
        return out["pixel_values"][0]
    fill = tuple(int(x * 255) for x in ip.image_mean)  # `pad_to_square`'s background
    gray = image.mode == "L" and (image.width == image.height or len(set(fill)) == 1)
    work = image if gray else image.convert("RGB")
    if ip.do_pad and work.width != work.height:  # centred, as `pad_to_square` places it
        square = max(work.size)
        canvas = Image.new(work.mode, (square, square), fill[0] if gray else fill)
        canvas.paste(work, ((square - work.width) // 2, (square - work.height) // 2))
        work = canvas
    if work.size != (side, side):
        work = work.resize((side, side), resample=ip.resample)
    channels = np.asarray(work)[None] if gray else np.asarray(work).transpose(2, 0, 1)
    # `rescale` (in float64, then float32) and `normalize` (in float32), as the library does
    scaled = (np.ascontiguousarray(channels).astype(np.float64) * ip.rescale_factor).astype(
        np.float32
    )
    mean = np.asarray(ip.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((scaled - mean) / std)


def _square_target(ip: object, size: tuple[int, int]) -> int | None:
    """The side of the square that `ip` resizes an image of `size` to, when its steps are only
    (pad to square,) resize, rescale and normalise, with nothing this module does not reproduce
    exactly; else None. A shortest-edge resize plus a centre crop of the same side qualifies
    once the image is square (padded, or square already): the crop then takes all of it."""
    if type(ip) is not LlavaImageProcessorPil:  # a subclass may add steps
        return None
    if not (ip.do_resize and ip.do_rescale and ip.do_normalize):
        return None
    mean, std = ip.image_mean, ip.image_std
    if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple))):
        return None
    if len(mean) != 3 or len(std) != 3 or not isinstance(ip.resample, int):
        return None
    size_, crop = _dims(ip.size), _dims(ip.crop_size)
    crop_side = crop["height"] if crop["height"] == crop["width"] else None
    square = bool(ip.do_pad) or size[0] == size[1]
    if size_["height"] and size_["width"] and not size_["shortest_edge"]:
        side = size_["height"]
        if size_["width"] != side or (ip.do_center_crop and crop_side != side):
            return None
        return side
    if size_["shortest_edge"] and not size_["longest_edge"] and square and ip.do_center_crop:
        side = size_["shortest_edge"]
        return side if crop_side == side else None
    return None


def _dims(size: object) -> dict[str, int | None]:
    """The sides an image processor's `size` or `crop_size` gives: a `SizeDict` as transformers
    5 makes them, or a plain dict as older configs hold."""
    keys = ("height", "width", "shortest_edge", "longest_edge")
    if isinstance(size, dict):
        return {k: size.get(k) for k in keys}
    return {k: getattr(size, k, None) for k in keys}


def batch_inputs(
    processor: LlavaProcessor, prompts: list[str], pixels: list[torch.Tensor]
) -> BatchFeature:
    """`processor(images=..., text=prompts, padding=True, return_tensors="pt")`, from each
    prompt's image already turned into `pixel_values`: every prompt holds one image token, which
    the processor's own `replace_image_token` expands (it reads only the pixel array's shape)."""
    if len(prompts) != len(pixels):
        raise ValueError(f"got {len(prompts)} prompts but {len(pixels)} images")
    token = processor.image_token
    texts = []
    for prompt, pv in zip(prompts, pixels, strict=True):
        if prompt.count(token) != 1:
            raise ValueError(f"a prompt must hold exactly one {token}")
        shape_only = {"pixel_values": [np.broadcast_to(np.float32(0), tuple(pv.shape))]}
        texts.append(prompt.replace(token, processor.replace_image_token(shape_only, 0)))
    encoded = processor.tokenizer(texts, padding=True, return_tensors="pt")
    return BatchFeature({**encoded, "pixel_values": torch.stack(pixels)})
