"""Build and install ser-lightning with its fused attention extension.

The C++ (CPU) kernels are always built. The CUDA kernels are built whenever a CUDA toolkit whose
major version matches ``torch.version.cuda`` is found, also on machines without a GPU.

Build switches (environment variables):

- ``SER_LIGHTNING_CUDA``: ``auto`` (default: build if a matching toolkit is found), ``1`` (require
  the CUDA build; fail if no matching toolkit), ``0`` (CPU only).
- ``CUDA_HOME``: the toolkit to use. When unset it is found from ``nvcc`` on the PATH (which may be a
  symbolic link or a wrapper script: nvcc itself is asked where it lives).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (default below).
- ``MAX_JOBS``: parallel compile jobs (ninja).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ROOT = Path(__file__).parent


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


def nvcc_version(cuda_home: Path) -> str | None:
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        print(f"ser-lightning: building CUDA kernels with nvcc {toolkit} from {cuda_home} "
              f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return True
    reason = (f"nvcc {toolkit} does not match torch's CUDA {torch_cuda}" if toolkit
              else "no CUDA toolkit (nvcc) found")
    if switch in ("1", "on", "true", "yes"):
        raise RuntimeError(f"SER_LIGHTNING_CUDA=1 but {reason}")
    print(f"ser-lightning: building the CPU kernels only ({reason})")
    return False


def extensions() -> tuple[list, dict]:
    cuda = want_cuda()  # before importing cpp_extension, which reads CUDA_HOME once at import
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # -fopenmp: at::parallel_for in the CPU kernels is OpenMP code inlined from ATen's headers (serial
    # without it); the library resolves to the OpenMP runtime torch has already loaded (same soname).
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wno-psabi", "-fdiagnostics-color=always"]
    link_flags = ["-fopenmp"]
    if cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        ext = CUDAExtension(
            "ser_lightning._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=[("SER_LIGHTNING_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "ser_lightning._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
    ],
    extras_require={
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["ser-lightning=ser_lightning.cli:main"]},
)
