"""The paper stage: tables, figures and a self-contained ``index.html`` from a workflow run (issue 2 item 8).

``build_paper(inputs, out_dir, *, experiments, preset, reference_yaml)`` is the entry point (``inputs``: the
``PaperInputs`` files the ``paper`` rule lists); see ``build``.
"""

from __future__ import annotations

__all__ = ["build_paper", "PaperInputError", "PaperInputs"]


def __getattr__(name: str):
    # lazy: importing franca.paper must not pull in torch and matplotlib
    if name == "build_paper":
        from franca.paper.build import build_paper

        return build_paper
    if name in ("PaperInputError", "PaperInputs"):
        from franca.paper import collect

        return getattr(collect, name)
    raise AttributeError(name)
