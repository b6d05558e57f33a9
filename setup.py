"""Build script: the Python package, the Triton kernels mapped to ``structprune._kernels``, and the optional
C++/CUDA extension ``structprune._C`` (see csrc/ and the README's "Building the extension").

The extension is built only when torch is importable while building (``pip install --no-build-isolation .``);
pyproject.toml deliberately does not list torch as a build requirement, so a plain (isolated) ``pip install .``
gives a pure-Python install and structprune JIT-builds csrc/ on first use instead. Knobs (csrc/README.md):

    STRUCTPRUNE_SKIP_EXT=1          do not build structprune._C at all
    STRUCTPRUNE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even with a CUDA torch
    STRUCTPRUNE_CUDA_ARCH_LIST      CUDA archs (TORCH_CUDA_ARCH_LIST syntax); else the user's TORCH_CUDA_ARCH_LIST;
                                    else the default "8.0;9.0a;9.0+PTX" (sm_80, sm_90a, and compute_90 PTX that
                                    the driver JIT-compiles for newer GPUs such as sm_100 / sm_120)
    MAX_JOBS                        parallel ninja jobs (default: from the cores and memory)
    STRUCTPRUNE_EXT_REQUIRED=1      fail the install if the extension fails to build (default: warn, JIT later)
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC = "csrc"
CPU_SOURCES = ["register.cpp", "gated_core.cpp", "cpu/ops_cpu.cpp"]
CUDA_SOURCES = ["cuda/kernels.cu", "cuda/ops_cuda.cpp"]


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    return str(max(1, min(cores, int(mem_gib // 3))))  # ~3 GiB per compiler process including nvcc


DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a;9.0+PTX"  # PTX of compute_90, not 90a: arch-specific PTX runs on sm_90 only


def cuda_arch_list(env) -> str:
    """The CUDA arch list to build for: STRUCTPRUNE_CUDA_ARCH_LIST, else the user's TORCH_CUDA_ARCH_LIST, else
    DEFAULT_CUDA_ARCH_LIST."""
    for var in ("STRUCTPRUNE_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if env.get(var, "").strip():
            return env[var].strip()
    return DEFAULT_CUDA_ARCH_LIST


def _extension_kwargs() -> dict:
    if os.environ.get("STRUCTPRUNE_SKIP_EXT") == "1":
        print("structprune: STRUCTPRUNE_SKIP_EXT=1, not building structprune._C")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("structprune: torch is not importable at build time (isolated build); not building structprune._C, "
              "it will be JIT-built on first use. Use `pip install --no-build-isolation .` to prebuild it.")
        return {}

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("STRUCTPRUNE_SKIP_CUDA_BUILD") != "1")
    sources = [f"{CSRC}/{s}" for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    cflags = ["-O3", "-DSTRUCTPRUNE_PYTHON_MODULE"] + (["-DSTRUCTPRUNE_WITH_CUDA"] if with_cuda else [])
    include_dirs = [os.path.abspath(CSRC)]
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ)
        ext = cpp_extension.CUDAExtension("structprune._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]})
    else:
        ext = cpp_extension.CppExtension("structprune._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cflags})

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), but a failed build only warns unless STRUCTPRUNE_EXT_REQUIRED=1."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:
                if os.environ.get("STRUCTPRUNE_EXT_REQUIRED") == "1":
                    raise
                print(f"structprune: WARNING: building {extension.name} failed ({exc}); installing without it, "
                      "structprune will try a JIT build on first use")

    print(f"structprune: building structprune._C ({'CPU + CUDA' if with_cuda else 'CPU'}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']})")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


class BuildPyWithKernels(build_py):
    """build_py, plus the Triton kernels of kernels/ copied into the wheel's structprune/_kernels/.

    kernels/ has no __init__.py, so that it never imports as a top-level package ``kernels`` from the repository
    root (it would shadow Hugging Face's ``kernels``); structprune/_kernels/__init__.py reaches into it in a source
    checkout, and the wheel carries the modules themselves."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "structprune" / "_kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(Path(__file__).resolve().parent.joinpath("kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


def _cmdclass(ext_kwargs: dict) -> dict:
    return {**ext_kwargs.pop("cmdclass", {}), "build_py": BuildPyWithKernels}


_EXT = _extension_kwargs()

setup(
    # kernels/ installs as structprune._kernels (copied by BuildPyWithKernels) and csrc/ as structprune/csrc
    # (sources for the JIT build)
    packages=find_packages(include=["structprune", "structprune.*"]) + ["structprune.csrc"],
    package_dir={"structprune": "structprune", "structprune.csrc": CSRC},
    package_data={"structprune.model": ["templates/*.py"],  # the modeling file save_pretrained writes
                  "structprune.csrc": ["*.cpp", "*.h", "*.md", "*.sh", "cpu/*.cpp", "cuda/*.cu", "cuda/*.h",
                                       "cuda/*.cpp"]},
    cmdclass=_cmdclass(_EXT),
    **_EXT,
)
