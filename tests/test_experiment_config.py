"""One config loader and one run-directory convention for every experiment."""

from __future__ import annotations

import json

import pytest

from sqs.experiments import config as C
from sqs.experiments import image as im
from sqs.experiments import lm


def test_named_and_path_configs_with_dotted_overrides_for_image_and_lm(tmp_path):
    d, where = C.load_config_dict("image", "sec42", ["model.gate=identity", "train.lr=3e-3", "noise_std=0.5"])
    assert d["model"]["gate"] == "identity" and d["train"]["lr"] == 3e-3 and d["noise_std"] == 0.5
    assert where == "sqs/configs/image/sec42.toml"
    assert im.load_config("sec42", ["model.gate=identity"]).model.gate == "bilinear"  # alias -> paper name
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[train]\nsteps = 4\nbatch_size = 8\n[model]\ncontext = 16\n')
    cfg = lm.load_config(path, ["train.lr=3e-4", "gate=silu"])
    assert (cfg.name, cfg.steps, cfg.lr, cfg.context, cfg.gate) == ("mine", 4, 3e-4, 16, "swiglu")
    assert C.parse_override("x=[0.9, 0.95]") == ("x", [0.9, 0.95]) and C.parse_override("x=abc") == ("x", "abc")
    with pytest.raises(ValueError, match="belongs in \\[model\\]"):
        lm.load_config(path, ["d_model=64"])
    with pytest.raises(FileNotFoundError, match="sec41, sec42"):
        C.load_config_dict("image", "no-such")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [")
    with pytest.raises(ValueError, match="bad.toml"):
        C.load_config_dict("lm", bad)


def test_run_dir_convention_and_old_layouts_get_a_move_hint(tmp_path):
    assert C.run_dir("runs", "sec42", "mnist", "sqs", 0).as_posix() == "runs/sec42/mnist/sqs-s0"
    assert C.run_dir("runs", "sec41", "fashion-mnist", "identity", 3).as_posix() == "runs/sec41/fashion-mnist/bilinear-s3"
    assert C.run_dir("runs", "x/tinystories-cpu.toml", "tinystories", "silu", 1).as_posix() == \
        "runs/tinystories-cpu/tinystories/swiglu-s1"
    old = tmp_path / "sec41" / "mnist" / "identity-seed2"  # the spectra layout before, old gate name
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"kind": "image"}))
    with pytest.raises(FileExistsError, match="mv .*identity-seed2 .*bilinear-s2"):
        C.check_no_legacy(tmp_path, "sec41", "mnist", "bilinear", 2)
    C.check_no_legacy(tmp_path, "sec41", "mnist", "bilinear", 0)  # nothing old: no complaint


def test_paper_reference_is_one_file_read_by_every_report():
    ref = C.paper_reference()
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
