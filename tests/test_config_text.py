"""Tests of mfa.config_text: YAML files and --set strings, up to the config tree."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mfa.config import apply_overrides, load_config
from mfa.config_text import parse_override

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded-mnist.yaml"


def test_a_mapping_given_to_a_section_keeps_its_other_keys():
    """`--set model={n_factors: 2}` replaced the whole section: the file's K fell back to
    the default and data.dequantize was switched off without a word."""
    base = load_config(CONFIG)
    assert base.model.n_components != 10 and base.data.dequantize  # the file's own values
    got = load_config(CONFIG, ["model={n_factors: 2}", "data={limit: 100}"])
    assert got.model.n_factors == 2 and got.data.limit == 100
    assert got.model.n_components == base.model.n_components
    assert got.data.dequantize == base.data.dequantize
    # nested sections merge too; a plain value still replaces
    nested = apply_overrides(base, ["train={em: {max_iter: 7}}"])
    assert nested.train.em.max_iter == 7 and nested.train.em.tol == base.train.em.tol
    assert nested.train.method == base.train.method
    assert apply_overrides(base, ["train.em.max_iter=9"]).train.em.max_iter == 9


def test_an_override_value_with_a_key_twice_is_refused():
    with pytest.raises(ValueError, match=r"(?s)invalid override .*found the key .n_components. "
                                         r"twice"):
        load_config(CONFIG, ["model={n_components: 3, n_components: 5}"])


def test_yaml_merge_keys_work_and_may_be_overridden(tmp_path):
    """`<<: *defaults` was refused as "not valid YAML" (the duplicate-key check constructed
    the merge key itself)."""
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  em: &em {max_iter: 5, tol: 0.001}\n  hierarchical:\n"
                    "    root_em:\n      <<: *em\n      max_iter: 2\n")
    config = load_config(path)
    assert config.train.em.max_iter == 5
    assert config.train.hierarchical.root_em.max_iter == 2  # the explicit key wins
    assert config.train.hierarchical.root_em.tol == 0.001  # from the merge
    path.write_text("model:\n  n_components: 3\n  n_components: 4\n")
    with pytest.raises(ValueError, match=r"found the key 'n_components' twice"):
        load_config(path)


def test_an_override_of_an_aliased_section_changes_that_section_alone(tmp_path):
    """`root_em: *em` gave both keys one dict (kept shared by deepcopy), so
    `--set train.hierarchical.root_em.max_iter=7` set train.em's too (and with it the
    children's, which copy train.em), silently."""
    path = tmp_path / "alias.yaml"
    path.write_text("train:\n  em: &em\n    max_iter: 2\n  hierarchical:\n"
                    "    root_em: *em\n")
    config = load_config(path, ["train.hierarchical.root_em.max_iter=7"])
    assert (config.train.em.max_iter, config.train.hierarchical.root_em.max_iter) == (2, 7)
    config = load_config(path, ["train.em.max_iter=9"])  # (root_em's own max_iter stays)
    assert (config.train.em.max_iter, config.train.hierarchical.root_em.max_iter) == (9, 2)
    config = load_config(path, ["train.em={max_iter: 4}"])  # a mapping merged in: the same
    assert (config.train.em.max_iter, config.train.hierarchical.root_em.max_iter) == (4, 2)


def test_a_recursive_alias_is_an_unknown_key_not_a_recursion_error(tmp_path):
    """Copying every alias out (to unshare an overridden section) recursed without end on
    `notes: &a [*a]` and blew up tenfold per level on nested aliases; the key is refused."""
    path = tmp_path / "recursive.yaml"
    path.write_text("notes: &a [*a]\n")
    with pytest.raises(ValueError, match=r"unknown config key 'notes'"):
        load_config(path, ["train.em.max_iter=3"])


@pytest.mark.parametrize(("text", "kind"), [
    ("output.name=2024", "a number"), ("output.name=yes", "a bool"),
    ("data.root=3.5", "a number")])
def test_a_string_read_as_a_number_says_how_to_quote_it(text, kind):
    """"expected a string or null, got 2024" did not say that YAML read the text as a
    number, or how to pass the string."""
    key = text.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}: expected a string.*YAML reads the text "
                                         rf"unquoted as {kind}: quote it.*--set '{key}=\"...\"'"):
        load_config(CONFIG, [text])
    assert load_config(CONFIG, [text.replace("=", '="') + '"']).output is not None


def test_merge_chains_read_as_pyyaml_reads_them(tmp_path):
    """An anchor whose mapping merges another, merged again later: the first construction
    flattened it, and the duplicate check then took the merged key and its override for a
    key given twice."""
    import yaml

    text = ("train:\n  hierarchical:\n    root_em: &A\n      <<: &B {max_iter: 5, tol: 0.001}\n"
            "      max_iter: 3\n  em:\n    <<: *A\n    n_init: 2\n")
    path = tmp_path / "chain.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.train.hierarchical.root_em.max_iter == 3
    assert (config.train.em.max_iter, config.train.em.n_init) == (3, 2)
    assert config.train.em.tol == 0.001
    assert yaml.safe_load(text)["train"]["em"] == {"max_iter": 3, "tol": 0.001, "n_init": 2}



@pytest.mark.parametrize(("text", "value"), [
    ("train.em.max_iter=0x1F", 31),
    ("train.em.max_iter=1_0", 10),  # (YAML 1.1 forms that read as they look stay)
    ("train.em.tol=1e-3", 1e-3),
    ("train.em.tol=.5", 0.5),
    ("output.name=09", "09"),  # (not a number in YAML 1.1: a saved run's name reads back)
    ("output.name=1e5", "1e5"),
])
def test_numbers_read_as_they_look(text, value):
    config = load_config(None, [text])
    got = config
    for part in text.split("=")[0].split("."):
        got = getattr(got, part)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("text", "problem"), [
    ("train.em.max_iter=010", "'010' is the octal 8 in YAML 1.1: write 10 without"),
    ("seed=0123", "'0123' is the octal 83"),
    ("model.n_components=1:5", "'1:5' is a base-60 number in YAML 1.1 \\(65\\)"),
    ("train.em.tol=1:0.5", "'1:0.5' is a base-60 number in YAML 1.1 \\(60.5\\)"),
])
def test_yaml_1_1_octal_and_base_60_numbers_are_refused_not_read(text, problem):
    """``010`` was read as 8, ``0123`` as 83, ``1:5`` as 65 (base 60), silently."""
    with pytest.raises(ValueError, match=problem):
        load_config(None, [text])


def test_a_config_file_names_an_octal_number_and_reads_the_rest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 7\ntrain:\n  em:\n    tol: 1e-3\n    max_iter: 007\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"run\.yaml is not valid YAML: .*'007' is the octal"):
        load_config(path)
    path.write_text("seed: 7\ntrain:\n  em:\n    tol: 1e-3\n    max_iter: 70\n",
                    encoding="utf-8")
    config = load_config(path)
    assert (config.seed, config.train.em.tol, config.train.em.max_iter) == (7, 1e-3, 70)


def test_a_saved_config_with_number_like_strings_reads_back(tmp_path):
    """The saved config is written by PyYAML (YAML 1.1): a name such as '09' or '1e5' is
    written unquoted and must read back as the same string (a resume compares it)."""
    from mfa.config import save_config
    for name in ("09", "1e5", "0o17", "010", "1:5", "1_000", "0x10"):
        config = load_config(None, [f"output.name='{name}'"])
        save_config(config, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml").output.name == name


def test_mapping_overrides_lay_a_config_tree_over_another():
    """``mfa train --resume RUN --config FILE`` applies the file as --set values."""
    import yaml

    from mfa.config_text import apply_override_strings, mapping_overrides, read_yaml_mapping

    data = read_yaml_mapping(CONFIG)
    assert apply_override_strings({}, mapping_overrides(data)) == data
    odd = {"seed": 3, "device": "cpu", "output": {"name": "1e-3", "mask_image": "..."},
           "train": {"em": {"tol": 1e-6, "device": None}}}
    assert apply_override_strings({}, mapping_overrides(odd)) == odd
    assert "seed=3" in mapping_overrides(odd)  # (no YAML document end, "3\n...")
    base = {"model": {"n_components": 3, "n_factors": 2}}
    assert apply_override_strings(base, mapping_overrides({"model": {"n_factors": 1}})) == {
        "model": {"n_components": 3, "n_factors": 1}}
    assert yaml.safe_load(mapping_overrides(odd)[-1].split("=", 1)[1]) == odd["train"]


def test_drop_empty_sections_keeps_values_that_are_null():
    """A YAML section whose keys are all commented out is null: laid over a run's config it
    reset the section to the defaults. It is dropped; a null that is a value stays."""
    from mfa.config_text import drop_empty_sections

    template = {"train": {"em": {"max_iter": 30}, "hierarchical": {"root_em": None}},
                "seed": 0}
    given = {"train": {"em": None, "hierarchical": {"root_em": None}}, "seed": None,
             "output": {}}
    assert drop_empty_sections(given, template) == {
        "train": {"hierarchical": {"root_em": None}}, "seed": None, "output": {}}


@pytest.mark.parametrize("text, kept", [
    ("output.name=my run #1", "my run"), ("data.root=/data/scans #1/png", "/data/scans"),
    ("output.name=#1", None), ("train.em.max_iter=5 # five", 5)])
def test_a_value_holding_a_yaml_comment_is_refused_naming_it(text, kept):
    """`--set "output.name=my run #1"` named the folder `my run`: YAML read " #1" as a
    comment and dropped it without a word."""
    import yaml

    from mfa.config_text import parse_override

    key, raw = text.split("=", 1)
    assert yaml.safe_load(raw) == kept  # (what the value was cut to)
    with pytest.raises(ValueError, match=rf"invalid override .*{key}.*YAML comment"):
        parse_override(text)


def test_a_hash_inside_a_word_or_quotes_is_text_and_the_advice_keeps_it():
    from mfa.config_text import parse_override

    assert parse_override("output.name=run#1")[1] == "run#1"
    assert parse_override("output.name='my run #1'")[1] == "my run #1"
    with pytest.raises(ValueError) as refused:
        parse_override("output.name=my run #1")
    advice = str(refused.value).split("e.g. --set ")[1]
    (word,) = shlex.split(advice)  # the advice, pasted into a shell, is one argument
    assert parse_override(word) == (["output", "name"], "my run #1")


def test_an_override_splits_at_its_first_equals_sign():
    """The key ends at the first '=': a value may hold '=' (a path, a URL query); split at
    the last one, 'data.root=/data/set=1' set a key 'data.root=/data/set' to '1'."""
    assert parse_override("data.root=/data/set=1") == (["data", "root"], "/data/set=1")
    assert parse_override("output.name=a=b=c") == (["output", "name"], "a=b=c")
    config = load_config(CONFIG, overrides=["data.root=/data/set=1"])
    assert config.data.root == "/data/set=1"


def test_yaml_binary_numbers_read_as_they_look():
    """``0b101`` is 5 (binary), as ``0x1F`` is 31: neither is a leading-zero octal."""
    assert load_config(None, ["train.em.max_iter=0b101"]).train.em.max_iter == 5


def test_two_merge_keys_in_one_mapping_are_not_a_key_given_twice():
    from mfa.config_text import _load

    text = "a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n  z: 3\n"
    assert _load(text, "f.yaml")["c"] == {"x": 1, "y": 2, "z": 3}  # as PyYAML reads it


def test_the_keys_an_override_sets():
    """What --resume checks against the keys a run may change (an empty mapping sets the
    section itself)."""
    from mfa.config_text import dotted_leaves, override_keys

    assert override_keys("train.em.max_iter=5") == ["train.em.max_iter"]
    assert override_keys("train={em: {max_iter: 2, tol: 0.1}}") == ["train.em.max_iter",
                                                                   "train.em.tol"]
    assert override_keys("model={}") == ["model"]
    assert dotted_leaves({"a": {}, "b": {"c": 1, "d": {"e": None}}}) == {"b.c": 1,
                                                                         "b.d.e": None}


def test_overrides_through_null_sections_and_a_single_string():
    from mfa.config_text import apply_override_strings

    data = {"train": {"hierarchical": {"root_em": None}}}
    assert apply_override_strings(data, ["train.hierarchical.root_em.max_iter=3",
                                         "output.name=x"]) == {
        "train": {"hierarchical": {"root_em": {"max_iter": 3}}}, "output": {"name": "x"}}
    assert data == {"train": {"hierarchical": {"root_em": None}}}  # (a copy is changed)
    assert apply_override_strings({}, "seed=3") == {"seed": 3}  # one string, not its letters


def test_a_nested_mapping_override_of_an_aliased_section_changes_that_section_alone(
        tmp_path):
    """The section-by-section merge copies each section it writes: through a mapping value
    two levels up, root_em (an alias of train.em) shared its dict with train.em."""
    from mfa.config_text import apply_override_strings, read_yaml_mapping

    path = tmp_path / "alias.yaml"
    path.write_text("train:\n  em: &em\n    max_iter: 2\n  hierarchical:\n"
                    "    root_em: *em\n")
    got = apply_override_strings(read_yaml_mapping(path),
                                 ["train={hierarchical: {root_em: {max_iter: 7}}}"])
    assert got["train"] == {"em": {"max_iter": 2}, "hierarchical": {"root_em": {"max_iter": 7}}}


def test_a_missing_config_of_another_name_in_configs_gets_no_shipped_hint(tmp_path,
                                                                          monkeypatch):
    """Only the shipped names are pointed to the checkout (a user's configs/mine.yaml is
    just missing)."""
    from mfa.config_text import read_yaml_mapping

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        read_yaml_mapping(Path("configs/mine.yaml"))
    assert str(missing.value) == "config file configs/mine.yaml does not exist"
    with pytest.raises(FileNotFoundError, match="the shipped configs live in the source"):
        read_yaml_mapping(Path("configs/mnist.yaml"))


def test_drop_empty_sections_drops_an_empty_mapping_of_a_section_too():
    """``model: {}`` (written out, or every key removed by a tool) is an empty section as a
    null one is; an empty mapping where the defaults hold no section stays."""
    from mfa.config_text import drop_empty_sections

    template = {"model": {"n_components": 1}, "train": {"em": {"max_iter": 30}}, "seed": 0}
    assert drop_empty_sections({"model": {}, "train": {"em": {}}, "seed": 4, "x": {}},
                               template) == {"train": {}, "seed": 4, "x": {}}


def test_a_yaml_error_names_the_file_or_the_override(tmp_path):
    """PyYAML names a string '<unicode string>': the marks name the file or the --set key."""
    from mfa.config_text import read_yaml_mapping

    with pytest.raises(ValueError, match=r'in "--set model", line 1'):
        parse_override("model={a: 1, a: 2}")
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  a: 1\n  a: 2\n")
    with pytest.raises(ValueError, match=rf'in "{path}", line 3'):
        read_yaml_mapping(path)


def test_an_empty_config_file_is_an_empty_mapping(tmp_path):
    from mfa.config_text import read_yaml_mapping

    path = tmp_path / "empty.yaml"
    for text in ("", "# all commented out\n"):
        path.write_text(text)
        assert read_yaml_mapping(path) == {}


def test_spaces_around_an_overrides_key_are_not_part_of_it():
    assert parse_override(" train.em.max_iter =5") == (["train", "em", "max_iter"], 5)


def test_a_value_that_is_only_a_comment_is_told_to_quote_it():
    with pytest.raises(ValueError, match=r"would drop it \(leaving None\); quote the value "
                                         r"to keep the '#', e\.g\. --set 'output\.name=\"#1\"'"):
        parse_override("output.name=#1")
