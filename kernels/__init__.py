"""tpo_fast's Triton kernels, installed as `tpo_fast.kernels` (pyproject.toml maps this folder there).

From the repository root (the current directory on `sys.path`, or the root on PYTHONPATH) this folder would
also be importable as a top-level `kernels`, and shadow the PyPI package of that name, which transformers
(5.25 on) imports when it is installed. Imported under that name, this module steps aside: it loads the
installed `kernels` package in its place (without one it stays this empty module, with no version, which
is what transformers' probe reads as "not installed").
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
