"""The on-disk cache of compiled XLA programs: where it lives, how it is keyed, that TensorFlow
writes to it, and `ltnet cache --clear`."""
import os
import subprocess
import sys

from ltnet_keras import _compat, cli


def test_cache_folder_is_keyed_by_versions_and_cpu_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("LTNET_XLA_CACHE", str(tmp_path))
    folder = _compat.xla_cache_dir()
    assert folder.parent == tmp_path
    assert folder.name.startswith("tf") and "-ltnet" in folder.name
    assert folder.name.endswith(_compat._cpu_key())
    monkeypatch.setenv("LTNET_XLA_CACHE", "off")
    assert _compat.xla_cache_dir() is None


def test_a_new_process_compiles_into_the_cache_and_clear_removes_it(tmp_path, capsys,
                                                                     monkeypatch):
    env = dict(os.environ, LTNET_XLA_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_XLA_FLAGS", None)
    program = ("import ltnet_keras, os, tensorflow as tf\n"
               "print(os.environ['TF_XLA_FLAGS'])\n"
               "f = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * 3.0), jit_compile=True)\n"
               "print(float(f(tf.ones([7, 5]))))\n")
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{_compat.XLA_CACHE_FLAG}={tmp_path}" in done.stdout
    cached = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cached, "TensorFlow wrote no compiled program"
    monkeypatch.setenv("LTNET_XLA_CACHE", str(tmp_path))
    assert cli.main(["cache", "--clear"]) == 0
    assert f"removed {tmp_path}" in capsys.readouterr().out
    assert not tmp_path.exists()


def test_a_damaged_cached_program_is_named_with_the_remedy(tmp_path, capsys, monkeypatch):
    """TensorFlow fails on a truncated cache entry instead of recompiling; `ltnet` says where
    the cache is and how to clear it."""
    monkeypatch.setenv("LTNET_XLA_CACHE", str(tmp_path))

    class OutOfRangeError(Exception):
        pass

    def broken(args):
        raise OutOfRangeError("Read less bytes than requested")
    monkeypatch.setattr(cli, "cmd_cache", broken)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    assert cli.main(["cache"]) == 2
    err = capsys.readouterr().err
    assert "Read less bytes" in err and str(tmp_path) in err and "ltnet cache --clear" in err


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
