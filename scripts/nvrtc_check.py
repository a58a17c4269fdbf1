#!/usr/bin/env python3
"""Compile rendered kernels (kernels-generated/<key>.cu) with NVRTC for an arch and print the
ptxas resource report (registers, spills, shared memory) per file; optionally write the CUBIN.
Usage: scripts/nvrtc_check.py [--arch sm_90a] [--out DIR] FILE.cu...
Needs libnvrtc.so (LD_LIBRARY_PATH or NVRTC_LIB)."""
import ctypes, os, sys, argparse

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="sm_90a")
ap.add_argument("--out")
ap.add_argument("files", nargs="+")
a = ap.parse_args()
lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so.13"))
status = 0
for f in a.files:
    src = open(f, "rb").read()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(f).encode(), 0, None, None) == 0
    opts = [f"--gpu-architecture={a.arch}".encode(), b"-std=c++17", b"-default-device", b"--ptxas-options=-v"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace")
    keep = [l for l in text.splitlines() if rc != 0 or "registers" in l or "spill" in l or "warning" in l.lower()]
    print(f"== {os.path.basename(f)} rc={rc}")
    print("\n".join(keep[:60]))
    if rc != 0:
        status = 1
    elif a.out:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetCUBIN(prog, buf)
        os.makedirs(a.out, exist_ok=True)
        open(os.path.join(a.out, os.path.basename(f)[:-3] + ".cubin"), "wb").write(buf.raw)
sys.exit(status)
