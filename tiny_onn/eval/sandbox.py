"""Where model-generated code runs: a fresh `python -I` in an empty temporary folder, with resource limits and, where the
Linux kernel offers them to an unprivileged process, two isolation layers applied before the code starts:

- a new user + network namespace (`unshare`): the program sees only a loopback device that is down, so no socket of any
  kind reaches another process or host;
- a Landlock ruleset (Linux >= 5.13): the program may read only Python's standard library and the system library folders,
  and read and write only its own temporary folder; with Landlock ABI >= 4 it may not bind or connect TCP sockets, with
  ABI >= 6 not reach abstract unix sockets or signal processes outside the sandbox.

Which layers a run got is measured, not assumed (`sandbox_layers`), recorded in eval.json and logged when one is missing.
This confines mistakes and casual misuse of generated code; it is not a hardened jail (same kernel, no seccomp filter).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

LAYERS = ("resource limits", "network namespace", "landlock filesystem", "landlock tcp", "landlock scope")

# executed first in the child, before any generated code; names start with _tiny_onn_ to stay out of its way
_PRELUDE = textwrap.dedent('''
    import resource as _tiny_onn_resource
    _tiny_onn_resource.setrlimit(_tiny_onn_resource.RLIMIT_AS, ({mem}, {mem}))
    _tiny_onn_resource.setrlimit(_tiny_onn_resource.RLIMIT_CPU, ({cpu}, {cpu}))


    def _tiny_onn_isolate(workdir, read_dirs, read_files):
        import ctypes
        import os

        layers = ["resource limits"]
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return layers
        if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
            layers.append("network namespace")
        abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
        if abi < 1:
            return layers

        class Ruleset(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        fs = (1 << 13) - 1  # execute, write, read, read dir, remove, make char/dir/reg/sock/fifo/block/sym
        fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
        net = 0b11 if abi >= 4 else 0  # bind and connect TCP: handled with no rule, so denied
        scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside the sandbox
        ruleset = libc.syscall(444, ctypes.byref(Ruleset(fs, net, scoped)), ctypes.sizeof(Ruleset), 0)
        if ruleset < 0:
            return layers
        read_only = 1 | 4 | 8  # execute, read file, read dir
        rules = [(workdir, fs)] + [(d, read_only) for d in read_dirs] + [(f, 4) for f in read_files]
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            libc.syscall(445, ruleset, 1, ctypes.byref(PathBeneath(allowed, fd)), 0)  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS, required to restrict an unprivileged process
        if libc.syscall(446, ruleset, 0) == 0:  # landlock_restrict_self
            layers.append("landlock filesystem")
            layers += ["landlock tcp"] if net else []
            layers += ["landlock scope"] if scoped else []
        os.close(ruleset)
        return layers


    _tiny_onn_sandbox = _tiny_onn_isolate({workdir!r}, {read_dirs!r}, {read_files!r})
    del _tiny_onn_isolate, _tiny_onn_resource
''')


def _readable_dirs() -> list[str]:
    """What a sandboxed program may read: the standard library and the folders shared libraries load from."""
    dirs = {sysconfig.get_paths()["stdlib"], *(f"{p}/lib" for p in {sys.base_prefix, sys.base_exec_prefix})}
    dirs |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"}
    return sorted(d for d in dirs if os.path.isdir(d))


def sandboxed_program(code: str, workdir: str, timeout: float, memory_bytes: int) -> str:
    """`code` preceded by the prelude that limits resources and isolates the process."""
    prelude = _PRELUDE.format(mem=memory_bytes, cpu=max(1, int(timeout) + 1), workdir=workdir,
                              read_dirs=_readable_dirs(), read_files=["/etc/ld.so.cache"])
    return prelude + "\n" + code


def run_sandboxed(code: str, timeout: float = 5.0, memory_bytes: int = 1 << 30) -> subprocess.CompletedProcess | None:
    """Run `code` in a fresh, isolated Python subprocess in an empty temporary folder; None if it timed out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(sandboxed_program(code, tmp, timeout, memory_bytes))
        try:
            return subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, text=True,
                                  timeout=timeout, env={"PATH": os.environ.get("PATH", "")})
        except subprocess.TimeoutExpired:
            return None


@functools.cache
def sandbox_layers() -> tuple[str, ...]:
    """The isolation layers a sandboxed program gets on this machine, as measured by running one."""
    proc = run_sandboxed("import json\nprint(json.dumps(_tiny_onn_sandbox))", timeout=30)
    if proc is None or proc.returncode:
        return ()
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))
