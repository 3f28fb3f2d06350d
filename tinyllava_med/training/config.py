"""Training configuration: one validated `TrainConfig` per stage, read from YAML, flags override.

What a stage trains is data, not code: each component (vision tower, projector, language
model) is `frozen`, `full` or `lora`, optionally with its own learning rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

Stage = Literal["alignment", "instruct", "downstream"]
Mode = Literal["frozen", "full", "lora"]
COMPONENTS = ("vision_tower", "projector", "language_model")
CONFIG_DIR = Path(__file__).parent / "configs"


class Component(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Mode = "full"
    learning_rate: float | None = None


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 128  # LLaVA's LoRA recipe (lora_r 128, lora_alpha 256: a scale of 2)
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "fc1",
            "fc2",
            "out_proj",
            "dense",
            "linear_1",  # the projector's two layers (LLaVA's multi_modal_projector)
            "linear_2",
        ]
    )
    qlora: bool = False  # 4-bit NF4 base (bitsandbytes) under the adapters


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Stage
    model: str  # served-format folder or variant name
    data_path: str
    image_folder: str
    output_dir: str
    # the trained model's name in answers, reports and metrics; default: output_dir's folder name
    name: str | None = None
    template: str | None = None  # default: the model's own
    vision_tower: Component = Component(mode="frozen")
    projector: Component = Component(mode="full")
    language_model: Component = Component(mode="full")
    lora: LoraSettings = LoraSettings()
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 2
    num_train_epochs: float = 1
    max_steps: int = -1
    max_time_s: float | None = None  # stop cleanly after this many seconds of training
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    model_max_length: int = 2048
    turns_per_sample: int = 1  # >1 merges questions about one image into one conversation
    pack_turns: bool = False  # merged questions see the image but not each other (packing)
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    seed: int = 42
    report_to: list[str] = Field(default_factory=lambda: ["none"])
    deepspeed: str | None = None  # path to a ZeRO json (see configs/)
    dataloader_num_workers: int = 0
    cache_dataset: bool = False  # keep encoded items in memory (small data sets, many epochs)
    use_cpu: bool | None = None  # default: CPU when no GPU is visible
    disable_tqdm: bool | None = None
    resume_from_checkpoint: str | bool | None = None

    @field_validator("deepspeed")
    @classmethod
    def _shipped_deepspeed(cls, v: str | None) -> str | None:
        """`zero2` / `zero3` (or `zero3.json`, as the configs' comments wrote it) name the ZeRO
        configs shipped in `training/configs/`, unless a file of that name is here."""
        if v is not None and not Path(v).is_file() and Path(v).stem in ("zero2", "zero3"):
            return str(CONFIG_DIR / f"{Path(v).stem}.json")
        return v

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        """-1 trains `num_train_epochs`; otherwise at least one step (transformers reads 0 as
        one step and any other negative as no limit)."""
        if v != -1 and v < 1:
            raise ValueError("max_steps is a number of steps (1 or more), or -1 for the epochs")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path, stage: str | None = None, **overrides: Any) -> TrainConfig:
        """Read a config file (or a shipped config by name, e.g. `tinyllava-1.5b-instruct`).
        `stage` (`train --stage`) must be the one the file configures, if it names one: the
        stage is only recorded, so a mismatch would label one stage's run as another's."""
        path = Path(path)
        shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
        if not path.is_file() and shipped.is_file():  # `tinyllava-1.5b-instruct[.yaml]`
            path = shipped
        data = yaml.safe_load(path.read_text()) or {}
        if stage is not None:
            if data.get("stage", stage) != stage:
                raise ValueError(
                    f"--stage {stage}, but {path.name} configures the {data['stage']} stage (its "
                    "data, components and recipe): pick that stage's config"
                )
            data["stage"] = stage
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return cls.model_validate(data)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`language_model.mode=lora` style overrides into nested dicts."""
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` flags; values are parsed as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip().lstrip("-").replace("-", "_")] = yaml.safe_load(value)
    return out
