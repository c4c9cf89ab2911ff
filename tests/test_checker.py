"""Tests for deltalign.rewards.checker: hand-written passing and failing responses for every constraint kind."""

import pytest

from deltalign.rewards import checker as C

Q = "What is the capital of France?"

# (constraint, response, expected score)
CASES = [
    ({"kind": "lowercase"}, "the capital of france is paris.", 1.0),
    ({"kind": "lowercase"}, "  the capital of france is paris.\n\n", 1.0),  # surrounding whitespace is fine
    ({"kind": "lowercase"}, "the capital of france is Paris.", 0.0),
    ({"kind": "lowercase"}, "Paris.", 0.0),
    ({"kind": "lowercase"}, "paris.", 1.0),
    ({"kind": "lowercase"}, "12.", 0.0),  # no letters at all
    ({"kind": "lowercase"}, "   ", 0.0),
    ({"kind": "uppercase"}, "THE CAPITAL OF FRANCE IS PARIS.", 1.0),
    ({"kind": "uppercase"}, "THE CAPITAL OF FRANCE IS Paris.", 0.0),
    ({"kind": "uppercase"}, "The Capital Of France Is Paris.", 0.0),
    ({"kind": "max_words", "n": 8}, "one two three four five six seven", 1.0),  # 7 < 8
    ({"kind": "max_words", "n": 8}, "one two three four five six seven eight", 0.0),  # 8 is not fewer than 8
    ({"kind": "max_words", "n": 8}, "one\ntwo  three\tfour five six seven  ", 1.0),  # any whitespace splits
    ({"kind": "max_words", "n": 2}, "Paris.", 1.0),
    ({"kind": "max_words", "n": 2}, "", 0.0),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Paris is the capital. Hope this helps!", 1.0),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Paris is the capital. Hope this helps!  \n", 1.0),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Paris is the capital. Hope this helps", 0.0),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Paris is the capital. hope this helps!", 0.0),
    ({"kind": "end_phrase", "phrase": "Hope this helps!"}, "Hope this helps! Paris is the capital.", 0.0),
    ({"kind": "include_keyword", "keyword": "fact"}, "Paris is the capital. That is a fact.", 1.0),
    ({"kind": "include_keyword", "keyword": "fact"}, "FACT: Paris is the capital.", 1.0),  # any case
    ({"kind": "include_keyword", "keyword": "fact"}, "Paris is the capital, in fact!", 1.0),
    ({"kind": "include_keyword", "keyword": "fact"}, "Those are the facts about Paris.", 0.0),  # whole word only
    ({"kind": "include_keyword", "keyword": "fact"}, "Paris is the capital.", 0.0),
    ({"kind": "forbidden_word", "word": "capital"}, "Paris.", 1.0),
    ({"kind": "forbidden_word", "word": "capital"}, "The capital of France is Paris.", 0.0),
    ({"kind": "forbidden_word", "word": "capital"}, "CAPITAL: Paris.", 0.0),  # any case
    ({"kind": "forbidden_word", "word": "capital"}, "Paris is the capitals' capitol.", 1.0),  # whole word only
    ({"kind": "forbidden_word", "word": "capital"}, "  ", 0.0),  # an empty answer does not count
    ({"kind": "bullets", "k": 3}, "- Paris\n- France\n- Europe", 1.0),
    ({"kind": "bullets", "k": 3}, "\n- Paris\n\n- France\n- Europe  \n", 1.0),  # blank lines are ignored
    ({"kind": "bullets", "k": 3}, "- Paris\n- France\n- Europe\n- Earth", 0.0),  # 4 bullets
    ({"kind": "bullets", "k": 4}, "- Paris\n- France\n- Europe", 0.0),  # 3 bullets
    ({"kind": "bullets", "k": 3}, "Here you go:\n- Paris\n- France\n- Europe", 0.0),  # an extra non-bullet line
    ({"kind": "bullets", "k": 3}, "* Paris\n* France\n* Europe", 0.0),
    ({"kind": "bullets", "k": 3}, "- Paris\n- \n- Europe\n-", 0.0),  # empty bullets
    ({"kind": "bullets", "k": 1}, "-Paris", 0.0),  # needs "- " with a space
    ({"kind": "json_key", "key": "answer"}, '{"answer": "The capital of France is Paris."}', 1.0),
    ({"kind": "json_key", "key": "answer"}, '\n {"answer": "Paris", "extra": 1}\n', 1.0),
    ({"kind": "json_key", "key": "answer"}, '{"response": "The capital of France is Paris."}', 0.0),  # wrong key
    ({"kind": "json_key", "key": "answer"}, '{"answer": ""}', 0.0),
    ({"kind": "json_key", "key": "answer"}, '{"answer": 12}', 0.0),
    ({"kind": "json_key", "key": "answer"}, "{'answer': 'Paris'}", 0.0),
    ({"kind": "json_key", "key": "answer"}, '```json\n{"answer": "Paris"}\n```', 0.0),
    ({"kind": "json_key", "key": "answer"}, '["answer", "Paris"]', 0.0),
    ({"kind": "json_key", "key": "answer"}, "The capital of France is Paris.", 0.0),
    ({"kind": "start_word", "word": "Sure"}, "Sure! The capital of France is Paris.", 1.0),
    ({"kind": "start_word", "word": "Sure"}, "  sure, it is Paris.", 1.0),
    ({"kind": "start_word", "word": "Sure"}, "Surely it is Paris.", 0.0),
    ({"kind": "start_word", "word": "Sure"}, "Okay! Sure, it is Paris.", 0.0),
    ({"kind": "start_word", "word": "Sure"}, "", 0.0),
]


@pytest.mark.parametrize("constraint,response,expected", CASES)
def test_check_cases(constraint, response, expected):
    assert C.check(constraint, response) == expected
    # the same verdict through the prompt text
    assert C.score(f"{Q} {C.describe(constraint)}", response) == expected


def test_every_kind_has_a_passing_and_a_failing_case():
    for kind in C.KINDS:
        verdicts = {e for c, _, e in CASES if c["kind"] == kind}
        assert verdicts == {0.0, 1.0}, kind


def test_prompt_wording_is_fixed():
    assert C.describe({"kind": "lowercase"}) == "Answer in all lowercase letters."
    assert C.describe({"kind": "max_words", "n": 8}) == "Answer in fewer than 8 words."
    assert C.describe({"kind": "bullets", "k": 3}) == 'Answer with exactly 3 bullet points, each on its own line starting with "- ".'
    assert C.describe({"kind": "end_phrase", "phrase": "That is all."}) == (
        'End your response with the exact phrase "That is all."')


@pytest.mark.parametrize("constraint", [c for c, _, _ in CASES[::3]] + [{"kind": "max_words", "n": 12}])
def test_parse_roundtrip(constraint):
    assert C.parse_constraint(f"{Q} {C.describe(constraint)}") == constraint
    # also inside a chat-templated string, and as a list of messages
    templated = f"<|im_start|>user\n{Q} {C.describe(constraint)}<|im_end|>\n<|im_start|>assistant\n"
    assert C.parse_constraint(templated) == constraint
    assert C.parse_constraint([{"role": "user", "content": f"{Q} {C.describe(constraint)}"}]) == constraint


def test_parse_none_and_last_wins():
    assert C.parse_constraint(Q) is None
    assert C.parse_constraint("Answer in lowercase.") is None  # not the fixed wording
    two = f"{Q} Answer in all capital letters. Answer in fewer than 5 words."
    assert C.parse_constraint(two) == {"kind": "max_words", "n": 5}


def test_score_errors():
    with pytest.raises(ValueError, match="capital of France"):
        C.score(Q, "Paris.")
    with pytest.raises(ValueError):
        C.check({"kind": "sparkly"}, "Paris.")
    with pytest.raises(ValueError):
        C.check({"kind": "max_words"}, "Paris.")
    with pytest.raises(ValueError):
        C.check(None, "Paris.")
    with pytest.raises(ValueError):
        C.describe({"kind": "end_phrase", "phrase": 'say "hi"'})


def test_score_batch():
    prompts = [f"{Q} Answer in all lowercase letters.", f"{Q} Answer in fewer than 3 words."]
    assert C.score_batch(prompts, ["paris.", "The capital of France is Paris."]) == [1.0, 0.0]
    assert C.score_batch([], []) == []
    with pytest.raises(ValueError):
        C.score_batch(prompts, ["paris."])
