"""The networks: shapes, the size keys of the small CIFAR ResNet, and clear errors."""

import pytest
import torch

import inspect

from gaf.config import MODEL_SIZES
from gaf.models import MODELS, build_model, check_size


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny", "cnn4", "resnet_cifar", "resnet18_cifar"])
def test_models_map_cifar_images_to_class_logits(name):
    model = build_model(name, 10).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_cifar_size_keys():
    """width scales every stage (parameters ~ width^2); blocks adds BasicBlocks per stage."""
    w8, w16, w32 = (n_params(build_model("resnet_cifar", 10, width=w)) for w in (8, 16, 32))
    assert 3.5 < w16 / w8 < 4.1 and 3.5 < w32 / w16 < 4.1
    assert n_params(build_model("resnet_cifar", 10)) == w16  # the default is width 16, one block per stage
    deep = build_model("resnet_cifar", 10, width=16, blocks=3)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in deep.modules())
    assert convs == 1 + 3 * 3 * 2 + 2  # stem, blocks, 2 projections
    assert n_params(deep) > 3 * w16
    x = torch.randn(3, 3, 32, 32)
    assert deep(x).shape == (3, 10)


def test_cnn4_is_four_convs_whose_width_sets_its_size():
    model = build_model("cnn4", 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 4
    assert n_params(model) == 98_970  # w = 16: convs 3-16-32-64-128, BatchNorms, a 128 -> 10 head
    w8, w32 = (n_params(build_model("cnn4", 10, width=w)) for w in (8, 32))
    assert 3.5 < n_params(model) / w8 < 4.1 and 3.5 < w32 / n_params(model) < 4.1
    with pytest.raises(ValueError, match="model.blocks does not apply to model 'cnn4'"):
        build_model("cnn4", 10, blocks=2)


def test_unset_size_keys_take_the_default():
    assert n_params(build_model("tiny", 10, width=None, blocks=None)) == n_params(build_model("tiny", 10))


@pytest.mark.parametrize("name, size, match", [
    ("resnet18", {"width": 16}, "model.width does not apply to model 'resnet18'"),
    ("tiny", {"blocks": 2}, "model.blocks does not apply to model 'tiny'"),
    ("resnet_cifar", {"width": 0}, "model.width must be an integer >= 1, got 0"),
    ("resnet_cifar", {"blocks": 1.5}, "model.blocks must be an integer >= 1, got 1.5"),
    ("resnet_cifar", {"width": True}, "model.width must be an integer >= 1, got True"),
])
def test_bad_size_keys_are_named(name, size, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, **size)
    with pytest.raises(ValueError, match=match):
        check_size(name, **size)


def test_the_schemas_models_are_the_registry_with_their_size_keys():
    """gaf.config.MODEL_SIZES (the schema, torch-free) names exactly the models of MODELS, each with
    the size keys its builder takes."""
    assert tuple(MODEL_SIZES) == tuple(MODELS)
    for name, builder in MODELS.items():
        assert set(inspect.signature(builder).parameters) - {"c", "num_classes"} == set(MODEL_SIZES[name]), name
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9", 10)


def test_run_config_checks_the_size_keys_up_front():
    from gaf.config import RunConfig, validate

    cfg = RunConfig.from_dict({"model": {"name": "resnet_cifar", "width": 8, "blocks": 2}})
    validate(cfg)
    with pytest.raises(ValueError, match="model.width does not apply to model 'resnet18'"):
        validate(RunConfig.from_dict({"model": {"name": "resnet18", "width": 8}}))
    with pytest.raises(ValueError, match="model.name must be one of"):
        validate(RunConfig.from_dict({"model": {"name": "resnet9"}}))
