"""launch.sweep_points expands a multirun as Hydra's basic sweeper does, through Hydra's public
override grammar: the same points in the same order, for every preset's grid and the command lines
that add to it, override it and quote or list their values; and no module of the project but this
test names Hydra's private ones."""

import random
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference, private: only here
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "experiments"))
import launch  # noqa: E402

PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
SCALES = sorted(p.stem for p in (CONFIGS / "scale").glob("*.yaml"))
# Command lines on top of a preset's grid: none, a fixed key and a swept one added, the grid's own keys
# overridden (fixed and swept; the key keeps its place in the grid), a key given twice.
PRESET_LINES = [
    [],
    ["model=tiny", "optim.lr=0.1,0.01"],
    ["seed=3,4", "data.noise=0.1", "method.per_class=2,3", "method.tau=1.0"],
    ["train.iterations=5", "seed=1,2", "seed=7"],
]
# Command lines alone: quoting, lists and dicts as values, each of the grammar's sweeps, prefixes.
LINES = [
    ["a=1,2", "b=x,y,z"],
    ["a=[1,2]", "b=[1,2],[3]", "c={x:1,y:2}", "d=[]"],
    ["a='x,y'", 'b="1,2"', "c='it\\'s'", "d=a\\,b", "e='q',\"r\""],
    ["a=choice(1,2)", "b=choice([1,2],[3])", "c=choice(x)"],
    ["a=range(3)", "b=range(0,6,2)", "c=range(0,1,0.25)", "d=range(5,1,-2)"],
    ["a=sort(3,1,2)", "b=sort(3,1,2,reverse=true)", "c=sort(range(3,0,-1))"],
    ["a=tag(t1,choice(1,2))", "b=tag(x,y,range(2))"],
    ["+a=1,2", "++b=3", "~c", "~d=4", "a=5,6", "+a=7"],
    ["model=glob(resnet*)", "data=glob(*,exclude=[cifar*])"],
    ["a=null", "b=", "c=1,null", "d=true,false", "e=1e-3,0.5"],
    ["hydra.launcher.n_jobs=2", "hydra/launcher=fused", "db@pkg=x,y", "x.y.z=${a},2"],
    ["a=str(1),int(2.0)", "b=float(1),2"],
]


def basic_sweeper(grid, overrides: list[str]) -> list[list[str]]:
    """The points Hydra's BasicSweeper.sweep makes of ``grid`` and ``overrides``, with its config loader."""
    lines = [f"{k}={v}" for k, v in (grid or {}).items()] + list(overrides)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]


@pytest.fixture
def hydra_configs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def grid_of(preset: str, scale: str):
    cfg = compose("config", overrides=[f"experiment={preset}", f"scale={scale}"], return_hydra_config=True)
    return cfg.hydra.sweeper.params


@pytest.mark.parametrize("preset", PRESETS)
def test_every_presets_grid_at_every_scale_expands_as_the_basic_sweeper(preset, hydra_configs):
    for scale in SCALES:
        grid = grid_of(preset, scale)
        for line in PRESET_LINES:
            assert launch.sweep_points(grid, line) == basic_sweeper(grid, line), (preset, scale, line)


def test_a_command_line_key_keeps_its_place_in_the_grid_and_the_last_key_varies_fastest(hydra_configs):
    grid = {"data.noise": "0.0,0.4", "method": "baseline,gaf", "seed": 0}
    points = launch.sweep_points(grid, ["seed=1,2", "data.noise=0.2"])
    assert points == basic_sweeper(grid, ["seed=1,2", "data.noise=0.2"])
    assert points[:2] == [["data.noise=0.2", "method=baseline", "seed=1"], ["data.noise=0.2", "method=baseline", "seed=2"]]


@pytest.mark.parametrize("line", LINES, ids=[" ".join(line) for line in LINES])
def test_quoted_listed_and_grammar_sweeps_expand_as_the_basic_sweeper(line, hydra_configs):
    random.seed(0)
    ours = launch.sweep_points({"fixed": "1", "a": "0,9"}, line)
    random.seed(0)
    assert ours == basic_sweeper({"fixed": "1", "a": "0,9"}, line)


def test_shuffled_sweeps_draw_as_the_basic_sweeper(hydra_configs):
    line = ["a=shuffle(1,2,3,4,5)", "b=shuffle(range(4))"]
    random.seed(1)
    ours = launch.sweep_points(None, line)
    random.seed(1)
    assert ours == basic_sweeper(None, line)


def test_a_glob_lists_the_groups_options(hydra_configs):
    assert launch.sweep_points(None, ["model=glob(resnet*)"]) == [
        ["model=resnet18"], ["model=resnet18_cifar"], ["model=resnet34_cifar"], ["model=resnet_cifar"]]


@pytest.mark.parametrize("line", [["a=1", "b=interval(0,1)"], ["b=tag(x,interval(0.1,1.0))"]])
def test_an_interval_is_refused_in_one_line_naming_the_key_as_the_basic_sweeper_refuses_it(line, hydra_configs):
    with pytest.raises(Exception, match="does not support sweep type"):
        basic_sweeper(None, line)
    with pytest.raises(ValueError) as e:
        launch.sweep_points(None, line)
    assert str(e.value).startswith("b=") and "\n" not in str(e.value) and "not interval(...)" in str(e.value)


def test_a_glob_without_hydras_configs_is_one_line():
    assert not GlobalHydra.instance().is_initialized()
    with pytest.raises(ValueError, match=r"^model=glob\(\*\): glob\(\.\.\.\) needs Hydra's configs; list model's"):
        launch.sweep_points(None, ["model=glob(*)"])


def test_only_the_tests_name_hydras_private_modules():
    """The project uses Hydra's public API (issue 28): its private modules, which change without
    notice between releases, are named only here, as the reference."""
    named = [f"{p.relative_to(ROOT)}:{n}" for folder in ("experiments", "gaf", "scripts", "configs")
             for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".yaml")
             for n, line in enumerate(p.read_text().splitlines(), 1) if "hydra._internal" in line]
    assert named == []
