"""The Triton kernels of the top-level ``kernels/`` folder, as the package ``structprune._kernels``.

``kernels/`` has no ``__init__.py`` on purpose: from the repository root (``python -m ...``, a REPL, a notebook) it
must never import as a package named ``kernels``, which would shadow Hugging Face's ``kernels`` package that
transformers imports. In a wheel, ``setup.py`` copies the kernel modules beside this file; in a source checkout
(editable install or the repository root on ``sys.path``) this package's path reaches into ``kernels/``.
The backend built on them is :mod:`structprune.backends.triton`.
"""
from pathlib import Path

_here = Path(__file__).resolve().parent
_checkout = _here.parent.parent
if not (_here / "attention.py").exists() and (_checkout / "setup.py").is_file() \
        and (_checkout / "kernels" / "attention.py").is_file():
    __path__.append(str(_checkout / "kernels"))  # noqa: F821 (a package's __path__)
