"""The typed schemas of the dataset and model configs (resnet_cli/config.py).

Every shipped dataset config, and a model of each family, refuses a wrong key and a wrong enum
value in one line naming the key (the enum's allowed values too), exit status 2, before any data
is read or any run folder made; the keys a builder takes are there without a '+'. Cheap: the
subprocess runs stop at composition or at validation.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from pathlib import Path

import pytest

from conftest import REPO, apply, compose

DATASETS = sorted(p.stem for p in (REPO / "configs" / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))


def schema_of(node) -> type:
    """The dataclass that types a composed node."""
    from omegaconf import OmegaConf

    return OmegaConf.get_type(node)


def enum_keys(schema: type) -> dict[str, type[enum.Enum]]:
    """key -> enum of every enum-typed field of a schema (Optional[...] unwrapped)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if len(args) == 1 else kind
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            out[f.name] = kind
    return out


@functools.lru_cache(maxsize=None)
def base(*choices: str):
    """The composed config for a choice of groups (composed once; overrides then go through Hydra's own code)."""
    return compose(list(choices))


def refusal(choices: tuple[str, ...], overrides: list[str]) -> str | None:
    """None when the overrides apply to base(*choices) and validate, else the one line resnet-train would print."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from resnet_cli.errors import UserError, one_line
    from resnet_cli.validate import validate

    try:
        validate(apply(base(*choices), overrides))
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        return one_line(exc)
    return None


def assert_refused_before_data(res, tmp_path: Path, *named: str) -> str:
    """Exit status 2, one stderr line naming everything in `named`, nothing written (data or run folder)."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("resnet-train: error:") and "Traceback" not in res.stderr
    for name in named:
        assert name in lines[0], lines[0]
    assert "never-read" not in lines[0]  # the key is named, not the folder it would have read
    assert not (tmp_path / "never-read").exists() and not (tmp_path / "outputs").exists()
    return lines[0]


def where(dataset: str, tmp_path: Path) -> list[str]:
    """dataset=<name>, with the data folder pointed at one that does not exist (shapes has none)."""
    root = [f"dataset.root={tmp_path / 'never-read'}"] if "root" in base(f"dataset={dataset}").dataset else []
    return [f"dataset={dataset}", *root, f"output_root={tmp_path / 'outputs'}", "trainer.device=cpu"]


# --- every dataset config, through the real entry point ---------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("case", ["wrong key", "added key", "wrong value"])
def test_every_dataset_config_refuses_a_bad_key_or_value_in_one_line_before_any_data(cli, tmp_path, dataset, case):
    schema = schema_of(base(f"dataset={dataset}").dataset)
    if case == "wrong key":
        line = assert_refused_before_data(cli(*where(dataset, tmp_path), "dataset.bogus_key=1"), tmp_path,
                                          "dataset.bogus_key", "unknown config key")
    elif case == "added key":  # the '+' that used to reach the builder as an unexpected keyword argument
        line = assert_refused_before_data(cli(*where(dataset, tmp_path), "+dataset.bogus_key=1"), tmp_path,
                                          "dataset.bogus_key", "unknown config key")
    else:  # the dataset's own enum where it has one (labels, val_split, on_bad_image), else the loader
        key, words = list(enum_keys(schema).items())[-1]
        line = assert_refused_before_data(cli(*where(dataset, tmp_path), f"dataset.{key}=bogus"), tmp_path,
                                          f"dataset.{key}", *(w.value for w in words))
    assert len(line) < 300, line


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_enum_key_of_every_dataset_names_its_allowed_values(dataset):
    schema = schema_of(base(f"dataset={dataset}").dataset)
    assert {"loader", "crop", "pad_mode"} <= set(enum_keys(schema))
    for key, words in enum_keys(schema).items():
        message = refusal((f"dataset={dataset}",), [f"dataset.{key}=bogus"])
        assert message and f"dataset.{key}" in message and "\n" not in message, message
        assert all(w.value in message for w in words), message
        for word in words:  # and every allowed value is taken
            assert apply(base(f"dataset={dataset}"), [f"dataset.{key}={word.value}"]).dataset[key] == word


def test_auto_or_a_number_keys_take_both():
    for key, number in (("image_size", 48), ("batch_size", 32), ("num_workers", 0), ("pad", 3), ("resize", 40)):
        assert refusal(("dataset=imagefolder",), [f"dataset.{key}=auto"]) is None
        assert refusal(("dataset=imagefolder",), [f"dataset.{key}={number}"]) is None
        message = refusal(("dataset=imagefolder",), [f"dataset.{key}=bogus"])
        assert message and f"dataset.{key}" in message and "auto" in message, message


def test_a_dataset_key_of_another_family_is_refused():
    for dataset, key in (("cifar10", "val_fraction=0.2"), ("cifar10", "labels=coarse"), ("shapes", "root=x"),
                         ("flowers102", "val_fraction=0.2"), ("imagefolder", "download=true")):
        message = refusal((f"dataset={dataset}",), [f"dataset.{key}"])
        assert message and f"dataset.{key.split('=')[0]}" in message and "unknown config key" in message, message


def test_a_dataset_yaml_without_a_schema_line_is_checked_against_its_builders_schema():
    """A YAML of your own that does not name a schema: validate() still refuses a key the builder does not take."""
    from omegaconf import OmegaConf

    from resnet_cli.errors import UserError
    from resnet_cli.validate import validate

    plain = OmegaConf.to_container(base("dataset=shapes").dataset, resolve=True, enum_to_str=True)
    validate(OmegaConf.create({"dataset": plain}))
    with pytest.raises(UserError, match=r"unknown config key 'dataset.loadr' \(did you mean 'loader'\?\)"):
        validate(OmegaConf.create({"dataset": {**plain, "loadr": "memory"}}))
    with pytest.raises(UserError, match=r"dataset.loader=disk: must be one of auto, memory, dataloader"):
        validate(OmegaConf.create({"dataset": {**plain, "loader": "disk"}}))


def test_shared_loader_keys_come_from_the_schema_not_from_each_yaml():
    """Each dataset YAML names its schema and every dataset has every loader key (none needs a '+')."""
    from resnet_cli.config import DatasetConfig

    shared = {f.name for f in dataclasses.fields(DatasetConfig)}
    for dataset in DATASETS:
        text = (REPO / "configs" / "dataset" / f"{dataset}.yaml").read_text()
        assert f"- /{dataset}_schema@_here_" in text, dataset
        assert shared <= set(base(f"dataset={dataset}").dataset), dataset


# --- models ------------------------------------------------------------------------------------------------


def test_model_keys_need_no_plus():
    """The issue's example, and a key of each kind, compose without '+'."""
    cfg = compose(["experiment=r1_resnet18_cifar10", "model.shortcut_kernel=3"])
    assert cfg.model.shortcut_kernel == 3 and cfg.model.stem == "cifar"
    for model, key in (("resnet18", "deep_stem=true"), ("resnet18", "head=mlp"), ("resnet50", "groups=32"),
                       ("resnet50", "width_per_group=4"), ("resnet50", "attn=se"), ("resnet20", "shortcut=projection"),
                       ("attention56", "stem=cifar"), ("simple_cnn", "drop_rate=0.2")):
        assert refusal((f"model={model}",), [f"model.{key}"]) is None, (model, key)


def test_every_model_config_gives_its_builder_the_registered_arguments(monkeypatch):
    """The YAML over its family's schema calls the network's constructor exactly as create_model(name) does.

    The schema's defaults must not replace a variant's own keywords (resnext's groups, a CIFAR net's
    shortcut): each constructor is stopped at its call, so no network is built.
    """
    import inspect

    from resnet_cli.build import build_model
    from resnet_cli.models import create_model
    from resnet_cli.models.attention import ResidualAttentionNet
    from resnet_cli.models.resnet import ResNet
    from resnet_cli.models.small import ResNet9, SimpleCNN

    class Called(Exception):
        """A constructor's class and every argument it got (defaults filled in)."""

    def stop(cls: type):
        signature = inspect.signature(cls.__init__)

        def init(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            raise Called(cls.__name__, {k: v for k, v in bound.arguments.items() if k != "self"})
        return init

    for cls in (ResNet, ResidualAttentionNet, ResNet9, SimpleCNN):
        monkeypatch.setattr(cls, "__init__", stop(cls))

    def called(build) -> tuple:
        with pytest.raises(Called) as got:
            build()
        return got.value.args

    for model in MODELS:
        from_config = called(lambda: build_model(model_node(model), 10, 32))
        assert from_config == called(lambda: create_model(model, 10, image_size=32)), model


def model_node(model: str):
    """configs/model/<model>.yaml merged over the schema its defaults list names, as Hydra composes it.

    Merged here rather than composed 42 times (seconds each on a busy machine); the compositions
    themselves are exercised by test_models' training of every model through resnet-train.
    """
    from omegaconf import OmegaConf

    from resnet_cli.config import SCHEMAS

    own = OmegaConf.load(REPO / "configs" / "model" / f"{model}.yaml")
    schema = str(own.pop("defaults")[0]).removeprefix("/").removesuffix("@_here_")
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[schema]), own, {"image_size": 32})


@pytest.mark.parametrize("model, key, named", [
    ("resnet18", "model.bogus_key=1", ["model.bogus_key", "unknown config key"]),
    ("resnet18", "+model.bogus_key=1", ["model.bogus_key", "unknown config key"]),
    ("resnet20", "model.stem=cifar", ["model.stem", "unknown config key"]),  # a CIFAR net's stem is fixed
    ("resnet50", "model.shortcut=diagonal", ["model.shortcut", "projection, pad, avg, none"]),
])
def test_a_bad_model_key_or_value_is_one_line_before_any_data(cli, tmp_path, model, key, named):
    res = cli(f"model={model}", key, *where("cifar10", tmp_path))
    assert_refused_before_data(res, tmp_path, *named)


def test_a_key_or_value_a_models_family_does_not_take_is_refused():
    for model, key, named in (("resnet18", "groups=32", "unknown config key"),  # basic blocks have no groups
                              ("simple_cnn", "zero_init_residual=true", "unknown config key"),
                              ("attention56", "stem=huge", "auto, imagenet, cifar"),
                              ("resnet20", "shortcut_kernel=2", "odd"), ("resnet50", "attn=cbam", "se"),
                              ("resnet18", "head=conv", "linear, mlp")):
        message = refusal((f"model={model}",), [f"model.{key}"])
        assert message and f"model.{key.split('=')[0]}" in message and named in message, message
