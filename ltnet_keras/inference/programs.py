"""Traced programs kept on disk, so that a fresh process does not trace them in Python again.

:func:`stored_program` wraps a ``tf.function``. Called eagerly, it runs
the program traced for the call's signature: from this process' memory; else from the store
(a ``FunctionDef`` an earlier process wrote, registered with TensorFlow's runtime and called by
name, as a ``ConcreteFunction`` calls its own); else traced now and written to the store. The
XLA programs themselves come from TensorFlow's persistent XLA cache (:mod:`ltnet_keras._compat`),
which keys a program by its function's name: a stored program keeps one name, derived from its
key, in every process. Tracing the 26 programs of one refinement and label transfer took
0.72 s of a fresh ``ltnet segment`` (issue 28); reading and registering them takes ~10 ms.

A key holds the function's module and name, each tensor argument's dtype and shape, each other
argument's value (a Python value is part of the program), TensorFlow's version and a digest of
the package's source files: a new version, an edited source or a new shape never runs a stale
program. Files are written whole (a temporary file, then a rename), so processes may share a
store; an unreadable file is traced again and replaced. The store is the ``programs`` folder
of the XLA cache (``ltnet cache --clear`` removes both; ``LTNET_XLA_CACHE=off``: memory only).
Programs that capture tensors, call other functions, or take arguments other than tensors,
arrays and plain Python values are traced as usual. A network's forward pass is stored with its
weights as constants (``freeze``) under a key that holds their digest: a fresh process then
neither imports voxelmorph nor builds the network (0.45 s of ``ltnet segment``).
"""
import contextlib
import functools
import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.framework import function_pb2
from tensorflow.python.eager import context

__all__ = ["compiled", "stored_program", "program_store", "source_digest", "file_digest"]

_PLAIN = (bool, int, float, str, type(None))


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """SHA-256 over the package's ``.py`` files (their paths within it and their bytes)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(tf.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def file_digest(path) -> str:
    """SHA-256 of a file's bytes (a network's weights, for :func:`stored_program`'s ``salt``)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def program_store() -> Optional[Path]:
    """The folder stored programs are kept in (None: the XLA cache is off)."""
    return _store_for(os.environ.get("LTNET_XLA_CACHE", ""))


@functools.lru_cache(maxsize=None)
def _store_for(setting: str) -> Optional[Path]:
    from ltnet_keras._compat import xla_cache_dir   # reads the installed versions: ~2 ms
    folder = xla_cache_dir()
    return None if folder is None else folder / "programs"


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _signature(args):
    """``(key parts, tensor inputs)`` of a call, or None when an argument is not storable."""
    parts, inputs = [], []
    for value in args:
        if isinstance(value, (tf.Tensor, np.ndarray, np.generic)):
            tensor = value if isinstance(value, tf.Tensor) else tf.convert_to_tensor(value)
            parts.append(("tensor", tensor.dtype.name, tuple(tensor.shape)))
            inputs.append(tensor)
        elif _plain(value):
            parts.append(("value", repr(value)))
        else:
            return None
    return parts, inputs


class _Program:
    """One traced program: its runtime name, how many outputs, and whether it returns one."""

    def __init__(self, name: str, outputs: int, single: bool):
        self.name, self.outputs, self.single = name, outputs, single

    def __call__(self, inputs):
        flat = context.context().call_function(self.name.encode(), inputs, self.outputs)
        return flat[0] if self.single else tuple(flat)


def _register(definition: function_pb2.FunctionDef) -> None:
    ctx = context.context()
    if not ctx.has_function(definition.signature.name):
        ctx.add_function_def(definition)


def _read(path: Path) -> Optional[_Program]:
    try:
        data = path.read_bytes()
        (length,) = struct.unpack("<I", data[:4])
        header = json.loads(data[4:4 + length])
        definition = function_pb2.FunctionDef.FromString(data[4 + length:])
        program = _Program(definition.signature.name, int(header["outputs"]),
                           bool(header["single"]))
        if (len(definition.signature.output_arg) != program.outputs
                or len(definition.signature.input_arg) != int(header["inputs"])):
            return None
    except (OSError, ValueError, KeyError, struct.error, DecodeError):
        return None   # a damaged file: traced again and replaced
    _register(definition)
    return program


def _write(path: Path, definition: function_pb2.FunctionDef, program: _Program) -> None:
    header = json.dumps({"outputs": program.outputs, "single": program.single,
                         "inputs": len(definition.signature.input_arg)}).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    except OSError:   # a read-only store: the program still runs, from memory
        return
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(struct.pack("<I", len(header)) + header + definition.SerializeToString())
        os.replace(temporary, path)
    except OSError:   # a full disk: likewise
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _trace(function, args, inputs, name: str, freeze: bool
           ) -> Optional[Tuple[_Program, function_pb2.FunctionDef]]:
    """Trace ``function`` for ``args`` (``freeze``: its variables made constants); its
    definition renamed ``name``, or None when it is not self-contained (captures, nested
    functions) or its inputs are not ``inputs``."""
    concrete = function.get_concrete_function(*args)
    outputs = concrete.structured_outputs
    if freeze:
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2)
        concrete = convert_variables_to_constants_v2(concrete)
    single = isinstance(outputs, tf.Tensor)
    flat = [outputs] if single else list(outputs) if isinstance(outputs, tuple) else None
    definition = function_pb2.FunctionDef()
    definition.CopyFrom(concrete.function_def)
    if (flat is None or not all(isinstance(t, tf.Tensor) for t in flat)
            or concrete.captured_inputs
            or len(definition.signature.input_arg) != len(inputs)
            or concrete.graph.as_graph_def().library.function):
        return None
    definition.signature.name = name
    _register(definition)
    return _Program(name, len(flat), single), definition


def stored_program(function, freeze: bool = False, salt: str = "") -> Callable:
    """``function`` (a ``tf.function``) with its traced programs kept in memory and on disk
    (module docstring). In a graph (inside another trace) it is ``function`` itself.

    ``freeze``: the variables it reads (a network's weights) are stored as constants, so a
    later process runs it without building the network; ``salt`` must then name their values
    (e.g. a digest of the weights file), as it joins the key.
    """
    where = (f"{function.python_function.__module__}.{function.python_function.__qualname__}"
             f"|{salt}")
    programs = {}

    @functools.wraps(function.python_function)
    def call(*args):
        signature = _signature(args) if tf.executing_eagerly() else None
        if signature is None:
            return function(*args)
        parts, inputs = signature
        key = repr((where, parts))
        program = programs.get(key)
        if program is None:
            digest = hashlib.sha256(f"{source_digest()}|{key}".encode()).hexdigest()[:24]
            name = re.sub(r"\W", "_", f"ltnet_{function.python_function.__name__}_{digest}")
            store = program_store()
            path = None if store is None else store / f"{name}.pb"
            program = _read(path) if path is not None and path.is_file() else None
            if program is None:
                traced = _trace(function, args, inputs, name, freeze)
                if traced is None:
                    programs[key] = False
                    return function(*args)
                program, definition = traced
                if path is not None:
                    _write(path, definition, program)
            programs[key] = program
        if program is False:
            return function(*args)
        return program(inputs)

    return call


def compiled(fn) -> Callable:
    """``fn`` as one XLA program per signature (``tf.function(jit_compile=True)``, no
    AutoGraph: Python control flow runs at trace time), stored (:func:`stored_program`)."""
    return stored_program(tf.function(fn, jit_compile=True, autograph=False))
