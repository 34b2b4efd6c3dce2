"""yamlsafe.py: configs are bounded before they are parsed deeply (issue 31)."""
import pytest

from hrseg import config, yamlsafe


def test_plain_yaml_reads_as_safe_load_does(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\n  name: 'x'\nmesh: {spatial: [2, 2, 1]}\n")
    assert yamlsafe.read(f) == {"train": {"steps": 10, "name": "x"},
                                "mesh": {"spatial": [2, 2, 1]}}


@pytest.mark.parametrize("text, match", [
    ("a: &a [1, 2]\nb: *a\n", "line 1: YAML anchors and aliases"),
    ("a: 1\nb: &x 2\n", "line 2: YAML anchors and aliases"),
    ("a: " + "[" * 100 + "]" * 100, "nested deeper than 32 levels"),
    ("a: [1,\n", "not valid YAML"),
])
def test_aliases_depth_and_bad_yaml_are_one_line_naming_the_file(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        yamlsafe.read(f)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


def test_the_alias_bomb_is_refused_before_it_expands(tmp_path):
    levels = ['a0: &a0 ["' + "x" * 10 + '"]']
    for i in range(1, 9):
        levels.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(levels) + "\ntrain: {name: *a8}\n")     # 10^8 strings if expanded
    with pytest.raises(ValueError, match="anchors and aliases"):
        config.load(f)


def test_size_is_checked_before_reading(tmp_path, monkeypatch):
    f = tmp_path / "big.yaml"
    f.write_text("a: 1\n" + "#" * yamlsafe.MAX_BYTES)
    monkeypatch.setattr(type(f), "read_text", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(ValueError, match="more than a config may have"):
        yamlsafe.read(f)
    with pytest.raises(ValueError, match="more than a config may have"):
        yamlsafe.loads("#" * (yamlsafe.MAX_BYTES + 1))


@pytest.mark.parametrize("item, match", [
    ("train.name=", "'train.name': not a string"),
    ("train.name=../../x", "plain name"),
    ("train.name=a/b", "plain name"),
    ("train.name=..", "plain name"),
    ("train.name=" + "n" * 101, "101 characters"),
    ("data.root=[1, 2]", "'data.root': not a string"),
    ("train.name=&a x", "anchors and aliases"),
])
def test_string_keys_are_type_checked(item, match):
    with pytest.raises(ValueError, match=match):
        config.load(None, [item])


def test_a_plain_name_is_fine():
    assert config.load(None, ["train.name=tpu_512-v2.1"]).train.name == "tpu_512-v2.1"
