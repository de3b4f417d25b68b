from pathlib import Path

import pytest

from tessera.config import ConfigError, RunConfig, load_config, valid_keys


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_and_file_and_override_compose(tmp_path):
    path = write(tmp_path, "name: x\ndata:\n  tiles:\n    size: 512\n")
    config = load_config(path, ["data.tiles.magnification=40", "data.stream.splits=[train, val]"])
    assert config.name == "x"
    assert config.data.tiles.size == 512
    assert config.data.tiles.magnification == 40.0
    assert config.data.stream.splits == ["train", "val"]
    assert config.data.tissue == RunConfig().data.tissue  # untouched sections keep their defaults


def test_unknown_key_names_file_and_nearest_key(tmp_path):
    path = write(tmp_path, "data:\n  tiles:\n    sise: 512\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'data.tiles.sise'" in message
    assert "did you mean 'data.tiles.size'" in message


def test_unknown_section_suggests_the_real_one(tmp_path):
    path = write(tmp_path, "data:\n  tile:\n    size: 512\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.tile'.*did you mean 'data.tiles'"):
        load_config(path)


def test_bad_type_in_file_names_key_and_value(tmp_path):
    path = write(tmp_path, "data:\n  tiles:\n    size: big\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}: data.tiles.size:" in message and "'big'" in message and "integer" in message


def test_bad_override_names_the_flag(tmp_path):
    path = write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.tiles.size=abc"])
    assert "--set data.tiles.size=abc: data.tiles.size:" in str(err.value)
    with pytest.raises(ConfigError, match=r"--set data.tiles.siz=3: unknown key.*did you mean 'data.tiles.size'"):
        load_config(path, ["data.tiles.siz=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["data.tiles.size"])
    with pytest.raises(ConfigError, match="'name' is a value"):
        load_config(path, ["name.first=3"])


def test_constraints_and_cross_field_rules_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.tiles.min_tissue_fraction"):
        load_config(None, ["data.tiles.min_tissue_fraction=1.5"])
    with pytest.raises(ConfigError, match="crop='random' needs crop_size"):
        load_config(None, ["data.stream.crop=random"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_every_listed_key_resolves():
    config = RunConfig()
    for key in valid_keys():
        node = config
        for part in key.split("."):
            if node is None:  # inside an optional section left unset (train.swa, train.growing)
                assert key.split(".")[1] in ("swa", "growing"), key
                break
            node = getattr(node, part)


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["data.tiles.size=384", "seed=7"])
    again = load_config(write(tmp_path, config.to_yaml()))
    assert again == config


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_bundled_recipe_validates(recipe):
    config = load_config(recipe)
    assert config.name and config.method.name


def test_method_option_typos_are_blamed_on_their_own_key_and_source(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method:\n  name: reference_ae\n  options:\n    depth: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(recipe, ["method.options.widht=3"])
    assert "--set method.options.widht=3: unknown key 'method.options.widht'; did you mean " \
           "'method.options.width'?" in str(error.value)
    recipe.write_text("method:\n  name: reference_ae\n  options:\n    depht: 3\n")
    with pytest.raises(ConfigError, match=f"{recipe}: unknown key 'method.options.depht'; did you mean "
                                          "'method.options.depth'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="--set method.options.width=wide: method.options.width: "):
        load_config(None, ["method.options.width=wide"])


def test_booleans_are_not_numbers(tmp_path):
    for override in ("train.steps=true", "train.lr=false", "train.clip_grad=true"):
        with pytest.raises(ConfigError, match=f"--set {override}: .*expected a number, not a boolean"):
            load_config(None, [override])
    assert load_config(None, ["train.steps=3", "train.lr=1"]).train.steps == 3


def test_resumed_config_takes_only_keys_that_keep_the_checkpoint_valid(tmp_path):
    from tessera.config import resumed_config

    saved = tmp_path / "config.yaml"
    saved.write_text(load_config(None).to_yaml())
    assert resumed_config(saved, ["train.lr=1e-4", "train.steps=50"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="keys that leave the checkpoint valid"):
        resumed_config(saved, ["method.options.width=64"])
    saved.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot be read as text"):
        resumed_config(saved, [])
