"""TrainConfig is where every training knob and its default live: train.py's flags match its fields
one to one, take their defaults from it, and run.json is its asdict."""

import argparse
import dataclasses

import pytest
import torch

from minimind.cli import add_train_arguments
from minimind.errors import UsageError
from minimind.recipes import STAGES
from minimind.trainconfig import FIELDS, STAGE_FIELDS, TrainConfig, default, resolve


def _parser():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p


def test_every_flag_is_a_field_and_every_field_a_flag():
    dests = {a.dest for a in _parser()._actions if a.dest not in ("help", "local_rank")}
    assert dests == set(FIELDS)


def test_flags_take_their_defaults_from_the_dataclass():
    for action in _parser()._actions:
        if action.dest in FIELDS:
            assert action.default == default(action.dest) or (action.default is False and not default(action.dest))


def test_stage_knobs_come_from_the_stage_record(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    for name, stage in STAGES.items():
        argv = ["--stage", name, "--data", str(data), "--out", str(tmp_path / name)]
        argv += ["--init", str(tmp_path)] if stage.needs_init else []
        argv += ["--teacher", str(tmp_path)] if stage.needs_teacher else []
        cfg = resolve(_parser().parse_args(argv))
        assert isinstance(cfg, TrainConfig)
        for field in STAGE_FIELDS:
            assert getattr(cfg, field) == stage.default(field, on_cpu=not torch.cuda.is_available()), (name, field)
        assert cfg.min_lr == stage.lr / 10 and cfg.epochs == 1.0
        for device, on_cpu in (("cpu", True), ("cuda", False)):  # a device's own defaults, wherever this runs
            cfg = resolve(_parser().parse_args([*argv, "--device", device]))
            assert all(getattr(cfg, f) == stage.default(f, on_cpu) for f in STAGE_FIELDS), (name, device)
    pre = STAGES["pretrain"]
    assert pre.default("batch_size", on_cpu=True) != pre.default("batch_size", on_cpu=False)  # the CPU's own batch
    cfg = resolve(_parser().parse_args(["--stage", "sft", "--init", str(tmp_path), "--data", str(data), "--lr",
                                        "1e-3", "--out", str(tmp_path / "x")]))
    assert cfg.lr == 1e-3 and dataclasses.asdict(cfg)["lr"] == 1e-3


def test_combinations_are_checked(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    with pytest.raises(UsageError, match="--init"):
        resolve(_parser().parse_args(["--stage", "sft", "--data", str(data)]))
    with pytest.raises(UsageError, match="--teacher"):
        resolve(_parser().parse_args(["--stage", "distill", "--init", str(tmp_path), "--data", str(data)]))
