"""What a cohort takes away besides the label maps: per scan a record, and from the records the
volume table (``--volumes``), the QC table (``--qc``) and the visual report (``--report``).

Every segmented scan gets ``OUT/records/<name>.json`` (volumes, QC signals and prediction, how
its brain was found, seconds), written before its label map is renamed into place, so a label
map on disk always has its record. The tables and the report are rebuilt from the records of
the WHOLE image list that exist, in list order, whenever an ``ltnet segment`` process finishes:
the shards of a job array write no rows of their own, so no row is lost or written twice, and
the last task to finish leaves every row in place. Rerunning any task (its scans are skipped)
rebuilds them.
"""
import json
from pathlib import Path
from typing import List, Optional, Sequence

from ltnet_keras.inference.qc import QCModel
from ltnet_keras.inference.volumes import label_volumes, write_volumes_csv
from ltnet_keras.records import atomic_write_text, csv_text

RECORDS_DIR = "records"


def record_path(out_dir, name: str) -> Path:
    return Path(out_dir) / RECORDS_DIR / f"{name}.json"


def scan_record(result, name: str, image_path, protocol, qc_model: Optional[QCModel] = None
                ) -> dict:
    """The record of one segmentation (``result``: a ``Segmentation``)."""
    from ltnet_keras.data.grids import voxel_sizes
    record = {"subject": name, "image": str(image_path),
              "volumes": label_volumes(result.labels, voxel_sizes(result.affine), protocol),
              "signals": dict(result.signals),
              "brain": result.brain.record() if result.brain is not None else {"skull": False},
              "seconds": {k: round(v, 3) for k, v in result.seconds.items()}}
    if qc_model is not None and result.signals:
        predicted = qc_model.predict(result.signals)
        record["qc"] = dict(predicted, flag=qc_model.flag(predicted["predicted_dice"]))
    return record


def write_record(out_dir, name: str, record: dict) -> Path:
    return atomic_write_text(record_path(out_dir, name), json.dumps(record, indent=2))


def read_records(out_dir, names: Sequence[str]) -> List[dict]:
    """The records of ``names`` that exist, in that order."""
    records = []
    for name in names:
        path = record_path(out_dir, name)
        if path.exists():
            records.append(json.loads(path.read_text()))
    return records


def qc_columns(records: Sequence[dict]) -> List[str]:
    first = next((r for r in records if "qc" in r), None)
    if first is None:
        return []
    predicted = [k for k in first["qc"] if k.startswith("predicted_dice_")]
    signals = list(first["signals"])
    return ["subject", "predicted_dice"] + predicted + ["flag"] + signals


def write_qc_csv(path, records: Sequence[dict]) -> Path:
    """One row per scan with a QC prediction: ``subject``, ``predicted_dice``,
    ``predicted_dice_<structure>``..., ``flag``, then the signals it used."""
    columns = qc_columns(records)
    rows = []
    for record in records:
        if "qc" not in record:
            continue
        values = {"subject": record["subject"], **record["qc"], **record["signals"]}
        rows.append([_cell(values.get(c, "")) for c in columns])
    return atomic_write_text(path, csv_text(columns, rows))


def _cell(value):
    return f"{value:.4f}" if isinstance(value, float) else value


def rebuild_tables(out_dir, names: Sequence[str], protocol, volumes_path=None, qc_path=None,
                   report_dir=None, report=print) -> List[dict]:
    """Rewrite the asked-for tables and report from the records of ``names`` (the whole list,
    in order) under ``out_dir``; returns the records found."""
    records = read_records(out_dir, names)
    if volumes_path:
        write_volumes_csv(volumes_path, records, protocol)
        report(f"volumes of {len(records)} scans: {volumes_path}")
    if qc_path:
        write_qc_csv(qc_path, records)
        flagged = sum(1 for r in records if r.get("qc", {}).get("flag") == "check")
        report(f"QC of {len(records)} scans ({flagged} to check): {qc_path}")
    if report_dir:
        from ltnet_keras.inference.report import write_index
        index = write_index(report_dir, records, protocol)
        report(f"report of {len(records)} scans: {index}")
    return records


def output_name(image_path, paths) -> str:
    """The base name a scan's outputs share (its label map's name without the suffix)."""
    from ltnet_keras.data.io import output_suffix
    return paths["labels"].name[:-len(output_suffix(image_path))]


class ScanOutputs:
    """Per-scan record (and picture) writer, then the tables and report, for ``ltnet segment``
    with ``--volumes``, ``--qc`` or ``--report``. ``qc_model``: needed for ``--qc`` (its
    predictions also order the report)."""

    def __init__(self, out_dir, protocol, volumes_path=None, qc_path=None, report_dir=None,
                 qc_model: Optional[QCModel] = None):
        self.out_dir, self.protocol = Path(out_dir), protocol
        self.volumes_path, self.qc_path, self.report_dir = volumes_path, qc_path, report_dir
        self.qc_model = qc_model

    @property
    def wanted(self) -> bool:
        return bool(self.volumes_path or self.qc_path or self.report_dir)

    def write(self, image_path, paths, result) -> None:
        """Record (and with a report, picture: the labels over the scan as given, a whole
        head included) of one segmented scan."""
        name = output_name(image_path, paths)
        record = scan_record(result, name, image_path, self.protocol, self.qc_model)
        if self.report_dir:
            from ltnet_keras.data.io import load_image
            from ltnet_keras.inference.report import write_scan_picture
            scan = load_image(image_path)
            qc = record.get("qc")
            caption = (f"QC {qc['flag']}, predicted Dice {100 * qc['predicted_dice']:.1f}"
                       if qc else "")
            write_scan_picture(self.report_dir, name, scan.array, scan.affine, result.labels,
                               self.protocol, caption)
        write_record(self.out_dir, name, record)

    def fill_missing(self, images, plans) -> int:
        """Records for label maps segmented without one (an earlier run without --volumes):
        volumes read back from the label map, no QC (its signals are gone). Returns how
        many were written."""
        from ltnet_keras.data.grids import voxel_sizes
        from ltnet_keras.data.io import load_label_map
        written = 0
        for image, paths in zip(images, plans):
            name = output_name(image, paths)
            if paths["labels"].exists() and not record_path(self.out_dir, name).exists():
                labels = load_label_map(paths["labels"])
                write_record(self.out_dir, name, {
                    "subject": name, "image": str(image), "signals": {}, "brain": {},
                    "volumes": label_volumes(labels.array, voxel_sizes(labels.affine),
                                             self.protocol)})
                written += 1
        return written

    def rebuild(self, images, plans, report=print) -> List[dict]:
        names = [output_name(i, p) for i, p in zip(images, plans)]
        return rebuild_tables(self.out_dir, names, self.protocol, self.volumes_path,
                              self.qc_path, self.report_dir, report)
