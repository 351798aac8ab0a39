"""The cohort report: pictures per scan and an index.html that opens from disk."""
from html.parser import HTMLParser

import numpy as np

from ltnet_keras.data.labels import LabelTable
from ltnet_keras.inference.report import INDEX, qc_order, write_index, write_scan_picture

TABLE = LabelTable([1, 2], ["L_a", "R_a"], ["a", "a"])


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.rows, self.cells = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.links.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


def record(name, predicted):
    qc = {} if predicted is None else {"qc": {"predicted_dice": predicted, "flag":
                                              "check" if predicted < 0.7 else "ok"}}
    return {"subject": name, "volumes": {"L_a": 1000.0, "R_a": 2000.0, "total": 3000.0},
            "brain": {"skull": name == "b", "brain_ml": 1500.0}, "signals": {}, **qc}


def test_index_lists_scans_worst_first_and_every_picture_it_links_exists(tmp_path):
    labels = np.zeros((20, 24, 16), np.int16)
    labels[5:10, 5:15, 4:12], labels[10:15, 5:15, 4:12] = 1, 2
    image = np.random.default_rng(0).uniform(0, 100, labels.shape).astype(np.float32)
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    records = [record("a", 0.85), record("b", 0.62), record("c", None), record("d", 0.74)]
    for r in records:
        picture = write_scan_picture(tmp_path, r["subject"], image, affine, labels, TABLE)
        assert picture.read_bytes()[:4] == b"\x89PNG"
    index = write_index(tmp_path, records, TABLE)
    assert index == tmp_path / INDEX
    parser = Links()
    parser.feed(index.read_text())
    assert parser.links and all((tmp_path / link).is_file() for link in parser.links)
    assert not any(link.startswith(("http", "/")) for link in parser.links)  # opens from disk
    order = [c for c in parser.cells if c in ("a", "b", "c", "d")]
    assert order == ["b", "d", "a", "c"] * 2     # the scans' table, then their volumes
    order = order[:4]
    assert [r["subject"] for r in qc_order(records)] == order
    assert "1 flagged" in index.read_text()
