"""From Hydra's composed config to the runs it launches, every one checked before the first starts.

The Hydra side of the project (``gaf/`` stays free of Hydra): the folder names, the scale a
run's settings are, the ``RunConfig`` a composed config launches, the points of a sweep, and
``LaunchChecks``, the callback (configs/config.yaml) that refuses a bad launch with one message
and exit code 2 before Hydra makes a folder or a log file:

- a single run: its settings, a preset that is a sweep launched without ``-m``, a run directory
  that cannot be written;
- a multirun: every point of the sweep (the preset's grid and the command line's), all of them
  before the first launches.

``dry_run=true`` lists what would run (each point and its folder) and launches nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
import tempfile
from pathlib import Path

from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from gaf.config import RunConfig, inapplicable, settings, validate, without_inapplicable
from gaf.rundir import RUN_FILES, RunDirError, RunDirLock

NAME_BYTES = 200  # a folder name may hold 255 bytes; leave room for Hydra's and the file system's suffixes
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Keys of a composed config that steer Hydra and the launch, not a run: a preset's adjustments per
# scale (`at_scale`), what scripts/reproduce.py launches of it (`launches`), the presets a scale is
# made for where it is not for all (`scale_for`), and `dry_run`.
LAUNCH_KEYS = ("at_scale", "launches", "scale_for", "dry_run")
# What a scale fixes (configs/scale/) that makes a run "at" that scale: its length and its data. The
# network and m are left out: presets sweep m and width (figures 4, 8, the premise) and pick their
# own networks (figure 3).
SCALE_KEYS = ("train.iterations", "train.val_every", "train.memorisation_samples", "data.train_per_class",
              "data.test_per_class", "data.fallback", "data.fallback_when")


EMPTY_DIRNAME = "defaults"  # the folder of a run (or sweep) whose overrides all name no setting: its own leaf


def bounded_dirname(name: str) -> str:
    """Hydra's override_dirname as a folder name: as it is when short enough, else a readable
    prefix and a hash of the whole (about 15 overrides passed 255 bytes: OSError 36); never empty,
    so that no run's folder is the parent of other runs' folders."""
    raw = name.encode()
    if not raw:
        return EMPTY_DIRNAME
    if len(raw) <= NAME_BYTES:
        return name
    tail = ",...-" + hashlib.sha256(raw).hexdigest()[:12]
    prefix = raw[: NAME_BYTES - len(tail)].rsplit(b",", 1)[0]  # whole overrides only
    return prefix.decode(errors="ignore") + tail


# The groups config.yaml lists as optional. Hydra skips an optional group's option that does not
# exist without a word, so each choice is checked here: one line naming the options.
OPTIONAL_GROUPS = ("scale", "loss", "arm")


def group_options(group: str) -> tuple[str, ...]:
    """A config group's options (configs/<group>/)."""
    return tuple(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))


def scale_options() -> tuple[str, ...]:
    """The scales a run may be at: the scale group's options (configs/scale/)."""
    return group_options("scale")


def scale_for(scale: str) -> list[str] | None:
    """The presets a scale is made for (its file's ``scale_for``), or None: every preset."""
    return OmegaConf.load(CONFIGS / "scale" / f"{scale}.yaml").get("scale_for")


def register_configs(store: ConfigStore | None = None) -> None:
    """What config.yaml's defaults list takes from code rather than files: every setting at
    ``RunConfig``'s default (gaf/config.py is their one definition), and each preset's ``at_scale``
    block as the option ``at_scale/<preset>_<scale>``, merged after the preset where that scale is chosen."""
    store = store or ConfigStore.instance()
    store.store(name="run_config_defaults", node=RunConfig().to_dict())
    scales = scale_options()
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        for scale, adjustments in (OmegaConf.load(path).get("at_scale") or {}).items():
            if scale not in scales:
                raise ValueError(f"configs/experiment/{path.name}: at_scale.{scale} names no scale; "
                                 f"the scales are {', '.join(scales)} (configs/scale/)")
            store.store(group="at_scale", name=f"{path.stem}_{scale}", node=adjustments, package="_global_")


def check_choices(cfg) -> None:
    """A ``scale=``, ``loss=`` or ``arm=`` that names no option of its group: an error. Needs the
    composed config's ``hydra`` node."""
    choices = cfg["hydra"]["runtime"]["choices"]
    for group in OPTIONAL_GROUPS:
        chosen, options = choices.get(group), group_options(group)
        if chosen is not None and chosen not in options:
            raise ValueError(f"{group} must be one of {', '.join(options)}, got {chosen!r}")


def settings_scale(cfg, overrides) -> str:
    """The scale a run's settings are: the scale chosen (configs/scale/; "custom" where none is, and
    for presets with lengths of their own), unless ``overrides`` (the command line, or a sweep point)
    change what a scale fixes (``SCALE_KEYS``): then "custom"."""
    return "custom" if given_keys(overrides) & set(SCALE_KEYS) else cfg["scale"]


# Registered at import; Hydra hands registered resolvers and the config store on to its joblib and
# SLURM workers.
register_configs()
OmegaConf.register_new_resolver("bounded_dirname", bounded_dirname, replace=True)
OmegaConf.register_new_resolver(
    "settings_scale", lambda *, _root_: settings_scale(_root_, _root_.hydra.overrides.task), replace=True)
OmegaConf.register_new_resolver("sweep_leaf", lambda *, _root_: sweep_leaf(_root_), replace=True)


def sweep_leaf(cfg) -> str:
    """An ad-hoc sweep's own folder (its command line's overrides), so that two sweeps never share one
    multirun.yaml; a preset's sweeps stay in multirun/<preset>/<scale>/, where their runs have always been.
    A job recomposes its config from its point's overrides: ``pin_sweep_dir`` keeps it in its sweep's folder."""
    if cfg["experiment"] != "single":
        return ""
    return "/" + bounded_dirname(cfg["hydra"]["job"]["override_dirname"])


def pin_sweep_dir(config: DictConfig, sweep_dir: str) -> None:
    """Hand the sweep's folder, as resolved from the whole command line, to its jobs (each recomposes
    its config from the sweep's hydra overrides and its point)."""
    hydra_overrides = config.hydra.overrides.hydra
    if "hydra.sweep.dir" in given_keys(hydra_overrides):
        return
    quoted = "'" + str(sweep_dir).replace("\\", "\\\\").replace("'", "\\'") + "'"
    with read_write(config.hydra.overrides):
        hydra_overrides.append(f"hydra.sweep.dir={quoted}")


def unknown_key(argv) -> str | None:
    """The error for a command-line override that names no setting, group or launch key (Hydra would
    refuse it in several lines), or None. Appending (+key=...) is left to the settings' own check."""
    known = {key for key, _, _ in settings(RunConfig)}
    roots = {key.split(".")[0] for key in known} | {p.name for p in CONFIGS.iterdir() if p.is_dir()} | set(LAUNCH_KEYS)
    for arg in argv:
        key = arg.split("=", 1)[0]
        if arg.startswith("-") or "=" not in arg or key.startswith(("+", "~")) or key in known or key in roots:
            continue
        if key.split(".")[0] in ("hydra", *LAUNCH_KEYS) or "/" in key or "@" in key:  # Hydra's own, group paths
            continue
        section, _, _ = key.rpartition(".")
        top = sorted(roots - {"at_scale", "launches"})  # a preset's own blocks: not for the command line
        under = sorted({k[len(section) + 1:].split(".")[0] for k in known if k.startswith(section + ".")}) \
            if section else top
        if not under:
            section, under = "", top
        return f"unknown config key {key}; allowed under {section or 'the top level'}: {', '.join(under)}"
    return None


def given_keys(overrides) -> set[str]:
    """The keys a list of overrides sets ('+method.tau=1' and '~seed' included)."""
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}


def chosen_option(overrides, group: str) -> str | None:
    """The option ``group=X`` in a list of overrides chooses, or None."""
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep and key.lstrip("+") == group:
            return value
    return None


def option_node(group: str, option: str) -> dict:
    """An option's settings as its file (configs/<group>/<option>.yaml) holds them."""
    node = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else {}


def with_chosen_model(container: dict, overrides) -> str | None:
    """A ``model=X`` given in ``overrides`` trains X, although a scale or preset (merged after the
    group) names another network: X's settings, the overrides' own model.* keys on top. Returns
    what was replaced, for the log, or None."""
    option = chosen_option(overrides, "model")
    if option is None or not (CONFIGS / "model" / f"{option}.yaml").is_file():
        return None
    chosen, composed = {"width": None, "blocks": None, **option_node("model", option)}, container["model"]
    if composed.get("name") == chosen["name"]:
        return None
    given = given_keys(overrides)
    container["model"] = {k: composed.get(k) if f"model.{k}" in given else v for k, v in chosen.items()}
    return f"model={option} trains {chosen['name']} (the scale or preset would train {composed.get('name')})"


def check_option_keys(choices, overrides, container: dict) -> None:
    """An option that presets another one (method=averaging: GAF at tau 2 with the mean merge) keeps
    what defines it: a key it sets, changed by ``overrides``, is an error."""
    given = given_keys(overrides)
    for group, option in (choices or {}).items():
        path = CONFIGS / str(group) / f"{option}.yaml"
        node = option_node(group, option) if group in container and path.is_file() else {}
        if node.get("name", option) == option:
            continue
        for key, value in node.items():
            got = container[group].get(key)
            if f"{group}.{key}" in given and key != "name" and got != value:
                fixed = ", ".join(f"{group}.{k}={v}" for k, v in node.items() if k != "name")
                raise ValueError(f"{group}.{key}={got} would change what {group}={option} is ({node['name']} with "
                                 f"{fixed}); use {group}={node['name']} {group}.{key}={got}")


def run_config(cfg: DictConfig, overrides, choices=None, notes: list | None = None) -> RunConfig:
    """The run a composed config launches, validated. A setting that has no effect on it (GAF's
    tau for the baseline, a label file for random data) is an error where ``overrides`` (the
    command line, or a sweep point) give it, and dropped where a preset's rows, written for every
    method and data set, set it. ``choices``: the options Hydra chose (read from ``cfg`` where it
    holds its hydra node); ``notes`` receives what the log should say."""
    if "hydra" in cfg:
        check_choices(cfg)
        choices = cfg["hydra"]["runtime"]["choices"]
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    container = OmegaConf.to_container(job, resolve=True)
    check_option_keys(choices if choices is not None else {"method": chosen_option(overrides, "method")},
                      overrides, container)
    if (note := with_chosen_model(container, overrides)) and notes is not None:
        notes.append(note)
    if (presets := container.get("scale_for")) and container["experiment"] not in presets:
        raise ValueError(f"scale={container['scale']} is made for experiment={','.join(presets)} only "
                         f"(configs/scale/{container['scale']}.yaml); choose one of the other scales")
    container["scale"] = settings_scale(container, overrides)
    for key in LAUNCH_KEYS:
        container.pop(key, None)
    rc = RunConfig.from_dict(container)
    for key, value, why in inapplicable(rc, given_keys(overrides)):
        raise ValueError(f"{key}={value} has no effect here: {why}; drop {key} from the command line")
    rc = without_inapplicable(rc)
    validate(rc)
    return rc


def sweep_points(grid, overrides: list[str]) -> list[list[str]]:
    """Every point of a multirun, as Hydra's basic sweeper makes them: the preset's ``grid``
    (hydra.sweeper.params), then the command line's overrides, one override list per point. A key
    given twice keeps its first place and takes its last values (the command line over the preset);
    the product varies the last key fastest."""
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    lines = [*(f"{k}={v}" for k, v in (grid or {}).items()), *overrides]
    options = {}  # a key's 'key=value' per point; a dict keeps a reassigned key's place
    for override in OverridesParser.create(config_loader=loader).parse_overrides(lines):
        options[override.get_key_element()] = point_values(override)
    return [list(point) for point in itertools.product(*options.values())]


def point_values(override) -> list[str]:
    """A parsed override's 'key=value' for each point: one for a plain value, each of a list,
    choice(...), range(...) or glob(...) for a sweep; an interval(...) has no points, and the basic
    sweeper refuses it too."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():
        raise ValueError(f"{override.input_line}: {key} sweeps no list of values; the basic sweeper takes "
                         "a,b,..., choice(...), range(...) or glob(...), not interval(...)")
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP and override.config_loader is None:
        raise ValueError(f"{override.input_line}: glob(...) needs Hydra's configs; list {key}'s options instead")
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def fixed_overrides(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps (what a multirun's base config composes with)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def first_line(error: Exception) -> str:
    """An error as the one line a launch reports."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def composed_point(point: list[str], config_name: str = "config") -> tuple[object, str | None]:
    """(the point's RunConfig or the error that stops it, its folder under the sweep directory)."""
    try:
        cfg = compose(config_name, overrides=point, return_hydra_config=True)
        return run_config(cfg, point), str(cfg.hydra.sweep.subdir)
    except Exception as e:  # noqa: BLE001 (composition errors, bad values: each point's one line)
        return e, None


def composed_points(points: list[list[str]], config_name: str = "config") -> list[tuple[list[str], object]]:
    """Each point as Hydra would launch it: (its overrides, its RunConfig or the error that stops it).
    Hydra is initialised by the caller."""
    return [(point, composed_point(point, config_name)[0]) for point in points]


def point_errors(points: list[list[str]], sweep_dir: str | None = None, config_name: str = "config") -> list[str]:
    """'<point>: <error>' for every point that would not run (with ``sweep_dir``: its folder checked too)."""
    errors = []
    for point in points:
        result, subdir = composed_point(point, config_name)
        if not isinstance(result, Exception) and sweep_dir is not None:
            result = folder_refusal(Path(sweep_dir) / subdir, result) or result
        if isinstance(result, (Exception, str)):
            errors.append(f"{','.join(point)}: {result if isinstance(result, str) else first_line(result)}")
    return errors


def folder_refusal(folder: Path, rc: RunConfig) -> str | None:
    """Why launching ``rc`` into ``folder`` would be refused (a run of another config, files that are
    not a run's, a run in progress), or None: checked before Hydra writes .hydra/ and train.log there."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if owner := RunDirLock(folder).holder():
        return f"run directory {folder} is in use by {owner}; wait for that run to end, or use another run directory"
    if not any((folder / name).exists() for name in RUN_FILES):
        return None
    from gaf.checkpoint import prior_run  # imports torch: only for a folder that holds a run's files

    try:
        prior_run(folder, rc.to_dict())
    except RunDirError as e:
        return str(e)
    return None


def sweep_keys_left_open(cfg: DictConfig, rc: RunConfig) -> list[str]:
    """The keys a sweep preset varies that a single run ``rc`` (no -m) neither sets nor ignores."""
    params = list(cfg.hydra.sweeper.params or {})
    given = given_keys(cfg.hydra.overrides.task)
    ignored = {k for k, _, _ in inapplicable(rc, set(params))}
    return [k for k in params if k not in given and k not in ignored]


def unwritable(folder: str) -> str | None:
    """Why a run folder cannot be written to, or None."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    try:  # what the permission bits do not say (/proc, a read-only mount): make a folder there, as Hydra will
        tempfile.TemporaryDirectory(dir=existing, prefix=".gaf-probe-").cleanup()
    except OSError as e:
        return f"no folder can be made in {existing} ({e.strerror})"
    return None


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)  # SystemExit passes through Hydra's callback handler, which logs and ignores exceptions


# ----------------------------------------------------------------------------- the fused launcher's collection

_collected: list | None = None  # (RunConfig, run dir) of each job, while a launcher collects instead of running


@contextlib.contextmanager
def collecting():
    """Within it, a job hands its checked settings and folder to ``collect`` instead of training
    (the fused launcher trains them afterwards, as groups)."""
    global _collected
    _collected = []
    try:
        yield _collected
    finally:
        _collected = None


def collect(settings: RunConfig, run_dir: str) -> bool:
    """True (and the job recorded) where a launcher is collecting jobs."""
    if _collected is None:
        return False
    _collected.append((settings, run_dir))
    return True


def fused_groups(points: list[list[str]], max_fused) -> list[list[int]]:
    """hydra/launcher=fused's groups of these sweep points (indices), each checked: a group its
    runs cannot share is refused in one line before anything is made."""
    from gaf.fused_train import check_group, groups

    try:
        configs = [(rc, None) for _, rc in composed_points(points)]
        found = groups([rc for rc, _ in configs], max_fused)
        for members in found:
            check_group([configs[i][0] for i in members])
    except ValueError as e:
        refuse(f"hydra/launcher=fused: {first_line(e)}")
    return found


class LaunchChecks(Callback):
    """Hydra callback: check a launch as a whole before Hydra makes anything (configs/config.yaml)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            rc = run_config(config, config.hydra.overrides.task)
            left_open = sweep_keys_left_open(config, rc)
            run_dir = config.hydra.run.dir
        except Exception as e:  # noqa: BLE001 (one line, no traceback)
            refuse(first_line(e))
        if left_open:
            refuse(f"experiment={config.experiment} is a sweep over {', '.join(left_open)}: run it with -m "
                   f"(python experiments/train.py -m experiment={config.experiment} ...), or set "
                   f"{', '.join(k + '=...' for k in left_open)} to run one point")
        if why := unwritable(run_dir):
            refuse(f"cannot write the run directory {run_dir}: {why}; choose another with hydra.run.dir=...")
        if why := folder_refusal(Path(run_dir), rc):
            refuse(why)
        if config.get("dry_run"):
            try:
                print(f"dry run: 1 run -> {run_dir}\n  {' '.join(config.hydra.overrides.task) or '(defaults)'}")
            finally:  # also where the listing cannot be written (a closed pipe): Hydra would go on and launch
                sys.exit(0)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_choices(config)
            points = sweep_points(config.hydra.sweeper.params, list(config.hydra.overrides.task))
            sweep_dir = config.hydra.sweep.dir
        except Exception as e:  # noqa: BLE001
            refuse(first_line(e))
        errors = point_errors(points, sweep_dir)
        if errors:
            refuse(f"{len(errors)} of {len(points)} sweep points would not run; nothing was launched:\n  "
                   + "\n  ".join(errors))
        if why := unwritable(sweep_dir):
            refuse(f"cannot write the sweep directory {sweep_dir}: {why}; choose another with hydra.sweep.dir=...")
        pin_sweep_dir(config, sweep_dir)
        fused = str(config.hydra.launcher.get("_target_", "")).endswith("FusedLauncher")
        found = fused_groups(points, config.hydra.launcher.max_fused) if fused else []
        if config.get("dry_run"):
            try:
                list_launch(points, sweep_dir, found if fused else None, config.hydra.launcher.get("max_fused"))
            finally:  # also where the listing cannot be written (a closed pipe): Hydra would go on and launch
                sys.exit(0)


def list_launch(points: list[list[str]], sweep_dir: str, groups: list[list[int]] | None, max_fused) -> None:
    """What dry_run=true prints of a multirun: each point, and the fused launcher's groups."""
    shown = [" ".join(o for o in point if not o.startswith("dry_run=")) for point in points]
    print(f"dry run: {len(points)} runs under {sweep_dir}")
    print("\n".join("  " + line for line in shown))
    if groups is not None:
        print(f"fused: {len(groups)} group{'s' * (len(groups) != 1)} (at most {max_fused} runs each)")
        for members in groups:
            print(f"  {len(members)} runs: " + "; ".join(
                ",".join(o for o in points[i] if not o.startswith("dry_run=")) for i in members))
