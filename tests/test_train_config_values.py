"""Impossible train-config values are refused when the config is built, naming the field.

(seq_len against the model's max_seq_len is checked where both are known: `smoe train`.)"""

import pytest

from smoe.train.config import TrainConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", 0),
        ("steps", 0),
        ("grad_accum", 0),
        ("lr", -1e-3),
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("lr", "1e-3"),  # a JSON string: float() would accept it, AdamW would not
        ("eps", float("inf")),
        ("weight_decay", float("inf")),
        ("aux_loss_coef", float("inf")),
        ("beta1", True),
        ("min_lr_ratio", 1.5),
    ],
)
def test_impossible_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=repr(field)):
        TrainConfig(**{field: value})
