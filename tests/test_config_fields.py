"""Config fields' meanings: parsed from the comments, complete, and the generated
docs/configuration.md current."""

import subprocess
import sys
from pathlib import Path

from medseg_jax import config_fields
from medseg_jax.config import choose_section, default_config, study_section

ROOT = Path(__file__).resolve().parents[1]


def test_meanings_are_the_comments_above_and_beside_a_field(tmp_path):
    source = tmp_path / "config.py"
    source.write_text(
        "def default_config():\n"
        "    config = ml_collections.ConfigDict()\n"
        "    # --- data: where the cases are -----\n"
        "    config.data = data = ml_collections.ConfigDict()\n"
        "    # The first line\n"
        "    # and its second line.\n"
        "    data.a = (1,\n"
        "              2)  # trailing\n"
        "    data.b = 2\n"
        "\n"
        "    # a comment with a blank line below\n"
        "\n"
        "    config.c = 3  # top level\n")
    fields, sections = config_fields._config_meanings(source)  # noqa: SLF001
    assert fields == {"data.a": "The first line and its second line. trailing", "data.b": "",
                      "c": "top level"}
    assert sections == {"data": "where the cases are."}


def test_every_field_has_a_meaning():
    config = default_config()
    config.benchmark = study_section()
    config.choose = choose_section()
    known = config_fields.meanings()
    names = [name for name, _ in config_fields.flatten(config)]
    names += [f"model.{f}" for fields in config_fields.model_extras().values() for f in fields]
    assert len(names) > 100
    assert [n for n in names if not known.get(n)] == []


def test_augment_fields_come_from_the_docstring_and_model_fields_from_the_classes():
    known = config_fields.meanings()
    assert known["augment.p_rotate"] == "probability per sample of a rotation."
    # "p_brightness, brightness_range: ..." gives both fields the entry's text
    assert known["augment.p_brightness"] == known["augment.brightness_range"]
    assert known["augment.p_gamma_invert"].endswith("with ``gamma_range``.")  # continued
    assert config_fields.model_extras() == {
        "unet": {}, "fcn": {"dropout_rate": 0.0}, "attention_unet": {"output_transform": True},
        "resenc_unet": {"blocks_per_stage": (), "decoder_convs": 1}}
    assert "fc6" in known["model.dropout_rate"]


def test_listing_gives_value_and_meaning_per_line():
    config = default_config()
    config.model.name = "fcn"
    config.model.dropout_rate = 0.5
    lines = config_fields.listing(config).splitlines()
    assert "train.learning_rate = 0.001  # the initial learning rate (lr_schedule " \
           "decays it)" in lines
    assert lines[0].startswith("seed = 0  # ")
    assert any(line.startswith("model.dropout_rate = 0.5  # dropout after fc6")
               for line in lines)
    assert len(lines) == len(config_fields.flatten(config))


def test_listing_takes_a_config_files_own_comments(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def get_config():\n    config = default_config()\n"
                    "    config.extra = 3  # my own field\n    return config\n")
    config = default_config()
    config.extra = 3
    assert "extra = 3  # my own field" in config_fields.listing(config, str(path))


def test_listing_a_config_imports_no_jax():
    code = ("import sys; from medseg_jax import config_fields as f; f.meanings(); "
            "f.model_extras(); f.sections(); "
            "assert not {'jax', 'flax'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_docs_are_generated_from_the_comments():
    """docs/configuration.md is `python -m medseg_jax.config_fields`'s output: a comment
    changed in the code and not regenerated fails here."""
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_fields.markdown(), (
        "regenerate: python -m medseg_jax.config_fields > docs/configuration.md")
    assert "| `train.learning_rate` | `0.001` | the initial learning rate" in committed
    assert "use only config files you\ntrust" in committed
    # "<workdir>" is text, not an HTML tag; code keeps its "<"; pipes do not split cells
    assert "Empty: &lt;workdir>/cache." in committed and "``lo < 1 < hi``" in committed
    assert ("| the architecture: unet \\| fcn \\| attention_unet \\| resenc_unet |"
            in committed)
