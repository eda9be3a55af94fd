"""RASA: Removal of Absolute Spatial Attributes (spec section 5).

``RASAHead`` (rasa_head.py) holds the removed position directions; ``train_rasa`` (train.py) trains them round by
round on frozen patch tokens; ``round_report`` (report.py) measures each round; ``fit_rasa`` (data.py) runs the
stage on samples through a backbone.
"""

from franca.rasa.rasa_head import RASAHead, decompose_pos, orthonormal_basis
from franca.rasa.report import round_report
from franca.rasa.train import RASATrainConfig, closed_form_rasa, train_rasa

__all__ = [
    "RASAHead",
    "RASATrainConfig",
    "closed_form_rasa",
    "decompose_pos",
    "orthonormal_basis",
    "round_report",
    "train_rasa",
]
