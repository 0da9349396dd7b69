"""One config loader and one run-directory convention for every experiment."""

from __future__ import annotations

import json

import pytest

from sqs.runs.config_files import load_config_dict, paper_reference, parse_override
from sqs.runs.image_config import load_config as load_image_config
from sqs.runs.lm_config import load_config as load_lm_config
from sqs.runs.naming import check_no_legacy


def test_named_and_path_configs_with_dotted_overrides_for_image_and_lm(tmp_path):
    d, where = load_config_dict("image", "sec42", ["model.gate=identity", "train.lr=3e-3", "noise_std=0.5"])
    assert d["model"]["gate"] == "identity" and d["train"]["lr"] == 3e-3 and d["noise_std"] == 0.5
    assert where == "sqs/configs/image/sec42.toml"
    assert load_image_config("sec42", ["model.gate=identity"]).model.gate == "bilinear"  # alias -> paper name
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[train]\nsteps = 4\nbatch_size = 8\n[model]\ncontext = 16\n')
    cfg = load_lm_config(path, ["train.lr=3e-4", "gate=silu"])
    assert (cfg.name, cfg.steps, cfg.lr, cfg.context, cfg.gate) == ("mine", 4, 3e-4, 16, "swiglu")
    assert parse_override("x=[0.9, 0.95]") == ("x", [0.9, 0.95]) and parse_override("x=abc") == ("x", "abc")
    with pytest.raises(ValueError, match="belongs in \\[model\\]"):
        load_lm_config(path, ["d_model=64"])
    with pytest.raises(FileNotFoundError, match="sec41, sec42"):
        load_config_dict("image", "no-such")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config_dict("lm", bad)


def test_run_dir_convention_and_old_layouts_get_a_move_hint(tmp_path):
    assert load_image_config("sec42", ["model.gate=sqs"]).run_dir("runs").as_posix() == "runs/sec42/mnist/sqs-s0"
    assert load_image_config("sec41", ['dataset="fashion-mnist"', "model.gate=identity", "seed=3"]).run_dir(
        "runs").as_posix() == "runs/sec41/fashion-mnist/bilinear-s3"
    path = tmp_path / "x" / "tinystories-cpu.toml"  # a config file is filed under its stem
    path.parent.mkdir()
    path.write_text('[train]\nsteps = 4\n')
    assert load_lm_config(path, gate="silu", seed=1).run_dir("runs").as_posix() == \
        "runs/tinystories-cpu/tinystories/swiglu-s1"
    old = tmp_path / "sec41" / "mnist" / "identity-seed2"  # the spectra layout before, old gate name
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"kind": "image"}))
    cfg = load_image_config("sec41", ["model.gate=bilinear", "seed=2"])
    with pytest.raises(FileExistsError, match="mv .*identity-seed2 .*bilinear-s2"):
        check_no_legacy(cfg.run_dir(tmp_path), cfg.legacy_dirs(tmp_path))
    cfg0 = load_image_config("sec41", ["model.gate=bilinear", "seed=0"])
    check_no_legacy(cfg0.run_dir(tmp_path), cfg0.legacy_dirs(tmp_path))  # nothing old: no complaint
    tagged = load_image_config("sec41", ["model.gate=sqs", "seed=2", "model.gate_kwargs.lam=0.1"])
    assert tagged.legacy_dirs(tmp_path) == []  # old layouts had no tagged runs


def test_paper_reference_is_one_file_read_by_every_report():
    ref = paper_reference()
    assert set(ref["table1"]["mnist"]) == {"relu", "gelu", "swiglu", "bilinear", "sqs"}
    assert ref["lm"]["relu"]["loss"] == 1.9021 and ref["fig2"]["cos_min"] == 0.5
    assert "claim" in ref["appc"]


def test_cli_gate_flags_take_aliases_and_list_paper_names(capsys):
    from sqs.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["experiment", "table1", "--gates", "silu", "identity", "sqs"])
    assert args.gates == ["swiglu", "bilinear", "sqs"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "lm", "--help"])
    assert "one of relu, gelu, swiglu, bilinear, sqs" in " ".join(capsys.readouterr().out.split())
