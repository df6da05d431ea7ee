import json
from collections import Counter
from pathlib import Path

import pytest

from ftlib.core.config import load_params
from ftlib.stages.split import SPLITS, InvalidData, assign, split_paths
from ftlib.stages.validate import prompt_key
from tests.conftest import LABELS, alpaca, balanced, write_jsonl


def read(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()] for s in SPLITS}


def where(splits: dict[str, list[dict]]) -> dict[str, str]:
    return {json.dumps(o, sort_keys=True): s for s, objs in splits.items() for o in objs}


def test_split_writes_three_files_with_every_example_once(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "raw" / "d.jsonl", balanced(100))
    result = split_paths([f], params, tmp_path / "splits", tokenizer=tokenizer)
    got = read(tmp_path / "splits")
    assert sum(len(v) for v in got.values()) == 300 == sum(result.counts.values())
    assert {s: len(v) for s, v in got.items()} == result.counts
    assert len(where(got)) == 300


def test_split_is_deterministic_byte_for_byte(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", balanced(40))
    split_paths([f], params, tmp_path / "a", tokenizer=tokenizer)
    split_paths([f], params, tmp_path / "b", tokenizer=tokenizer)
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()


def test_appending_ten_percent_moves_no_old_example(tmp_path, params, tokenizer):
    old = balanced(100)
    write_jsonl(tmp_path / "raw" / "old.jsonl", old)
    split_paths([tmp_path / "raw"], params, tmp_path / "before", tokenizer=tokenizer)
    write_jsonl(tmp_path / "raw" / "new.jsonl", balanced(10, start=100))  # +10%
    split_paths([tmp_path / "raw"], params, tmp_path / "after", tokenizer=tokenizer)
    before, after = where(read(tmp_path / "before")), where(read(tmp_path / "after"))
    assert len(after) == 330
    moved = [k for k, s in before.items() if after[k] != s]
    assert moved == []


def test_stratified_per_label(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", balanced(1000))
    result = split_paths([f], params, tmp_path / "s", tokenizer=tokenizer)
    for label in LABELS:
        total = sum(result.per_label[s][label] for s in SPLITS)
        assert total == 1000
        for s, ratio in zip(SPLITS, (0.8, 0.1, 0.1)):
            # each label is cut by the same hash thresholds: ratios hold up to sampling noise
            assert abs(result.per_label[s][label] / total - ratio) < 0.04, (s, label, result.per_label)


def test_ratios_follow_params(tmp_path, tokenizer):
    p = load_params(None, ["split.train=0.5", "split.validation=0.25", "split.test=0.25", "validate.data_docs=false"])
    result = split_paths([write_jsonl(tmp_path / "d.jsonl", balanced(400))], p, tmp_path / "s", tokenizer=tokenizer)
    assert abs(result.counts["train"] / 1200 - 0.5) < 0.05 and abs(result.counts["test"] / 1200 - 0.25) < 0.05


def test_duplicate_prompts_never_land_in_two_splits(tmp_path, tokenizer):
    # duplicates and contradictions downgraded to warnings so they reach the split
    p = load_params(None, ["validate.duplicates=warning", "validate.contradictions=warning", "validate.data_docs=false"])
    rows = balanced(60)
    rows += [alpaca(r["input"], "NEUTRAL" if r["output"] != "NEUTRAL" else "POSITIVO") for r in rows[:60]]  # same prompts, other labels
    rows += rows[:30]  # exact duplicates
    result = split_paths([write_jsonl(tmp_path / "d.jsonl", rows)], p, tmp_path / "s", tokenizer=tokenizer)
    assert result.duplicates_dropped == 30
    prompts: dict[str, set[str]] = {}
    for s, objs in read(tmp_path / "s").items():
        for o in objs:
            prompts.setdefault(prompt_key(o), set()).add(s)
    assert all(len(v) == 1 for v in prompts.values())
    assert Counter(len(v) for v in prompts.values())[1] == 180


def test_assign_depends_only_on_content_and_seed(params):
    k = prompt_key(alpaca("hola"))
    assert assign(k, params) == assign(k, params)
    other = load_params(None, ["split.seed=1"])
    keys = [prompt_key(alpaca(f"t{i}")) for i in range(200)]
    assert [assign(k, params) for k in keys] != [assign(k, other) for k in keys]


def test_invalid_data_is_refused_and_nothing_written(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", balanced(5) + ['{"broken": '])
    with pytest.raises(InvalidData) as e:
        split_paths([f], params, tmp_path / "s", tokenizer=tokenizer)
    assert [i.rule for i in e.value.result.errors] == ["json"]
    assert not (tmp_path / "s").exists()


def test_invalid_data_leaves_existing_splits_untouched(tmp_path, params, tokenizer):
    split_paths([write_jsonl(tmp_path / "good.jsonl", balanced(20))], params, tmp_path / "s", tokenizer=tokenizer)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", balanced(20, start=50) + ['{"broken": '])
    with pytest.raises(InvalidData):  # valid chunks were streamed to temp files before the bad line
        split_paths([bad], params, tmp_path / "s", tokenizer=tokenizer, chunk_rows=7)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


@pytest.mark.slow
def test_chunked_split_equals_one_chunk(tmp_path, tokenizer):
    """20,000 rows with duplicates and contradictions let through as warnings: byte-identical
    split files, counts and dropped duplicates whether validated 1,000 rows at a time or at once."""
    p = load_params(None, ["validate.duplicates=warning", "validate.contradictions=warning", "validate.data_docs=false"])
    rows = balanced(6_667)
    rows += [rows[3], rows[15_000], alpaca(rows[5]["input"], "NEUTRAL" if rows[5]["output"] != "NEUTRAL" else "POSITIVO")]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    one = split_paths([f], p, tmp_path / "one", tokenizer=tokenizer, chunk_rows=10**9)
    many = split_paths([f], p, tmp_path / "many", tokenizer=tokenizer, chunk_rows=1_000)
    assert one.duplicates_dropped == many.duplicates_dropped == 2
    assert (one.counts, one.per_label) == (many.counts, many.per_label) and sum(one.counts.values()) == len(rows) - 2
    for s in SPLITS:
        assert (tmp_path / "one" / f"{s}.jsonl").read_bytes() == (tmp_path / "many" / f"{s}.jsonl").read_bytes()
