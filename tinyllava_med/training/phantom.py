"""PhantomVQA: a deterministic synthetic radiology VQA set (images + questions), written to disk.

This module owns the PhantomVQA benchmark: the four phantom kinds and how they are drawn, the
question templates and answer vocabularies, and the on-disk format. It is the benchmark every
model variant is compared on and the training data of the bundled demo model
(`tinyllava-med data phantom --out DIR --n N --seed S` calls `generate_phantom(DIR, N, S)`).

Layout written by `generate_phantom(out_dir, n, seed)`::

    out_dir/train.json    flat list, one entry per question (VQA-RAD converted to LLaVA format)
    out_dir/test.json     same, for the held-out images (no image is in both splits)
    out_dir/images/       phantom-<seed>-<index>.png, 8-bit greyscale; "image" is relative here

One entry::

    {"id": "phantom-<seed>-<image index>-<question index>", "image": "phantom-0-00042.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs there a pleural effusion?"},
                       {"from": "gpt", "value": "yes"}],
     "answer_type": "CLOSED", "question_type": "presence", "modality": "x-ray", "organ": "chest"}

Phantoms (64x64 by default, every structure jittered in position, size and intensity, plus
global shift, contrast, brightness and Gaussian noise):

- chest x-ray (PA): dark lungs, mediastinum, heart, clavicles, rib hints; finding `nodule`
  (1 or 2 bright blobs, two nodules always in different 16 px patches) or `effusion` (a bright,
  meniscus-shaped base filling the bottom of one lung);
- head CT (axial): bright skull ring, grey brain, ventricles, falx; finding `hemorrhage`
  (a bright blob in one hemisphere);
- abdominal CT (axial): body ellipse, liver, spleen, kidneys, aorta, spine; finding `mass`
  (a dark round lesion in the liver or in the left upper abdomen);
- knee MRI (coronal T1): femur, tibia, fibula, soft tissue; finding `fracture` (a dark oblique
  line across the femur or the tibia; not lateralised).

Half of the images are normal (finding `none`).

Side convention (radiological): images are displayed as if facing the patient, so the
PATIENT'S RIGHT IS ON THE IMAGE LEFT and the patient's left is on the image right. Every
answer about sides ("left"/"right") names the patient's side. `render_case` returns the
finding's pixel mask so the convention can be checked against the geometry.

Everything is a pure function of `(seed, image index)`: the same seed writes the same bytes,
another seed gives other images.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

Kind = Literal["chest_xray", "head_ct", "abdomen_ct", "knee_mri"]
Side = Literal["left", "right"]
AnswerType = Literal["CLOSED", "OPEN"]

KINDS: tuple[Kind, ...] = ("chest_xray", "head_ct", "abdomen_ct", "knee_mri")
MODALITY_OF: dict[str, str] = {
    "chest_xray": "x-ray",
    "head_ct": "ct",
    "abdomen_ct": "ct",
    "knee_mri": "mri",
}
ORGAN_OF: dict[str, str] = {
    "chest_xray": "chest",
    "head_ct": "head",
    "abdomen_ct": "abdomen",
    "knee_mri": "knee",
}
# Findings each kind can show, with their probability given that the image is abnormal.
FINDINGS_OF: dict[str, tuple[tuple[str, float], ...]] = {
    "chest_xray": (("nodule", 2 / 3), ("effusion", 1 / 3)),
    "head_ct": (("hemorrhage", 1.0),),
    "abdomen_ct": (("mass", 1.0),),
    "knee_mri": (("fracture", 1.0),),
}
LATERALISED: frozenset[str] = frozenset({"nodule", "effusion", "hemorrhage", "mass"})
ABNORMAL_FRACTION = 0.5

MODALITIES: tuple[str, ...] = ("x-ray", "ct", "mri")
ORGANS: tuple[str, ...] = ("chest", "head", "abdomen", "knee")
FINDINGS: tuple[str, ...] = ("nodule", "effusion", "hemorrhage", "mass", "fracture", "none")
COUNTS: tuple[str, ...] = ("0", "1", "2")
SIDES: tuple[str, ...] = ("left", "right")
YES_NO: tuple[str, ...] = ("yes", "no")

QUESTION_TYPES: tuple[str, ...] = (
    "modality",
    "organ",
    "abnormal",
    "finding",
    "presence",
    "side",
    "count",
)
# question_type -> answer_type -> allowed answers. Yes/no questions are CLOSED; "which side"
# (left/right) is OPEN, because LLaVA-Med's closed metric only scores yes/no answers.
ANSWER_VOCAB: dict[str, dict[str, frozenset[str]]] = {
    "modality": {"OPEN": frozenset(MODALITIES), "CLOSED": frozenset(YES_NO)},
    "organ": {"OPEN": frozenset(ORGANS), "CLOSED": frozenset(YES_NO)},
    "abnormal": {"CLOSED": frozenset(YES_NO)},
    "finding": {"OPEN": frozenset(FINDINGS)},
    "presence": {"CLOSED": frozenset(YES_NO)},
    "side": {"CLOSED": frozenset(YES_NO), "OPEN": frozenset(SIDES)},
    "count": {"OPEN": frozenset(COUNTS)},
}

# ---------------------------------------------------------------------------------------------
# Question templates (several phrasings per type; one is drawn per question)
# ---------------------------------------------------------------------------------------------
_MODALITY_OPEN = (
    "What imaging modality is this?",
    "What type of imaging is this?",
    "What kind of scan is this?",
    "What is the modality of this image?",
    "How was this image taken?",
)
_MODALITY_NAMES: dict[str, tuple[str, ...]] = {
    "x-ray": ("an x-ray", "a radiograph", "a plain film"),
    "ct": ("a CT scan", "a CT image", "a computed tomography scan"),
    "mri": ("an MRI", "an MR image", "a magnetic resonance image"),
}
# The modality a "no" question names. Half of the images are CT, so asking every non-CT image
# about CT (and CT images about x-ray or MRI) makes each modality's question yes half the time.
_MODALITY_DECOYS: dict[str, tuple[str, ...]] = {
    "x-ray": ("ct",),
    "mri": ("ct",),
    "ct": ("x-ray", "mri"),
}
_MODALITY_CLOSED = ("Is this {name}?", "Is this image {name}?", "Was this taken as {name}?")
_ORGAN_OPEN = (
    "What part of the body is shown?",
    "Which body region is imaged?",
    "What body part is this?",
    "What region of the body is in this image?",
    "What organ system is pictured?",
)
_ORGAN_NAMES: dict[str, tuple[str, ...]] = {
    "chest": ("chest", "thorax"),
    "head": ("head", "brain"),
    "abdomen": ("abdomen",),
    "knee": ("knee",),
}
_ORGAN_CLOSED = (
    "Is this an image of the {name}?",
    "Does this image show the {name}?",
    "Is the {name} shown here?",
)
# (question, answer is "yes" when the image is normal)
_ABNORMAL: tuple[tuple[str, bool], ...] = (
    ("Is this image normal?", True),
    ("Is this a normal study?", True),
    ("Is there an abnormality?", False),
    ("Is anything abnormal in this image?", False),
    ("Are there any abnormal findings?", False),
)
_FINDING_OPEN = (
    "What abnormality is seen?",
    "What is the main finding?",
    "What is abnormal in this image?",
    "What pathology is present?",
    "What is the finding?",
)
_PRESENCE: dict[str, tuple[str, ...]] = {
    "nodule": (
        "Is there a nodule in the lungs?",
        "Are there any lung nodules?",
        "Is a pulmonary nodule present?",
    ),
    "effusion": (
        "Is there a pleural effusion?",
        "Is there fluid in the pleural space?",
        "Is an effusion present?",
    ),
    "hemorrhage": (
        "Is there a hemorrhage?",
        "Is there bleeding in the brain?",
        "Is there an intracranial hemorrhage?",
    ),
    "mass": (
        "Is there a mass in the abdomen?",
        "Is an abdominal mass present?",
        "Is there a lesion in the abdomen?",
    ),
    "fracture": (
        "Is there a fracture?",
        "Is a bone broken?",
        "Is there a fracture of the knee?",
    ),
}
# {f}: finding noun ("nodule"/"nodules"), {s}: side asked about. Side yes/no and two-choice.
_SIDE_YES_NO: dict[str, tuple[str, ...]] = {
    "nodule": ("{Be} the {f} in the {s} lung?", "{Be} the {f} on the {s} side?"),
    "effusion": ("Is the effusion on the {s} side?", "Is there an effusion in the {s} lung?"),
    "hemorrhage": (
        "Is the hemorrhage in the {s} hemisphere?",
        "Is the bleed on the {s} side of the brain?",
    ),
    "mass": ("Is the mass on the patient's {s} side?", "Is the mass in the {s} abdomen?"),
}
_SIDE_CHOICE: dict[str, tuple[str, ...]] = {
    "nodule": (
        "Which lung {be} the {f} in?",
        "Which side {be} the {f} on?",
        "{Be} the {f} in the left or right lung?",
    ),
    "effusion": (
        "Which side is the effusion on?",
        "Is the effusion on the left or right side?",
        "Which lung has the effusion?",
    ),
    "hemorrhage": (
        "Which side is the hemorrhage on?",
        "Which hemisphere contains the bleed?",
        "Is the hemorrhage on the left or right?",
    ),
    "mass": (
        "Which side of the abdomen is the mass on?",
        "Is the mass on the left or right side?",
        "On which side is the mass?",
    ),
}
_COUNT = (
    "How many nodules are there?",
    "How many lung nodules are seen?",
    "How many nodules can be seen in the lungs?",
    "What is the number of nodules?",
)


# ---------------------------------------------------------------------------------------------
# Cases: what one phantom shows (drawn first, then rendered and asked about)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lesion:
    """One drawn finding, in normalised image coordinates (x: 0 = image left, y: 0 = top).

    `side` is the PATIENT's side (None for the knee). For `effusion`, `cx` is the nominal lung centre and
    `cy` the fluid level; for `fracture`, `r` is the half length and `angle` the orientation;
    for `hemorrhage`, `angle` is the aspect ratio (x radius = r * angle).
    """

    kind: str
    side: Side | None
    cx: float
    cy: float
    r: float
    angle: float = 0.0
    intensity: float = 0.0


@dataclass(frozen=True)
class PhantomCase:
    """Everything one phantom shows; `render_case` turns it into pixels deterministically."""

    index: int
    kind: Kind
    finding: str  # one of FINDINGS ("none" for a normal image)
    side: Side | None  # patient side of the finding; None if absent, bilateral or the knee
    count: int | None  # number of nodules (chest only)
    lesions: tuple[Lesion, ...]
    shift: tuple[float, float]  # global (dx, dy) in normalised units
    jitter: tuple[float, ...]  # uniform(-1, 1) draws consumed by the anatomy
    contrast: float
    brightness: float
    noise_sigma: float
    noise_seed: int

    @property
    def modality(self) -> str:
        return MODALITY_OF[self.kind]

    @property
    def organ(self) -> str:
        return ORGAN_OF[self.kind]


_N_JITTER = 8


def _pick(rng: np.random.Generator, options: tuple[Any, ...]) -> Any:
    return options[int(rng.integers(len(options)))]


def _image_x(side: Side, offset: float) -> float:
    """Image x of a structure `offset` from the midline on the patient's `side`."""
    return 0.5 - offset if side == "right" else 0.5 + offset


def sample_case(rng: np.random.Generator, index: int) -> PhantomCase:
    """Draw one phantom: kind, finding, side, count and all jitter, from `rng`."""
    kind: Kind = KINDS[int(rng.integers(len(KINDS)))]
    dx, dy = (float(v) for v in rng.uniform(-0.02, 0.02, size=2))
    jitter = tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=_N_JITTER))
    abnormal = bool(rng.random() < ABNORMAL_FRACTION)
    finding = "none"
    if abnormal:
        names, probs = zip(*FINDINGS_OF[kind], strict=True)
        finding = names[int(rng.choice(len(names), p=np.asarray(probs)))]
    side: Side | None = None
    if finding in LATERALISED:
        side = "right" if rng.random() < 0.5 else "left"
    count: int | None = 0 if kind == "chest_xray" else None
    lesions: list[Lesion] = []
    u = rng.uniform  # shorthand

    if finding == "nodule":
        assert side is not None
        count = 1 if rng.random() < 0.5 else 2
        if count == 1:
            sides: list[Side] = [side]
            heights = [float(u(0.30, 0.58))]
        elif rng.random() < 0.5:  # both in one lung: upper and lower patch rows
            sides = [side, side]
            heights = [float(u(0.27, 0.36)), float(u(0.55, 0.61))]
        else:  # one in each lung: side questions are not asked
            sides = ["right", "left"]
            heights = [float(u(0.28, 0.6)), float(u(0.28, 0.6))]
            side = None
        for s, h in zip(sides, heights, strict=True):
            lesions.append(
                Lesion(
                    "nodule",
                    s,
                    _image_x(s, float(u(0.2, 0.25))) + dx,
                    h + dy,
                    float(u(0.05, 0.065)),
                    intensity=float(u(0.6, 0.7)),
                )
            )
    elif finding == "effusion":
        assert side is not None
        lesions.append(
            Lesion(
                "effusion",
                side,
                _image_x(side, 0.21) + dx,  # nominal lung centre; the lung drawn is jittered
                float(u(0.55, 0.63)) + dy,
                0.0,
                intensity=float(u(0.48, 0.56)),
            )
        )
    elif finding == "hemorrhage":
        assert side is not None
        lesions.append(
            Lesion(
                "hemorrhage",
                side,
                _image_x(side, float(u(0.17, 0.21))) + dx,
                float(u(0.34, 0.64)) + dy,
                float(u(0.07, 0.095)),
                angle=float(u(0.8, 1.2)),  # aspect ratio
                intensity=float(u(0.82, 0.92)),
            )
        )
    elif finding == "mass":
        assert side is not None
        if side == "right":  # in the liver, image left
            cx, cy = _image_x("right", float(u(0.15, 0.2))), float(u(0.41, 0.5))
        else:  # left upper abdomen, between spleen and kidney, image right
            cx, cy = _image_x("left", float(u(0.16, 0.21))), float(u(0.47, 0.55))
        lesions.append(
            Lesion(
                "mass",
                side,
                cx + dx,
                cy + dy,
                float(u(0.065, 0.085)),
                intensity=float(u(0.1, 0.18)),
            )
        )
    elif finding == "fracture":
        on_femur = rng.random() < 0.5
        cy = float(u(0.15, 0.25)) if on_femur else float(u(0.73, 0.83))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        lesions.append(
            Lesion(
                "fracture",
                None,
                0.5 + float(u(-0.02, 0.02)) + dx,
                cy + dy,
                0.14,
                angle=sign * float(u(0.2, 0.5)),
                intensity=float(u(0.04, 0.1)),
            )
        )

    return PhantomCase(
        index=index,
        kind=kind,
        finding=finding,
        side=side,
        count=count,
        lesions=tuple(lesions),
        shift=(dx, dy),
        jitter=jitter,
        contrast=float(u(0.85, 1.15)),
        brightness=float(u(-0.05, 0.05)),
        noise_sigma=float(u(0.02, 0.035)),
        noise_seed=int(rng.integers(2**62)),
    )


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
@dataclass
class _Canvas:
    size: int
    x: np.ndarray = field(init=False)  # (1, S) pixel centres, normalised
    y: np.ndarray = field(init=False)  # (S, 1)
    img: np.ndarray = field(init=False)
    px: float = field(init=False)

    def __post_init__(self) -> None:
        c = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size
        self.x = c[None, :]
        self.y = c[:, None]
        self.img = np.zeros((self.size, self.size), dtype=np.float32)
        self.px = 1.0 / self.size

    def _window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns within `reach` (+2 px) of a point: drawing is done there only."""
        pad = reach + 2 * self.px
        lo_x, hi_x = int((cx - pad) * self.size), int(math.ceil((cx + pad) * self.size))
        lo_y, hi_y = int((cy - pad) * self.size), int(math.ceil((cy + pad) * self.size))
        clamp = lambda v: min(max(v, 0), self.size)  # noqa: E731
        return slice(clamp(lo_y), clamp(hi_y)), slice(clamp(lo_x), clamp(hi_x))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
        """Coverage in [0, 1] of an ellipse with a soft one-pixel edge."""
        out = np.zeros((self.size, self.size), dtype=np.float32)
        rows, cols = self._window(cx, cy, max(rx, ry))
        x = self.x[:, cols] - cx
        y = self.y[rows, :] - cy
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            x, y = x * ca + y * sa, y * ca - x * sa
        xn, yn = x / rx, y / ry
        d = np.sqrt(xn * xn + yn * yn)
        lo, hi = min(rx, ry), max(rx, ry)
        if hi < 2 * lo and lo > 2 * self.px:  # roundish: distance to outline ~ (1 - d) * r
            inside = (1.0 - d) * (lo / self.px)
        else:  # thin: signed distance ~ (d - 1) / |grad d|, keeps a one-pixel edge
            xg, yg = xn / rx, yn / ry
            grad = np.sqrt(xg * xg + yg * yg) / np.maximum(d, 1e-6)
            inside = (1.0 - d) / (np.maximum(grad, 1e-6) * self.px)
        inside += 0.5
        out[rows, cols] = np.minimum(np.maximum(inside, 0.0, out=inside), 1.0, out=inside)
        return out

    def segment(self, cx: float, cy: float, half: float, angle: float, width: float) -> np.ndarray:
        """Coverage of a line segment (centre, half length, angle, half width)."""
        ca, sa = math.cos(angle), math.sin(angle)
        x = self.x - cx
        y = self.y - cy
        along = np.clip(x * ca + y * sa, -half, half)
        dist = np.sqrt((x - along * ca) ** 2 + (y - along * sa) ** 2)
        return np.clip((width - dist) / self.px + 0.5, 0.0, 1.0)

    def paint(self, alpha: np.ndarray, value: float) -> None:
        self.img += alpha * (value - self.img)


def _chest(c: _Canvas, case: PhantomCase) -> np.ndarray:
    dx, dy = case.shift
    j = case.jitter
    c.img[:] = 0.04
    c.paint(c.ellipse(0.5 + dx, 0.58 + dy, 0.47, 0.52), 0.42)
    lungs: dict[str, tuple[np.ndarray, float, float, float, float]] = {}
    patient_sides: tuple[Side, Side] = ("right", "left")
    for k, s in enumerate(patient_sides):
        lcx = _image_x(s, 0.21 + 0.01 * j[k]) + dx
        lcy = 0.47 + 0.015 * j[2] + dy
        rx, ry = 0.145 * (1 + 0.05 * j[3]), 0.29 * (1 + 0.04 * j[4])
        a = c.ellipse(lcx, lcy, rx, ry)
        c.paint(a, 0.12 + 0.03 * j[5])
        lungs[s] = (a, lcx, lcy, rx, ry)
    # rib hints: faint bright bands inside the lungs, curving down laterally
    lung_alpha = lungs["right"][0] + lungs["left"][0]
    phase = (c.y - dy - 1.2 * (c.x - 0.5 - dx) ** 2) / 0.085
    c.img += lung_alpha * 0.07 * np.clip(np.sin(2 * np.pi * phase), 0.0, 1.0) ** 4
    c.paint(c.ellipse(0.5 + dx, 0.44 + dy, 0.065, 0.32), 0.55)  # mediastinum
    c.paint(c.ellipse(0.55 + dx + 0.01 * j[6], 0.67 + dy, 0.12 * (1 + 0.06 * j[7]), 0.1), 0.58)
    for sign in (-1, 1):  # clavicles
        c.paint(c.ellipse(0.5 + sign * 0.17 + dx, 0.16 + dy, 0.15, 0.018, -sign * 0.25), 0.62)
    mask = np.zeros_like(c.img, dtype=bool)
    for les in case.lesions:
        assert les.side is not None
        if les.kind == "nodule":
            a = c.ellipse(les.cx, les.cy, les.r, les.r)
        else:  # effusion: fills the lung base up to a meniscus, higher laterally
            la, lcx, _, lrx, _ = lungs[les.side]
            lateral = np.clip((lcx - c.x) if les.side == "right" else (c.x - lcx), 0.0, None) / lrx
            level = les.cy - 0.08 * lateral
            a = la * np.clip((c.y - level) / c.px + 0.5, 0.0, 1.0)
        c.paint(a, les.intensity)
        mask |= a > 0.5
    return mask


def _head(c: _Canvas, case: PhantomCase) -> np.ndarray:
    dx, dy = case.shift
    j = case.jitter
    cx, cy = 0.5 + dx, 0.5 + dy
    rx, ry = 0.37 * (1 + 0.05 * j[0]), 0.45 * (1 + 0.04 * j[1])
    c.img[:] = 0.0
    c.paint(c.ellipse(cx, cy, rx, ry), 0.95)  # skull
    c.paint(c.ellipse(cx, cy, rx - 0.045, ry - 0.045), 0.42 + 0.03 * j[2])  # brain
    c.paint(c.ellipse(cx, cy, rx - 0.11, ry - 0.11), 0.37 + 0.03 * j[2])  # white matter
    c.paint(c.ellipse(cx, cy, 0.006, ry - 0.08), 0.55)  # falx
    for s in (-1, 1):  # ventricles
        c.paint(c.ellipse(cx + s * 0.045, cy - 0.02 + 0.02 * j[3], 0.035, 0.1, s * 0.3), 0.12)
    mask = np.zeros_like(c.img, dtype=bool)
    for les in case.lesions:
        a = c.ellipse(les.cx, les.cy, les.r * les.angle, les.r)
        c.paint(a, les.intensity)
        mask |= a > 0.5
    return mask


def _abdomen(c: _Canvas, case: PhantomCase) -> np.ndarray:
    dx, dy = case.shift
    j = case.jitter
    c.img[:] = 0.0
    c.paint(c.ellipse(0.5 + dx, 0.52 + dy, 0.46 * (1 + 0.04 * j[0]), 0.34), 0.26)  # fat
    c.paint(c.ellipse(0.5 + dx, 0.52 + dy, 0.41 * (1 + 0.04 * j[0]), 0.29), 0.42)
    c.paint(
        c.ellipse(0.32 + dx, 0.46 + dy, 0.18 * (1 + 0.06 * j[1]), 0.16 * (1 + 0.06 * j[2])),
        0.6 + 0.03 * j[3],
    )  # liver, patient right = image left
    c.paint(c.ellipse(0.74 + dx, 0.42 + dy, 0.065, 0.085), 0.54)  # spleen
    for s in (-1, 1):  # kidneys
        c.paint(c.ellipse(0.5 + s * 0.15 + dx, 0.66 + dy, 0.05, 0.07, s * 0.3), 0.64)
    c.paint(c.ellipse(0.53 + dx, 0.6 + dy, 0.025, 0.025), 0.72)  # aorta
    c.paint(c.ellipse(0.5 + dx, 0.72 + dy, 0.065, 0.055), 0.95)  # vertebral body
    c.paint(c.ellipse(0.5 + dx, 0.79 + dy, 0.02, 0.02), 0.2)  # canal
    mask = np.zeros_like(c.img, dtype=bool)
    for les in case.lesions:
        a = c.ellipse(les.cx, les.cy, les.r, les.r * (1 + 0.1 * j[4]))
        c.paint(a, les.intensity)
        mask |= a > 0.5
    return mask


def _knee(c: _Canvas, case: PhantomCase) -> np.ndarray:
    dx, dy = case.shift
    j = case.jitter
    cx = 0.5 + dx
    c.img[:] = 0.03
    c.paint(c.ellipse(cx, 0.5 + dy, 0.35 * (1 + 0.05 * j[0]), 0.62), 0.3)  # soft tissue
    bone = (
        (cx, 0.08 + dy, 0.11 * (1 + 0.06 * j[1]), 0.4),  # femoral shaft
        (cx, 0.4 + dy, 0.21 * (1 + 0.05 * j[2]), 0.085),  # condyles
        (cx, 0.58 + dy, 0.2 * (1 + 0.05 * j[2]), 0.07),  # tibial plateau
        (cx, 0.9 + dy, 0.12 * (1 + 0.06 * j[3]), 0.34),  # tibial shaft
    )
    for bx, by, brx, bry in bone:  # dark cortex first, then bright marrow
        c.paint(c.ellipse(bx, by, brx + 0.018, bry + 0.018), 0.1)
    marrow = []
    for bx, by, brx, bry in bone:
        a = c.ellipse(bx, by, brx, bry)
        c.paint(a, 0.8 + 0.04 * j[4])
        marrow.append(a)
    c.paint(c.ellipse(cx + 0.2, 0.78 + dy, 0.03, 0.17), 0.7)  # fibula (lateral)
    mask = np.zeros_like(c.img, dtype=bool)
    for les in case.lesions:  # a fracture line crosses one shaft only
        shaft = marrow[0] if les.cy < 0.5 + dy else marrow[3]
        a = c.segment(les.cx, les.cy, les.r, les.angle, 0.018) * shaft
        c.paint(a, les.intensity)
        mask |= a > 0.5
    return mask


_RENDERERS = {
    "chest_xray": _chest,
    "head_ct": _head,
    "abdomen_ct": _abdomen,
    "knee_mri": _knee,
}


def render_case(case: PhantomCase, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (uint8, H x W) and the ground-truth finding mask (bool, True on finding pixels).

    Column 0 is the image left, i.e. the patient's right. The mask is empty for a normal case.
    """
    canvas = _Canvas(image_size)
    mask = _RENDERERS[case.kind](canvas, case)
    noise = np.random.default_rng(case.noise_seed).standard_normal(canvas.img.shape)
    img = (canvas.img - 0.5) * case.contrast + 0.5 + case.brightness
    img = img + case.noise_sigma * noise.astype(np.float32)
    pixels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return pixels, mask


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomQuestion:
    question_type: str
    answer_type: AnswerType
    question: str
    answer: str


def make_questions(case: PhantomCase, rng: np.random.Generator) -> list[PhantomQuestion]:
    """All questions about one phantom (7 to 10), phrasings drawn from `rng`."""
    qs: list[PhantomQuestion] = []

    def yes_no(flag: bool) -> str:
        return "yes" if flag else "no"

    modality, organ, finding = case.modality, case.organ, case.finding
    qs.append(PhantomQuestion("modality", "OPEN", _pick(rng, _MODALITY_OPEN), modality))
    truth = bool(rng.random() < 0.5)
    asked = modality if truth else _pick(rng, _MODALITY_DECOYS[modality])
    text = _pick(rng, _MODALITY_CLOSED).format(name=_pick(rng, _MODALITY_NAMES[asked]))
    qs.append(PhantomQuestion("modality", "CLOSED", text, yes_no(truth)))

    qs.append(PhantomQuestion("organ", "OPEN", _pick(rng, _ORGAN_OPEN), organ))
    truth = bool(rng.random() < 0.5)
    asked = organ if truth else _pick(rng, tuple(o for o in ORGANS if o != organ))
    text = _pick(rng, _ORGAN_CLOSED).format(name=_pick(rng, _ORGAN_NAMES[asked]))
    qs.append(PhantomQuestion("organ", "CLOSED", text, yes_no(truth)))

    text, yes_if_normal = _pick(rng, _ABNORMAL)
    qs.append(
        PhantomQuestion("abnormal", "CLOSED", text, yes_no((finding == "none") == yes_if_normal))
    )
    qs.append(PhantomQuestion("finding", "OPEN", _pick(rng, _FINDING_OPEN), finding))

    # Presence: an abnormal image is asked about its finding ("yes"); a normal one about a
    # finding of its kind drawn with the same odds as abnormal images show them ("no"), so
    # every presence question is yes half of the time.
    if finding != "none":
        asked = finding
    else:
        names, probs = zip(*FINDINGS_OF[case.kind], strict=True)
        asked = names[int(rng.choice(len(names), p=np.asarray(probs)))]
    qs.append(
        PhantomQuestion(
            "presence", "CLOSED", _pick(rng, _PRESENCE[asked]), yes_no(finding != "none")
        )
    )

    if case.side is not None:
        plural = finding == "nodule" and case.count == 2
        words = {"f": "nodules" if plural else finding, "be": "are" if plural else "is"}
        words["Be"] = words["be"].capitalize()
        text = _pick(rng, _SIDE_CHOICE[finding]).format(**words)
        qs.append(PhantomQuestion("side", "OPEN", text, case.side))
        asked_side = _pick(rng, SIDES)
        text = _pick(rng, _SIDE_YES_NO[finding]).format(s=asked_side, **words)
        qs.append(PhantomQuestion("side", "CLOSED", text, yes_no(asked_side == case.side)))

    if case.count is not None:
        qs.append(PhantomQuestion("count", "OPEN", _pick(rng, _COUNT), str(case.count)))
    return qs


# ---------------------------------------------------------------------------------------------
# Writing the set
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomSummary:
    """What `generate_phantom` wrote: counts per split ("train", "test")."""

    seed: int
    n: int
    image_size: int
    images: dict[str, int]
    questions: dict[str, int]
    answer_types: dict[str, dict[str, int]]  # split -> CLOSED/OPEN -> questions
    question_types: dict[str, dict[str, int]]  # split -> question_type -> questions
    yes_no: dict[str, dict[str, int]]  # split -> yes/no -> closed yes/no questions

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "n": self.n,
            "image_size": self.image_size,
            "images": dict(self.images),
            "questions": dict(self.questions),
            "answer_types": {k: dict(v) for k, v in self.answer_types.items()},
            "question_types": {k: dict(v) for k, v in self.question_types.items()},
            "yes_no": {k: dict(v) for k, v in self.yes_no.items()},
        }


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws image `index` of `seed` (case, then its questions)."""
    return np.random.default_rng([seed, 1, index])


def _test_indices(n: int, seed: int, test_fraction: float) -> set[int]:
    n_test = int(round(n * test_fraction))
    if n >= 2 and test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng([seed, 2, 0]).permutation(n)
    return {int(i) for i in order[:n_test]}


def _write_json(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    body = ",\n".join(json.dumps(e, ensure_ascii=False) for e in entries)
    tmp.write_text(f"[\n{body}\n]\n" if entries else "[]\n", encoding="utf-8")
    os.replace(tmp, path)


def generate_phantom(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    image_size: int = 64,
    test_fraction: float = 0.2,
) -> PhantomSummary:
    """Write `n` phantoms and their questions to `out_dir` (see the module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 images, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    test_set = _test_indices(n, seed, test_fraction)

    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    images: Counter[str] = Counter()
    for index in range(n):
        rng = image_rng(seed, index)
        case = sample_case(rng, index)
        pixels, _ = render_case(case, image_size)
        name = f"phantom-{seed}-{index:05d}.png"
        Image.fromarray(pixels).save(image_dir / name, format="PNG")
        split = "test" if index in test_set else "train"
        images[split] += 1
        for q_index, q in enumerate(make_questions(case, rng)):
            splits[split].append(
                {
                    "id": f"phantom-{seed}-{index}-{q_index}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{q.question}"},
                        {"from": "gpt", "value": q.answer},
                    ],
                    "answer_type": q.answer_type,
                    "question_type": q.question_type,
                    "modality": case.modality,
                    "organ": case.organ,
                }
            )

    for split, entries in splits.items():
        _write_json(out_dir / f"{split}.json", entries)
    written = {f"phantom-{seed}-{index:05d}.png" for index in range(n)}
    for stale in image_dir.glob("phantom-*.png"):  # an earlier set's, no question names them
        if stale.name not in written:
            stale.unlink()

    def count(entries: list[dict[str, Any]], key: str) -> dict[str, int]:
        return dict(sorted(Counter(e[key] for e in entries).items()))

    def yes_no(entries: list[dict[str, Any]]) -> dict[str, int]:
        c = Counter(e["conversations"][1]["value"] for e in entries)
        return {"yes": c["yes"], "no": c["no"]}

    return PhantomSummary(
        seed=seed,
        n=n,
        image_size=image_size,
        images={s: images[s] for s in splits},
        questions={s: len(e) for s, e in splits.items()},
        answer_types={s: count(e, "answer_type") for s, e in splits.items()},
        question_types={s: count(e, "question_type") for s, e in splits.items()},
        yes_no={s: yes_no(e) for s, e in splits.items()},
    )
