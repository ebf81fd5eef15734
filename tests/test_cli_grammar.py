"""One CLI grammar: `--set section.key=value` means the same profile path in every command, one progress flag
(`--no-progress`, alias `--quiet`), and exit codes / Ctrl-C hints that say what really happened."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ctssl_core.cli import build_parser, main
from ctssl_core.config import ConfigError, SECTION_READERS, profile_overrides, section_overrides

# the commands this grammar covers (bias and jobs follow when their owners adopt the helpers)
SET_COMMANDS = {"synth": [], "ingest": ["DIR"], "pretrain": [], "finetune": ["--task", "pe"], "benchmark": [],
                "embed": ["--checkpoint", "random"]}


# ------------------------------------------------------------------ the shared helper


@pytest.mark.parametrize("items, own, reads, want", [
    (["pretrain.train.steps=5"], "pretrain", None, ["pretrain.train.steps=5"]),
    (["train.steps=5", "steps=5"], "pretrain", None, ["pretrain.train.steps=5", "pretrain.steps=5"]),
    (["n_patients=8"], "synth", None, ["synth.n_patients=8"]),
    (["workers=2", "pretrain.train.steps=3", "bias.n_perm=99"], "benchmark", SECTION_READERS,
     ["benchmark.workers=2", "pretrain.train.steps=3", "bias.n_perm=99"]),
    (["benchmark.bias=false"], "benchmark", SECTION_READERS, ["benchmark.bias=false"]),
    (["note=a=b"], "embed", None, ["embed.note=a=b"]),  # only the first '=' splits
])
def test_profile_overrides_give_full_paths(items, own, reads, want):
    assert profile_overrides(items, "cmd", own, reads) == want


def test_section_overrides_accept_the_full_path_and_the_short_form_alike():
    assert section_overrides(["embed.split=test", "batch_size=16"], "embed", "embed") == ["split=test", "batch_size=16"]
    assert section_overrides(["pretrain.train.steps=5", "steps=6", "train.lr=1e-3"], "pretrain", "pretrain") == \
        ["train.steps=5", "steps=6", "train.lr=1e-3"]


@pytest.mark.parametrize("items, command, own, reads, message", [
    (["embed.split=test"], "synth", "synth", None,
     "key of the 'embed' section, which `ctssl synth` does not read (it reads synth.*); "
     "pass it to `ctssl embed` or `ctssl benchmark`"),
    (["pretrain.train.steps=5"], "finetune", "downstream",
     ("downstream", "pretrain.encoder", "benchmark.pool"), "pass it to `ctssl pretrain` or `ctssl benchmark`"),
    (["benchmark.workers=2"], "embed", "embed", None, "pass it to `ctssl benchmark`"),
    (["bias=false"], "benchmark", "benchmark", SECTION_READERS, "write benchmark.bias=... for the key of that name"),
    (["steps"], "pretrain", "pretrain", None, "must look like section.key=value"),
    (["pretrain..steps=3"], "pretrain", "pretrain", None, "empty key part"),
])
def test_bad_overrides_are_errors_that_say_where_the_key_belongs(items, command, own, reads, message):
    with pytest.raises(ConfigError) as e:
        profile_overrides(items, command, own, reads)
    assert message in str(e.value)


def test_every_command_takes_the_same_set_and_progress_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name, extra in SET_COMMANDS.items():
        action = next(a for a in sub[name]._actions if a.dest == "overrides")
        assert action.option_strings == ["--set"] and action.metavar == "SECTION.KEY=VALUE", name
        for flag in ("--no-progress", "--quiet"):
            args = parser.parse_args([name, *extra, "--set", f"{name}.x=1", flag])
            assert args.no_progress is True and args.overrides == [f"{name}.x=1"], (name, flag)
        assert parser.parse_args([name, *extra]).no_progress is False


# ------------------------------------------------------------------ each command, run


def test_synth_takes_full_paths_and_short_forms_and_refuses_another_section(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--set", "synth.n_patients=2",
                 "--set", "slices_per_exam=4", "--no-progress"]) == 0
    assert "patients 2, slices 8," in capsys.readouterr().out
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--set", "embed.split=test"]) == 2
    err = capsys.readouterr().err
    assert "'embed' section" in err and "`ctssl embed`" in err


def test_ingest_takes_set(tiny_cohort, tmp_path, capsys):
    from ctssl_core.data.ingest import store_size

    st = tmp_path / "st"
    assert main(["ingest", str(tiny_cohort), "--store", str(st), "--set", "ingest.size=16", "--set", "workers=1",
                 "--quiet"]) == 0
    assert store_size(st) == 16
    assert main(["ingest", str(tiny_cohort), "--store", str(st), "--set", "synth.n_patients=3"]) == 2
    assert "pass it to `ctssl synth` or `ctssl benchmark`" in capsys.readouterr().err


@pytest.fixture
def fake_finetune(monkeypatch):
    """Record the FinetuneConfig `ctssl finetune` builds instead of training (the grammar, not the training, is
    under test; test_benchmark runs the real one)."""
    import ctssl_core.finetune as ft

    seen = []

    def finetune(fc, store, profile=None, progress=None, labels=None):
        seen.append(fc)
        return SimpleNamespace(run_id="r", init=fc.init, n_train_patients=1, n_train_slices=1, wall_s=0.0, metrics={})

    monkeypatch.setattr(ft, "finetune", finetune)
    return seen


@pytest.mark.parametrize("setting", ["downstream.train.steps=3", "train.steps=3"])
def test_finetune_full_path_and_short_form_mean_the_same_key(fake_finetune, tmp_path, setting):
    assert main(["finetune", "--task", "pe", "--profile", "smoke", "--store", str(tmp_path), "--no-progress",
                 "--set", setting, "--set", "pretrain.encoder=resnet18"]) == 0
    (fc,) = fake_finetune
    assert fc.train["steps"] == 3 and fc.encoder == "resnet18"


def test_finetune_refuses_keys_it_would_ignore(fake_finetune, tmp_path, capsys):
    assert main(["finetune", "--task", "pe", "--profile", "smoke", "--store", str(tmp_path),
                 "--set", "pretrain.train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "'pretrain' section" in err and "pretrain.encoder" in err and not fake_finetune


def test_benchmark_routes_short_forms_to_its_own_section(monkeypatch, tmp_path, capsys):
    import ctssl_core.benchmark as bm
    from ctssl_core.plan import resolve_profile

    seen = {}

    def run_benchmark(profile, store, overrides, progress=True, labels=None):
        seen["cfg"], seen["progress"] = resolve_profile(profile, overrides), progress
        return {"benchmark_id": "b", "ran": 0, "skipped": 0, "wall_s": 0.0}

    monkeypatch.setattr(bm, "run_benchmark", run_benchmark)
    assert main(["benchmark", "--profile", "smoke", "--store", str(tmp_path), "--quiet", "--set", "workers=3",
                 "--set", "pretrain.train.steps=7", "--set", "bias.n_perm=99", "--set", "embed.split=test"]) == 0
    cfg = seen["cfg"]
    assert cfg["benchmark"]["workers"] == 3 and cfg["pretrain"]["train"]["steps"] == 7
    assert cfg["bias"]["n_perm"] == 99 and cfg["embed"]["split"] == "test" and seen["progress"] is False
    assert main(["benchmark", "--profile", "smoke", "--store", str(tmp_path), "--set", "bias=false"]) == 2
    assert "benchmark.bias" in capsys.readouterr().err


def test_embed_takes_full_paths(store_copy, capsys):
    assert main(["embed", "--checkpoint", "random", "--store", str(store_copy), "--no-umap", "--set", "embed.split=all",
                 "--set", "embed.encoder=tiny", "--set", "max_per_series=2", "--set", "embed.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "exam embeddings: random-tiny-s0-all-exam" in out
    assert main(["embed", "--checkpoint", "random", "--store", str(store_copy), "--set", "embed.splitt=all"]) == 2
    assert "unknown config key 'embed.splitt'" in capsys.readouterr().err


# ------------------------------------------------------------------ pretrain: full paths, exit codes, hints

PRE = ["--profile", "smoke", "--no-progress", "--task", "rotation", "--set", "pretrain.train.image_size=32",
       "--set", "pretrain.train.batch_size=8", "--set", "pretrain.train.steps=2"]


def _runs(store):
    from ctssl_core.db import connect
    from ctssl_core.paths import store_paths

    with connect(store_paths(store).db, read_only=True) as con:
        return con.execute("SELECT run_id, status, config FROM runs WHERE kind = 'pretrain'").fetchall()


def test_pretrain_takes_full_paths(store_copy, capsys):
    assert main(["pretrain", "--store", str(store_copy), *PRE, "--set", "pretrain.probe_every=0"]) == 0
    ((rid, status, cfg),) = _runs(store_copy)
    assert status == "succeeded" and json.loads(cfg)["pretrain"]["train"]["steps"] == 2
    assert main(["pretrain", "--store", str(store_copy), *PRE, "--set", "downstream.train.steps=2"]) == 2
    assert "pass it to `ctssl finetune` or `ctssl benchmark`" in capsys.readouterr().err


def _stop_fit(monkeypatch, how):
    """Replace the training loop by one that stops at once, as SIGTERM (`signal`) or Ctrl-C (`interrupt`) would."""
    import ctssl_core.train as train

    def fit(task, encoder, batches, cfg, **kw):
        if how == "interrupt":
            raise KeyboardInterrupt
        return train.FitResult(start_step=0, step=1, first_loss=None, final_loss=None, stopped="signal")

    monkeypatch.setattr(train, "fit", fit)


def test_pretrain_stopped_by_sigterm_exits_143_with_the_resume_command(store_copy, monkeypatch, capsys):
    _stop_fit(monkeypatch, "signal")
    assert main(["pretrain", "--store", str(store_copy), *PRE]) == 143
    ((rid, status, _),) = _runs(store_copy)
    assert status == "cancelled"
    assert f"stopped by SIGTERM at step 1; resume with `ctssl pretrain --resume {rid}`" in capsys.readouterr().err


def test_pretrain_ctrl_c_exits_130_and_names_the_run_to_resume(store_copy, monkeypatch, capsys):
    _stop_fit(monkeypatch, "interrupt")
    assert main(["pretrain", "--store", str(store_copy), *PRE]) == 130
    ((rid, status, _),) = _runs(store_copy)
    err = capsys.readouterr().err
    assert status == "cancelled"
    assert f"ctssl pretrain: interrupted; resume with `ctssl pretrain --resume {rid}`" in err
    assert "re-run the same command to resume" not in err


def test_ctrl_c_before_a_run_exists_says_nothing_to_resume(monkeypatch, tmp_path, capsys):
    import ctssl_core.pretrain as pre

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pre, "run_pretrain", interrupted)
    assert main(["pretrain", "--store", str(tmp_path), "--task", "rotation"]) == 130
    assert "no run had started; re-run the same command to start it." in capsys.readouterr().err
    assert main(["pretrain", "--store", str(tmp_path), "--resume", "RID7"]) == 130
    assert "resume with `ctssl pretrain --resume RID7`" in capsys.readouterr().err


@pytest.mark.parametrize("command, argv, hint", [
    ("benchmark", ["--profile", "smoke"], "re-run the same command to resume: finished runs are reused"),
    ("finetune", ["--task", "pe", "--profile", "smoke"], "a fine-tuning has no resume"),
])
def test_ctrl_c_hint_matches_what_a_rerun_does(monkeypatch, tmp_path, capsys, command, argv, hint):
    import ctssl_core.benchmark as bm
    import ctssl_core.finetune as ft

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "run_benchmark", interrupted)
    monkeypatch.setattr(ft, "finetune", interrupted)
    assert main([command, "--store", str(tmp_path), "--no-progress", *argv]) == 130
    assert hint in capsys.readouterr().err


def test_an_interrupt_marked_as_sigterm_exits_143(monkeypatch, tmp_path, capsys):
    """The contract for library code that unwinds with KeyboardInterrupt on SIGTERM (a fine-tune does)."""
    import ctssl_core.finetune as ft

    def stopped(*a, **kw):
        e = KeyboardInterrupt("fine-tune stopped by signal at step 3")
        e.signal = "SIGTERM"
        raise e

    monkeypatch.setattr(ft, "finetune", stopped)
    assert main(["finetune", "--task", "pe", "--profile", "smoke", "--store", str(tmp_path)]) == 143
    assert "ctssl finetune: stopped by SIGTERM; a fine-tuning has no resume" in capsys.readouterr().err


def test_finetune_stopped_mid_training_is_not_a_success(store_copy, monkeypatch, capsys):
    """A fine-tune stopped by SIGTERM mid-training exits 143 (as the README's exit-code table says), no scores."""
    import ctssl_core.train as train

    def fit(task, encoder, batches, cfg, head=None, **kw):
        return train.FitResult(start_step=0, step=1, first_loss=None, final_loss=None, stopped="signal", head=head)

    monkeypatch.setattr(train, "fit", fit)
    assert main(["finetune", "--task", "pe", "--profile", "smoke", "--store", str(store_copy), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "a fine-tuning has no resume; re-run the same command to train it again" in err


@pytest.mark.parametrize("status, code", [("succeeded", 0), ("cancelled", 143), ("failed", 1)])
def test_pretrain_exit_code_of_each_run_status(status, code):
    from ctssl_core.commands.pretrain import exit_code

    assert exit_code(status) == code


# ------------------------------------------------------------------ the README's examples


def _readme_set_examples() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    para = text[text.index("**Overrides: one grammar.**"):text.index("### Exit codes")]
    return re.findall(r"`(ctssl [^`]*--set [^`]*)`", para)


def _build_section(section: str, overrides: list[str]):
    """Build the config a section command would build from these (relative) overrides."""
    from ctssl_core.bias import BiasConfig
    from ctssl_core.config import build
    from ctssl_core.data.synth import SynthConfig
    from ctssl_core.embed import EmbedConfig
    from ctssl_core.pretrain import resolve_config

    if section == "pretrain":
        return resolve_config("rotation", overrides=overrides)
    return build({"synth": SynthConfig, "embed": EmbedConfig, "bias": BiasConfig}[section], {}, overrides,
                 where=f"{section}.")


def test_every_readme_override_example_parses_and_sets_the_key_it_names():
    import shlex

    from ctssl_core.plan import resolve_profile

    parser = build_parser()
    examples = _readme_set_examples()
    assert len(examples) >= 8
    refused = "ctssl synth --set embed.split=test"  # the README's example of a key the command does not read
    assert refused in examples
    for ex in examples:
        args = parser.parse_args(shlex.split(ex)[1:])
        mod = args._module
        if ex == refused:
            with pytest.raises(ConfigError, match="'embed' section"):
                section_overrides(args.overrides, args.command, mod.SECTION)
            continue
        if args.command == "jobs":  # a job's fields: the section named by its kind
            from ctssl_core.config import parse_overrides, spec_overrides
            from ctssl_core.jobs.kinds import validate_spec

            over = spec_overrides(args.overrides + args.params, "jobs submit", args.kind)
            validate_spec(args.kind, parse_overrides(over), None)
            continue
        full = profile_overrides(args.overrides, args.command, mod.SECTION, getattr(mod, "READS", None))
        if hasattr(mod, "READS"):  # whole-profile commands
            resolve_profile("smoke", full)
        else:
            _build_section(mod.SECTION, section_overrides(args.overrides, args.command, mod.SECTION))
    # and the values land where the README says
    pre = _build_section("pretrain", section_overrides(["pretrain.train.steps=5"], "pretrain", "pretrain"))
    assert pre.train.steps == 5 and _build_section("pretrain", ["steps=5"]).train.steps == 5
    assert _build_section("synth", section_overrides(["n_patients=8"], "synth", "synth")).n_patients == 8


# ------------------------------------------------------------------ bias and jobs submit: the same --set


def test_bias_and_jobs_submit_take_the_same_set_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    jobs_sub = next(a for a in sub["jobs"]._actions if a.dest == "action").choices
    for p, argv in ((sub["bias"], ["bias", "--emb", "e"]), (jobs_sub["submit"], ["jobs", "submit", "tick"])):
        action = next(a for a in p._actions if a.dest == "overrides")
        assert action.option_strings == ["--set"] and action.metavar == "SECTION.KEY=VALUE"
        assert parser.parse_args([*argv, "--set", "a.b=1", "--set", "c=2"]).overrides == ["a.b=1", "c=2"]


@pytest.fixture
def fake_bias(monkeypatch):
    """Record the BiasConfig `ctssl bias` builds instead of analysing (test_bias runs the real analysis)."""
    import pandas as pd

    import ctssl_core.bias as bias

    class Seen(list):
        scores: list            # (pe_scores, pe_val_scores) of each call

    seen = Seen()
    seen.scores = []

    def analyse_encoder(store, emb, ref, cfg, pe_scores=None, progress=None, pe_val_scores=None):
        seen.append(cfg)
        seen.scores.append((pe_scores, pe_val_scores))
        return pd.DataFrame(columns=["analysis", "sentence", "flagged", "attribute"])

    monkeypatch.setattr(bias, "analyse_encoder", analyse_encoder)
    return seen


def test_bias_takes_full_paths_and_short_forms_and_refuses_another_section(fake_bias, store_copy, capsys):
    base = ["bias", "--emb", "e", "--store", str(store_copy)]
    assert main([*base, "--set", "bias.n_boot=17", "--set", "correction=holm",
                 "--set", "bias.attributes=[age,sex]"]) == 0
    (cfg,) = fake_bias
    assert cfg.n_boot == 17 and cfg.correction == "holm" and tuple(cfg.attributes) == ("age", "sex")
    assert main([*base, "--set", "embed.split=test"]) == 2
    err = capsys.readouterr().err
    assert "'embed' section, which `ctssl bias` does not read" in err and "pass it to `ctssl embed`" in err
    # a named attribute is checked against the store whichever spelling named it
    assert main([*base, "--set", "bias.attributes=[age,weight]"]) == 2
    assert "unknown attribute(s) ['weight']" in capsys.readouterr().err and len(fake_bias) == 1


def test_bias_takes_validation_scores_beside_a_runs_test_scores_or_from_val_scores(fake_bias, store_copy, tmp_path,
                                                                                    capsys):
    """Subgroup TPR/FPR thresholds come from validation scores: a PE run folder holds both files, and
    `--scores <run>/exam_scores.parquet` picks up the validation file beside it; `--val-scores` names one."""
    import pandas as pd

    run = tmp_path / "run"
    run.mkdir()
    test = pd.DataFrame({"patient_key": ["a", "b"], "score": [0.2, 0.9], "label": [0, 1]})
    val = pd.DataFrame({"patient_key": ["c", "d"], "score": [0.3, 0.7], "label": [0, 1]})
    test.to_parquet(run / "exam_scores.parquet")
    base = ["bias", "--emb", "e", "--store", str(store_copy), "--scores", str(run / "exam_scores.parquet")]
    assert main(base) == 0
    got_test, got_val = fake_bias.scores[-1]
    assert got_test.equals(test) and got_val is None                     # nothing beside it yet
    val.to_parquet(run / "exam_scores_val.parquet")
    assert main(base) == 0
    assert fake_bias.scores[-1][1].equals(val)
    assert "exam_scores_val.parquet (beside --scores) choose the TPR/FPR threshold" in capsys.readouterr().out
    val.assign(score=[0.1, 0.2]).to_csv(tmp_path / "v.csv", index=False)
    assert main([*base, "--val-scores", str(tmp_path / "v.csv")]) == 0   # named: wins over the file beside
    assert list(fake_bias.scores[-1][1].score) == [0.1, 0.2]
    n = len(fake_bias)
    assert main(["bias", "--emb", "e", "--store", str(store_copy), "--val-scores", str(tmp_path / "v.csv")]) == 2
    assert "pass --scores as well" in capsys.readouterr().err
    assert main([*base, "--val-scores", str(tmp_path / "no.csv")]) == 2
    assert "--val-scores" in (err := capsys.readouterr().err) and "does not exist" in err
    assert len(fake_bias) == n                                                 # refused before any analysis


@pytest.fixture
def job_store(tmp_path, monkeypatch):
    monkeypatch.setenv("CTSSL_JOB_PLUGINS", "ctssl_core.jobs.testing")   # the `tick` test kind
    return tmp_path / "store"


def test_jobs_submit_takes_set_and_still_the_positional_form_with_a_note(job_store, capsys):
    from ctssl_core import jobs

    s = ["jobs", "--store", str(job_store), "submit", "tick", "--no-worker"]
    assert main([*s, "--set", "tick.steps=3", "--set", "interval_s=0.5"]) == 0
    new = capsys.readouterr()
    job_id = new.out.strip().splitlines()[0]
    spec = jobs.get_job(job_store, job_id)["spec"]["params"]
    assert spec["steps"] == 3 and spec["interval_s"] == 0.5 and "deprecated" not in new.err
    assert main(["jobs", "--store", str(job_store), "submit", "tick", "steps=4", "--no-worker"]) == 0   # the old form
    old = capsys.readouterr()
    assert "note: positional key=value is deprecated; write --set steps=4" in old.err
    assert jobs.get_job(job_store, old.out.strip().splitlines()[0])["spec"]["params"]["steps"] == 4
    assert main([*s, "--set", "pretrain.train.steps=3"]) == 2
    assert "takes the fields of a tick job" in capsys.readouterr().err
    assert main([*s, "--set", "tick.steps=-1"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert len(jobs.list_jobs(job_store)) == 2


def test_jobs_list_and_kinds_print_json(job_store, capsys):
    from ctssl_core import jobs

    s = ["jobs", "--store", str(job_store)]
    assert main([*s, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    ids = [jobs.submit(job_store, "tick", {"steps": n}) for n in (2, 5)]
    assert main([*s, "list", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [j["job_id"] for j in got] == ids[::-1]            # newest first, as the table
    assert [j["spec"]["params"]["steps"] for j in got] == [5, 2] and got[0]["total"] == 5
    assert {j["state"] for j in got} == {"queued"}
    assert main([*s, "list", "--json", "--state", "running"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main([*s, "kinds", "--json"]) == 0
    kinds = json.loads(capsys.readouterr().out)
    fields = {f["name"]: f for f in kinds["finetune"]["fields"]}
    assert fields["fraction"]["min"] == 0.0 and fields["fraction"]["min_exclusive"] is True
    assert fields["task"]["choices"] == ["demographics", "nodule", "pe"] and "random" in fields["init"]["choices"]
    assert "steps" in {f["name"] for f in kinds["tick"]["fields"]}
