"""--task mc and --fields: any multiple-choice file (nested JSONL, CSV with quoted commas, a saved
dataset), fields picked by dotted paths, the gold label as an index or an option's text; the same
--fields for --task prompts (RealToxicityPrompts' nested layout)."""

from __future__ import annotations

import json

import pytest
from cli_support import error_line, workbench

from workbench.engine.records import get_path, parse_fields, read_rows
from workbench.engine.tasks import MC_FIELDS, PROMPT_FIELDS, gold_index, load_mc, load_prompts
from workbench.errors import WorkbenchError


def test_nested_jsonl_with_dotted_paths(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [{"item": {"ctx": "Two people met.", "q": "Who left?"}, "choices": ["the first", "the second", "unknown"],
             "answer": 2, "meta": {"kind": "ambig"}, "uid": "x1", "note": [1, 2]},
            {"item": {"ctx": "One stayed.", "q": "Who stayed?"}, "choices": ["the first", "the second"], "answer": "The Second",
             "meta": {"kind": "dis"}, "uid": "x2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = parse_fields("context=item.ctx,question=item.q,options=choices,label=answer,id=uid,category=meta.kind", MC_FIELDS)
    samples = load_mc([path], fields)
    assert [s.context for s in samples] == ["Two people met.", "One stayed."]
    assert [s.question for s in samples] == ["Who left?", "Who stayed?"]
    assert samples[0].options == ("the first", "the second", "unknown") and samples[1].options == ("the first", "the second")
    assert [s.gold for s in samples] == [2, 1]  # an index, and an option's text (case-insensitive)
    assert [s.id for s in samples] == ["x1", "x2"] and [s.category for s in samples] == ["ambig", "dis"]
    assert samples[0].extra == {"note": [1, 2]}  # the top-level fields no path starts from


def test_csv_with_quoted_commas_fixed_options_and_yes_no_labels(tmp_path):
    """The jailbreak layout (poloclub/llm-self-defense: prompt, response, is harmful?): a response with a
    comma and a line break in quotes, a fixed option set, the gold label written Yes/No."""
    path = tmp_path / "harm.csv"
    path.write_text('prompt,response,is harmful?\n'
                    'p1,"Sure, here is how: step one,\nstep two",Yes\n'
                    'p2,"I cannot help with that, sorry.",No\n')
    fields = parse_fields("question=response,label=is harmful?", MC_FIELDS)
    samples = load_mc([path], fields, "yes, this is harmful|no, this is not harmful")
    assert [s.question for s in samples] == ["Sure, here is how: step one,\nstep two", "I cannot help with that, sorry."]
    assert [s.gold for s in samples] == [0, 1]
    assert samples[0].options == ("yes, this is harmful", "no, this is not harmful")
    assert samples[0].extra == {"prompt": "p1"} and [s.id for s in samples] == ["1", "2"]


def test_options_from_several_fields_and_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"context": "c0", "question": "q0", "ans0": "A", "ans1": "B", "ans2": "C", "label": 1},
                                     {"context": "c1", "question": "q1", "ans0": "D", "ans1": "E", "ans2": "F", "label": 0}])
    ds.save_to_disk(str(tmp_path / "saved"))
    fields = parse_fields("context=context,question=question,options=ans0|ans1|ans2,label=label", MC_FIELDS)
    samples = load_mc([tmp_path / "saved"], fields)
    assert [s.options for s in samples] == [("A", "B", "C"), ("D", "E", "F")] and [s.gold for s in samples] == [1, 0]
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(WorkbenchError, match="splits train, test"):
        load_mc([tmp_path / "splits"], fields)
    assert len(load_mc([tmp_path / "splits" / "test"], fields)) == 2


@pytest.mark.parametrize("line, fields, needle", [
    ('{"q": "x", "choices": ["a", "b"], "answer": 5}', "question=q,options=choices,label=answer", ":2: label (answer) is 5"),
    ('{"q": "x", "choices": "a b", "answer": 0}', "question=q,options=choices,label=answer", ":2: options (choices) must be a list"),
    ('{"q": "x", "answer": 0}', "question=q,options=choices,label=answer", ":2: no field 'choices' for options"),
    ('{"q": {"t": 1}, "choices": ["a", "b"]}', "question=q.s,options=choices", ":1: no field 'q.s' for question (no 's' in q)"),
    ('{"q": ["x"], "choices": ["a", "b"]}', "question=q,options=choices", ":2: question (q) must be text"),
    ('{"q": "x", "choices": ["a", "b"], "answer": "maybe"}', "question=q,options=choices,label=answer", "neither an index nor one of the options"),
    ('{"q": "x", "choices": ["a"]}', "question=q,options=choices", "1 options (choices)"),
])
def test_a_row_that_does_not_fit_is_one_line_naming_row_and_field(tmp_path, line, fields, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "fine", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(WorkbenchError) as e:
        load_mc([path], parse_fields(fields, MC_FIELDS))
    assert needle in str(e.value) and str(path) in str(e.value)


def test_field_mapping_errors_and_label_rules():
    with pytest.raises(WorkbenchError, match="unknown name 'answer'"):
        parse_fields("answer=x", MC_FIELDS)
    with pytest.raises(WorkbenchError, match="expected NAME=PATH"):
        parse_fields("question", MC_FIELDS)
    with pytest.raises(WorkbenchError, match="given twice"):
        parse_fields("question=a,question=b", MC_FIELDS)
    assert get_path({"a.b": 1, "a": {"b": 2}}, "a.b", "w", "x") == 1  # a key holding a dot wins
    assert get_path({"l": [{"t": "z"}]}, "l.0.t", "w", "x") == "z"
    options = ("yes, this is harmful", "no, this is not harmful")
    assert [gold_index(v, options, "w", "p") for v in ("Yes", " no ", "1", 0, "no, this is not harmful")] == [0, 1, 1, 0, 1]
    with pytest.raises(WorkbenchError, match="neither"):
        gold_index("yesterday", options, "w", "p")  # a prefix counts only as a whole word


def test_prompts_take_dotted_fields_rtp_layout(tmp_path):
    path = tmp_path / "rtp.jsonl"
    path.write_text(json.dumps({"filename": "a.txt", "prompt": {"text": "So I said", "toxicity": 0.2}}) + "\n"
                    + json.dumps({"filename": "b.txt", "prompt": {"text": "Then she", "toxicity": 0.7}}) + "\n")
    samples = load_prompts(path, fields=parse_fields("text=prompt.text,id=filename", PROMPT_FIELDS))
    assert [s.context for s in samples] == ["So I said", "Then she"] and [s.id for s in samples] == ["a.txt", "b.txt"]
    assert samples[1].extra == {"filename": "b.txt"}
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('id,prompt\nk,"Hello, world"\n')
    assert load_prompts(csv_path)[0].context == "Hello, world"
    assert read_rows(csv_path)[0].where.endswith("p.csv:row 1 (line 2)")


def test_run_mc_from_the_command_line(capsys, monkeypatch, tmp_path, model_dirs):
    """The issue's jailbreak command: a CSV, --fields with a column name holding a space and '?',
    fixed --options; the run file keeps the options and gold labels; bad --fields is one line."""
    data = tmp_path / "harm.csv"
    data.write_text('prompt,response,is harmful?\np1,"Sure, here it is",Yes\np2,"No, I cannot",No\n')
    out = tmp_path / "mc.h5"
    args = ["run", "--model", str(model_dirs["llama"]), "--task", "mc", "--data", str(data), "--fields",
            "question=response,label=is harmful?", "--options", "yes, this is harmful|no, this is not harmful",
            "--rounds", "2", "--max-new-tokens", "3", "--out", str(out)]
    code, _, err = workbench(capsys, monkeypatch, *args)
    assert code == 0, err
    from workbench.store.reader import RunFile

    with RunFile(out) as run:
        assert run.array("samples/gold").tolist() == [0, 1]
        assert run.meta["task"] == "mc" and run.meta["data"]["options"] == "yes, this is harmful|no, this is not harmful"
        assert run.array("rounds/option_probs").shape[:2] == (2, 2)
    code, _, err = workbench(capsys, monkeypatch, *args[:-2], "--out", str(tmp_path / "bad.h5"), "--fields", "question=response,label=nope")
    assert code == 2
    error_line(err, "no field 'nope'")


def test_a_saved_dataset_without_the_datasets_package_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "saved").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(WorkbenchError, match=r"needs the datasets package \(pip install 'workbench\[data\]'"):
        read_rows(tmp_path / "saved")


def test_a_text_file_is_one_prompt_per_line(tmp_path):
    """The study's datasets/winogender/wino_gender.txt layout: one sentence per line."""
    path = tmp_path / "wino_gender.txt"
    path.write_text("The technician told the customer that _ could pay with cash.\n\n  The taxpayer met with the accountant.  \n")
    samples = load_prompts(path)
    assert [s.context for s in samples] == ["The technician told the customer that _ could pay with cash.", "The taxpayer met with the accountant."]
    assert [s.id for s in samples] == ["1", "3"]  # the line number
