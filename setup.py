"""Build and install ser-lightning with its fused attention extension.

The C++ (CPU) kernels are always built. The CUDA kernels are built whenever a CUDA toolkit whose
major version matches ``torch.version.cuda`` is found, also on machines without a GPU.

Build switches (environment variables):

- ``SER_LIGHTNING_CUDA``: ``auto`` (default: build if a matching toolkit is found), ``1`` (require
  the CUDA build; fail if no matching toolkit), ``0`` (CPU only).
- ``CUDA_HOME``: the toolkit to use. When unset it is found from ``nvcc`` on the PATH (which may be a
  symbolic link or a wrapper script: nvcc itself is asked where it lives).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (default: DEFAULT_CUDA_ARCHS that the
  toolkit supports, the newest also as PTX).
- ``MAX_JOBS``: parallel compile jobs (ninja).
- ``CXX``: the C++ compiler (default ``c++``). Optional flags (OpenMP, warning switches) are probed,
  so compilers without OpenMP build a working, serial CPU kernel.

Builds are incremental: objects live in ``build/temp.<platform>-<python>`` and ninja recompiles only
the sources (or headers) that changed, also across ``pip install -e .`` runs.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
# Python 3.10, the cp310 abi3 tag of the wheel. torch's BuildExtension adds the same define for
# py_limited_api=True; it is stated here so that the claim does not depend on that.
PY_LIMITED_API = "0x030A0000"
ROOT = Path(__file__).parent
BUILD_TEMP = ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"


def find_cuda_home() -> Path | None:
    """The CUDA toolkit: $CUDA_HOME, else the installation that nvcc on the PATH belongs to."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    here = re.search(r"^#\$ _HERE_=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return Path(here.group(1).strip()).resolve().parent if here else Path(nvcc).resolve().parents[1]


def nvcc_output(cuda_home: Path, *args: str) -> str | None:
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    return subprocess.run([str(nvcc), *args], capture_output=True, text=True).stdout


def nvcc_version(cuda_home: Path) -> str | None:
    match = re.search(r"release (\d+\.\d+)", nvcc_output(cuda_home, "--version") or "")
    return match.group(1) if match else None


def default_arch_list(cuda_home: Path) -> str:
    """DEFAULT_CUDA_ARCHS that this nvcc can compile (``--list-gpu-arch``), the newest also as PTX."""
    listed = nvcc_output(cuda_home, "--list-gpu-arch") or ""
    supported = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", listed)}
    archs = [arch for arch in DEFAULT_CUDA_ARCHS if arch in supported]
    if not archs:
        raise RuntimeError(f"nvcc in {cuda_home} supports none of {DEFAULT_CUDA_ARCHS}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def want_cuda() -> bool:
    """Decide on the CUDA build from the toolkit and the switch, never from visible GPUs."""
    import torch

    switch = os.environ.get("SER_LIGHTNING_CUDA", "auto").lower()
    if switch in ("0", "off", "false", "no"):
        return False
    cuda_home = find_cuda_home()
    toolkit = nvcc_version(cuda_home) if cuda_home else None
    torch_cuda = torch.version.cuda
    matches = toolkit is not None and torch_cuda is not None and toolkit.split(".")[0] == torch_cuda.split(".")[0]
    if matches:
        os.environ["CUDA_HOME"] = str(cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(cuda_home)
        print(f"ser-lightning: building CUDA kernels with nvcc {toolkit} from {cuda_home} "
              f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return True
    reason = (f"nvcc {toolkit} does not match torch's CUDA {torch_cuda}" if toolkit
              else "no CUDA toolkit (nvcc) found")
    if switch in ("1", "on", "true", "yes"):
        raise RuntimeError(f"SER_LIGHTNING_CUDA=1 but {reason}")
    print(f"ser-lightning: building the CPU kernels only ({reason})")
    return False


@cache
def compiler_accepts(*flags: str, source: str = "int main() { return 0; }\n") -> bool:
    """Whether $CXX (the compiler torch's build uses) compiles and links `source` with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(source)
        cmd = [os.environ.get("CXX", "c++"), *flags, str(src), "-o", str(Path(tmp) / "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def cxx_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for the C++ sources."""
    # -ffp-contract=off: no implicit FMAs, so every CPU path rounds the shared math the same way (the
    # kernels' FMAs are explicit); see csrc/attention_pool.h.
    compile_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fdiagnostics-color=always"]
    link_flags = []
    if compiler_accepts("-Werror", "-Wno-psabi"):
        compile_flags.append("-Wno-psabi")
    # at::parallel_for is OpenMP code inlined from ATen's headers; without OpenMP it runs serially.
    if compiler_accepts("-fopenmp", source="#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n"):
        compile_flags.append("-fopenmp")
        link_flags.append("-fopenmp")  # resolves to the OpenMP runtime torch has already loaded
    else:
        print("ser-lightning: the C++ compiler has no OpenMP (-fopenmp); the CPU kernels will run serially")
    return compile_flags, link_flags


def extensions() -> tuple[list, dict]:
    cuda = want_cuda()  # before importing cpp_extension, which reads CUDA_HOME once at import
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class IncrementalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Keeps objects in BUILD_TEMP: pip's editable install otherwise builds in a fresh temporary
        directory each time, recompiling everything."""

        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = str(BUILD_TEMP)

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    compile_flags, link_flags = cxx_flags()
    common = {
        "include_dirs": [str(ROOT / "csrc")],
        "define_macros": [("Py_LIMITED_API", PY_LIMITED_API)],
        "extra_link_args": link_flags,
        "py_limited_api": True,
    }
    if cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        # No --use_fast_math: the kernels use the shared rational tanh and expf, and the float32 tests
        # compare with float64 at 1e-4. -lineinfo maps compute-sanitizer and profiler reports to lines.
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo"]
        ext = CUDAExtension("ser_lightning._C", sources, extra_compile_args={"cxx": compile_flags, "nvcc": nvcc_flags},
                            **common)
    else:
        ext = CppExtension("ser_lightning._C", sources, extra_compile_args={"cxx": compile_flags}, **common)
    return [ext], {"build_ext": IncrementalBuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="ser-lightning",
    version="0.1.0",
    description="Speech emotion recognition with attention-based fully convolutional networks, on PyTorch Lightning",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ser_lightning", "ser_lightning.*"]),
    package_data={"ser_lightning.inference": ["web/*.html", "web/*.js", "web/*.css"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "lightning>=2.5,<3",
        "torchmetrics>=1.5",
        "tensorboard>=2.16",
        "jsonargparse[signatures]>=4.32",
        "soundfile>=0.12",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "scikit-learn>=1.4",
        "pyyaml>=6",
        "opensmile>=2.5",
        "silero-vad>=5.1",
        "onnxruntime>=1.18",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "python-multipart>=0.0.9",
    ],
    extras_require={
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "studies": ["ray>=2.40", "optuna>=4"],
        "test": ["pytest>=8", "httpx>=0.27", "websockets>=12", "playwright>=1.40"],
    },
    # the shipped configurations, found by `--config NAME` after a regular (non-editable) install
    data_files=[(f"share/ser-lightning/{folder}", sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*.yaml")))
                for folder in ("configs", "configs/spaces")],
    entry_points={"console_scripts": ["ser-lightning=ser_lightning.cli:main"]},
)
