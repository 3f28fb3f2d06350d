"""`eval compare`: several variants of one model scored on one PhantomVQA split, one table."""

from __future__ import annotations

import json

from tinyllava_med.eval.compare import compare_variants
from tinyllava_med.training.phantom import generate_phantom


def test_compare_writes_table_json_and_chart(tiny_model_dir, tmp_path):
    ph = tmp_path / "ph"
    generate_phantom(ph, n=6, seed=3)
    md = compare_variants(
        [str(tiny_model_dir), f"{tiny_model_dir}:cpu-int8"],
        questions=ph / "test.json",
        images=ph / "images",
        out_dir=tmp_path / "cmp",
        max_new_tokens=3,
    )
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["quantization"] for r in rows] == ["none", "cpu-int8"]
    n = len(json.loads((ph / "test.json").read_text()))
    for r in rows:
        assert r["n_closed"] + r["n_open"] == n and r["missing"] == 0
        assert 0.0 <= r["closed_accuracy"] <= 1.0 and r["static_memory_bytes"] > 0
    assert rows[1]["static_memory_bytes"] < rows[0]["static_memory_bytes"]
    # each row counts the answers its 3-token limit cut, as the answers file records them
    for r in rows:
        (answers,) = (tmp_path / "cmp").glob(f"*-{r['quantization']}.answers.jsonl")
        lines = [json.loads(line) for line in answers.read_text().splitlines()]
        cut = sum(line["metadata"]["finish_reason"] == "length" for line in lines)
        assert r["cut_short"] == cut > 0, (r["variant"], answers.name)
    # the second row is paired with the first question by question, as its answer files say
    assert rows[0]["against_reference"] is None
    against = rows[1]["against_reference"]
    texts = [
        {
            (line := json.loads(raw))["question_id"]: line["text"].strip().lower()
            for raw in next((tmp_path / "cmp").glob(f"*-{q}.answers.jsonl")).read_text().split("\n")
            if raw
        }
        for q in ("none", "cpu-int8")
    ]
    assert against["reference"] == str(tiny_model_dir) and against["n_paired"] == n
    assert against["changed"] == sum(texts[0][q] != texts[1][q] for q in texts[0])
    assert 0.0 < against["mcnemar_p"] <= 1.0
    text = md.read_text()
    assert "cpu-int8" in text and "McNemar p" in text and text.count("\n") == 6
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_two_folders_of_one_name_are_compared_each_in_its_own_file(tiny_model_dir, tmp_path):
    """`--variants runs/a/demo runs/b/demo` named both answer files `demo-none`: the second
    stopped on the first's answers ("holds answers of another model")."""
    import shutil

    ph = tmp_path / "ph"
    generate_phantom(ph, n=2, seed=3)
    a, b, c = (tmp_path / run / tiny_model_dir.name for run in ("a", "b", "c"))
    for folder in (a, b, c):
        shutil.copytree(tiny_model_dir, folder)
    compare_variants(
        [str(a), str(b), str(c)],
        questions=ph / "test.json",
        images=ph / "images",
        out_dir=tmp_path / "cmp",
        max_new_tokens=2,
    )
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["variant"] for r in rows] == [str(a), str(b), str(c)]
    files = sorted(p.name for p in (tmp_path / "cmp").glob("*.answers.jsonl"))
    assert files == [f"{a.name}-none{n}.answers.jsonl" for n in ("-2", "-3", "")]
