"""Which language-model linear, kept in fp16, helps nf4 most? Measured on calibration phantoms.

    python bench/nf4_sensitivity.py --model data/models/demo --prompts 256

For the paper's nf4 recipe with the vision tower in LLM.int8 (`quantize --method nf4 --int8
model.vision_tower`), and then for the same with each language-model linear in turn kept in
fp16, the fp32 model's greedy answers to `--prompts` PhantomVQA phantoms of the output check's
seed (`quantize.check.CHECK_SEED`, which the demo neither trains nor is scored on) are teacher
forced: answers kept, the worst centred logit cosine, and the mean and worst KL divergence from
fp32 over the answer tokens. A module that matters stands out here before it is chosen on the
benchmark itself.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from tinyllava_med.model.load import load_model
from tinyllava_med.quantize.check import Reference, _centred_cosines, phantom_prompts
from tinyllava_med.quantize.export import quantize_checkpoint
from tinyllava_med.quantize.skip import quantizable_linears

KEPT = ["model.multi_modal_projector", "lm_head"]
INT8 = ["model.vision_tower"]


def scores(ref: Reference, model: torch.nn.Module) -> tuple[int, float, float, float]:
    kept, cosines, kls = 0, [], []
    for got, want, answer in ref.forced(model):
        kept += got.argmax(-1).tolist() == answer
        cosines.append(_centred_cosines(got, want).min().item())
        kl = torch.nn.functional.kl_div(
            got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none"
        )
        kls.append(kl.sum(-1).max().item())
    return kept, min(cosines), sum(kls) / len(kls), max(kls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="data/models/demo")
    ap.add_argument("--prompts", type=int, default=256)
    args = ap.parse_args()
    base = load_model(args.model, device="cpu")
    ref = Reference(base, phantom_prompts(args.prompts))
    print("| kept in fp16 | answers as fp32 | worst cosine | mean KL | worst KL |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for module in [None, *quantizable_linears(base.model, KEPT + INT8)]:
        with tempfile.TemporaryDirectory() as tmp:
            skip = KEPT + ([module] if module else [])
            dst = quantize_checkpoint(
                args.model, f"{tmp}/q", method="nf4", skip_modules=skip, int8_modules=INT8
            )
            kept, cos, mean_kl, max_kl = scores(ref, load_model(str(dst)).model)
        name = module or "nothing more (paper recipe, tower int8)"
        print(f"| {name} | {kept}/{args.prompts} | {cos:.4f} | {mean_kl:.5f} | {max_kl:.4f} |")


if __name__ == "__main__":
    main()
