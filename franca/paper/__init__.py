"""The paper stage: tables, figures and a self-contained ``index.html`` from a workflow run (issue 2 item 8).

``build_paper(results_dir, out_dir, *, experiments, preset, reference_yaml)`` is the entry point; see ``build``.
"""

from __future__ import annotations

__all__ = ["build_paper", "PaperInputError"]


def __getattr__(name: str):
    # lazy: importing franca.paper must not pull in torch and matplotlib
    if name == "build_paper":
        from franca.paper.build import build_paper

        return build_paper
    if name == "PaperInputError":
        from franca.paper.collect import PaperInputError

        return PaperInputError
    raise AttributeError(name)
