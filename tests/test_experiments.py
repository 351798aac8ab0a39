"""The table experiments: configs match the paper's rows, fusion, and one tiny table end to end."""
import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ltnet_keras.config import config_from_dict, load_config, save_config
from ltnet_keras.evaluation import SubjectScores, write_scores_csv

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import common  # noqa: E402  (experiments/common.py, imported the way the scripts import it)

CONFIGS = sorted((EXPERIMENTS / "configs").glob("table*/*.yaml"))
SCRIPTS = ["table1_forward_backward.py", "table2_ablation.py", "table3_multi_atlas.py",
           "table4_structures.py", "table5_sota.py"]
# Loss terms switched on in each row of Tables 1-2 (Eq. 11).
ACTIVE_TERMS = {
    "voxelmorph": {"sim", "smooth"},
    "gan": {"gan", "sim", "smooth"},
    "gan_cyc": {"gan", "sim", "smooth", "cyc"},
    "trans": {"gan", "sim", "smooth", "cyc", "trans"},
    "anatomy": {"gan", "sim", "smooth", "cyc", "anatomy_cyc"},
    "trans_anatomy": {"gan", "sim", "smooth", "cyc", "trans", "anatomy_cyc"},
    "ltnet": {"gan", "sim", "smooth", "cyc", "trans", "anatomy_cyc", "diff_cyc"},
}
# 2 steps: enough to write every file of a finished run; no assertion reads what it learned.
TINY = {"train.steps": 2, "train.log_every": 2, "train.checkpoint_every": 2,
        "data.crop_shape": [128, 192, 128],
        "data.factor": 4, "data.train_subjects": ["S11", "S12"], "data.val_subjects": ["S13"],
        "data.atlas": "S11"}


def test_there_is_one_config_per_row_of_every_table():
    for table, rows in common.TABLE_ROWS.items():
        stems = sorted(p.stem for p in (EXPERIMENTS / "configs" / table).glob("*.yaml"))
        assert stems == sorted(rows), table
    assert len(CONFIGS) == sum(len(rows) for rows in common.TABLE_ROWS.values())


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in ("table1", "table2")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_loads_with_its_preset_and_the_default_protocol(path):
    """Tables 1-2 (Table 5's configs: tests/test_segnet.py; Table 3's: tests/test_multi_atlas.py)."""
    config = load_config(path)
    assert config.preset == path.stem
    assert config.name == f"{path.parent.name}_{path.stem}"
    assert set(t for t, w in config.weights.terms().items() if w > 0) == ACTIVE_TERMS[path.stem]
    assert config.data.atlas == "auto"
    assert config.data.train_subjects == [f"S{i}" for i in range(11, 31)]
    assert config.data.val_subjects == [f"S{i}" for i in range(31, 41)]
    assert not set(config.data.train_subjects) & set(config.data.val_subjects)
    train = config.train
    # The recipe search's protocol, so that its finished runs can be reused (--runs).
    assert config.data.crop_shape == (128, 192, 128) and config.data.factor == 4
    assert config.data.network_shape == (32, 48, 32)
    assert (train.steps, train.log_every, train.checkpoint_every, train.seed) == (500, 20, 100, 0)
    assert train.log_grad_norms


@pytest.mark.parametrize("table, row, search", [
    ("table1", "voxelmorph", "00_vm_twin_500.yaml"), ("table2", "ltnet", "02_paper.yaml")])
def test_table_rows_differ_from_their_search_setting_only_in_name(table, row, search):
    """So ``--runs voxelmorph=runs/recipe_search/vm_twin_500`` reuses the search's run as is."""
    ours = load_config(EXPERIMENTS / "configs" / table / f"{row}.yaml")
    theirs = load_config(EXPERIMENTS / "configs" / "recipe" / search)
    assert common.config_differences(ours, theirs, ignore=()) == [
        f"name: {ours.name!r} != {theirs.name!r}"]
    assert common.config_differences(ours, theirs) == []


def test_tables_1_and_2_have_exactly_the_papers_rows_in_order():
    assert list(common.TABLE_ROWS["table1"]) == ["voxelmorph", "gan", "gan_cyc"]
    assert list(common.TABLE_ROWS["table2"]) == ["gan_cyc", "trans", "anatomy", "trans_anatomy",
                                                 "ltnet"]
    for table in ("table1", "table2"):
        paper_rows = [paper for _, paper in common.TABLE_ROWS[table].values()]
        assert paper_rows == list(common.PAPER_REFERENCE[table])
    # Table 2's baseline is Table 1's last row, in the paper and here.
    assert common.PAPER_REFERENCE["table2"]["Baseline"] == \
        common.PAPER_REFERENCE["table1"]["+ L_GAN + L_cyc"]
    t1 = load_config(EXPERIMENTS / "configs/table1/gan_cyc.yaml")
    t2 = load_config(EXPERIMENTS / "configs/table2/gan_cyc.yaml")
    assert t1.weights == t2.weights


def test_paper_reference_numbers_are_consistent():
    for table, rows in common.PAPER_REFERENCE.items():
        for name, (mean, std, low, high) in rows.items():
            assert low <= mean <= high and std > 0, (table, name)
    table4 = common.PAPER_TABLE4
    assert all(len(v) == len(table4["structures"]) for v in table4["rows"].values())
    assert set(common.SHARED_STRUCTURES.values()) <= set(table4["structures"])
    for table in ("table3", "table5"):
        for _, paper in common.TABLE_ROWS[table].values():
            assert paper in common.PAPER_REFERENCE.get(table, table4["rows"])


def test_majority_vote_hand_computed():
    a = np.array([0, 1, 2, 2, 5])
    b = np.array([0, 2, 2, 1, 7])
    c = np.array([1, 1, 2, 3, 7])
    # voxel 0: 0,0,1 -> 0; 1: 1,2,1 -> 1; 2: unanimous 2; 3: 2,1,3 all tied -> first map (2);
    # voxel 4: 5,7,7 -> 7.
    np.testing.assert_array_equal(common.majority_vote([a, b, c]), [0, 1, 2, 2, 7])
    # The order of the maps is the tie-break priority.
    np.testing.assert_array_equal(common.majority_vote([c, b, a]), [0, 1, 2, 3, 7])
    np.testing.assert_array_equal(common.majority_vote([b, a]), b)
    np.testing.assert_array_equal(common.majority_vote([a]), a)


def test_majority_vote_3d_dtype_and_errors():
    maps = [np.full((2, 2, 2), v, dtype=np.uint8) for v in (3, 4, 4, 3, 3)]
    fused = common.majority_vote(maps)
    assert fused.dtype == np.uint8 and fused.shape == (2, 2, 2) and (fused == 3).all()
    with pytest.raises(ValueError):
        common.majority_vote([])
    with pytest.raises(ValueError):
        common.majority_vote([np.zeros(3), np.zeros(4)])


def test_overrides_from_arguments():
    parser = common.build_parser("table1", "test")
    args = parser.parse_args(["--smoke", "--steps", "20", "--data", "/x",
                              "--set", "data.val_subjects=[S31, S32]", "--set", "train.seed=3"])
    overrides = common.overrides_from_args(args)
    assert overrides["train.steps"] == 20 and overrides["data.root"] == "/x"
    assert overrides["data.val_subjects"] == ["S31", "S32"] and overrides["train.seed"] == 3
    assert overrides["data.factor"] == 4
    config, = common.load_rows(common.config_paths("table1", ["gan"]), overrides).values()
    assert config.train.steps == 20 and config.data.network_shape == (32, 48, 32)
    with pytest.raises(SystemExit):
        common.config_paths("table1", ["ltnet"])
    with pytest.raises(SystemExit):
        common.parse_set(["no_equals_sign"])


# ----------------------------------------------------------------------------- Tables 1-2 twice

HAND_RECIPE = config_from_dict({
    "name": "hand", "preset": "ltnet",
    "weights": {"gan": 0.1, "sim": 2.0, "cyc": 0.5, "smooth": 0.7, "trans": 0.2,
                "anatomy_cyc": 0.3, "diff_cyc": 0.4, "ncc_window": 7},
    "penalties": {"cyc_eps": 0.02, "trans_eps": 0.5, "diff_eps": 0.05,
                  "reconstruction": "composed"},
    "train": {"steps": 40, "seed": 5}})


def test_recipe_variant_by_hand_on_two_rows():
    gan = load_config(EXPERIMENTS / "configs/table1/gan.yaml")
    trans_anatomy = load_config(EXPERIMENTS / "configs/table2/trans_anatomy.yaml")
    variant = common.recipe_variant(gan, HAND_RECIPE)
    # On in the row (gan 1, sim 1, smooth 3): the recipe's weight; off in the row: stays 0.
    assert dataclasses.asdict(variant.weights) == dict(
        gan=0.1, sim=2.0, cyc=0.0, smooth=0.7, trans=0.0, anatomy_cyc=0.0, diff_cyc=0.0,
        inverse_sim=0.0, inverse_trans=0.0, ncc_window=7)
    assert variant.penalties == HAND_RECIPE.penalties
    assert variant.name == "table1_gan_recipe" and variant.preset == "gan"
    assert variant.data == gan.data and variant.train == gan.train  # the row's protocol
    assert gan.weights.gan == 1.0 and gan.penalties.trans_eps == 0.001  # the row is untouched
    variant = common.recipe_variant(trans_anatomy, HAND_RECIPE)
    assert dataclasses.asdict(variant.weights) == dict(
        gan=0.1, sim=2.0, cyc=0.5, smooth=0.7, trans=0.2, anatomy_cyc=0.3, diff_cyc=0.0,
        inverse_sim=0.0, inverse_trans=0.0, ncc_window=7)
    # A term the recipe switches off is off in every variant, and the table says so.
    no_gan = dataclasses.replace(HAND_RECIPE,
                                 weights=dataclasses.replace(HAND_RECIPE.weights, gan=0.0))
    assert common.recipe_variant(gan, no_gan).weights.gan == 0.0
    assert common.switched_off_by_recipe(gan, no_gan) == ["gan"]
    assert common.switched_off_by_recipe(gan, HAND_RECIPE) == []
    # Only weights and penalties are carried over; other recipe settings are named.
    assert common.ignored_recipe_settings(HAND_RECIPE) == []
    resample = load_config(EXPERIMENTS / "configs/recipe/26_composed_gan0.1_resample.yaml")
    assert common.ignored_recipe_settings(resample) == ["train.discriminator_resample_real=True"]


def test_twin_rows_share_voxelmorph_and_get_their_own_run_dirs(tmp_path):
    paper = common.load_rows(common.config_paths("table1"))
    stand_in = load_config(common.STAND_IN_RECIPE)
    configs = common.twin_configs(paper, stand_in)
    assert list(configs) == ["voxelmorph", "gan", "gan_cyc", "gan@recipe", "gan_cyc@recipe"]
    assert common.run_dir_for(tmp_path, "gan_cyc@recipe") == tmp_path / "recipe" / "gan_cyc"
    assert common.run_dir_for(tmp_path, "gan_cyc") == tmp_path / "gan_cyc"
    # The stand-in switches the GAN off (and smooth = 1): '+ L_GAN' with its weights trains
    # exactly like VoxelMorph, so the two share one run.
    assert common.training_key(configs["gan@recipe"]) == common.training_key(configs["voxelmorph"])
    assert common.training_key(configs["gan_cyc@recipe"]) != common.training_key(configs["gan_cyc"])
    # With a cycle term on, the penalties are part of the training.
    other = dataclasses.replace(configs["gan_cyc"], penalties=stand_in.penalties)
    assert common.training_key(other) != common.training_key(configs["gan_cyc"])


def test_parse_runs_accepts_recipe_keys():
    runs = common.parse_runs(["gan_cyc@recipe=a/b", "voxelmorph=c"], "table1",
                             (common.RECIPE_SUFFIX,))
    assert runs == {"gan_cyc@recipe": Path("a/b"), "voxelmorph": Path("c")}
    with pytest.raises(SystemExit):
        common.parse_runs(["gan_cyc@recipe=a"], "table1")
    with pytest.raises(SystemExit):
        common.parse_runs(["ltnet=a"], "table1", (common.RECIPE_SUFFIX,))


def test_resolve_recipe_falls_back_to_the_stand_in(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "DEFAULT_RECIPE", common.CONFIG_DIR / "no_such_recipe.yaml")
    assert common.resolve_recipe(None) == common.STAND_IN_RECIPE
    assert "does not exist yet" in capsys.readouterr().out
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: ltnet\n")
    assert common.resolve_recipe(mine) == mine
    with pytest.raises(SystemExit, match="no such file"):
        common.resolve_recipe(tmp_path / "nope.yaml")


def test_read_back_of_a_finished_run_named_differently(tmp_path):
    """A recipe-search run (other name, ``scores_<name>_<interp>.csv``) is read back as a row's
    finished run; any other config difference, stale scores or missing subjects are not."""
    row = common.load_rows(common.config_paths("table1", ["voxelmorph"]))["voxelmorph"]
    run = tmp_path / "vm_twin_500"
    save_config(dataclasses.replace(row, name="vm_twin_500"), run / "config.yaml")
    (run / "forward_generator.h5").write_bytes(b"weights")
    os.utime(run / "forward_generator.h5", (1_000_000, 1_000_000))
    scores_path = run / "scores_vm_twin_500_linear.csv"
    write_scores_csv([SubjectScores(s, structures={"caudate": 0.5})
                      for s in row.data.val_subjects], scores_path)
    assert common._current_scores(run, row) == scores_path
    read = common.train_and_score(row, run)  # read back: nothing is trained
    assert [s.subject for s in read] == row.data.val_subjects
    longer = dataclasses.replace(row, train=dataclasses.replace(row.train, steps=1000))
    assert common._current_scores(run, longer) is None
    fewer = dataclasses.replace(row, data=dataclasses.replace(row.data, val_subjects=["S31"]))
    assert common._current_scores(run, fewer) is None
    os.utime(scores_path, (1, 1))  # scores older than the weights: stale
    assert common._current_scores(run, row) is None


def _table_lines(markdown):
    return [line for line in markdown.splitlines() if line.startswith("| ")]


@pytest.mark.slow
def test_table1_twice_end_to_end_then_reused(lpba40_root, tmp_path, capsys):
    import table1_forward_backward
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: ltnet\nweights: {gan: 0.5, smooth: 1.0, cyc: 1.0, trans: 0.3}\n"
                      "penalties: {trans_eps: 0.5}\n")
    out = tmp_path / "table1"
    argv = ["--smoke", "--rows", "gan", "--recipe", str(recipe), "--out", str(out),
            "--verbose", "0", "--steps", "2", "--set", "train.log_every=2", "--set",
            "train.checkpoint_every=2"]  # 2 steps per row: nothing here reads what they learned
    result = table1_forward_backward.main(argv)
    assert list(result.scores) == ["gan", "gan@recipe"]
    weights = result.configs["gan@recipe"].weights
    assert (weights.gan, weights.smooth, weights.cyc) == (0.5, 1.0, 0.0)
    assert (out / "recipe" / "gan" / "forward_generator.h5").exists()
    markdown = (out / "table1.md").read_text()
    header, *body = _table_lines(markdown)
    assert "paper weights: Mean (std)" in header and "recipe weights: Mean (std)" in header
    assert [line.split("|")[1].strip() for line in body] == [common.NO_REGISTRATION, "+ L_GAN"]
    assert "79.0 (3.1)" in body[1]  # the paper's '+ L_GAN' beside both of ours
    subjects = list(csv.DictReader(open(out / "table1_subjects.csv")))
    assert [(r["row"], r["variant"], r["subject"]) for r in subjects] == [
        (common.NO_REGISTRATION, "", "S13"), ("+ L_GAN", "paper weights", "S13"),
        ("+ L_GAN", "recipe weights", "S13")]
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["recipe"]["path"] == str(recipe)
    assert list(provenance["configs"]) == ["gan", "gan@recipe"]
    capsys.readouterr()
    # Again, the recipe row given with --runs: nothing trains, the numbers are the same.
    again = table1_forward_backward.main(argv + ["--runs", f"gan@recipe={out / 'recipe' / 'gan'}"])
    printed = capsys.readouterr().out
    assert "[table1_gan] finished and scored" in printed and "reusing finished run" in printed
    assert again.reuse == {"gan@recipe": {"run": str(out / "recipe" / "gan"), "differences": []}}
    assert again.scores["gan@recipe"][0].structures == result.scores["gan@recipe"][0].structures


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    out = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout and "--steps" in out.stdout


@pytest.fixture(scope="module")
def tiny_table(lpba40_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("table1")
    paths = common.config_paths("table1", ["voxelmorph"])
    result = common.run_table("table1", paths, out, TINY, verbose=0)
    return out, result


@pytest.mark.slow
def test_run_table_one_row_writes_table_and_provenance(tiny_table, capsys):
    out, result = tiny_table
    markdown = (out / "table1.md").read_text()
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    methods = [line.split("|")[1].strip() for line in lines[1:]]
    assert methods == [common.NO_REGISTRATION, "VoxelMorph"]
    assert "76.0 (9.7)" in markdown  # the paper's VoxelMorph row beside ours
    csv_rows = (out / "table1.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("method,level,n,mean")
    subjects = (out / "table1_subjects.csv").read_text().splitlines()
    assert subjects[0].startswith("row,variant,subject,mean_dice") and len(subjects) == 3
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((out / "provenance.json").read_text())
    for key in ("configs", "git_commit", "packages", "seeds", "date", "overrides"):
        assert key in provenance
    assert provenance["configs"]["voxelmorph"]["train"]["steps"] == 2
    assert provenance["seeds"] == {"voxelmorph": 0}
    # the row's training wall time, from its run directory's clock, in provenance and notes
    seconds = provenance["train_seconds"]["voxelmorph"]
    assert seconds == json.loads((out / "voxelmorph" / "train_seconds.json").read_text())["seconds"]
    assert seconds > 0
    assert f"'VoxelMorph' {seconds / 60:.1f}" in markdown
    assert [s.subject for s in result.scores["voxelmorph"]] == ["S13"]
    # A second call finds the run finished and scored, and reads it back.
    again = common.run_table("table1", common.config_paths("table1", ["voxelmorph"]), out, TINY,
                             verbose=0)
    assert "finished and scored" in capsys.readouterr().out
    assert again.scores["voxelmorph"][0].structures == result.scores["voxelmorph"][0].structures


@pytest.mark.slow
def test_multi_atlas_with_one_atlas_is_the_single_atlas_segmentation(tiny_table):
    out, result = tiny_table
    config, run_dir = result.configs["voxelmorph"], result.run_dirs["voxelmorph"]
    scores, atlases, seconds = common.multi_atlas_scores(run_dir, config, [1, 2, 3])
    assert atlases == ["S11", "S12"] and list(scores) == [1, 2] and seconds > 0
    single, = result.scores["voxelmorph"]
    assert scores[1][0].mean_structure == pytest.approx(single.mean_structure, abs=1e-6)
    assert 0 < scores[2][0].mean_structure <= 1


RECIPE_CONFIGS = sorted((EXPERIMENTS / "configs" / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: p.stem)
def test_recipe_settings_share_one_protocol(path):
    """Issue 6: same grid, atlas rule, subjects, seed and diagnostics in every setting; a
    setting that starts from another run names a folder that holds one."""
    config = load_config(path)
    assert config.data.network_shape == (32, 48, 32) and config.data.atlas == "auto"
    assert config.data.train_subjects == [f"S{i}" for i in range(11, 31)]
    assert config.data.val_subjects == [f"S{i}" for i in range(31, 41)]
    assert config.train.seed == 0 and config.train.log_grad_norms
    assert config.train.steps in (500, 1000)
    if config.train.init_from:
        source = EXPERIMENTS.parent / config.train.init_from
        assert (source / "forward_generator.h5").exists() and (source / "config.yaml").exists()
    names = [load_config(p).name for p in RECIPE_CONFIGS]
    assert len(set(names)) == len(names)


class _Parsed(Exception):
    """Raised instead of running a script once its arguments are parsed."""


_PARSE_ARGS = common.ExperimentParser.parse_args


def _parsed_outputs(script, argv, monkeypatch):
    """The output folders ``experiments/<script>.py`` would use for ``argv``, and their
    defaults, read off its real parser (the script stops right after parsing)."""
    import importlib
    seen = {}

    def parse_and_stop(self, args=None, namespace=None):
        seen["parser"], seen["args"] = self, _PARSE_ARGS(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(common.ExperimentParser, "parse_args", parse_and_stop)
    with pytest.raises(_Parsed):
        importlib.import_module(script).main(argv)
    dests = seen["parser"].output_defaults
    return {d: getattr(seen["args"], d) for d in dests}, dests


@pytest.mark.parametrize("script", ["recipe_search", "recipe_ship", "table1_forward_backward",
                                    "table2_ablation", "table3_multi_atlas",
                                    "table4_structures", "table5_sota"])
def test_smoke_writes_apart_from_real_runs_and_results(script, monkeypatch, tmp_path):
    smoke, defaults = _parsed_outputs(script, ["--smoke"], monkeypatch)
    assert "out" in smoke
    for dest, path in smoke.items():
        assert path.parent == common.SMOKE_ROOT / path.parent.name and path.name == dest
        assert defaults[dest] != path and common.SMOKE_ROOT not in defaults[dest].parents
    real, _ = _parsed_outputs(script, [], monkeypatch)
    assert real == defaults
    given, _ = _parsed_outputs(script, ["--smoke", "--out", str(tmp_path)], monkeypatch)
    assert given["out"] == tmp_path
