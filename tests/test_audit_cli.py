"""``textcam audit``'s flags: one per AuditConfig field, typed, with a help line; they override the file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flows.cli import HELP, add_audit_parsers, config_from_args
from tasks.config import SECTIONS, AuditConfig, load_config


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="textcam")
    add_audit_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_every_setting_has_a_flag_and_a_help_line() -> None:
    fields = set(AuditConfig.model_fields) - set(SECTIONS)
    fields |= {f"{section}.{name}" for section, model in SECTIONS.items() for name in model.model_fields}
    assert {"calibration.bank_m", "explanation.method", "flags.alpha"} <= fields
    assert set(HELP) == fields
    parser = argparse.ArgumentParser(prog="textcam")
    add_audit_parsers(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["audit"].format_help()  # type: ignore[union-attr]
    for name in fields:
        field = name.rpartition(".")[2].replace("_", "-")
        assert ("--flag-" + field if name.startswith("flags.") else "--" + field) in text


def test_flags_are_typed_and_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text(f"data: {tmp_path}\ncalibration:\n  bank_m: 50\n  probe_size: 500\n")
    args = parse(
        [
            "audit",
            "--config",
            str(config),
            "--bank-m",
            "20",
            "--probe-size",
            "60",
            "--no-check-phrases",
            "--classes",
            "model",
            "--shrinkage",
            "0.3",
            "--vocab",
            "clevr",
            "phrase:a logo",
        ]
    )
    cfg = config_from_args(args)
    calibration = cfg.calibration
    assert (calibration.bank_m, calibration.probe_size, calibration.shrinkage) == (20, 60, 0.3)
    assert (cfg.explanation.check_phrases, cfg.classes, cfg.vocab) == (
        False,
        "model",
        ("clevr", "phrase:a logo"),
    )
    from_file = config_from_args(parse(["audit", "--config", str(config)]))
    assert from_file.calibration.bank_m == 50  # the file's value
    with pytest.raises(SystemExit):
        parse(["audit", "--bank-m", "many"])


def test_flag_settings_are_a_typed_section_merged_with_the_file(tmp_path: Path) -> None:
    config = tmp_path / "audit.yaml"
    config.write_text(f"data: {tmp_path}\nflags:\n  alpha: 0.05\n  min_effect: 0.3\n")
    cfg = config_from_args(parse(["audit", "--config", str(config), "--flag-min-effect", "0.4"]))
    assert (cfg.flags.alpha, cfg.flags.min_effect, cfg.flags.n_permutations) == (0.05, 0.4, 200)
    with pytest.raises(ValueError, match=r"flags\.alpha"):
        config_from_args(parse(["audit", "--config", str(config), "--flag-alpha", "2"]))
    with pytest.raises(ValueError, match=r"flags\.min_effect_in_training"):
        config_from_args(parse(["audit", "--config", str(config), "--flag-min-effect-in-training", "-0.1"]))
    seen = config_from_args(parse(["audit", "--config", str(config), "--flag-probe-seen-in-training"]))
    assert (seen.flags.effect_bound, cfg.flags.effect_bound) == (seen.flags.min_effect_in_training, 0.4)
    config.write_text(f"data: {tmp_path}\nflags:\n  alpah: 0.05\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['flags.alpah'\]"):
        config_from_args(parse(["audit", "--config", str(config)]))


def test_sections_keep_their_keys_and_old_flat_keys_say_where_they_went(tmp_path: Path) -> None:
    (tmp_path / "probe").mkdir()
    config = tmp_path / "audit.yaml"
    config.write_text("data: images\ncalibration:\n  probe: probe\n  bank_m: 7\n")
    cfg = load_config(config)
    assert cfg.calibration.probe == str(tmp_path / "probe")  # relative to the file, like data
    edited = cfg.replace(calibration={"probe_size": 40})
    assert (edited.calibration.bank_m, edited.calibration.probe_size) == (7, 40)
    assert edited.fingerprint() != cfg.fingerprint()
    config.write_text("data: images\nbank_m: 7\n")
    with pytest.raises(ValueError, match=r"'bank_m' belongs in its section: calibration\.bank_m"):
        load_config(config)


def test_a_bad_method_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown CAM method"):
        config_from_args(parse(["audit", "--data", str(tmp_path), "--method", "gradcan"]))


def test_deployment_parameters_are_a_valid_config_with_absolute_paths(tmp_path: Path) -> None:
    """What `textcam schedule` stores for workers: every path absolute, the sections included."""
    from flows.deploy import deployment_parameters
    from tasks.config import from_mapping

    cfg = load_config(None, {"data": "images", "calibration": {"probe": "probe", "bank_m": 7}})
    params = deployment_parameters(cfg, base=tmp_path)["config"]
    assert params["data"] == str(tmp_path / "images")
    assert params["calibration"]["probe"] == str(tmp_path / "probe")
    again = from_mapping(params)
    assert again.calibration.bank_m == 7 and again.fingerprint() != cfg.fingerprint()  # paths differ
