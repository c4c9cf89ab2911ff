"""KTO and ORPO (issue 36 goal 6) through the command line a user types: `--help`, `status`, `eval` and `export`'s
choice of policy know them, and ORPO from the base runs with the shipped configs as docs/stages.md says."""

import json

import pytest

from deltalign.pipeline.cli import main, parser

TINY = ["--config", "configs/tiny.yaml"]


def test_help_lists_the_new_stage_and_options(capsys):
    assert "kto" in parser().format_help()  # the stages named in `python -m deltalign --help`
    assert main(["run", "kto", "--help"]) == 0
    text = capsys.readouterr().out
    for want in ("kto.beta = 0.1", "kto.desirable_weight = 1.0", "kto.undesirable_weight = 1.0",
                 "kto.reference = sft", "kto.batch_size = 8"):
        assert want in text, want
    assert main(["run", "dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "dpo.orpo_lambda = 0.1" in text and "orpo (Hong et al. 2024" in text
    with pytest.raises(SystemExit):  # export's --policy: auto picks the newest of the aligned stages, kto too
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{auto,sft,dpo,kto,ppo,grpo,compose}" in text and "finished of ppo, grpo, dpo, kto;" in text, text
    assert main(["run", "grpo", "--help"]) == 0
    text = capsys.readouterr().out
    for want in ("grpo.importance_sampling = token", "grpo.loss = clip", "grpo.cispo_max = 5.0",
                 "grpo.overlong_cache = 0", "grpo.mask_truncated = false"):
        assert want in text, want


@pytest.mark.parametrize("config", ["configs/default.yaml", "configs/tiny.yaml"])
def test_orpo_from_the_base_with_the_shipped_configs(tmp_path, capsys, config):
    """`SET="dpo.loss=orpo dpo.init=fresh" make dpo` (docs/stages.md): the shipped config asks for no reference, so
    ORPO is not refused, and the plan is dpo alone (no SFT stage)."""
    rc = main(["status", "dpo", "--config", config, "--set", "dpo.loss=orpo", "--set", "dpo.init=fresh",
               "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert [line.split()[:2] for line in out.out.splitlines()] == [["dpo", "missing"]]


def _table(run):
    return json.loads((run / "eval_table.json").read_text())


def test_status_eval_and_export_know_kto_and_orpo(tmp_path, capsys):
    """sft -> kto: status says kto done, eval compares it, export picks it (the newest aligned stage); ORPO from the
    base: dpo alone in the plan, in eval's table and exported."""
    run = tmp_path / "kto-run"
    args = [*TINY, "--run-dir", str(run), "--set", "sft.max_steps=2", "--set", "kto.max_steps=2",
            "--set", "sft.eval_checker=false", "--set", "kto.eval_checker=false"]
    assert main(["run", "sft", "kto", *args]) == 0
    capsys.readouterr()
    assert main(["status", "kto", *args]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [["sft", "done"], ["kto", "done"]]
    assert main(["eval", *args, "--limit", "2"]) == 0
    assert set(_table(run)) == {"base", "sft", "kto"} and "| kto |" in capsys.readouterr().out
    assert main(["export", *args]) == 0
    assert json.loads((run / "export" / "manifest.json").read_text())["metrics"]["policy"] == "kto"

    run = tmp_path / "orpo-run"
    args = [*TINY, "--run-dir", str(run), "--set", "dpo.loss=orpo", "--set", "dpo.init=fresh",
            "--set", "dpo.max_steps=2", "--set", "dpo.eval_checker=false"]
    assert main(["run", "dpo", *args]) == 0
    assert not (run / "sft").exists()
    capsys.readouterr()
    assert main(["status", "dpo", *args]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [["dpo", "done"]]
    assert main(["eval", *args, "--limit", "2"]) == 0
    assert set(_table(run)) == {"base", "dpo"}
    assert main(["export", *args]) == 0
    assert json.loads((run / "export" / "manifest.json").read_text())["metrics"]["policy"] == "dpo"
