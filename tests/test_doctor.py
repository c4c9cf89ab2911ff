"""`python -m deltalign doctor`: a short report before a long run; a problem found exits 2."""

import json

from deltalign.pipeline.cli import main


def test_doctor_on_the_tiny_config_is_ready(capsys):
    assert main(["doctor", "sft", "dpo", "--config", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "chat template is prefix-stable" in out and "differs from EOS" in out
    assert "sft.data: embedded:sft_train (600 rows" in out and "p99" in out
    assert "dpo: ~4 steps of 4 rows" in out and out.strip().endswith("ready to run")


def test_doctor_fails_on_rows_too_long_for_truncation_error(tmp_path, capsys):
    rows = [{"prompt": "word " * 100, "chosen": "yes", "rejected": "no"}, {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["doctor", "dpo", "--config", "configs/tiny.yaml", "--set", f"dpo.data={f}", "--set", "dpo.max_length=64",
               "--set", "dpo.truncation=error", "--set", "dpo.reference=base", "--set", "dpo.init=fresh"])
    out = capsys.readouterr().out
    assert rc == 2
    assert any(ln.startswith("FAIL") and "1 of 2 longer ('error' applies)" in ln for ln in out.splitlines()), out


def test_doctor_names_a_missing_model_directory(capsys):
    assert main(["doctor", "sft", "--config", "configs/tiny.yaml", "--set", "model.path=/nope/model"]) == 2
    assert "FAIL  model.path '/nope/model'" in capsys.readouterr().out
