"""compose: cat is an exact weighted sum, ties/svd give loadable adapters of the asked rank, learned gates train
only themselves and load back to the same logits, and what cannot compose is refused with a clear message."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deltalign.model.backbone import AdapterConfig, Backbone, ModelConfig
from deltalign.deltas import composable, fusion
from deltalign.core import settings as configs
from deltalign.stages import compose

TINY = ModelConfig(path="tiny")
QUIET = dict(eval_data="", eval_checker=False)  # no held-out evaluation: the tests look at the deltas


def _random_delta(out, seed: int, scale: float = 0.05, **adapter):
    """A trained-looking delta (random non-zero values everywhere) saved like a stage saves it."""
    bb = Backbone.load(TINY)
    torch.manual_seed(seed)
    bb.add_adapter("x", AdapterConfig(**{"dropout": 0.0, **adapter}))
    with torch.no_grad():
        for p in bb.adapter_parameters("x").values():
            p.add_(torch.randn_like(p) * scale)
    bb.save_adapter("x", out)
    return out


@pytest.fixture(scope="module")
def deltas_dir(tmp_path_factory):
    """Two LoRA deltas of different ranks and targets, plus one of each kind that cannot be merged."""
    root = tmp_path_factory.mktemp("deltas")
    _random_delta(root / "a", 1, r=4)
    _random_delta(root / "b", 2, r=2, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _random_delta(root / "ia3", 3, method="ia3")
    _random_delta(root / "dora", 4, method="dora", r=4)
    return root


def _run(tmp_path, sources, upstream=None, **kw):
    out = tmp_path / "compose"
    metrics = compose.run(compose.Config(sources=[str(s) for s in sources], **{**QUIET, **kw}), TINY, out,
                          upstream or {})
    return out, metrics


def _lora_modules(bb):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in bb.causal_lm.named_modules() if isinstance(m, LoraLayer)}


def _module_delta(bb, module, name, x):
    """What delta ``name`` adds to one module's output for input ``x``."""
    with torch.no_grad():
        with bb.using(name):
            y = module(x)
        with bb.using(None):
            y0 = module(x)
    return y - y0


# --- cat: exact -------------------------------------------------------------------------------------------------

def test_cat_output_is_exactly_the_weighted_sum_of_the_sources(tmp_path, deltas_dir):
    a, b = deltas_dir / "a", deltas_dir / "b"
    # one source as a finished stage of the run (a bare name), one as a folder
    out, metrics = _run(tmp_path, ["sft", b], upstream={"sft": a}, method="cat", weights=[0.7, -0.3])
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 + 2
    recipe = json.loads((out / "compose.json").read_text())
    assert recipe["method"] == "cat" and recipe["weights"] == [0.7, -0.3]
    assert [s["path"] for s in recipe["sources"]] == [str(a.resolve()), str(b.resolve())]

    bb = Backbone.load(TINY)  # a fresh backbone reads the composed folder like any adapter
    bb.load_adapter("a", a)
    bb.load_adapter("b", b)
    bb.load_adapter("c", out)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for path, m in _lora_modules(bb).items():
        x = torch.randn(3, 5, m.in_features, generator=g)
        want = 0.7 * _module_delta(bb, m, "a", x) - 0.3 * _module_delta(bb, m, "b", x)
        got = _module_delta(bb, m, "c", x)
        assert want.abs().max() > 1e-3, path  # every module really carries a delta
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=path)
        checked += 1
    assert checked == 14  # every linear of both layers: the union of the two sources' targets


def test_cat_uses_uniform_weights_by_default(tmp_path, deltas_dir):
    out, metrics = _run(tmp_path, [deltas_dir / "a", deltas_dir / "b"], method="cat")
    assert json.loads((out / "compose.json").read_text())["weights"] == [0.5, 0.5]
    assert metrics["weights"] == [0.5, 0.5]


# --- ties / svd -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,rank,want", [("ties", 3, 3), ("svd", 3, 3), ("svd", 0, 4)])
def test_ties_and_svd_write_a_loadable_adapter_of_the_rank_asked(tmp_path, deltas_dir, method, rank, want):
    out, _ = _run(tmp_path, [deltas_dir / "a", deltas_dir / "b"], method=method, rank=rank, density=0.5)
    bb = Backbone.load(TINY)
    bb.load_adapter("m", out)
    assert bb.model.peft_config["m"].r == want
    shapes = {tuple(p.shape) for n, p in bb.adapter_parameters("m").items() if ".lora_A." in n}
    assert shapes and {s[0] for s in shapes} == {want}
    ids = torch.randint(3, 250, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = bb.lm_logits(bb(ids, mask))
        with bb.using(None):
            base = bb.lm_logits(bb(ids, mask))
    assert torch.isfinite(logits).all() and not torch.allclose(logits, base)


def test_svd_at_the_sum_of_the_ranks_equals_cat(tmp_path, deltas_dir):
    sources = [deltas_dir / "a", deltas_dir / "b"]
    cat, _ = _run(tmp_path / "cat", sources, method="cat")
    svd, _ = _run(tmp_path / "svd", sources, method="svd", rank=6)
    bb = Backbone.load(TINY)
    bb.load_adapter("cat", cat)
    bb.load_adapter("svd", svd)
    for path, m in _lora_modules(bb).items():
        torch.testing.assert_close(m.get_delta_weight("svd"), m.get_delta_weight("cat"), atol=1e-5, rtol=0,
                                   msg=path)


# --- gates ------------------------------------------------------------------------------------------------------

GATES = dict(method="gates", data="embedded:sft_train", batch_size=4, max_steps=3, lr=0.2, log_every=1,
             checkpoint_every=0)


def _base_state(bb):
    """The frozen base's own tensors, by their names in the plain transformers model."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in bb.causal_lm.named_parameters()
            if "lora_" not in n}


@pytest.fixture(scope="module")
def gates_run(tmp_path_factory, deltas_dir):
    """One gates run on a backbone the test keeps (Backbone.load is patched to hand it over)."""
    tmp = tmp_path_factory.mktemp("gates")
    sources = [deltas_dir / "a", deltas_dir / "b"]
    before_files = {s: {f.name: f.read_bytes() for f in s.iterdir()} for s in sources}
    bb = Backbone.load(TINY)
    base_before = _base_state(bb)
    mp = pytest.MonkeyPatch()
    mp.setattr(compose.Backbone, "load", classmethod(lambda cls, cfg: bb))
    trainable_seen = []
    real_prepare = compose.Engine.prepare

    def spy(engine, backbone, n_steps, *a, **k):
        trainable_seen.append({n for n, p in backbone.named_parameters() if p.requires_grad})
        return real_prepare(engine, backbone, n_steps, *a, **k)

    mp.setattr(compose.Engine, "prepare", spy)
    try:
        out, metrics = _run(tmp, sources, **GATES)
    finally:
        mp.undo()
    return dict(out=out, metrics=metrics, bb=bb, sources=sources, before_files=before_files,
                base_before=base_before, trainable=trainable_seen)


def test_gates_start_uniform_and_then_equal_the_average_merge(tmp_path, deltas_dir):
    bb = Backbone.load(TINY)
    names = composable.load_sources(bb, [deltas_dir / "a", deltas_dir / "b"])
    f = fusion.Fusion(bb, names, "softmax")
    torch.testing.assert_close(f.gates.weights(), torch.full((2, 2), 0.5))
    fusion.attach(bb, "gates", f, trainable=False)
    cat, _ = _run(tmp_path, [deltas_dir / "a", deltas_dir / "b"], method="cat")
    bb.load_adapter("cat", cat)
    ids = torch.randint(3, 250, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad(), bb.using("gates"):
        gated = bb.lm_logits(bb(ids, mask))
    with torch.no_grad(), bb.using("cat"):
        merged = bb.lm_logits(bb(ids, mask))
    torch.testing.assert_close(gated, merged, atol=1e-5, rtol=0)


def test_gates_train_only_the_gates(gates_run):
    bb, metrics = gates_run["bb"], gates_run["metrics"]
    # only the gate logits were handed to the optimizer
    assert gates_run["trainable"] == [{"deltas.gates.gates.logits"}]
    assert metrics["trainable_params"] == 2 * 2  # layers x sources
    # the base is bit-identical
    after = _base_state(bb)
    assert after.keys() == gates_run["base_before"].keys()
    assert all(torch.equal(after[k], v) for k, v in gates_run["base_before"].items())
    # the sources are bit-identical: in memory, and their folders untouched
    from peft.utils import get_peft_model_state_dict

    for i, s in enumerate(gates_run["sources"]):
        saved = load_file(str(s / "adapter_model.safetensors"))
        live = get_peft_model_state_dict(bb.model, adapter_name=f"source{i}")
        assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
        assert {f.name: f.read_bytes() for f in s.iterdir()} == gates_run["before_files"][s]
    # the gates moved away from uniform
    logits = load_file(str(gates_run["out"] / fusion.GATES_FILE))["logits"]
    assert logits.shape == (2, 2)
    weights = torch.softmax(logits, -1)
    assert not torch.allclose(weights, torch.full((2, 2), 0.5), atol=1e-3)
    torch.testing.assert_close(torch.tensor(metrics["gates"]["weights"]), weights, atol=1e-6, rtol=0)
    rows = [json.loads(r) for r in (gates_run["out"] / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["kind"] == "train"]) == 3


def test_gates_save_and_load_back_to_the_same_logits(gates_run):
    out, bb = gates_run["out"], gates_run["bb"]
    ids = torch.randint(3, 250, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad(), bb.using("gates"):
        trained = bb.lm_logits(bb(ids, mask))
    # 1. the folder is a plain LoRA adapter (the gates baked in): what load_adapter, export, eval and generate read
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 + 2
    fresh = Backbone.load(TINY)
    fresh.load_adapter("composed", out)
    with torch.no_grad():
        baked = fresh.lm_logits(fresh(ids, mask))
    torch.testing.assert_close(baked, trained, atol=1e-5, rtol=0)
    # 2. gates.safetensors + gates.json load back as live gates over the sources they name
    again = Backbone.load(TINY)
    name = fusion.load_gates(again, out)
    with torch.no_grad(), again.using(name):
        live = again.lm_logits(again(ids, mask))
    torch.testing.assert_close(live, trained, atol=1e-6, rtol=0)
    assert again.trainable == set()  # loaded frozen


def test_gates_refuse_to_load_over_changed_sources(gates_run, tmp_path):
    moved = tmp_path / "gates"
    shutil.copytree(gates_run["out"], moved)
    meta = json.loads((moved / fusion.GATES_JSON).read_text())
    changed = tmp_path / "changed"
    _random_delta(changed, 9, r=4)
    meta["sources"][0]["path"] = str(changed)
    (moved / fusion.GATES_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="changed since the gates were trained"):
        fusion.load_gates(Backbone.load(TINY), moved)


def test_sigmoid_gates_start_at_the_weights_given(deltas_dir):
    bb = Backbone.load(TINY)
    names = composable.load_sources(bb, [deltas_dir / "a", deltas_dir / "b"])
    f = fusion.Fusion(bb, names, "sigmoid", init=[0.8, 0.3])
    torch.testing.assert_close(f.gates.weights(), torch.tensor([[0.8, 0.3], [0.8, 0.3]]))


# --- what cannot compose ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["cat", "ties", "svd", "gates"])
@pytest.mark.parametrize("bad,message", [
    ("ia3", r"compose\.sources\[1\].*ia3.*only LoRA"),
    ("dora", r"compose\.sources\[1\].*DoRA"),
])
def test_non_lora_deltas_are_refused(tmp_path, deltas_dir, method, bad, message):
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, [deltas_dir / "a", deltas_dir / bad], method=method, data="embedded:sft_train")


def test_deltas_of_another_base_model_are_refused(tmp_path, deltas_dir):
    other = tmp_path / "other"
    shutil.copytree(deltas_dir / "b", other)
    conf = json.loads((other / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "models/some-other-model"
    (other / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"compose\.sources\[1\].*different base model.*some-other-model"):
        _run(tmp_path, [deltas_dir / "a", other], method="cat")


def test_a_reward_model_is_refused(tmp_path, deltas_dir):
    rm = tmp_path / "rm"
    shutil.copytree(deltas_dir / "b", rm)
    (rm / "head.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"compose\.sources\[0\].*reward model"):
        _run(tmp_path, [rm, deltas_dir / "a"], method="cat")


def test_missing_sources_are_named(tmp_path, deltas_dir):
    with pytest.raises(ValueError, match=r"compose\.sources\[1\].*not an adapter folder"):
        _run(tmp_path, [deltas_dir / "a", tmp_path / "nowhere"], method="cat")
    with pytest.raises(ValueError, match=r"compose\.sources\[0\].*'dpo'.*no finished output"):
        _run(tmp_path, ["dpo", deltas_dir / "a"], method="cat")


def test_a_rank_above_the_smallest_matrix_is_refused(tmp_path, deltas_dir):
    with pytest.raises(ValueError, match=r"compose\.rank"):
        _run(tmp_path, [deltas_dir / "a", deltas_dir / "b"], method="svd", rank=33)


@pytest.mark.parametrize("settings,message", [
    ({"sources": ["sft"]}, r"compose\.sources: at least two"),
    ({"sources": ["sft", "sft"]}, r"compose\.sources.*twice"),
    ({"sources": ["sft", "compose"]}, r"compose\.sources\[1\].*this stage"),
    ({"sources": ["sft", ""]}, r"compose\.sources\[1\]"),
    ({"weights": [1.0]}, r"compose\.weights.*2"),
    ({"weights": [0.0, 0.0]}, r"compose\.weights"),
    ({"weights": [1.0, float("nan")]}, r"compose\.weights"),
    ({"method": "gates", "weights": [1.0, 0.0]}, r"compose\.weights.*softmax.*> 0"),
    ({"method": "gates", "gate": "sigmoid", "weights": [1.0, 0.5]}, r"compose\.weights.*sigmoid.*between 0 and 1"),
    ({"method": "gates", "data": ""}, r"compose\.data"),
])
def test_bad_settings_are_refused_at_load(settings, message):
    with pytest.raises(ValueError, match=message):
        compose.Config(**settings)
    # through the config loader: a ConfigError with its source
    with pytest.raises(configs.ConfigError, match=message):
        configs.from_dict(compose.Config, settings, "test.yaml", "compose")


@pytest.mark.parametrize("key,value", [("density", 0.0), ("density", 1.5), ("rank", -1), ("method", "linear"),
                                       ("gate", "tanh")])
def test_method_settings_are_range_checked(key, value):
    with pytest.raises(configs.ConfigError, match=rf"compose\.{key}"):
        configs.from_dict(compose.Config, {key: value}, "test.yaml", "compose")


def test_stage_names_among_the_sources_are_its_upstream():
    cfg = compose.Config(sources=["sft", "runs/x/dpo", "./local", "grpo"])
    assert cfg.needs() == ["sft", "grpo"]


def test_in_a_pipeline_a_stage_source_runs_first(tmp_path, deltas_dir, monkeypatch):
    """The graph entry (``needs`` = the stage names among the sources) plans and feeds the stage."""
    from deltalign.pipeline import graph

    if "compose" not in graph.STAGES:  # until the graph lists the stage
        monkeypatch.setitem(graph.STAGES, "compose",
                            graph.Stage("compose", "deltalign.stages.compose", needs=lambda c: c.needs()))
    cfgs = configs.load(graph.sections(), "configs/tiny.yaml",
                        ["sft.max_steps=2", "sft.eval_checker=false", "compose.eval_data=",
                         f"compose.sources=[sft, {deltas_dir / 'a'}]", "compose.weights=[1.0, -1.0]"])
    p = graph.Pipeline(cfgs, tmp_path / "run")
    assert p.plan(["compose"]) == ["sft", "compose"]
    results = p.run(["compose"])
    assert results["compose"]["weights"] == [1.0, -1.0]
    recipe = json.loads((tmp_path / "run" / "compose" / "compose.json").read_text())
    assert recipe["sources"][0]["path"] == str((tmp_path / "run" / "sft").resolve())
    bb = Backbone.load(TINY)
    bb.load_adapter("c", tmp_path / "run" / "compose")
    assert bb.model.peft_config["c"].r == 4 + 4
