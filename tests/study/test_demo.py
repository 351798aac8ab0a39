"""The README's main job (`make demo`) end to end on a tiny budget: the demo's own configs, a few
training steps, two validation scans, a coarse SyN and a short refinement."""
import csv
import json
import math
from pathlib import Path

import pytest

from ltnet_keras.baselines.syn import SMOKE_SYN
from ltnet_keras.config import load_config
from ltnet_keras.inference.refine import RefineSettings
from ltnet_keras.study.demo import DemoSettings, format_table, run_demo

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "experiments" / "configs" / name
           for name in ("demo_voxelmorph.yaml", "demo.yaml")]
TINY = {"train.steps": 4, "train.log_every": 2, "train.checkpoint_every": 2,
        "data.train_subjects": ["S11", "S12", "S13"], "data.atlas": "S13"}


def test_demo_configs_are_the_recipe_and_its_twin():
    voxelmorph, ltnet = (load_config(path) for path in CONFIGS)
    tuned = load_config(REPO / "experiments" / "configs" / "ltnet_tuned.yaml")
    assert voxelmorph.preset == "voxelmorph" and ltnet.preset == "ltnet"
    assert ltnet.weights == tuned.weights and ltnet.penalties == tuned.penalties
    assert ltnet.weights.gan == 0.0   # not the paper preset, which collapses at this scale
    assert voxelmorph.train.steps == ltnet.train.steps
    assert voxelmorph.data == ltnet.data


@pytest.mark.slow
def test_demo_pipeline_end_to_end(lpba40_root, tmp_path):
    configs = [load_config(path, TINY) for path in CONFIGS]
    settings = DemoSettings(refine=RefineSettings(levels=((8, 10), (4, 10))), syn=SMOKE_SYN,
                            subjects=["S31", "S32"])
    rows = run_demo(configs, tmp_path, settings, verbose=0, log=lambda *_: None)

    with open(tmp_path / "demo.csv") as handle:
        table = list(csv.DictReader(handle))
    names = [row["method"] for row in table]
    assert names == ["no registration", "VoxelMorph (voxelmorph), G_F",
                     "LT-Net (ltnet_recipe), G_F", "LT-Net (ltnet_recipe) + refine", "ANTs SyN"]
    for row in table:
        assert int(row["n"]) == 2
        for key in ("dice_mean", "dice_min", "dice_max", "seconds_per_case"):
            assert math.isfinite(float(row[key])), (row["method"], key)
        assert 0.0 <= float(row["dice_min"]) <= float(row["dice_mean"]) <= 100.0
    by_name = {row["method"]: row for row in table}
    # Four training steps leave G_F near identity; refinement must still register.
    assert (float(by_name["LT-Net (ltnet_recipe) + refine"]["dice_mean"])
            > float(by_name["LT-Net (ltnet_recipe), G_F"]["dice_mean"]) + 2.0)
    assert float(by_name["ANTs SyN"]["seconds_per_case"]) > 0
    markdown = (tmp_path / "demo.md").read_text()
    assert format_table(rows) in markdown and "results/demo_600" in markdown
    with open(tmp_path / "cases.csv") as handle:
        cases = list(csv.DictReader(handle))
    assert len(cases) == 2 * len(names)
    assert {c["subject"] for c in cases} == {"S31", "S32"}
    picture = (tmp_path / "demo.png").read_bytes()
    assert picture[:4] == b"\x89PNG" and len(picture) > 20_000
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["runs"]["ltnet_recipe"]["steps"] == 4 and record["refine_run"] == "ltnet_recipe"
    assert str(lpba40_root.resolve()) not in (tmp_path / "demo.json").read_text()
