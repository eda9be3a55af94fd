"""train_rasa_from_config: the rasa stage's call of train_rasa from a config section (config/rasa/*.yaml)."""

import pytest
import torch

from franca.config import compose, stage_config
from franca.rasa.train import train_rasa, train_rasa_from_config


def test_from_config_equals_explicit_call_and_names_missing_keys():
    rasa = dict(stage_config(compose("tiny", "franca"), "rasa")["rasa"], rounds=2, epochs=3)
    g = torch.Generator().manual_seed(0)
    x, x_val = torch.randn(6, 4, 4, 8, generator=g), torch.randn(3, 4, 4, 8, generator=g)
    head, reports = train_rasa_from_config(x, rasa, eval_tokens=x_val)
    keys = ("rounds", "epochs", "batch_size", "lr", "seed", "weight_decay", "use_pos_pred", "orthogonalize")
    ref_head, ref_reports = train_rasa(x, eval_tokens=x_val, **{k: rasa[k] for k in keys})
    assert torch.equal(head.projections, ref_head.projections) and head.n_projections == 2
    assert [r["r2_x_no_pos"] for r in reports] == [r["r2_x_no_pos"] for r in ref_reports]
    with pytest.raises(KeyError, match="orthogonalize"):
        train_rasa_from_config(x, {k: v for k, v in rasa.items() if k != "orthogonalize"})
