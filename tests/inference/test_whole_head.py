"""A whole-head T1 (skull on) through `ltnet segment` with no extra flag: brain found with
another subject's head as template, labels on the scan's grid, volumes and the record."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ltnet_keras import cli
from ltnet_keras.data.io import load_image, load_label_map
from ltnet_keras.data.skull import mask_dice

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "results" / "freesurfer" / "ltnet"
FREESURFER = REPO.parent / "shared" / "data" / "freesurfer"


@pytest.mark.slow
def test_whole_head_t1_is_segmented_without_a_flag(tmp_path, capsys):
    head = FREESURFER / "sub-02" / "T1.mgz"
    if not head.exists() or not RUN.is_dir():
        pytest.skip("FreeSurfer whole-head data or the committed FreeSurfer run not found")
    out = tmp_path / "seg"
    code = cli.main(["segment", "--run", str(RUN), "--image", str(head), "--out", str(out),
                     "--volumes", str(tmp_path / "volumes.csv"), "--save-brain-mask"])
    printed = capsys.readouterr()
    assert code in (0, None), printed.err
    assert "brain_extraction" in printed.out
    labels = load_label_map(out / "sub-02.mgz")
    truth = load_label_map(FREESURFER / "sub-02" / "aseg.mgz")
    assert labels.shape == truth.shape and np.allclose(labels.affine, truth.affine)
    from ltnet_keras import evaluation
    from ltnet_keras.data.labels import LabelTable
    table = LabelTable.from_tsv(FREESURFER / "labels.tsv")
    assert evaluation.evaluate_pair(labels.array, truth.array, table).mean_structure > 0.6
    mask = load_image(out / "brain_mask" / "sub-02.mgz").array > 0
    reference = load_image(FREESURFER / "sub-02" / "brainmask.mgz").array > 0
    assert mask_dice(mask, reference) > 0.9
    record = json.loads((out / "records" / "sub-02.json").read_text())
    assert record["brain"]["skull"] and "sub-02/T1.mgz" not in record["brain"]["templates"]
    with open(tmp_path / "volumes.csv") as handle:
        row, = list(csv.DictReader(handle))
    assert float(row["total"]) == pytest.approx(float((labels.array > 0).sum()), abs=0.5)
