#!/usr/bin/env python3
"""Compile every cuda_kernels/*.cu to PTX for a GPU architecture; exit 1 on any error.

This is how a broken kernel source is caught without a GPU. Backends, in order (``auto``):
``nvcc --ptx`` when nvcc is on PATH, else NVRTC (the library CuPy compiles with at run time)
loaded with ctypes from the pip wheel ``nvidia-cuda-nvrtc`` (or a system libnvrtc). No GPU or
driver is needed for either. Each file is compiled with ``-I<its directory>`` and ``-std=c++17``,
as runtime/kernels/cuda_ops.py does.

    python scripts/check_cuda_sources.py                 # all of cuda_kernels/, auto backend
    python scripts/check_cuda_sources.py --backend nvrtc  # force NVRTC
    python scripts/check_cuda_sources.py path/to/x.cu     # particular files
    python scripts/check_cuda_sources.py --ptx-dir out/   # keep the PTX

Exit status: 0 all compiled; 1 a file failed (its name and the compiler's message are printed)
or no compiler was found; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "cuda_kernels"
STD = "-std=c++17"


class CompilerMissing(RuntimeError):
    pass


def _nvcc_compile(nvcc: str, path: Path, arch: str, ptx_out: Path | None = None) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (path.stem + ".ptx")
        cmd = [nvcc, "--ptx", f"-arch={arch}", STD, f"-I{path.parent}", str(path), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        msg = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or not out.is_file():
            return False, msg or f"nvcc exited {proc.returncode}"
        if ptx_out is not None:
            shutil.copyfile(out, ptx_out)
        return True, msg


def _find_libnvrtc() -> str | None:
    """libnvrtc from a pip wheel on sys.path (nvidia/cu13/lib, nvidia/cuda_nvrtc/lib), else the system."""
    patterns = ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/lib64/libnvrtc.so*")
    for base in [p for p in sys.path if p and os.path.isdir(p)]:
        for pat in patterns:
            hits = sorted(h for h in glob.glob(os.path.join(base, pat)) if "builtins" not in os.path.basename(h))
            if hits:
                return hits[-1]
    for cand in ("/usr/local/cuda/lib64/libnvrtc.so", "libnvrtc.so"):
        try:
            ctypes.CDLL(cand)
            return cand
        except OSError:
            continue
    return None


class Nvrtc:
    def __init__(self, lib_path: str):
        self.path = lib_path
        self.lib = ctypes.CDLL(lib_path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"{major.value}.{minor.value}"

    def _err(self, code: int) -> str:
        return self.lib.nvrtcGetErrorString(code).decode(errors="replace")

    def compile(self, path: Path, arch: str, ptx_out: Path | None = None) -> tuple[bool, str]:
        lib = self.lib
        prog = ctypes.c_void_p()
        src = path.read_bytes()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.name.encode(), 0, None, None)
        if rc != 0:
            return False, f"nvrtcCreateProgram: {self._err(rc)}"
        try:
            opts = [f"--gpu-architecture={arch}", STD, f"-I{path.parent}"]
            arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(max(size.value, 1))
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                return False, f"{self._err(rc)}\n{log}".strip()
            ptx_size = ctypes.c_size_t()
            lib.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size))
            if ptx_size.value <= 1:
                return False, "NVRTC produced no PTX"
            if ptx_out is not None:
                ptx = ctypes.create_string_buffer(ptx_size.value)
                lib.nvrtcGetPTX(prog, ptx)
                ptx_out.write_bytes(ptx.value)
            return True, log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def make_backend(name: str):
    """Return (label, compile(path, arch, ptx_out=None) -> (ok, message)); raise CompilerMissing if none."""
    if name in ("auto", "nvcc"):
        nvcc = shutil.which("nvcc")
        if nvcc:
            return f"nvcc ({nvcc})", lambda p, a, out=None: _nvcc_compile(nvcc, p, a, out)
        if name == "nvcc":
            raise CompilerMissing("nvcc is not on PATH")
    lib = _find_libnvrtc()
    if lib is None:
        raise CompilerMissing(
            "no CUDA compiler found: put nvcc on PATH, or `pip install nvidia-cuda-nvrtc` "
            "(the NVRTC library CuPy uses) into this environment"
        )
    try:
        nvrtc = Nvrtc(lib)
    except OSError as exc:
        raise CompilerMissing(f"could not load NVRTC from {lib}: {exc}") from exc
    return f"NVRTC {nvrtc.version} ({lib})", nvrtc.compile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="*.cu files (default: every cuda_kernels/*.cu)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="directory of *.cu files (default %(default)s)")
    ap.add_argument("--backend", choices=("auto", "nvcc", "nvrtc"), default="auto")
    ap.add_argument("--arch", default="compute_90", help="virtual architecture (default %(default)s)")
    ap.add_argument("--ptx-dir", type=Path, default=None, help="also write each <name>.ptx into this directory")
    args = ap.parse_args(argv)

    files = list(args.files) or sorted(Path(args.dir).glob("*.cu"))
    if not files:
        print(f"error: no *.cu files in {args.dir}", file=sys.stderr)
        return 1
    missing = [f for f in files if not f.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    try:
        label, compile_one = make_backend(args.backend)
    except CompilerMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"compiling {len(files)} CUDA source(s) to PTX for {args.arch} with {label}")
    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for path in files:
        ptx_out = args.ptx_dir / f"{path.stem}.ptx" if args.ptx_dir is not None else None
        ok, msg = compile_one(path.resolve(), args.arch, ptx_out)
        if ok:
            print(f"  ok    {path.name}" + (f"\n{msg}" if msg else ""))
        else:
            failed.append(path)
            print(f"  FAIL  {path}\n{msg}\n", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(files)} failed: {', '.join(p.name for p in failed)}", file=sys.stderr)
        return 1
    print(f"all {len(files)} compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
