"""The floor every method must beat: atlas labels with no registration (LPBA40 is affinely
pre-aligned, so this is the "affine only" baseline), at full resolution and on the network
grid of a config.

    python experiments/baseline_no_registration.py --config experiments/configs/demo.yaml \\
        --atlas S01 --out results/baseline
"""
import argparse
import sys
from pathlib import Path

import ltnet_keras  # noqa: F401
from ltnet_keras import evaluation
from ltnet_keras.config import load_config
from ltnet_keras.data.dataset import resolve_atlas
from ltnet_keras.data.io import find_subjects
from ltnet_keras.study.experiment import no_registration_scores, report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_provenance  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--atlas", help="subject id (default: the config's atlas)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    atlas = args.atlas or resolve_atlas(config.data)
    subjects = [s for s in sorted(find_subjects(config.data.resolved_root())) if s != atlas]
    shape = "x".join(map(str, config.data.network_shape))
    results = {
        "no_registration_full_resolution": no_registration_scores(config, atlas, subjects),
        f"no_registration_{shape}": no_registration_scores(config, atlas, subjects,
                                                           on_network_grid=True)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report(out, results, f"No registration, atlas {atlas}, {len(subjects)} subjects"))
    for method, scores in results.items():
        print(method, "label level:", evaluation.format_summary_table(
            {method: evaluation.summarise(scores, level="label")}).splitlines()[-1])
    write_provenance(out, "baseline", {"baseline": config}, extra={"atlas": atlas})


if __name__ == "__main__":
    main()
