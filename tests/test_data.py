"""Tests for deltalign.data: loading, validation messages, completion-only labels, low-padding batching."""

import json
import random

import pytest
import torch

from deltalign.data import batching as B
from deltalign.data import formats as F
from deltalign.data import tokenize as T
from deltalign.data.formats import DataError
from deltalign.core.tiny import build_tokenizer

EOT = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.add_special_tokens({"pad_token": "<|pad|>"})
    assert t.pad_token_id != t.eos_token_id
    return t


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_error(tmp_path, rows, kind="sft", name="x.jsonl"):
    src = write_jsonl(tmp_path / name, rows)
    parse = F.sft_examples if kind == "sft" else F.preference_examples
    with pytest.raises(DataError) as e:
        parse(F.load_rows(src), src)
    return str(e.value)


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------------ loading

ROWS = [{"prompt": "2+2=", "completion": "4", "constraint": "digits"}, {"prompt": "1+1=", "completion": "2"}]


def test_load_json_list_jsonl_json_lines_and_parquet(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    write_jsonl(tmp_path / "b.jsonl", ROWS)
    write_jsonl(tmp_path / "c.json", ROWS)  # JSON Lines in a .json file: auto-detected
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("a.json", "b.jsonl", "c.json"):
        assert F.load_rows(str(tmp_path / name)) == ROWS
    rows = F.load_rows(str(tmp_path / "d.parquet"))
    assert [(r["prompt"], r["completion"]) for r in rows] == [("2+2=", "4"), ("1+1=", "2")]


def test_load_datasets_dir_offline(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))  # save_to_disk -> load_from_disk
    assert F.load_rows(str(tmp_path / "saved"))[1]["completion"] == "2"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(F.load_rows(str(tmp_path / "dd"), split="test")) == 2
    with pytest.raises(DataError, match="no split 'train'"):
        F.load_rows(str(tmp_path / "dd"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    (tmp_path / "files").mkdir()  # a plain directory of data files -> load_dataset's json builder
    write_jsonl(tmp_path / "files" / "train.jsonl", ROWS)
    assert F.load_rows(str(tmp_path / "files"))[0]["prompt"] == "2+2="


def test_load_embedded_generates_once_and_again_when_the_generator_changes(tmp_path, monkeypatch):
    from deltalign.data import embedded

    calls = []

    def write(out_dir, seed=0):
        calls.append(out_dir)
        write_jsonl(out_dir / "sft_train.jsonl", ROWS)
        write_jsonl(out_dir / "pref_train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(embedded, "write", write)
    monkeypatch.setattr(F, "EMBEDDED_DIR", tmp_path / "data" / "embedded")
    assert F.load_rows("embedded:sft_train") == ROWS
    assert F.load_rows("embedded:pref_train")[0]["chosen"] == "a"
    assert len(calls) == 1
    with pytest.raises(DataError, match="no embedded split 'nope'"):
        F.load_rows("embedded:nope")
    monkeypatch.setattr(embedded, "code_hash", lambda: "a changed generator")
    F.load_rows("embedded:sft_train")
    assert len(calls) == 2  # the cached files were made by other code: made again


def test_real_embedded_set_parses_and_tokenizes(tmp_path, monkeypatch, tok):
    pytest.importorskip("deltalign.data.embedded")
    monkeypatch.setattr(F, "EMBEDDED_DIR", tmp_path / "embedded")
    for name in ("sft_train", "sft_eval", "pref_train", "pref_eval"):
        src = f"embedded:{name}"
        sft = name.startswith("sft")
        examples = (F.sft_examples if sft else F.preference_examples)(F.load_rows(src), src)
        assert examples and all("constraint" in e.extra for e in examples)
        items, dropped = T.tokenize_all(examples, T.tokenize_sft if sft else T.tokenize_pair, tok, 512, src)
        assert len(items) == len(examples) and dropped == 0


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        F.load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        F.load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: invalid JSON on line 3"):
        F.load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 3"):
        F.load_rows(str(tmp_path / "bad.json"))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl: row 0: expected a JSON object"):
        F.load_rows(str(tmp_path / "list.jsonl"))
    with pytest.raises(DataError, match="not a local file or directory"):
        F.load_rows(str(tmp_path / "no_such_dataset_dir"))


# ------------------------------------------------------------------------------------------ SFT shapes


def test_sft_shapes_and_extra():
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), asst("Hello!")], "id": 7},
        {"prompt": "Q: 2+2?\nA:", "completion": " 4", "constraint": "one digit"},
        {"prompt": [user("Hi")], "completion": [asst("Hey")]},
        {"prompt": [user("Hi")], "completion": "Yo"},
    ]
    ex = F.sft_examples(rows, "s")
    assert ex[0].prompt == [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert (ex[0].completion, ex[0].conversational, ex[0].extra) == ("Hello!", True, {"id": 7})
    assert (ex[1].prompt, ex[1].completion, ex[1].conversational) == ("Q: 2+2?\nA:", " 4", False)
    assert ex[1].extra == {"constraint": "one digit"}
    assert (ex[2].prompt, ex[2].completion, ex[2].conversational) == ([user("Hi")], "Hey", True)
    assert (ex[3].completion, ex[3].conversational) == ("Yo", True)


@pytest.mark.parametrize("row, field, what", [
    ({"prompt": "a"}, "completion", "missing field"),
    ({"prompt": "a", "completion": None}, "completion", "missing field"),
    ({"messages": "hi"}, "messages", "expected a list"),
    ({"messages": [user("a"), {"role": "assistant", "content": 3}]}, "messages[1].content", "expected a string"),
    ({"prompt": 5, "completion": "b"}, "prompt", "expected a string or a list"),
    ({"prompt": "a", "completion": ""}, "completion", "empty text"),
    ({"prompt": " \n\t", "completion": "b"}, "prompt", "empty text"),
    ({"messages": [{"role": "bot", "content": "a"}, asst("b")]}, "messages[0].role", "unknown role 'bot'"),
    ({"messages": [user("a"), user("b")]}, "messages", "last message must be the assistant"),
    ({"messages": [asst("a")]}, "messages", "at least one prompt message"),
    ({"text": "a"}, "messages", "unrecognised row shape"),
])
def test_sft_errors_name_file_row_field(tmp_path, row, field, what):
    msg = load_error(tmp_path, [{"prompt": "ok", "completion": "ok"}, {"prompt": "ok", "completion": "ok"}, row])
    assert "x.jsonl: row 2: " in msg and repr(field) in msg and what in msg


# ----------------------------------------------------------------------------------- preference shapes


HH_C = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris, of course."
HH_R = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris? Maybe Lyon."


def test_preference_shapes_and_extra():
    rows = [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no", "margin": 2, "constraint": "short"},
        {"prompt": [user("Say hi")], "chosen": [asst("hi")], "rejected": "no"},
        {"prompt": "Say hi", "chosen": [user("Say hi"), asst("hi")], "rejected": [user("Say hi"), asst("no")]},
        {"chosen": [user("Say hi"), asst("hi")], "rejected": [user("Say hi"), asst("no")]},
        {"chosen": HH_C, "rejected": HH_R, "id": 3},
        {"prompt": [user("Say hi")], "chosen": [user("Say hi"), asst("hi")], "rejected": "no"},
    ]
    ex = F.preference_examples(rows, "p")
    assert (ex[0].prompt, ex[0].chosen, ex[0].rejected, ex[0].conversational) == ("Say hi", "hi", "no", False)
    assert ex[0].margin == 2.0 and isinstance(ex[0].margin, float) and ex[0].extra == {"constraint": "short"}
    for e in ex[1:4] + ex[5:]:
        assert (e.prompt, e.chosen, e.rejected, e.conversational, e.margin) == ([user("Say hi")], "hi", "no",
                                                                                True, None)
    hh = ex[4]
    assert hh.prompt == [user("Hi"), asst("Hello!"), user("Capital of France?")]
    assert (hh.chosen, hh.rejected, hh.conversational, hh.extra) == ("Paris, of course.", "Paris? Maybe Lyon.",
                                                                     True, {"id": 3})


@pytest.mark.parametrize("row, field, what", [
    ({"prompt": "a", "chosen": "b"}, "rejected", "missing field"),
    ({"prompt": "a", "chosen": 1, "rejected": "c"}, "chosen", "expected a string or a list"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}, "margin", "finite number"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": True}, "margin", "finite number"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, "chosen", "empty text"),
    ({"prompt": "a", "chosen": "b", "rejected": "  \n"}, "rejected", "empty text"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "chosen", "identical to 'rejected'"),
    ({"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"}, "prompt[0].role",
     "unknown role"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "chosen",
     "identical"),
    ({"chosen": "no markers b", "rejected": "no markers c"}, "chosen", "Assistant:"),
    ({"chosen": [user("x"), asst("b")], "rejected": [user("y"), asst("c")]}, "rejected", "differs"),
    ({"question": "a", "answer": "b"}, "chosen", "unrecognised row shape"),
])
def test_preference_errors_name_file_row_field(tmp_path, row, field, what):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    msg = load_error(tmp_path, [ok, row], kind="pref", name="prefs.jsonl")
    assert "prefs.jsonl: row 1: " in msg and repr(field) in msg and what in msg


def test_hh_divergence_before_last_turn_is_an_error():
    c = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    r = "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: d"
    with pytest.raises(DataError, match="differ before their final assistant turn"):
        F.preference_examples([{"chosen": c, "rejected": r}], "hh")


# ----------------------------------------------------------------------------------------- tokenisation


def test_sft_labels_mask_exactly_the_prompt_and_keep_end_of_turn(tok):
    ex = F.sft_examples([{"messages": [user("What is 2+2?"), asst("It is 4.")]}], "s")[0]
    out = T.tokenize_sft(ex, tok, max_length=256)
    ids, labels = out["input_ids"], out["labels"]
    prompt_ids = T.tokenize_prompt(ex.prompt, tok, True)
    n = len(prompt_ids)
    assert ids[:n] == prompt_ids and labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and -100 not in labels[n:]
    assert tok.decode(ids[n:]) == "It is 4." + EOT
    assert tok.eos_token_id in labels[n:]  # the end-of-turn (= eos) token is trained on
    assert tok.decode(ids) == tok.apply_chat_template(ex.prompt + [asst("It is 4.")], tokenize=False)


def test_sft_plain_text_appends_eos_no_bos(tok):
    ex = F.sft_examples([{"prompt": "2+2=", "completion": "4"}], "s")[0]
    out = T.tokenize_sft(ex, tok, max_length=64)
    assert out["input_ids"][0] != tok.bos_token_id
    assert out["labels"] == [-100] * 4 + out["input_ids"][4:]
    assert tok.decode(out["input_ids"][4:]) == "4<|im_end|>" and out["input_ids"][-1] == tok.eos_token_id


def test_sft_truncation_policies(tok, tmp_path):
    ex = F.sft_examples([{"prompt": [user("hi")], "completion": "abcdefghij"}], "s")[0]
    n = len(T.tokenize_prompt(ex.prompt, tok, True))
    cut = T.tokenize_sft(ex, tok, max_length=n + 3, truncation="completion")
    assert len(cut["input_ids"]) == n + 3 and tok.decode(cut["input_ids"][n:]) == "abc"
    assert T.tokenize_sft(ex, tok, max_length=n + 3, truncation="drop") is None
    with pytest.raises(DataError, match=r"s: row 0: field 'completion': prompt \+ response has"):
        T.tokenize_sft(ex, tok, max_length=n + 3, truncation="error", where="s: row 0")
    for policy in ("completion", "error"):
        with pytest.raises(DataError, match=rf"d.jsonl: row 4: field 'prompt': prompt has {n} tokens, max_length "
                                            rf"is {n}"):
            T.tokenize_sft(ex, tok, max_length=n, truncation=policy, where="d.jsonl: row 4")
    assert T.tokenize_sft(ex, tok, max_length=n, truncation="drop") is None
    fits = T.tokenize_sft(ex, tok, max_length=500, truncation="error")
    assert tok.decode(fits["input_ids"][n:]) == "abcdefghij" + EOT
    items, dropped = T.tokenize_all([ex, ex], T.tokenize_sft, tok, n + 3, "d.jsonl", truncation="drop")
    assert (items, dropped) == ([], 2)


def test_prompt_too_long_names_file_and_row_via_tokenize_all(tok):
    exs = F.sft_examples([{"prompt": "a", "completion": "b"}, {"messages": [user("x" * 50), asst("y")]}], "f.jsonl")
    with pytest.raises(DataError, match=r"f.jsonl: row 1: field 'messages': prompt has \d+ tokens, max_length is 20"):
        T.tokenize_all(exs, T.tokenize_sft, tok, 20, "f.jsonl")


def test_conversational_without_chat_template(tok):
    bare = build_tokenizer()
    bare.chat_template = None
    exs = F.sft_examples([{"prompt": "a", "completion": "b"}, {"messages": [user("a"), asst("b")]}], "c.jsonl")
    assert T.tokenize_sft(exs[0], bare, 16) is not None  # plain text needs no template
    with pytest.raises(DataError, match=r"c.jsonl: row 1: field 'messages': .*chat_template"):
        T.tokenize_all(exs, T.tokenize_sft, bare, 64, "c.jsonl")
    pref = F.preference_examples([{"prompt": [user("a")], "chosen": "b", "rejected": "c"}], "c.jsonl")
    with pytest.raises(DataError, match=r"c.jsonl: row 0: field 'prompt': .*chat_template"):
        T.tokenize_all(pref, T.tokenize_pair, bare, 64, "c.jsonl")


def test_non_prefix_stable_template_is_an_error(tok):
    t = build_tokenizer()
    t.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] + '\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'assistant says:' }}{% endif %}")
    ex = F.sft_examples([{"messages": [user("a"), asst("b")]}], "s")[0]
    with pytest.raises(DataError, match="not prefix-stable"):
        T.tokenize_sft(ex, t, 64, where="s: row 0")


def test_tokenize_pair(tok):
    ex = F.preference_examples([{"prompt": [user("Pick")], "chosen": "yes", "rejected": "no no", "margin": 1.5}],
                               "p")[0]
    out = T.tokenize_pair(ex, tok, 64)
    assert out["prompt_ids"] == T.tokenize_prompt(ex.prompt, tok, True)
    assert tok.decode(out["chosen_ids"]) == "yes" + EOT and tok.decode(out["rejected_ids"]) == "no no" + EOT
    assert out["margin"] == 1.5
    n = len(out["prompt_ids"])
    short = T.tokenize_pair(ex, tok, n + 2)
    assert tok.decode(short["chosen_ids"]) == "ye" and tok.decode(short["rejected_ids"]) == "no"
    assert T.tokenize_pair(ex, tok, n + 4, truncation="drop") is None
    plain = F.preference_examples([{"prompt": "Q:", "chosen": " a", "rejected": " b"}], "p")[0]
    out = T.tokenize_pair(plain, tok, 64)
    assert out["chosen_ids"][-1] == tok.eos_token_id and tok.decode(out["prompt_ids"]) == "Q:"


def test_render_prompt(tok):
    assert T.render_prompt("plain", tok, False) == "plain"
    assert T.render_prompt([user("hi")], tok, True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------------------------- bad rows, keep_end


def hh_pair(question, chosen, rejected, before=""):
    """HH-style ``chosen``/``rejected`` dialogues: ``before`` (earlier turns), then one question and two answers."""
    return {"chosen": f"{before}\n\nHuman: {question}\n\nAssistant: {chosen}",
            "rejected": f"{before}\n\nHuman: {question}\n\nAssistant: {rejected}"}


LONG_Q = "a long question " * 30
HH_ROWS = [
    hh_pair("Sure?", "Yes.", "No.", before="\n\nHuman: Q0?\n\nAssistant: A."),
    hh_pair("Q1?", "One.", "Two."),
    {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",  # odd: differ before the last turn
     "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e"},
    hh_pair("Q3?", "Three.", "Four."),
    hh_pair("hi", "hello", " "),  # odd: empty final response
    hh_pair(LONG_Q, "ok", "no"),  # row 5: a prompt longer than the max_length used below
]
GOOD_ROWS = [0, 1, 3, 5]


def test_bad_rows_error_names_file_row_and_field(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with pytest.raises(DataError, match=r"hh.jsonl: row 2: field 'chosen': chosen and rejected differ before"):
        F.preference_examples(F.load_rows(src), src, bad_rows="error")
    rows = F.load_rows(src)
    with pytest.raises(DataError, match=r"hh.jsonl: row 4: field 'rejected': empty text"):
        F.preference_examples(rows[:2] + rows[1:2] + rows[3:], src)  # the default is "error"
    with pytest.raises(ValueError, match="bad_rows"):
        F.preference_examples(rows, src, bad_rows="ignore")


def test_bad_rows_skip_keeps_good_rows_logs_one_line_each(tmp_path, capsys):
    src = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    rows, lines = F.load_rows(src), []
    ex = F.preference_examples(rows, src, bad_rows="skip", log=lines.append)
    assert [e.row for e in ex] == GOOD_ROWS and len(rows) - len(ex) == 2  # the skipped count
    assert [e.chosen for e in ex[:2]] == ["Yes.", "One."] and ex[0].prompt[-1] == user("Sure?")
    assert len(lines) == 2
    assert f"{src}: row 2: field 'chosen': chosen and rejected differ" in lines[0]
    assert f"{src}: row 4: field 'rejected': empty text" in lines[1]
    assert capsys.readouterr().err == ""
    F.preference_examples(rows, src, bad_rows="skip")  # default log: one line per bad row on stderr
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "row 2: field 'chosen'" in err[0] and "row 4: field 'rejected'" in err[1]


def test_bad_rows_skip_sft_and_prompt_rows():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"messages": [user("x"), asst("y")]}, {"text": 1}]
    lines = []
    ex = F.sft_examples(rows, "s.jsonl", bad_rows="skip", log=lines.append)
    assert [e.row for e in ex] == [0, 2] and len(lines) == 2
    assert "s.jsonl: row 1: field 'completion': missing field" in lines[0] and "s.jsonl: row 3: " in lines[1]
    lines.clear()
    ex = F.prompt_examples([{"prompt": ""}, {"prompt": "go"}, {"other": 1}], "p.jsonl", bad_rows="skip",
                           log=lines.append)
    assert [(e.row, e.prompt) for e in ex] == [(1, "go")] and len(lines) == 2
    assert "p.jsonl: row 0: field 'prompt': empty text" in lines[0] and "p.jsonl: row 2: no prompt" in lines[1]


def test_every_row_bad_still_raises():
    with pytest.raises(DataError, match=r"^s.jsonl: every row is bad \(2 skipped\)"):
        F.sft_examples([{"prompt": "a"}, {"completion": "b"}], "s.jsonl", bad_rows="skip", log=lambda line: None)
    assert F.sft_examples([], "s.jsonl", bad_rows="skip") == []  # nothing to check (load_rows rejects no rows)


def test_row_numbers_stay_right_after_skipped_rows(tmp_path, tok):
    src = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    ex = F.preference_examples(F.load_rows(src), src, bad_rows="skip", log=lambda line: None)
    n = len(T.tokenize_prompt(ex[-1].prompt, tok, True))
    assert n > 64  # row 5's prompt alone is longer than max_length
    with pytest.raises(DataError, match=rf"hh.jsonl: row 5: field 'prompt': prompt has {n} tokens, max_length is 64"):
        T.tokenize_all(ex, T.tokenize_pair, tok, 64, src)
    lines = []
    items, dropped = T.tokenize_all(ex, T.tokenize_pair, tok, 64, src, "completion", bad_rows="skip",
                                    log=lines.append)
    assert len(items) == 3 and dropped == 0 and len(lines) == 1
    assert f"{src}: row 5: field 'prompt': prompt has {n} tokens" in lines[0]
    # every row ends up as an item, dropped (truncation 'drop') or skipped (logged): 6 rows, 3 skipped in all
    assert len(HH_ROWS) - len(items) - dropped == 3
    items, dropped = T.tokenize_all(ex, T.tokenize_pair, tok, 64, src, "drop", bad_rows="skip", log=lines.append)
    assert (len(items), dropped, len(lines)) == (3, 1, 1)


def test_tokenize_all_skip_every_row_or_tokenizer_problem_still_raises(tok):
    ex = F.sft_examples([{"messages": [user("x" * 80), asst("y")]}, {"prompt": [user("z" * 80)], "completion": "w"}],
                        "f.jsonl")
    with pytest.raises(DataError, match=r"^f.jsonl: no usable rows: 2 bad"):
        T.tokenize_all(ex, T.tokenize_sft, tok, 20, "f.jsonl", bad_rows="skip", log=lambda line: None)
    bare = build_tokenizer()
    bare.chat_template = None
    lines = []
    with pytest.raises(DataError, match=r"f.jsonl: row 0: field 'messages': .*chat_template"):
        T.tokenize_all(ex, T.tokenize_sft, bare, 200, "f.jsonl", bad_rows="skip", log=lines.append)
    assert lines == []  # not a bad row: the tokenizer is wrong for every row


def test_keep_end_cuts_a_long_prompt_from_the_left(tok):
    ex = F.sft_examples([{"prompt": [user(LONG_Q)], "completion": "abc"}], "s")[0]
    prompt = T.tokenize_prompt(ex.prompt, tok, True)
    whole = T.tokenize_sft(ex, tok, 10_000)["input_ids"][len(prompt):]  # "abc" + end of turn
    max_length = len(whole) + 40
    assert len(prompt) > max_length
    with pytest.raises(DataError, match="field 'prompt': prompt has"):
        T.tokenize_sft(ex, tok, max_length, "completion", where="s: row 0")
    out = T.tokenize_sft(ex, tok, max_length, "keep_end")
    assert len(out["input_ids"]) == max_length
    assert out["input_ids"] == prompt[-40:] + whole  # the END of the prompt, the completion intact
    assert out["labels"] == [-100] * 40 + whole
    # a long response too: the prompt keeps its last max_length // 2 tokens, the response is cut from the right
    long = F.sft_examples([{"prompt": [user(LONG_Q)], "completion": "abcdefghij" * 20}], "s")[0]
    whole = T.tokenize_sft(long, tok, 10_000)["input_ids"][len(prompt):]
    out = T.tokenize_sft(long, tok, 61, "keep_end")
    assert out["input_ids"] == prompt[-30:] + whole[:31] and out["labels"][:30] == [-100] * 30
    # a prompt that fits is never cut while the response fits; a short prompt keeps all of itself
    short = F.sft_examples([{"prompt": [user("hi")], "completion": "abcdefghij" * 20}], "s")[0]
    n = len(T.tokenize_prompt(short.prompt, tok, True))
    assert T.tokenize_sft(short, tok, 10_000, "keep_end") == T.tokenize_sft(short, tok, 10_000, "error")
    assert T.tokenize_sft(short, tok, 3 * n, "keep_end") == T.tokenize_sft(short, tok, 3 * n, "completion")


def test_keep_end_pairs_share_one_cut_prompt(tok):
    ex = F.preference_examples([hh_pair(LONG_Q, "ok", "no, not at all")], "hh.jsonl")[0]
    prompt = T.tokenize_prompt(ex.prompt, tok, True)
    full = T.tokenize_pair(ex, tok, 10_000)
    longest = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    out = T.tokenize_pair(ex, tok, longest + 30, "keep_end")
    assert out["prompt_ids"] == prompt[-30:]
    assert (out["chosen_ids"], out["rejected_ids"]) == (full["chosen_ids"], full["rejected_ids"])
    assert len(out["prompt_ids"]) + len(out["rejected_ids"]) == longest + 30
    assert "keep_end" in T.TRUNCATION


# --------------------------------------------------------------------------------------------- batching


def random_lengths(n=2000, seed=1):
    rng = random.Random(seed)
    return [rng.randint(16, 256) for _ in range(n)]


def test_length_grouped_batches_deterministic_and_covering():
    lengths = random_lengths(1003)
    a = B.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert a == B.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    assert a != B.length_grouped_batches(lengths, 8, seed=0, epoch=1)
    assert a != B.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    for shuffle in (True, False):
        batches = B.length_grouped_batches(lengths, 8, seed=0, epoch=0, shuffle=shuffle)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003))
        assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8
    assert max(lengths[i] for i in a[0]) == max(lengths)  # longest batch first
    assert B.length_grouped_batches([], 8, 0, 0) == []


def pad_share(batches) -> float:
    """Pad share over batches given as lists of sequence lengths, or as pad_batch dicts."""
    counter = B.PadCounter()
    for b in batches:
        if isinstance(b, dict):
            counter.add(b["n_tokens"], b["n_pad"])
        else:
            counter.add(sum(b), len(b) * max(b, default=0) - sum(b))
    return counter.share


def test_length_grouping_keeps_pad_share_low():
    lengths = random_lengths()
    grouped = B.length_grouped_batches(lengths, 8, seed=0, epoch=0)
    grouped_share = pad_share([[lengths[i] for i in b] for b in grouped])
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    naive_share = pad_share([[lengths[i] for i in order[s: s + 8]] for s in range(0, len(order), 8)])
    assert grouped_share < 0.10
    assert naive_share > 0.30 and grouped_share < naive_share / 5


def test_pad_batch_right_left_and_counts():
    out = B.pad_batch([[5, 6, 7], [8]], pad_id=0, labels=[[-100, 6, 7], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert (out["n_tokens"], out["n_pad"]) == (4, 2) and out["input_ids"].dtype == torch.long
    left = B.pad_batch([[5, 6, 7], [8]], pad_id=0, pad_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and "labels" not in left
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # pad id == a real token id (pad == eos): the real token stays labelled, only positions decide
    same = B.pad_batch([[2, 2], [2]], pad_id=2, labels=[[2, 2], [2]])
    assert same["labels"].tolist() == [[2, 2], [2, -100]]
    counter = B.PadCounter()
    counter.add(out["n_tokens"], out["n_pad"])
    counter.add(6, 0)
    assert counter.share == pytest.approx(2 / 12) and pad_share([out]) == pytest.approx(2 / 6)


def test_pair_batch_layout_and_masks(tok):
    items = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "margin": 0.5},
             {"prompt_ids": [7], "chosen_ids": [8, 9, 10], "rejected_ids": [11, 12], "margin": None}]
    out = B.pair_batch(items, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, 4, 5], [-100, 8, 9, 10, -100],
                                      [-100, -100, -100, 6, -100], [-100, 11, 12, -100, -100]]
    assert out["attention_mask"].sum(1).tolist() == [5, 4, 4, 3]
    assert out["response_lengths"].tolist() == [2, 3, 1, 2] and out["prompt_lengths"].tolist() == [3, 1, 3, 1]
    assert out["margin"].tolist() == [0.5, 0.0] and (out["n_tokens"], out["n_pad"]) == (16, 4)
    assert "margin" not in B.pair_batch([dict(items[1])], pad_id=0)
    # end to end with the tokenizer: labelled tokens of row i decode to the response + end of turn
    ex = F.preference_examples([{"prompt": [user("Pick")], "chosen": "yes", "rejected": "no"}], "p")[0]
    out = B.pair_batch([T.tokenize_pair(ex, tok, 64)], tok.pad_token_id)
    for row, text in ((0, "yes"), (1, "no")):
        lab = out["labels"][row]
        assert tok.decode(lab[lab != -100].tolist()) == text + EOT
