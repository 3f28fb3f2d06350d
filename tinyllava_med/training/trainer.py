"""Run one training stage with HF `Trainer`; write a served-format checkpoint at the end.

DeepSpeed ZeRO-2/3, FSDP, multi-GPU and multi-node come from `accelerate launch` / `deepspeed`
around `tinyllava-med train`, with no code here. LoRA / QLoRA use PEFT and are merged into a
plain served checkpoint when the stage ends.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from tinyllava_med.model.load import resolve
from tinyllava_med.model.meta import ServedMeta, hash_files, publish_modes
from tinyllava_med.model.registry import get_variant, is_variant_name
from tinyllava_med.training.config import COMPONENTS, TrainConfig
from tinyllava_med.training.data import (
    Collator,
    ConversationDataset,
    group_by_image,
    read_conversations,
)

log = logging.getLogger(__name__)

# transformers 5 LLaVA module paths of each trainable component.
COMPONENT_PATHS = {
    "vision_tower": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language_model": "model.language_model",
}


class TimeLimit(TrainerCallback):
    """Stops training cleanly (and saves) once `seconds` of training have passed; `stopped`
    says whether it did."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0
        self.stopped = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = self.stopped = True


def _component_of(param_name: str) -> str | None:
    name = param_name.removeprefix("base_model.model.")
    for comp, path in COMPONENT_PATHS.items():
        if name.startswith(path + ".") or name.startswith(path.removeprefix("model.") + "."):
            return comp
    if name.startswith("lm_head."):
        return "language_model"
    return None


def _load_for_training(cfg: TrainConfig) -> tuple[Any, Any, ServedMeta]:
    path, _variant = resolve(cfg.model)
    meta = ServedMeta.load(path) or ServedMeta()
    processor = AutoProcessor.from_pretrained(path, backend="pil")  # PIL bicubic = the originals
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.lora.qlora:
        from tinyllava_med.quantize.runtime import bnb_config, make_4bit_inputs_contiguous

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kwargs["quantization_config"] = bnb_config("4bit", device)
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        make_4bit_inputs_contiguous(model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return model, processor, meta


def _apply_modes(model: Any, cfg: TrainConfig) -> Any:
    """Freeze / unfreeze components and wrap LoRA components with PEFT adapters."""
    modes = {c: getattr(cfg, c).mode for c in COMPONENTS}
    lora_comps = [c for c, m in modes.items() if m == "lora"]
    if lora_comps:
        from peft import LoraConfig, get_peft_model

        if cfg.lora.qlora:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing
            )
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = sorted(set(cfg.lora.target_modules) & {n.rsplit(".", 1)[-1] for n in linears})
        prefixes = "|".join(COMPONENT_PATHS[c].replace(".", r"\.") for c in lora_comps)
        # the projector's layers sit right under it (multi_modal_projector.linear_1)
        regex = rf"^(?:{prefixes})\.(?:.*\.)?(?:{'|'.join(targets)})$"
        for component in lora_comps:  # a LoRA component whose layers no target names trains nothing
            path = COMPONENT_PATHS[component] + "."
            own = [n for n in linears if n.startswith(path)]
            if not targets or not any(re.match(regex, n) for n in own):
                layers = sorted({n.rsplit(".", 1)[-1] for n in own})
                raise ValueError(
                    f"{component}.mode is lora, but lora.target_modules names none of its linear "
                    f"layers ({', '.join(layers)})"
                )
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=regex,
                bias="none",
            ),
        )
    for name, param in model.named_parameters():
        comp = _component_of(name)
        mode = modes.get(comp, "frozen") if comp else "frozen"
        if mode == "full":
            param.requires_grad = True
        elif mode == "frozen" or "lora_" not in name:
            param.requires_grad = False
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ValueError("nothing to train: every component is frozen")
    log.info("trainable parameters: %d", n_train)
    return model


CALIBRATION_STEPS = 50  # a budgeted run decides how its schedule runs after this many steps
WARM_STEPS = 10  # (or a tenth of its budget), timed from this step: the first carry the start-up


def budget_cosine(
    optimizer: Any,
    *,
    max_steps: int,
    warmup_ratio: float,
    budget_s: float,
    clock: dict[str, bool | None] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine over training progress under a wall-clock budget.

    After `CALIBRATION_STEPS` steps, or a tenth of the budget if that comes first, the run
    decides once: if the remaining steps fit the remaining time at the rate measured since step
    `WARM_STEPS` (since step 1 while there are too few steps after it; the first steps carry the
    start-up), progress is the step fraction alone, so the weights do not depend on this
    machine's speed (the same code, data, seed, CPU type and thread count give the same
    weights). If not, progress is the larger of the step fraction and the time fraction, so the
    rate still decays to zero by the end of the budget. `clock["led"]` records the decision
    (None: undecided)."""
    clock = clock if clock is not None else {}
    clock["led"] = None
    start = time.monotonic()
    marks: dict[int, float] = {}  # when steps 1 and WARM_STEPS ended

    def factor(step: int) -> float:
        now = time.monotonic()
        for mark in (1, WARM_STEPS):
            if step >= mark and mark not in marks:
                marks[mark] = now
        elapsed = now - start
        since = WARM_STEPS if step - WARM_STEPS >= 5 and WARM_STEPS in marks else 1
        due = step >= CALIBRATION_STEPS or elapsed >= budget_s / 10
        if clock["led"] is None and due and since in marks and step - since >= 2:
            rate = (step - since) / max(now - marks[since], 1e-9)
            clock["led"] = rate * (budget_s - elapsed) * 0.95 < max_steps - step
        progress = step / max(max_steps, 1)
        if clock["led"]:
            progress = max(progress, (now - start) / budget_s)
        progress = min(progress, 1.0)
        if progress < warmup_ratio:
            return max(progress / warmup_ratio, 1e-3)
        return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup_ratio) / (1 - warmup_ratio)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# what a LoRA checkpoint holds beside its adapters: the weights of components trained in `full`
# mode (the projector, the tower), which a PEFT adapter save leaves out
BESIDE_ADAPTERS = "trained_beside_adapters.safetensors"


def _trained_beside_adapters(model: Any) -> dict[str, torch.nn.Parameter]:
    if not hasattr(model, "peft_config"):
        return {}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


class StageTrainer(Trainer):
    """`Trainer` with one optimizer parameter group per component learning rate, a
    time-aware cosine schedule when the stage has a wall-clock budget, and checkpoints that
    resume with the weights they saved (see `_load_from_checkpoint`)."""

    def __init__(
        self,
        *args: Any,
        component_lrs: dict[str, float | None],
        budget_s: float | None = None,
        warmup_ratio: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.component_lrs = component_lrs
        self.budget_s = budget_s
        self.warmup_ratio = warmup_ratio
        self.clock: dict[str, bool | None] = {"led": None}  # did the wall clock set the rate

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        beside = _trained_beside_adapters(self.model)
        # DeepSpeed and FSDP resume from their own states (and hold shards, not whole weights)
        if (
            beside
            and self.args.should_save
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        ):
            tensors = {n: p.detach().cpu().contiguous() for n, p in beside.items()}
            out = Path(str(output_dir or self.args.output_dir)) / BESIDE_ADAPTERS
            safetensors.torch.save_file(tensors, str(out))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load a checkpoint's weights, all of them or refuse.

        `Trainer` loads a full model's checkpoint with `load_state_dict(strict=False)`, but
        `save_pretrained` wrote it under the original LLaVA key names (`language_model.model.*`),
        so nothing matched and the run went on from the stage's starting weights with the saved
        optimizer and schedule (transformers issue 43701). Here, but for FSDP, `from_pretrained` reads it,
        renaming as it does for any checkpoint (a second copy in memory while resuming), and
        every key must match. A LoRA checkpoint's adapters load as `Trainer` loads them, and the
        components trained in `full` beside them from `BESIDE_ADAPTERS`."""
        if self.is_fsdp_enabled:  # FSDP's own sharded states
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        if not hasattr(model, "peft_config"):
            dtype = next(model.parameters()).dtype
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
            model.load_state_dict(saved.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        wanted = _trained_beside_adapters(model)
        if not wanted:
            return
        path = Path(resume_from_checkpoint) / BESIDE_ADAPTERS
        if not path.is_file():
            raise ValueError(
                f"{resume_from_checkpoint} has the adapters but not the weights trained in full "
                f"mode beside them ({BESIDE_ADAPTERS}); it cannot be resumed exactly"
            )
        saved_beside = safetensors.torch.load_file(str(path))
        if set(saved_beside) != set(wanted):
            raise ValueError(
                f"{path} holds other weights than this run trains in full mode: "
                f"{sorted(set(saved_beside) ^ set(wanted))[:5]}"
            )
        with torch.no_grad():
            for name, param in wanted.items():
                param.copy_(saved_beside[name])

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.budget_s and self.lr_scheduler is None:
            self.lr_scheduler = budget_cosine(
                optimizer or self.optimizer,
                max_steps=num_training_steps,
                warmup_ratio=self.warmup_ratio,
                budget_s=self.budget_s,
                clock=self.clock,
            )
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None and any(v is not None for v in self.component_lrs.values()):
            groups: dict[float, list[torch.nn.Parameter]] = {}
            net: Any = self.model
            for name, p in net.named_parameters():
                if not p.requires_grad:
                    continue
                comp = _component_of(name)
                lr = self.component_lrs.get(comp or "") or self.args.learning_rate
                groups.setdefault(lr, []).append(p)
            opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, net)
            params = [
                {"params": ps, "lr": lr, "weight_decay": self.args.weight_decay}
                for lr, ps in groups.items()
            ]
            self.optimizer = opt_cls(params, **opt_kwargs)
            return self.optimizer
        return super().create_optimizer()


def check_launch(cfg: TrainConfig) -> None:
    """Refuse, before anything loads, a stage this machine cannot run as configured."""
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            f"deepspeed={cfg.deepspeed} needs DeepSpeed: install the gpu-train extra (`pip install "
            "-e .[gpu-train]`, on a machine with CUDA) and start the stage under `accelerate "
            "launch -m tinyllava_med.cli train ...` or `deepspeed`"
        )


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    check_launch(cfg)
    use_cpu = cfg.use_cpu if cfg.use_cpu is not None else not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "checkpoints"),
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio in transformers 5
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        report_to=cfg.report_to,
        deepspeed=cfg.deepspeed,
        dataloader_num_workers=cfg.dataloader_num_workers,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        disable_tqdm=cfg.disable_tqdm if cfg.disable_tqdm is not None else False,
    )


def run_stage(cfg: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train one stage as `cfg` says; returns the served-format output folder."""
    check_launch(cfg)
    # before anything draws: LoRA adapters are initialised as the model is wrapped, before the
    # Trainer would seed
    set_seed(cfg.seed)
    model, processor, meta = _load_for_training(cfg)
    template = cfg.template or meta.template
    entries = read_conversations(cfg.data_path)
    if cfg.turns_per_sample > 1:
        entries = group_by_image(entries, cfg.turns_per_sample, seed=cfg.seed)
    dataset = ConversationDataset(
        entries,
        cfg.image_folder,
        processor,
        template,
        max_length=cfg.model_max_length,
        cache=cfg.cache_dataset,
        pack=cfg.pack_turns,
    )
    if cfg.cache_dataset:
        dataset.preload()
    model = _apply_modes(model, cfg)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    callbacks = list(callbacks or [])
    limit = TimeLimit(cfg.max_time_s) if cfg.max_time_s else None
    if limit is not None:
        callbacks.append(limit)
    trainer = StageTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=dataset,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        callbacks=callbacks,
        component_lrs={c: getattr(cfg, c).learning_rate for c in COMPONENTS},
        budget_s=cfg.max_time_s,
        warmup_ratio=cfg.warmup_ratio,
    )
    t0 = time.monotonic()
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    stopped = bool(limit and limit.stopped)
    run = {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "seconds": round(time.monotonic() - t0, 1),
        "stopped_by_time_limit": stopped,
        "schedule_set_by_clock": bool(trainer.clock["led"]),
        # the same code, data, seed, CPU type and thread count give the same weights, unless
        # the wall clock shaped the run
        "reproducible": not (stopped or trainer.clock["led"]),
        "torch_threads": torch.get_num_threads(),
    }
    return save_stage_output(trainer.model, processor, cfg, meta, template, run=run)


def _merge_into_full_precision(peft_model: Any, cfg: TrainConfig) -> Any:
    import tempfile

    from peft import PeftModel

    path, _variant = resolve(cfg.model)
    # what a `full` component trained (the projector, the tower) is not in an adapter save
    trained = {
        name.removeprefix("base_model.model."): param.detach().to(torch.float32)
        for name, param in peft_model.named_parameters()
        if param.requires_grad and "lora_" not in name
    }
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)  # the adapters only
        base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        missing = set(trained) - set(base.state_dict())
        if missing:
            raise RuntimeError(f"trained weights the base does not have: {sorted(missing)[:5]}")
        base.load_state_dict(trained, strict=False)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def save_stage_output(
    model: Any,
    processor: Any,
    cfg: TrainConfig,
    meta: ServedMeta,
    template: str,
    run: dict[str, Any] | None = None,
) -> Path:
    """Merge adapters if any, then write weights, processor and provenance.

    QLoRA adapters are merged into the base reloaded in full precision (not into its 4-bit
    copy), so the output is a plain served checkpoint, as with LoRA; the weights of components
    trained in `full` mode beside them (the projector, the tower) are copied in first.
    """
    if cfg.lora.qlora and hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model = _merge_into_full_precision(model, cfg)
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    data_files = [Path(cfg.data_path)]
    # named for what it now is, not for the model it started from (that is `training.base`); a
    # registry variant's name given as `name` (the demo's build) is its variant too, but not a
    # folder that happens to be called so (`demo-model --force` replaces only the demo)
    name = cfg.name or out.resolve().name
    variant = (
        cfg.name
        if cfg.name and is_variant_name(cfg.name) and get_variant(cfg.name).quantization == "none"
        else None
    )
    ServedMeta(
        template=template,
        name=name,
        variant=variant,
        source_format="served",
        source_hash=meta.source_hash,
        vision_weights=meta.vision_weights,
        training={
            "stage": cfg.stage,
            "base": meta.variant or meta.name,
            "config": cfg.model_dump(mode="json"),
            "data_hash": hash_files(data_files),
            "run": run,
            "previous": meta.training,
        },
        notes=meta.notes,
    ).save(out)
    publish_modes(out)
    return out
