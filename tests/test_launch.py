"""What a launch may hold, checked before anything starts: settings that have no effect, a sweep's
points all at once, a sweep preset without -m, and one named error (never a traceback) for each."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gaf.config import APPLIES, RunConfig, inapplicable, settings, validate, without_inapplicable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import launch  # noqa: E402

# For every condition of APPLIES: sections under which it holds, and under which it does not.
WHERE = {
    "microbatches": ({"method": {"name": "gaf"}}, {"method": {"name": "baseline"}}),
    "adaptive": ({"method": {"adaptive_k": 1.0}}, {}),
    "batch": ({"method": {"name": "baseline"}}, {"method": {"name": "gaf"}}),
    "peer": ({"method": {"name": "coteaching"}, "train": {"fast": False}}, {"method": {"name": "gaf"}}),
    "label_smoothing": ({"loss": {"name": "label_smoothing"}}, {"loss": {"name": "ce"}}),
    "gce": ({"loss": {"name": "gce"}}, {"loss": {"name": "ce"}}),
    "sce": ({"loss": {"name": "sce"}}, {"loss": {"name": "gce"}}),
    "human_labels": ({"data": {"name": "cifar100n"}}, {"data": {"name": "cifar100"}}),
    "substitutable": ({"data": {"name": "cifar100"}}, {"data": {"name": "cifar10_jpeg"}}),
    "fallback": ({"data": {"fallback": "cifar10"}}, {}),
    "jpeg": ({"data": {"name": "cifar10_jpeg"}}, {"data": {"name": "cifar100"}}),
    "random": ({"data": {"name": "random"}}, {"data": {"name": "cifar100"}}),
    "sgd": ({"optim": {"name": "sgd"}}, {"optim": {"name": "adam"}}),
    "adam": ({"optim": {"name": "adamw"}}, {"optim": {"name": "sgd"}}),
    "plateau": ({"optim": {"schedule": "plateau"}}, {"optim": {"schedule": "cosine"}}),
    "distributed": ({"distributed": True}, {}),
}
# A valid value away from each conditional setting's default.
OTHER = {"data.label_file": "labels.pt", "data.fallback": "cifar10", "data.fallback_when": "always",
         "data.jpeg_path": "copy.tar.gz", "data.random_train": 700, "data.random_test": 70, "method.tau": 0.5,
         "method.n_micro": 3, "method.per_class": 2, "method.merge": "mean", "method.replacement": True,
         "method.adaptive_k": 1.0, "method.adaptive_window": 50, "method.batch_size": 64, "optim.momentum": 0.5,
         "optim.nesterov": False, "optim.betas": [0.8, 0.99],
         "optim.plateau_factor": 0.5, "optim.plateau_patience": 10, "dist_mode": "allgather",
         "method.forget_rate": 0.3, "method.ramp_epochs": 5.0, "loss.smoothing": 0.2, "loss.q": 0.5,
         "loss.alpha": 1.0, "loss.beta": 2.0}
CONDITIONAL = [(key, f.metadata["rule"].applies) for key, f, _ in settings(RunConfig) if f.metadata["rule"].applies]


def config(sections: dict, key: str, value) -> RunConfig:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
    section, _, name = key.rpartition(".")
    (d.setdefault(section, {}) if section else d)[name] = value
    return RunConfig.from_dict(d)


def value_of(cfg: RunConfig, key: str):
    return {k: v for k, _, v in settings(cfg)}[key]


def test_every_condition_is_defined_and_every_conditional_setting_is_walked():
    assert {cond for _, cond in CONDITIONAL} <= set(APPLIES) == set(WHERE)
    assert sorted(OTHER) == sorted(key for key, _ in CONDITIONAL)


@pytest.mark.parametrize("key, condition", CONDITIONAL, ids=[k for k, _ in CONDITIONAL])
def test_a_setting_that_has_no_effect_is_refused_naming_it(key, condition):
    """Walks the schema: every conditional setting, set away from its default where its condition
    fails, is one error naming the key and why; where the condition holds it is accepted."""
    holds, fails = WHERE[condition]
    with pytest.raises(ValueError) as e:
        validate(config(fails, key, OTHER[key]))
    assert str(e.value).startswith(f"{key}=") and "has no effect here" in str(e.value) and "\n" not in str(e.value)
    on = config(holds, key, OTHER[key])
    assert key not in [k for k, _, _ in inapplicable(on)]
    assert value_of(without_inapplicable(config(fails, key, OTHER[key])), key) == value_of(RunConfig(), key)


def test_the_reason_names_the_method_that_runs():
    (why,) = [w for k, _, w in inapplicable(RunConfig.from_dict({"method": {"name": "coteaching"}}), {"method.tau"})]
    assert why.startswith("method=coteaching steps on one batch of method.batch_size images")


def test_named_keys_count_even_at_their_default():
    cfg = RunConfig.from_dict({"method": {"name": "baseline"}})
    assert inapplicable(cfg) == []
    assert [k for k, _, _ in inapplicable(cfg, {"method.tau", "seed"})] == ["method.tau"]


def test_seed_beyond_31_bits_is_a_named_error():
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2147483647\], got 18446744073709551615$"):
        validate(RunConfig.from_dict({"seed": 18446744073709551615}))


def test_wandb_asked_for_where_it_is_not_installed_is_refused_before_any_data_loads(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"wandb.mode=offline needs wandb: pip install 'gaf\[wandb\]'"):
        validate(RunConfig.from_dict({"wandb": {"mode": "offline"}}))


def test_cifar100n_with_synthetic_noise_names_the_keys():
    with pytest.raises(ValueError, match=r"data.noise=0.2 with data=cifar100n.*use data.noise=0"):
        validate(RunConfig.from_dict({"data": {"name": "cifar100n", "noise": 0.2}}))


# ----------------------------------------------------------------------------- the command line


def train_cli(args, cwd):
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "experiments/train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def refused(out) -> str:
    """The one error line of a launch refused with exit code 2 and no traceback."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def checked(args, capsys) -> subprocess.CompletedProcess:
    """What experiments/train.py does with a single run's command line before anything is made, in
    this process: the unknown-key check before Hydra, then the check Hydra runs before the run starts
    (configs/config.yaml's callback, launch.LaunchChecks), on the config the arguments compose. Its
    exit code and output, as train_cli's."""
    if error := launch.unknown_key(args):
        print(f"error: {error}", file=sys.stderr)
        code = 2
    else:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("config", overrides=list(args), return_hydra_config=True)
        try:
            launch.LaunchChecks().on_run_start(cfg)
            code = None  # checked and accepted: Hydra would go on and train
        except SystemExit as stop:
            code = stop.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


TINY = ["data=random", "model=tiny", "device=cpu", "data.random_train=100", "data.random_test=20",
        "data.num_classes=5", "train.iterations=2", "train.val_every=2", "train.memorisation_samples=10"]


@pytest.mark.parametrize("args, message", [
    (["method=baseline", "method.tau=0.97"], "error: method.tau=0.97 has no effect here: method=baseline"),
    (["method=baseline", "method.adaptive_k=1.0"], "error: method.adaptive_k=1.0 has no effect here"),
    (["method=gaf", "method.batch_size=64"], "error: method.batch_size=64 has no effect here: method=gaf"),
    (["data.label_file=x.pt"], "error: data.label_file=x.pt has no effect here: only data=cifar100n"),
    (["method=averaging", "method.tau=0.5"], "error: method.tau=0.5 would change what method=averaging is (gaf with "
                                             "method.tau=2.0, method.merge=mean); use method=gaf method.tau=0.5"),
    (["scale=huge"], "error: scale must be one of gpu, paper, small, tiny, got 'huge'"),
    (["method.foo=1"], "error: unknown config key method.foo; allowed under method: adaptive_k, adaptive_window, "
                       "batch_size, forget_rate, merge, n_micro, name, per_class, ramp_epochs, replacement, tau"),
    (["methd.tau=1"], "error: unknown config key methd.tau; allowed under the top level: arm, data, device, "),
    (["method=coteaching", "method.tau=0.5"], "error: method.tau=0.5 has no effect here: method=coteaching steps on "),
    (["arm=foo"], "error: arm must be one of averaging, baseline, coteaching, gaf, gaf_gce, gce, label_smoothing, "
                  "sce, got 'foo'"),
    (["seed=18446744073709551615"], "error: seed must be an integer in [0, 2147483647]"),
    (["experiment=fig6", "scale=tiny"], "error: experiment=fig6 is a sweep over data.noise, method, seed: run it "
                                        "with -m"),
])
def test_a_bad_launch_is_one_error_before_anything_is_made(tmp_path, capsys, args, message):
    out = checked([*TINY, *args, f"hydra.run.dir={tmp_path}/run"], capsys)
    assert refused(out).startswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_command_line_refuses_a_bad_launch_in_one_line_before_anything_is_made(tmp_path):
    """Exit code 2, one error line and no traceback, nothing made, where experiments/train.py refuses
    before Hydra starts (the other refusals take the same paths in-process: above; Hydra's own check
    on the command line: tests/test_configs.py::test_cli_reports_a_bad_override_in_one_line)."""
    out = train_cli([*TINY, "methd.tau=1", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert refused(out).startswith("error: unknown config key methd.tau; allowed under the top level: arm, data, ")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_a_run_directory_that_cannot_be_made_is_named(tmp_path, capsys):
    """Under a file: what root meets where others meet a read-only folder (below)."""
    (tmp_path / "a file").write_text("")
    out = checked([*TINY, f"hydra.run.dir='{tmp_path}/a file/run'"], capsys)
    assert refused(out) == (f"error: cannot write the run directory {tmp_path}/a file/run: {tmp_path}/a file is not "
                            "a folder; choose another with hydra.run.dir=...")


def test_a_read_only_run_directory_is_named(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        out = checked([*TINY, f"hydra.run.dir={tmp_path}/ro/run"], capsys)
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert refused(out).startswith(f"error: cannot write the run directory {tmp_path}/ro/run: ")


def test_a_run_directory_where_no_folder_can_be_made_is_one_error(capsys):
    """/proc: writable by its permission bits for root, yet no folder can be made there."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    out = checked([*TINY, "hydra.run.dir=/proc/x"], capsys)
    assert refused(out).startswith("error: cannot write the run directory /proc/x: ")


def test_an_unwritable_folder_is_named_whoever_runs_the_check(tmp_path, monkeypatch):
    (tmp_path / "a file").write_text("")
    assert launch.unwritable(str(tmp_path / "a file" / "run")) == f"{tmp_path / 'a file'} is not a folder"
    assert launch.unwritable(str(tmp_path / "new" / "run")) is None
    monkeypatch.setattr(launch.os, "access", lambda path, mode: False)
    assert launch.unwritable(str(tmp_path / "new" / "run")) == f"{tmp_path} is not writable"


@pytest.mark.slow
def test_a_sweep_with_an_invalid_point_launches_none_of_them(tmp_path):
    out = train_cli(["-m", *TINY, "method.n_micro=1000,2", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    line = refused(out)
    assert line == "error: 1 of 2 sweep points would not run; nothing was launched:"
    assert "method.n_micro=1000: method.per_class=1 x method.n_micro=1000 = 1000 images" in out.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_dry_run_lists_a_sweeps_points_and_launches_nothing(tmp_path, capsys):
    out = train_cli(["-m", "experiment=fig6", "scale=tiny", "dry_run=true", f"hydra.sweep.dir={tmp_path}/sweep"],
                    tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
    assert len(listed) == 8 and "data.noise=0.4 method=gaf seed=1 experiment=fig6 scale=tiny" in listed
    assert f"dry run: 8 runs under {tmp_path}/sweep" in out.stdout and not (tmp_path / "sweep").exists()
    # one point of the sweep, every swept key set: a single run is fine
    one = checked(["experiment=fig6", "scale=tiny", "data.noise=0.4", "method=gaf", "seed=1", "dry_run=true",
                   f"hydra.run.dir={tmp_path}/one"], capsys)
    assert one.returncode == 0 and f"dry run: 1 run -> {tmp_path}/one" in one.stdout, one.stderr[-2000:]
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [True, False])
def test_a_dry_run_whose_listing_cannot_be_written_still_launches_nothing(tmp_path, multirun):
    """`... dry_run=true | head`: the pipe closes while the listing is printed. Hydra swallows a
    callback's exceptions and would go on to train every point (it once did, for an hour)."""
    read, write = os.pipe()
    os.close(read)  # every write to the pipe fails: EPIPE
    args = ["-m", "experiment=fig6", "scale=tiny"] if multirun else ["model=tiny", "data=random"]
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, str(ROOT / "experiments/train.py"), *args, "dry_run=true",
                          "train.iterations=3", f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.run.dir={tmp_path}/run"],
                         cwd=tmp_path, env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write)
    assert got.returncode in (0, 120), got.stderr[-2000:]  # 120: Python could not flush stdout at exit
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists(), got.stderr[-2000:]


def test_reproduce_dry_run_lists_every_launch_and_checks_every_point(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    assert reproduce.main(["--scale", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 48 runs in 15 launches at --scale tiny, every one valid" in out
    assert "premise method=baseline model.width=4: 1 run" in out
    assert "robust : 16 runs (multirun)" in out and "arm=coteaching data.noise=0.4 seed=1 experiment=robust" in out
    assert reproduce.main(["--scale", "tiny", "--only", "fig9", "--dry-run", "method.n_micro=1000"]) == 2
    err = capsys.readouterr().err
    assert "would not run; nothing was launched" in err and "method.n_micro=1000" in err


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_refused_launch_leaves_the_folder_byte_for_byte(tmp_path, capsys):
    """Into a finished run of another config, into someone else's files, and as a sweep point: refused
    before Hydra writes .hydra/ or train.log there (someone else's files: by the same check, in-process)."""
    run = tmp_path / "run"
    assert train_cli([*TINY, f"hydra.run.dir={run}"], tmp_path).returncode == 0
    before = files_of(run)
    assert refused(train_cli([*TINY, "seed=1", f"hydra.run.dir={run}"], tmp_path)).startswith(
        f"error: run directory {run} holds a finished run of another config: seed=1 (it has 0)")
    assert files_of(run) == before
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.csv").write_text("mine\n")
    assert refused(checked([*TINY, f"hydra.run.dir={theirs}"], capsys)).startswith(
        f"error: run directory {theirs} holds metrics.csv but no run summary")
    assert files_of(theirs) == {Path("metrics.csv"): b"mine\n"} and [p.name for p in theirs.iterdir()] == ["metrics.csv"]
    sweep = tmp_path / "sweep"
    point = ",".join(sorted([o for o in TINY if not o.startswith("device=")] + ["seed=1"]))  # Hydra's folder name
    (sweep / point).mkdir(parents=True)
    (sweep / point / "metrics.csv").write_text("mine\n")
    out = train_cli(["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert refused(out) == "error: 1 of 2 sweep points would not run; nothing was launched:"
    assert f"seed=1: run directory {sweep / point} holds metrics.csv but no run summary" in out.stderr
    assert files_of(sweep) == {Path(point, "metrics.csv"): b"mine\n"} and [p.name for p in sweep.iterdir()] == [point]


@pytest.mark.slow
def test_every_run_and_every_ad_hoc_sweep_gets_its_own_leaf(tmp_path, capsys):
    """Two ad-hoc sweeps never share a multirun.yaml, a sweep's runs land in its own folder, and a run
    whose overrides name no setting gets a folder of its own, never its siblings' parent."""
    out = train_cli(["-m", *TINY, "seed=0,1"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (sweep,) = [p.parent for p in (tmp_path / "multirun" / "single" / "custom").rglob("multirun.yaml")]
    assert sweep.name == ",".join(sorted([o for o in TINY if not o.startswith("device=")] + ["seed=0,1"]))
    assert sorted(p.parent.parent for p in tmp_path.rglob("summary.json")) == [sweep, sweep]
    other = train_cli(["-m", *TINY, "seed=1,2", "dry_run=true"], tmp_path)
    assert other.returncode == 0 and f"runs under multirun/single/custom/{sweep.name.replace('0,1', '1,2')}" in \
        other.stdout, other.stderr[-2000:]
    alone = checked(["device=cpu", "dry_run=true"], capsys)  # the folder Hydra's config names
    assert alone.returncode == 0 and "dry run: 1 run -> outputs/single/custom/defaults" in alone.stdout, alone.stderr
