"""Build script: the Python package, the Triton kernels mapped to ``structprune._kernels``, and the optional
C++/CUDA extension ``structprune._C`` (see csrc/ and the README's "Building the extension").

The extension is built only when torch is importable while building (``pip install --no-build-isolation .``);
pyproject.toml deliberately does not list torch as a build requirement, so a plain (isolated) ``pip install .``
gives a pure-Python install and structprune JIT-builds csrc/ on first use instead. The sources, flags, arch list and
MAX_JOBS default are csrc/build_recipe.py's, which the JIT build reads too. Knobs (csrc/README.md):

    STRUCTPRUNE_SKIP_EXT=1          do not build structprune._C at all
    STRUCTPRUNE_SKIP_CUDA_BUILD=1   build the CPU kernels only, even with a CUDA torch
    STRUCTPRUNE_CUDA_ARCH_LIST      CUDA archs (TORCH_CUDA_ARCH_LIST syntax); else the user's TORCH_CUDA_ARCH_LIST;
                                    else the default "8.0;9.0a;9.0+PTX" (sm_80, sm_90a, and compute_90 PTX that
                                    the driver JIT-compiles for newer GPUs such as sm_100 / sm_120)
    MAX_JOBS                        parallel ninja jobs (default: min(cores, memory / 3 GiB))
    STRUCTPRUNE_EXT_REQUIRED=1      fail the install if the extension fails to build (default: warn, JIT later)
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC = "csrc"


def _load_recipe():
    """csrc/build_recipe.py, the build recipe shared with the JIT build (loaded by path: no package import)."""
    import importlib.util

    path = Path(__file__).resolve().parent / CSRC / "build_recipe.py"
    spec = importlib.util.spec_from_file_location("structprune_build_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = _load_recipe()


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

    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not RECIPE.skip_cuda(os.environ))
    os.environ.update(RECIPE.build_env(os.environ, with_cuda))  # MAX_JOBS default, TORCH_CUDA_ARCH_LIST
    sources = [f"{CSRC}/{s}" for s in RECIPE.sources(with_cuda)]
    cflags = RECIPE.cxx_flags(with_cuda, python_module=True)
    include_dirs = [os.path.abspath(CSRC)]
    if with_cuda:
        ext = cpp_extension.CUDAExtension("structprune._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cflags, "nvcc": RECIPE.nvcc_flags()})
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

    arch = f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""
    print(f"structprune: building structprune._C ({'CPU + CUDA' if with_cuda else 'CPU'}, "
          f"MAX_JOBS={os.environ['MAX_JOBS']}{arch})")
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
                  "structprune.csrc": ["*.cpp", "*.h", "*.md", "*.sh", "build_recipe.py", "cpu/*.cpp", "cpu/*.h",
                                       "cuda/*.cu", "cuda/*.h", "cuda/*.cpp"]},
    cmdclass=_cmdclass(_EXT),
    **_EXT,
)
