"""Which modules stay in higher precision: the skip list and how its patterns match module paths.

Patterns match as transformers 5 matches `llm_int8_skip_modules` (a prefix of the full module
path up to a `.` boundary, or a suffix), so one list means the same thing for bitsandbytes, for
the CPU int8 format and for the computed memory table. A bare `multi_modal_projector` matches
nothing in a LLaVA (its path is `model.multi_modal_projector`): `unmatched_patterns` finds such
silent no-ops so that callers can refuse them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

# Small and quality-critical: the vision tower, the projector and `lm_head`. Only this list
# reproduces the paper's static reductions (measured on an H200: FQ4 -89.6%, Q4 -68.4% vs paper
# -90% / -67%). The tower in nf4 too (`device_rows.TOWER_SKIP`) measures -93.5% / -71.4% but
# costs the demo model 2 more PhantomVQA questions (bench/results/memory_table_cuda.md,
# phantomvqa_cuda.md), so it is an opt-in `--skip`, not the default. On CPU, int8 for the tower
# and `lm_head` as well is faster (bench/results/quant_speed_cpu.md): `quantize --method
# cpu-int8` adds each where its output check passes on the model at hand (`quantize.check`).
# The tower in LLM.int8 beside an nf4 LLM (`quantize --int8 model.vision_tower`: -92.2%
# computed) keeps every PhantomVQA answer of the paper recipe on the CPU kernels; it stays
# opt-in until a GPU run measures its memory, speed and answers on CUDA (bench/gpu_check.sh).
DEFAULT_SKIP_MODULES: tuple[str, ...] = (
    "model.vision_tower",
    "model.multi_modal_projector",
    "lm_head",
)


def skip_list(skip_modules: Sequence[str] | None) -> list[str]:
    """The skip patterns to use: the default when None, else exactly the given ones."""
    return list(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules)


def is_skipped(module_path: str, skip: Sequence[str]) -> bool:
    return not should_convert_module(module_path, list(skip))


def quantizable_linears(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Paths of the plain `nn.Linear` modules that the skip list leaves to quantize."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(name, skip)
    ]


def unmatched_patterns(model: nn.Module, skip: Sequence[str]) -> list[str]:
    """Skip patterns that keep no linear layer of `model` unquantized (typos, bare names).

    Quantizers test the paths of the linears themselves, so a bare `multi_modal_projector`
    suffix-matches its container `model.multi_modal_projector` but none of its linears.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [p for p in skip if not any(is_skipped(n, [p]) for n in names)]


def check_skip_patterns(model: nn.Module, skip: Sequence[str]) -> None:
    bad = unmatched_patterns(model, skip)
    if bad:
        raise ValueError(
            f"skip pattern(s) {bad} match no module of this model's linear layers; patterns are "
            f"transformers 5 module paths, e.g. {list(DEFAULT_SKIP_MODULES)}"
        )


def matched_by_both(model: nn.Module, first: Sequence[str], second: Sequence[str]) -> list[str]:
    """Paths of the linears of `model` that patterns of both lists match: `model.vision_tower`
    and `model.vision_tower.encoder` overlap though neither names the other."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and is_skipped(name, first) and is_skipped(name, second)
    ]
