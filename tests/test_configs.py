"""Every config composes into a valid RunConfig; multirun writes one directory per point."""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import gaf.config as schema
import gaf.rundir as rundir
from gaf.config import RunConfig, RunPlan, check_fast_path_options, resolve, settings, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "experiments"))
import launch  # noqa: E402
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("data", "model", "method", "optim")}


def composed(overrides, hydra=False):
    return _composed(tuple(overrides), hydra)


@functools.cache
def _composed(overrides: tuple, hydra: bool):
    """Each command line composed once per module (several tests compose the same ones), read-only:
    no test can change what another reads."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=hydra)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_run_config(cfg, overrides=()) -> RunConfig:
    """The run a composed config launches, as experiments/train.py builds it."""
    return launch.run_config(cfg, overrides)


def test_figure_presets_exist():
    assert {"fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9", "table1", "smoke"} <= set(PRESETS)


# An option named for what it is rather than the setting's value: plain averaging is GAF at tau = 2.
OPTION_NAMES = {("method", "averaging"): "gaf", ("optim", "sgd_cosine"): "sgd"}


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    rc = to_run_config(composed([f"{group}={option}"]))
    assert getattr(rc, group).name == OPTION_NAMES.get((group, option), option)


def test_plain_averaging_is_gaf_accepting_every_micro_gradient_with_the_mean_merge():
    rc = to_run_config(composed(["method=averaging"]))
    assert (rc.method.name, rc.method.tau, rc.method.merge) == ("gaf", 2.0, "mean")


@pytest.mark.parametrize("given, model, instead", [
    (["model=resnet18_cifar", "scale=paper"], ("resnet18_cifar", None, None), "resnet18"),
    (["model=vit_tiny", "scale=tiny"], ("vit_tiny", None, None), "cnn4"),
    (["model=resnet_cifar", "model.width=8", "scale=tiny"], ("resnet_cifar", 8, 1), "cnn4"),
    (["model=resnet18", "experiment=fig8", "scale=paper", "method=gaf"], ("resnet18", None, None), "resnet34_cifar"),
    (["model=cnn4", "model.width=8", "scale=tiny"], ("cnn4", 8, None), None),
])
def test_the_model_chosen_on_the_command_line_is_the_model_that_trains(given, model, instead):
    """A scale or preset merges its network after the model group: model=X on the command line still
    trains X (said in the log), never the scale's network without a word."""
    notes = []
    rc = launch.run_config(composed(given, hydra=True), given, notes=notes)
    assert (rc.model.name, rc.model.width, rc.model.blocks) == model
    assert notes == ([f"{given[0]} trains {model[0]} (the scale or preset would train {instead})"] if instead else [])
    assert to_run_config(composed(["scale=tiny"], hydra=True), ["scale=tiny"]).model.name == "cnn4"


@pytest.mark.parametrize("given", [["method=averaging", "method.tau=0.5"], ["method=averaging", "method.merge=halving"],
                                   ["arm=averaging", "method.tau=0.97"], ["experiment=fig1", "scale=tiny",
                                                                          "data=cifar100", "method.tau=0.5"]])
def test_a_preset_methods_defining_keys_cannot_turn_it_into_another_method(given):
    """method=averaging is GAF at tau 2 with the mean merge: changing either would train GAF in a
    folder and a role that say averaging."""
    key = given[-1].split("=")[0]
    with pytest.raises(ValueError, match=rf"^{key}=\S+ would change what method=averaging is \(gaf with "
                                         rf"method.tau=2.0, method.merge=mean\); use method=gaf {key}="):
        launch.run_config(composed(given, hydra=True), given)
    with pytest.raises(ValueError, match=r"would change what method=averaging is"):  # the choice read off the line
        launch.run_config(composed(given), given) if given[0] == "method=averaging" else launch.run_config(
            composed(given), given, choices={"method": "averaging"})
    same = ["method=averaging", "method.tau=2.0", "method.n_micro=4"]
    assert launch.run_config(composed(same, hydra=True), same).method.n_micro == 4


def swept_value_reached(point, key: str, value: str) -> bool:
    """Whether the composed config of one sweep point holds the swept value (a group: Hydra's record
    of the choice, and the option's name where its node has one)."""
    if key in point.hydra.runtime.choices:
        node = OmegaConf.select(point, key)
        name = OPTION_NAMES.get((key, value), value)
        return point.hydra.runtime.choices[key] == value and (node is None or node.name == name)
    got = OmegaConf.select(point, key)
    got = got.name if OmegaConf.is_config(got) else got
    try:
        return float(got) == float(value)
    except (TypeError, ValueError):
        return str(got) == value


@pytest.mark.parametrize("scale", ["tiny", "small", "paper"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_at_every_scale(preset, scale):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"scale={scale}"], return_hydra_config=True)
        rc = to_run_config(cfg)
        assert rc.experiment == preset and rc.scale == (scale if preset != "smoke" else "custom")  # smoke: its own length
        if preset != "smoke":
            params = cfg.hydra.sweeper.params
            assert params, f"{preset} has no sweep grid"
            # Every value of every swept key composes, validates, and reaches the config.
            for key, values in params.items():
                for value in str(values).split(","):
                    point = compose("config", overrides=[f"experiment={preset}", f"scale={scale}", f"{key}={value}"],
                                    return_hydra_config=True)
                    to_run_config(point)
                    assert swept_value_reached(point, key, value), (key, value)
    if scale == "tiny":
        assert rc.model.name in ("cnn4", "tiny", "vit_tiny")


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_each_arm_is_its_method_and_loss_at_any_scale(scale):
    """arm=X sets the method and the loss (and co-teaching's readable path), after the scale."""
    expected = {"baseline": ("baseline", "ce"), "label_smoothing": ("baseline", "label_smoothing"),
                "gce": ("baseline", "gce"), "sce": ("baseline", "sce"), "coteaching": ("coteaching", "ce"),
                "averaging": ("gaf", "ce"), "gaf": ("gaf", "ce"), "gaf_gce": ("gaf", "gce")}
    assert {p.stem for p in (CONFIGS / "arm").glob("*.yaml")} == set(expected)
    for arm, (method, loss) in expected.items():
        rc = to_run_config(composed(["experiment=robust", f"scale={scale}", f"arm={arm}", "data.noise=0.4", "seed=0"]))
        assert (rc.method.name, rc.loss.name) == (method, loss), arm
        if method == "gaf":
            assert (rc.method.tau, rc.method.merge) == ((2.0, "mean") if arm == "averaging" else (0.97, "halving"))
        assert rc.train.fast is ({"tiny": True, "small": None}[scale] if method != "coteaching" else False)


def test_paper_scale_uses_the_papers_settings():
    rc = to_run_config(composed(["experiment=fig6", "scale=paper", "method=gaf"]))
    assert (rc.model.name, rc.data.name, rc.data.fallback) == ("resnet18", "cifar100", None)
    assert (rc.method.n_micro, rc.method.per_class, rc.method.merge) == (2, 1, "halving")
    o = rc.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.schedule, o.plateau_factor,
            o.plateau_patience) == ("sgd", 0.01, 0.9, True, 0.01, "plateau", 0.1, 100)
    assert to_run_config(composed(["experiment=fig8", "scale=paper"])).model.name == "resnet34_cifar"


def test_canonical_overrides_reach_the_run_config():
    rc = to_run_config(composed(["data.noise=0.4", "method.tau=0.97", "method.n_micro=4", "method.per_class=2",
                                 "method.merge=mean", "train.iterations=7", "train.val_every=3", "seed=5",
                                 "device=cpu", "data.root=/somewhere"]))
    assert (rc.data.noise, rc.method.tau, rc.method.n_micro, rc.method.per_class, rc.method.merge) == \
        (0.4, 0.97, 4, 2, "mean")
    assert (rc.train.iterations, rc.train.val_every, rc.seed, rc.device, rc.data.root) == (7, 3, 5, "cpu", "/somewhere")


def test_the_lr_schedule_is_chosen_on_the_command_line_with_any_optimizer():
    """optim.schedule=cosine reaches the run; the plateau's settings given with it are refused
    (they would be ignored), and a preset-free default keeps the paper's plateau."""
    assert to_run_config(composed([])).optim.schedule == "plateau"
    for optim in GROUPS["optim"]:
        given = [f"optim={optim}", "optim.schedule=cosine"]
        rc = to_run_config(composed(given), given)
        assert (rc.optim.name, rc.optim.schedule) == (OPTION_NAMES.get(("optim", optim), optim), "cosine")
    given = ["optim.schedule=cosine", "optim.plateau_patience=5"]
    with pytest.raises(ValueError, match=r"^optim.plateau_patience=5 has no effect here: only optim.schedule=plateau"):
        to_run_config(composed(given), given)


@pytest.mark.parametrize("launcher, key, value", [("shared_gpu", "n_jobs", 4), ("slurm", "gpus_per_node", 1)])
def test_launcher_configs_compose(launcher, key, value):
    cfg = composed(["experiment=fig6", f"hydra/launcher={launcher}"], hydra=True)
    assert cfg.hydra.launcher[key] == value


def test_unknown_key_is_refused_by_composition():
    with pytest.raises(ConfigCompositionException, match="method.taux"):
        composed(["method.taux=1.0"])


def train_cli(args, cwd, timeout=300):
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "experiments/train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_point_multirun_and_noop_relaunch(tmp_path):
    args = ["-m", "data=random", "data.random_train=100", "data.random_test=20", "data.num_classes=5",
            "model=tiny", "train.iterations=3", "train.val_every=3", "train.memorisation_samples=50",
            "method.per_class=2", "device=cpu", "method.tau=0.5,2.0", f"hydra.sweep.dir={tmp_path}/sweep"]
    first = train_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    assert len(runs) == 2
    taus = sorted(json.loads((r / "config.json").read_text())["method"]["tau"] for r in runs)
    assert taus == [0.5, 2.0]
    assert all(json.loads((r / "summary.json").read_text())["status"] == "finished" for r in runs)
    assert all((r / ".hydra" / "config.yaml").exists() for r in runs)
    again = train_cli(args, tmp_path)
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 2, again.stdout[-2000:]


BAD_OVERRIDES = [
    ("data.noise=1.5", "error: data.noise must be a number in [0, 1), got 1.5"),
    ("data.noise=abc", "error: data.noise must be a number in [0, 1), got 'abc'"),
    ("device=gpu", "error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("optim.schedule=foo", "error: optim.schedule must be one of plateau, cosine, got 'foo'"),
]


@pytest.mark.slow
def test_cli_reports_a_bad_override_in_one_line(tmp_path):
    """The command line: exit code 2 and one line on stderr, nothing else (the other bad overrides
    take the same path in-process: below)."""
    override, message = BAD_OVERRIDES[0]
    out = train_cli(["data=random", override, "model=tiny", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == message
    assert not (tmp_path / "r").exists()


def launch_check(overrides, capsys) -> tuple[int, str]:
    """(exit code, stderr) of the check Hydra runs before a single run starts (configs/config.yaml's
    callback, launch.LaunchChecks) on the config these overrides compose: what experiments/train.py
    does with them before anything is made."""
    cfg = composed(overrides, hydra=True)
    with pytest.raises(SystemExit) as stop:
        launch.LaunchChecks().on_run_start(cfg)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", BAD_OVERRIDES)
def test_a_bad_override_is_refused_in_one_line(tmp_path, capsys, override, message):
    code, err = launch_check(["data=random", override, "model=tiny", f"hydra.run.dir={tmp_path}/r"], capsys)
    assert code == 2 and err.strip() == message
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.data_sources
def test_cli_names_missing_data_without_a_traceback(tmp_path):
    (tmp_path / "nothing").mkdir()
    out = train_cli(["data=cifar100", f"data.root={tmp_path}/nothing", "model=tiny", "device=cpu",
                     f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "cifar-100-python" in errors[0] and "download of cifar-100-python.tar.gz" in errors[0]  # each source tried
    assert "data.fallback=cifar10" in errors[0] and "data=cifar10_jpeg" in errors[0]  # and what to do instead


@pytest.mark.slow
@pytest.mark.data_sources
def test_cli_from_another_folder_finds_the_default_data(tmp_path, monkeypatch):
    """Default data paths come from the repository and $GAF_OFFLINE_DATA, not the working directory."""
    from cifar_fixtures import write_jpeg_tar

    offline = tmp_path / "offline"
    write_jpeg_tar(offline / "cifar10-jpeg" / "cifar10-jpeg-q75.tar.gz", [f"c{i}" for i in range(10)], 6, 2)
    monkeypatch.setenv("GAF_OFFLINE_DATA", str(offline))
    out = train_cli(["data=cifar10_jpeg", "model=tiny", "device=cpu", "method.per_class=1", "train.iterations=2",
                     "train.val_every=2", "train.memorisation_samples=10", f"hydra.run.dir={tmp_path}/r"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    note = json.loads((tmp_path / "r" / "summary.json").read_text())["data_note"]
    assert note.startswith(f"CIFAR-10 JPEG copy (q75) from {offline}/cifar10-jpeg/cifar10-jpeg-q75.tar.gz (the offline copy)")


def test_a_distributed_run_without_torchrun_is_a_settings_error_saying_how_to_launch(tmp_path):
    """A ValueError, which experiments/train.py reports in one line with exit code 2 (as it does the
    missing data above)."""
    from gaf.train import run

    given = ["data=random", "model=tiny", "device=cpu", "distributed=true", "data.num_classes=4",
             "data.random_train=80", "data.random_test=40"]
    with pytest.raises(ValueError, match="torchrun"):
        run(to_run_config(composed(given), given), tmp_path / "r")


def bad_values(rule):
    """Values the rule must refuse: wrong types, the bounds' wrong sides, null where not optional."""
    if rule.kind in ("int", "float"):
        bad = ["abc", True, float("nan")] + ([1.5] if rule.kind == "int" else [])
        if rule.low is not None:
            bad.append(rule.low if rule.open_low else rule.low - 1)
        if rule.high is not None:
            bad.append(rule.high if rule.open_high else rule.high + 1)
    elif rule.kind == "pair":
        bad = ["abc", [0.5], [0.5, "x"]] + ([[rule.high, 0.5]] if rule.high is not None else [])
    else:
        bad = {"choice": ["bogus", 3], "bool": ["yes", 1], "path": [5, ""], "text": [5, ""],
               "device": ["gpu", "cuda:x", 0]}[rule.kind]
    return bad + ([] if rule.optional else [None])


def with_setting(key, value) -> dict:
    *path, leaf = key.split(".")
    d = RunConfig().to_dict()
    section = d
    for name in path:
        section = section[name]
    section[leaf] = value
    return d


SCHEMA = list(settings(RunConfig))


def test_every_setting_has_a_rule():
    assert all("rule" in f.metadata for _, f, _ in SCHEMA), [k for k, f, _ in SCHEMA if "rule" not in f.metadata]
    kinds = {f.metadata["rule"].kind for _, f, _ in SCHEMA}
    assert {"int", "float", "choice", "bool", "path"} <= kinds
    validate(RunConfig())  # the defaults are valid


@pytest.mark.parametrize("key, value", [(k, v) for k, f, _ in SCHEMA for v in bad_values(f.metadata["rule"])],
                         ids=str)
def test_every_bad_setting_is_one_line_naming_key_and_allowed(key, value):
    """Walks the schema: every numeric key out of range or of the wrong type, every choice
    key off its list, every path/text key empty or not a string, null where not allowed."""
    rule = dict((k, f.metadata["rule"]) for k, f, _ in SCHEMA)[key]
    with pytest.raises(ValueError) as e:
        validate(RunConfig.from_dict(with_setting(key, value)))
    message, stored = str(e.value), tuple(value) if isinstance(value, list) else value  # betas: a tuple
    assert message == f"{key} must be {rule.allowed()}, got {stored!r}"
    assert "\n" not in message


@pytest.mark.parametrize("key, value", [("method.adaptive_k", -1), ("train.memorisation_samples", -1),
                                        ("train.eval_batch_size", 0), ("seed", 1.5), ("seed", "abc"),
                                        ("device", "gpu"), ("data.noise", "abc"), ("optim.betas", [0.9, 1.5])])
def test_the_reported_bad_settings_are_refused(key, value):
    with pytest.raises(ValueError) as e:
        validate(RunConfig.from_dict(with_setting(key, value)))
    assert str(e.value).startswith(f"{key} must be ") and "\n" not in str(e.value)


@pytest.mark.parametrize("train, device, match", [
    ({"amp": True}, "cpu", r"train.amp=true acts on the fast path only.*device is cpu.*train.fast=true"),
    ({"batched": True, "fast": False}, "cpu", r"train.batched=true .*train.fast=false"),
    ({"compile": "graph", "fast": True}, "cpu", r"train.compile=graph .*needs device=cuda"),
    ({"compile": "full", "batched": True}, "cuda", r"compile=full does not combine with train.batched"),
])
def test_fast_path_options_where_they_would_be_ignored_are_errors(train, device, match):
    cfg = RunConfig.from_dict({"train": train, "device": device})
    with pytest.raises(ValueError, match=match):
        validate(cfg)
        check_fast_path_options(cfg, device)


def test_fast_path_options_on_the_fast_path_are_accepted():
    cfg = RunConfig.from_dict({"train": {"amp": True, "batched": True, "fast": True}, "device": "cpu"})
    validate(cfg)
    check_fast_path_options(cfg, "cpu")
    cuda = RunConfig.from_dict({"train": {"amp": True, "compile": "graph", "batched": True}, "device": "auto"})
    validate(cuda)
    check_fast_path_options(cuda, "cuda")
    with pytest.raises(ValueError, match="distributed=true runs its own step"):
        check_fast_path_options(RunConfig.from_dict({"train": {"amp": True}, "distributed": True}), "cuda")


@pytest.mark.parametrize("settings_, device, plan", [
    ({}, "cpu", RunPlan("cpu", fast=False, amp=False, channels_last=False, compile=False, batched=False)),
    ({}, "cuda", RunPlan("cuda", fast=True, amp=False, channels_last=False, compile=False, batched=False)),
    ({"train": {"amp": True}}, "cuda", RunPlan("cuda", True, amp=True, channels_last=True, compile=False,
                                               batched=False)),
    ({"train": {"amp": True, "channels_last": False, "compile": "full"}}, "cuda",
     RunPlan("cuda", True, amp=True, channels_last=False, compile=True, batched=False)),
    ({"train": {"fast": True, "batched": True}}, "cpu", RunPlan("cpu", True, False, False, False, batched=True)),
    ({"train": {"compile": "graph"}}, "cuda", RunPlan("cuda", True, False, False, compile="graph", batched=False)),
    ({"distributed": True}, "cuda", RunPlan("cuda", fast=False, amp=False, channels_last=False, compile=False,
                                            batched=False)),
])
def test_resolve_decides_the_fast_path_and_its_options_once(settings_, device, plan):
    cfg = RunConfig.from_dict(settings_)
    validate(cfg)
    assert resolve(cfg, device) == plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fast = not plan.fast


def test_resolve_refuses_what_check_fast_path_options_refuses():
    with pytest.raises(ValueError, match=r"train.amp=true acts on the fast path only.*device is cpu"):
        resolve(RunConfig.from_dict({"train": {"amp": True}}), "cpu")


def test_importing_the_schema_loads_no_torch_and_no_gaf_module_but_the_records_and_rules():
    code = ("import gaf.config, sys; assert 'torch' not in sys.modules, 'torch'; "
            "print(sorted(m for m in sys.modules if m == 'gaf' or m.startswith('gaf.')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['gaf',", "'gaf.config',", "'gaf.datasets',", "'gaf.methods',", "'gaf.rules']"]


def test_the_schemas_choices_are_the_implementations():
    """The schema's literal choices against the registries of the modules that implement them
    (gaf.data takes its names from the schema; the models: tests/test_models.py)."""
    from gaf import data, distributed, fast, filter, optim, schedule
    from gaf.optim import build_optimizer

    from gaf import losses

    assert schema.MERGES == filter.MERGES and schema.OPTIMIZERS == optim.OPTIMIZERS
    assert schema.LOSSES == losses.LOSSES and schema.SCHEDULES == schedule.SCHEDULES
    assert schema.DIST_MODES == distributed.MODES
    assert (data.DATASETS, data.FALLBACKS, data.FALLBACK_WHEN) == (schema.DATASETS, schema.FALLBACKS,
                                                                  schema.FALLBACK_WHEN)
    model = torch.nn.Linear(2, 2)
    for compile_arg in schema.COMPILE_MODES.values():  # each one FastPlainStep accepts
        fast.FastPlainStep(model, build_optimizer("sgd", model.parameters(), lr=0.1, masked=True),
                           torch.nn.functional.cross_entropy, compile=compile_arg, graphs=fast.StandInGraphs())
    with pytest.raises(ValueError, match="compile must be"):
        fast.FastPlainStep(model, build_optimizer("sgd", model.parameters(), lr=0.1, masked=True),
                           torch.nn.functional.cross_entropy, compile="full", graphs=fast.StandInGraphs())


def cli_module():
    return launch


@pytest.mark.parametrize("preset", PRESETS)
def test_a_runs_scale_is_what_its_settings_are(preset):
    settings_scale = cli_module().settings_scale
    for scale in ("tiny", "small", "paper"):
        given = [f"experiment={preset}", f"scale={scale}"]
        container = OmegaConf.to_container(composed(given), resolve=True)
        assert settings_scale(container, given) == (scale if preset != "smoke" else "custom")  # smoke: its own length
        shorter = [*given, "train.iterations=7"]
        assert settings_scale(OmegaConf.to_container(composed(shorter), resolve=True), shorter) == "custom"
    ad_hoc = OmegaConf.to_container(composed(["data.noise=0.4"]), resolve=True)
    assert ad_hoc["scale"] == "custom" and settings_scale(ad_hoc, ["data.noise=0.4"]) == "custom"  # no scale chosen
    at_paper = ["data.noise=0.4", "scale=paper"]  # an ad-hoc run at a scale: that scale's settings
    assert settings_scale(OmegaConf.to_container(composed(at_paper), resolve=True), at_paper) == "paper"


def leaves(d: dict, prefix: str = "") -> dict:
    """Every leaf of a nested mapping by its dotted key."""
    out = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_setting_comes_from_run_config_and_config_yaml_restates_none():
    """RunConfig is the one source of defaults: the composed config holds every one of its keys,
    each at its default, and config.yaml sets none of them (re-adding one fails here)."""
    bare = OmegaConf.to_container(composed([]), resolve=True)
    defaults = leaves(RunConfig().to_dict())
    assert {k: v for k, v in leaves(bare).items() if k not in launch.LAUNCH_KEYS} == defaults
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml"))
    restated = {k: v for k, v in leaves({k: v for k, v in own.items() if k not in ("defaults", "hydra")}).items()
                if k in defaults}
    assert not restated, f"config.yaml restates RunConfig's settings {sorted(restated)}: set them in gaf/config.py"


@pytest.mark.slow
def test_cfg_job_shows_every_setting_at_its_default(tmp_path):
    out = train_cli(["--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = leaves(OmegaConf.to_container(OmegaConf.create(out.stdout)))
    assert {k: v for k, v in shown.items() if k not in launch.LAUNCH_KEYS} == leaves(RunConfig().to_dict())


@pytest.mark.parametrize("preset", PRESETS)
def test_a_presets_per_scale_adjustments_are_its_at_scale_block_only(preset):
    """One form for what a preset changes at a scale: its `at_scale` block, no interpolation on ${scale}
    (and no rows of its own) elsewhere in the preset."""
    text = (CONFIGS / "experiment" / f"{preset}.yaml").read_text()
    assert "${scale" not in text and "scales" not in OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml")
    assert set(OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml").get("at_scale") or {}) <= set(
        launch.scale_options())


@pytest.mark.parametrize("scale", sorted(p.stem for p in (CONFIGS / "scale").glob("*.yaml")))
def test_the_scale_group_sets_what_its_file_says(scale):
    given = [f"scale={scale}", *(["experiment=gpu_small"] if scale == "gpu" else [])]
    rc = to_run_config(composed(given, hydra=True), given)
    meant = leaves(OmegaConf.to_container(OmegaConf.load(CONFIGS / "scale" / f"{scale}.yaml")))
    meant = {k: v for k, v in meant.items() if k not in launch.LAUNCH_KEYS and not k.startswith("method.")}
    got = leaves(rc.to_dict())
    assert rc.scale == scale and {k: got[k] for k in meant} == meant


@pytest.mark.parametrize("preset", ["fig6", "robust", None])
def test_a_scale_made_for_one_preset_is_refused_for_the_others_in_one_line(preset):
    given = ["scale=gpu", *([f"experiment={preset}"] if preset else [])]
    with pytest.raises(ValueError, match=r"^scale=gpu is made for experiment=gpu_small only \(configs/scale/gpu.yaml\); "
                                         r"choose one of the other scales$"):
        to_run_config(composed(given, hydra=True), given)


@pytest.mark.parametrize("override, options", [
    ("scale=huge", "gpu, paper, small, tiny"), ("loss=foo", "ce, gce, label_smoothing, sce"),
    ("arm=foo", "averaging, baseline, coteaching, gaf, gaf_gce, gce, label_smoothing, sce")])
def test_an_optional_groups_choice_that_is_no_option_is_one_line_naming_the_options(override, options):
    """Hydra would skip them silently (the groups are optional): the run would train with the default."""
    group, value = override.split("=")
    with pytest.raises(ValueError, match=rf"^{group} must be one of {options}, got '{value}'$"):
        to_run_config(composed([override], hydra=True), [override])


def test_an_at_scale_block_naming_no_scale_is_refused(tmp_path, monkeypatch):
    (tmp_path / "scale").mkdir()
    (tmp_path / "scale" / "tiny.yaml").write_text("scale: tiny\n")
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "figx.yaml").write_text("at_scale:\n  tiyn: {train: {iterations: 3}}\n")
    monkeypatch.setattr(launch, "CONFIGS", tmp_path)
    with pytest.raises(ValueError, match=r"figx.yaml: at_scale.tiyn names no scale; the scales are tiny"):
        launch.register_configs(store=type("Store", (), {"store": lambda *a, **k: None})())


def test_long_override_lists_make_bounded_readable_folder_names():
    module = cli_module()
    short = "method.tau=0.9,seed=3"
    assert module.bounded_dirname(short) == short
    long = ",".join(f"optim.key{i}=value{i}" for i in range(40))
    name = module.bounded_dirname(long)
    assert len(name.encode()) <= 200 and name.startswith("optim.key0=value0,optim.key1=value1,")
    assert name.rsplit(",...-", 1)[0].split(",")[-1].startswith("optim.key")  # whole overrides only
    assert name != module.bounded_dirname(long + ",seed=1")  # the hash covers the whole list


@pytest.mark.slow
def test_cli_run_with_many_overrides_gets_a_folder(tmp_path):
    overrides = ["data.num_classes=5", "data.random_test=20", "data.random_train=100", "method.per_class=2",
                 "optim.lr=0.02", "optim.momentum=0.8", "optim.weight_decay=0.001", "optim.plateau_patience=5",
                 "optim.plateau_factor=0.5", "method.tau=0.9", "method.merge=mean", "method.adaptive_k=1.0", "method.adaptive_window=50",
                 "train.eval_batch_size=100", "seed=3", "train.memorisation_samples=10", "train.val_every=1"]
    out = train_cli(["data=random", "model=tiny", "device=cpu", "train.iterations=1", *overrides], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(run_dir.name.encode()) <= 200 and run_dir.name.startswith("data.num_classes=5,")
    # an ad-hoc run is filed, and recorded, as what its settings are
    assert run_dir.parent == tmp_path / "outputs" / "single" / "custom"
    assert json.loads((run_dir / "summary.json").read_text())["scale"] == "custom"


def test_a_run_saved_before_a_setting_existed_ran_at_its_default():
    """Run directories written before the loss section existed are the same run as today's
    cross-entropy default (a finished sweep point stays a no-op), and not as any other loss."""
    old = RunConfig().to_dict()
    del old["loss"], old["method"]["forget_rate"], old["method"]["ramp_epochs"]
    assert rundir.same_run(old, RunConfig().to_dict())
    gce = RunConfig.from_dict({"loss": {"name": "gce"}}).to_dict()
    assert not rundir.same_run(old, gce)
    assert rundir.describe_differences(gce, old) == 'loss.name="gce" (it has "ce")'


@pytest.mark.parametrize("d, match", [
    ({"loss": {"name": "gce", "q": 0.0}}, r"loss.q must be a number in \(0, 1\]"),
    ({"loss": {"name": "ce", "q": 0.5}}, "loss.q=0.5 has no effect here: only loss=gce has q"),
    ({"loss": {"name": "sce", "alpha": -1.0}}, "loss.alpha must be a number >= 0"),
    ({"loss": {"smoothing": 0.2}}, "only loss=label_smoothing smooths"),
    ({"method": {"name": "gaf", "forget_rate": 0.4}}, "only method=coteaching trains two networks"),
    ({"method": {"name": "coteaching", "forget_rate": 1.0}}, r"method.forget_rate must be a number in \[0, 1\)"),
    ({"method": {"name": "coteaching"}, "train": {"fast": True}}, "method=coteaching runs on the readable path"),
    ({"method": {"name": "coteaching"}, "train": {"batched": True}}, "method=coteaching has none"),
])
def test_loss_and_coteaching_settings_are_validated(d, match):
    with pytest.raises(ValueError, match=match):
        schema.validate(RunConfig.from_dict(d))


def test_a_methods_record_decides_which_settings_act_on_it():
    """gaf.methods: microbatches -> the microbatch settings act and the batch size does not; peer ->
    the second network's settings act; not fast -> the fast path is refused."""
    from gaf.methods import METHODS

    assert schema.METHODS == tuple(METHODS)
    for name, m in METHODS.items():
        idle = {key for key, *_ in schema.without_effect(RunConfig.from_dict({"method": {"name": name}}))}
        assert ("method.n_micro" not in idle) == m.microbatches and ("method.batch_size" not in idle) != m.microbatches
        assert ("method.forget_rate" not in idle) == m.peer
        fast = RunConfig.from_dict({"method": {"name": name}, "train": {"fast": True}})
        if m.fast:
            validate(fast)
        else:
            with pytest.raises(ValueError, match=f"method={name} runs on the readable path"):
                validate(fast)
