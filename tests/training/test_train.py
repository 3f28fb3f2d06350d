"""Training: supervised tokens, the three stages end to end, resume, LoRA merge, demo path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyllava_med.model.load import load_model
from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.training import trainer as trainer_mod
from tinyllava_med.training.config import TrainConfig
from tinyllava_med.training.data import (
    IGNORE_INDEX,
    ConversationDataset,
    encode_conversation,
    read_conversations,
    turns_of,
)
from tinyllava_med.training.trainer import budget_cosine, run_stage


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA-format dataset: multi-turn, one entry with the misspelt key."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    entries = []
    for i in range(12):
        name = f"im{i}.png"
        Image.new("L", (40, 32), 20 * i).save(root / "images" / name)
        key = "conversatons" if i == 0 else "conversations"
        entries.append(
            {
                "id": f"q{i}",
                "image": name,
                key: [
                    {"from": "human", "value": "<image>\nIs there a fracture?"},
                    {"from": "gpt", "value": "yes" if i % 2 else "no"},
                    {"from": "human", "value": "Which organ is shown?"},
                    {"from": "gpt", "value": "chest x-ray"},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(entries))
    return root


def test_only_answers_are_supervised(tiny_lm, vqa_dir):
    tok = tiny_lm.processor.tokenizer
    entries = read_conversations(vqa_dir / "train.json")
    assert "conversations" in entries[0]  # the misspelt key is read too
    ids, labels = encode_conversation(tok, "v1", turns_of(entries[1]), num_image_tokens=16)
    assert len(ids) == len(labels)
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    text = tok.decode(supervised)
    assert text == " yes</s> chest x-ray</s>"
    # and everything else is the prompt, which contains the 16 image tokens once
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 16
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels, strict=True) if t == image_id)


def test_dataset_item_matches_processor(tiny_lm, vqa_dir):
    ds = ConversationDataset(
        read_conversations(vqa_dir / "train.json"), vqa_dir / "images", tiny_lm.processor, "v1"
    )
    item = ds[3]
    n_img = (item["input_ids"] == tiny_lm.model.config.image_token_id).sum().item()
    assert n_img == ds.num_image_tokens == 16
    assert item["pixel_values"].shape == (3, 32, 32)


def _cfg(stage, model, vqa_dir, out, **kw) -> TrainConfig:
    base = dict(
        stage=stage,
        model=str(model),
        data_path=str(vqa_dir / "train.json"),
        image_folder=str(vqa_dir / "images"),
        output_dir=str(out),
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=3,
        logging_steps=1,
        save_steps=100,
        disable_tqdm=True,
        model_max_length=256,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_three_stages_end_to_end(tiny_model_dir, vqa_dir, tmp_path):
    before = load_model(str(tiny_model_dir), device="cpu").model.state_dict()
    a = run_stage(
        _cfg(
            "alignment",
            tiny_model_dir,
            vqa_dir,
            tmp_path / "a",
            vision_tower={"mode": "frozen"},
            projector={"mode": "full"},
            language_model={"mode": "frozen"},
        )
    )
    after_a = load_model(str(a), device="cpu").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after_a[k])}
    assert changed and all(k.startswith("model.multi_modal_projector") for k in changed)

    b = run_stage(
        _cfg(
            "instruct",
            a,
            vqa_dir,
            tmp_path / "b",
            language_model={"mode": "lora"},
            projector={"mode": "full", "learning_rate": 5e-4},
            lora={"r": 4, "alpha": 8},
            turns_per_sample=2,
        )
    )
    after_b = load_model(str(b), device="cpu").model.state_dict()
    assert not any("lora_" in k for k in after_b), "adapters are merged into plain weights"
    assert not torch.equal(
        after_a["model.language_model.layers.0.self_attn.q_proj.weight"],
        after_b["model.language_model.layers.0.self_attn.q_proj.weight"],
    )

    c = run_stage(_cfg("downstream", b, vqa_dir, tmp_path / "c", vision_tower={"mode": "full"}))
    umask = os.umask(0)
    os.umask(umask)  # the weights are readable as the umask allows, not safetensors' 0600
    assert (c / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    lm = load_model(str(c), device="cpu")
    meta = ServedMeta.load(c)
    assert meta.training["stage"] == "downstream"
    assert meta.training["previous"]["stage"] == "instruct"
    assert meta.training["data_hash"].startswith("sha256:")
    # each stage's model is named for its folder (or `name`), not for the one it started from
    assert (meta.name, meta.variant, meta.training["base"]) == ("c", None, "b")
    assert ServedMeta.load(a).training["base"] == ServedMeta.load(tiny_model_dir).name
    assert (lm.name, lm.variant) == ("c", None)
    named = run_stage(
        _cfg("downstream", c, vqa_dir, tmp_path / "d", max_steps=1, name="tinyllava-med-f")
    )
    assert (ServedMeta.load(named).name, ServedMeta.load(named).variant) == ("tinyllava-med-f",) * 2
    # a folder named like a variant is not that variant (`demo-model --force` would replace it)
    folder = run_stage(_cfg("downstream", c, vqa_dir, tmp_path / "demo", max_steps=1))
    assert (ServedMeta.load(folder).name, ServedMeta.load(folder).variant) == ("demo", None)
    from tinyllava_med.model.generate import SamplingParams, generate

    ans = generate(
        lm,
        [Image.new("L", (32, 32), 90)],
        ["Is there a fracture?"],
        SamplingParams(max_new_tokens=3),
    )[0]
    assert ans.new_tokens >= 1


@pytest.mark.parametrize(
    "modes",
    [
        {},  # the stage's defaults: projector and language model in full
        {"language_model": {"mode": "lora"}, "lora": {"r": 4, "alpha": 8}},  # projector full
    ],
    ids=["full", "lora-beside-full-projector"],
)
def test_resume_from_checkpoint_ends_on_the_same_weights(tiny_model_dir, vqa_dir, tmp_path, modes):
    """A run stopped after its checkpoint and resumed ends where the uninterrupted run ends.

    The resumed run gets the uninterrupted run's first checkpoint: its optimizer, schedule and
    data order go on from there, and so must its weights (before, a full run went on from the
    stage's starting weights, and a LoRA run lost the projector it trained beside the
    adapters)."""
    from safetensors.torch import load_file

    def cfg(out, **kw):
        return _cfg(
            "downstream", tiny_model_dir, vqa_dir, out,
            max_steps=4, save_steps=2, save_total_limit=None, **modes, **kw,
        )  # fmt: skip

    whole = run_stage(cfg(tmp_path / "whole"))
    shutil.copytree(
        whole / "checkpoints" / "checkpoint-2",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-2",
    )
    resumed = run_stage(cfg(tmp_path / "resumed", resume_from_checkpoint=True))

    state = json.loads(
        (resumed / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text()
    )
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    start = load_file(tiny_model_dir / "model.safetensors")
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], start[k])]
    assert any("multi_modal_projector" in k for k in changed)
    assert any("language_model" in k for k in changed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_resume_refuses_a_lora_checkpoint_without_its_full_weights(
    tiny_model_dir, vqa_dir, tmp_path
):
    modes = {"language_model": {"mode": "lora"}, "lora": {"r": 4, "alpha": 8}}
    out = tmp_path / "r"
    run_stage(_cfg("downstream", tiny_model_dir, vqa_dir, out, max_steps=2, save_steps=2, **modes))
    (out / "checkpoints" / "checkpoint-2" / trainer_mod.BESIDE_ADAPTERS).unlink()
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        run_stage(
            _cfg(
                "downstream",
                tiny_model_dir,
                vqa_dir,
                out,
                max_steps=4,
                save_steps=2,
                resume_from_checkpoint=True,
                **modes,
            )  # fmt: skip
        )


def test_lora_merge_keeps_outputs(tiny_model_dir, vqa_dir):
    from peft import LoraConfig, get_peft_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(
        lm.model,
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    inputs = lm.processor(
        images=[Image.new("RGB", (32, 32), (9, 9, 9))],
        text=["USER: <image>\nq ASSISTANT:"],
        return_tensors="pt",
    )
    with torch.no_grad():
        with_adapter = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    assert torch.allclose(with_adapter, merged, atol=1e-5)


def test_deepspeed_without_deepspeed_says_how_to_get_it(
    tiny_model_dir, vqa_dir, tmp_path, monkeypatch
):
    """`--set deepspeed=zero3` (README's instruct example) ended in transformers'
    PackageNotFoundError traceback where DeepSpeed is not installed."""
    import importlib.util

    assert importlib.util.find_spec("deepspeed") is None  # this machine has none to use
    cfg = _cfg("instruct", tiny_model_dir, vqa_dir, tmp_path / "x", deepspeed="zero3")
    with pytest.raises(ValueError, match=r"gpu-train extra .*accelerate launch"):
        trainer_mod.training_arguments(cfg)
    loaded = []  # and before the model and the data load (minutes at the real size)
    monkeypatch.setattr(trainer_mod, "_load_for_training", lambda cfg: loaded.append(cfg))
    with pytest.raises(ValueError, match="gpu-train extra"):
        run_stage(cfg)
    assert loaded == []


def test_nothing_to_train_is_an_error(tiny_model_dir, vqa_dir, tmp_path):
    frozen = {"mode": "frozen"}
    with pytest.raises(ValueError, match="nothing to train"):
        run_stage(
            _cfg(
                "alignment",
                tiny_model_dir,
                vqa_dir,
                tmp_path / "x",
                vision_tower=frozen,
                projector=frozen,
                language_model=frozen,
            )
        )


def test_shipped_configs_reproduce_the_recipe():
    from tinyllava_med.training.config import CONFIG_DIR

    epochs = {}
    for stage in ("alignment", "instruct", "downstream"):
        cfg = TrainConfig.from_yaml(f"tinyllava-1.5b-{stage}", deepspeed="zero3")
        assert (
            cfg.learning_rate,
            cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps,
        ) == (2e-5, 32, 2)
        assert cfg.bf16 and cfg.gradient_checkpointing and cfg.lr_scheduler_type == "cosine"
        assert cfg.warmup_ratio == 0.03 and cfg.model_max_length == 2048
        assert cfg.language_model.mode == cfg.projector.mode == "full"
        # the original froze the tower in every stage (train_utils.unlock_vit, from layer 100)
        assert cfg.vision_tower.mode == "frozen"
        assert Path(cfg.deepspeed) == CONFIG_DIR / "zero3.json"
        epochs[stage] = cfg.num_train_epochs
    assert epochs == {"alignment": 1, "instruct": 10, "downstream": 18}


def test_packed_questions_have_single_turn_logits(tiny_lm, vqa_dir):
    """Packing several questions about one image gives each answer exactly the logits it gets
    when asked alone (block-diagonal mask, positions restarting after the shared prefix)."""
    from tinyllava_med.training.data import Collator, group_by_image

    entries = read_conversations(vqa_dir / "train.json")
    singles = [{**e, "conversations": e["conversations"][:2]} for e in entries[:1]]
    singles.append(
        {
            **entries[0],
            "id": "b",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich organ is shown?"},
                {"from": "gpt", "value": "chest x-ray"},
            ],
        }
    )
    packed = group_by_image(singles, turns_per_sample=2)
    assert len(packed) == 1
    proc, model = tiny_lm.processor, tiny_lm.model
    col = Collator(proc.tokenizer.pad_token_id)
    ds_packed = ConversationDataset(packed, vqa_dir / "images", proc, "v1", pack=True)
    item = ds_packed[0]
    assert "segment_ids" in item and int(item["segment_ids"].max()) == 2
    with torch.no_grad():
        batch = col([item])
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        got = out[batch["labels"][0] != IGNORE_INDEX]  # logits at the answer tokens
        alone = []
        for e in singles:
            ds = ConversationDataset([e], vqa_dir / "images", proc, "v1")
            b = col([ds[0]])
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[0]
            alone.append(logits[b["labels"][0] != IGNORE_INDEX])
    # packing order follows the shuffle; compare as a set of rows
    want = torch.cat(alone)
    assert got.shape == want.shape
    assert any(torch.allclose(got, torch.cat(alone[::s]), atol=1e-4) for s in (1, -1))


def test_qlora_stage_writes_a_plain_checkpoint(tiny_model_dir, vqa_dir, tmp_path):
    """4-bit base under LoRA adapters; the adapters are merged into the full-precision base, and
    the projector trained in `full` mode beside them keeps what it learnt."""
    out = run_stage(
        _cfg(
            "instruct",
            tiny_model_dir,
            vqa_dir,
            tmp_path / "q",
            language_model={"mode": "lora"},
            projector={"mode": "full"},
            lora={"r": 4, "alpha": 8, "qlora": True},
            max_steps=2,
        )
    )
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    lm = load_model(str(out), device="cpu")
    assert lm.quantization == "none"
    base = load_model(str(tiny_model_dir), device="cpu").model.state_dict()
    merged = lm.model.state_dict()
    assert set(merged) == set(base)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.float32 and not torch.equal(merged[key], base[key])
    projector = [k for k in base if k.startswith("model.multi_modal_projector.")]
    assert projector and all(not torch.equal(merged[k], base[k]) for k in projector)
    tower = [k for k in base if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(merged[k], base[k]) for k in tower)  # frozen: as it was


@pytest.mark.parametrize("seconds_per_step", [0.1, 0.2])
def test_a_budget_that_fits_leaves_the_schedule_to_the_steps(monkeypatch, seconds_per_step):
    """100 steps in a 60 s budget, the first taking 3 s (start-up) and the next nine 0.5 s
    (warming up), the others 0.1 or 0.2 s: they fit, the schedule follows the steps alone, and
    both speeds give the same rates, so the weights do not depend on how fast the machine was.
    (When the clock was allowed to lead whenever it was ahead, the slow first step made it
    lead, and the rates differed.)"""
    now = [0.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock: dict = {}
    sched = budget_cosine(opt, max_steps=100, warmup_ratio=0.1, budget_s=60.0, clock=clock)
    rates = []
    for step in range(100):
        now[0] += 3.0 if step == 0 else 0.5 if step < 10 else seconds_per_step
        opt.step()
        sched.step()
        rates.append(round(sched.get_last_lr()[0], 12))
    assert clock["led"] is False
    steps_only = budget_cosine(opt, max_steps=100, warmup_ratio=0.1, budget_s=1e9)
    expected = []
    for _ in range(100):
        steps_only.step()
        expected.append(round(steps_only.get_last_lr()[0], 12))
    assert rates == expected and rates[-1] == 0.0


def test_a_budget_too_short_for_the_steps_lets_the_clock_lead(monkeypatch):
    """100 steps at 1 s each in a 30 s budget cannot fit: a tenth of the budget in (before the
    calibration steps), the clock takes the lead, so the rate reaches zero when the budget
    ends, not after 100 steps."""
    now = [0.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock: dict = {}
    sched = budget_cosine(opt, max_steps=100, warmup_ratio=0.1, budget_s=30.0, clock=clock)
    for step in range(1, 31):
        now[0] += 1.0
        opt.step()
        sched.step()
        if step < 3:  # two timed steps are needed to decide
            assert clock["led"] is None
        else:
            assert clock["led"] is True
    assert sched.get_last_lr()[0] == 0.0  # 30 s of 30: the schedule is over


def test_a_run_cut_by_its_time_limit_records_that_it_is_not_reproducible(
    tiny_model_dir, vqa_dir, tmp_path
):
    """The provenance says how a stage ran: all its steps (reproducible) or cut short by
    `max_time_s` (a rebuild differs), with the steps done and the thread count."""
    full = run_stage(_cfg("downstream", tiny_model_dir, vqa_dir, tmp_path / "full"))
    run = ServedMeta.load(full).training["run"]
    assert (run["steps"], run["max_steps"], run["reproducible"]) == (3, 3, True)
    assert run["torch_threads"] == torch.get_num_threads()

    cut = run_stage(
        _cfg("downstream", tiny_model_dir, vqa_dir, tmp_path / "cut", max_steps=50, max_time_s=1e-6)
    )
    run = ServedMeta.load(cut).training["run"]
    assert run["stopped_by_time_limit"] and not run["reproducible"]
    assert run["steps"] == 1 and run["max_steps"] == 50


def test_a_lora_stage_with_one_seed_gives_the_same_weights(tiny_model_dir, vqa_dir, tmp_path):
    """The adapters are initialised as the model is wrapped, before the Trainer seeds: the
    stage seeds first, so two runs with one seed (in one process, whatever drew from the
    random generator between them) write the same weights, as their provenance claims."""
    outs = []
    for name in ("a", "b"):
        torch.rand(7)  # something else drew in between
        out = run_stage(
            _cfg(
                "instruct",
                tiny_model_dir,
                vqa_dir,
                tmp_path / name,
                language_model={"mode": "lora"},
                projector={"mode": "frozen"},
                lora={"r": 4, "alpha": 8},
                max_steps=3,
            )
        )
        outs.append(load_model(str(out), device="cpu").model.state_dict())
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = load_model(str(tiny_model_dir), device="cpu").model.state_dict()
    assert not torch.equal(outs[0][key], base[key])  # it trained
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_lora_projector_gets_adapters_and_an_unmatched_one_is_refused(tiny_model_dir, vqa_dir):
    """`projector.mode: lora` puts adapters on the projector's two layers (they sit right under
    it); a target list that names none of a LoRA component's layers is an error, not a
    component that silently trains nothing."""
    cfg = _cfg(
        "instruct",
        tiny_model_dir,
        vqa_dir,
        "unused",
        projector={"mode": "lora"},
        language_model={"mode": "frozen"},
        lora={"r": 4, "alpha": 8},
    )
    model, _processor, _meta = trainer_mod._load_for_training(cfg)
    wrapped = trainer_mod._apply_modes(model, cfg)
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all("multi_modal_projector" in n and "lora_" in n for n in trained)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == {"linear_1", "linear_2"}

    only_attention = cfg.model_copy(
        update={"lora": cfg.lora.model_copy(update={"target_modules": ["q_proj"]})}
    )
    model, _processor, _meta = trainer_mod._load_for_training(only_attention)
    with pytest.raises(ValueError, match="projector.mode is lora.*linear_1, linear_2"):
        trainer_mod._apply_modes(model, only_attention)
