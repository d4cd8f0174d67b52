"""The runtime's tiny model: its oracle is consistent with the decode step it defines."""

import torch

from eep.runtime.model import TinyConfig, decode_step, dense_moe_fn, generate_weights, next_token_table, reference_generate


def test_tiny_model_oracle_is_consistent():
    weights = generate_weights(TinyConfig(seed=3))
    table = next_token_table(weights)
    tokens = torch.randint(weights.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    assert decode_step(weights, tokens, dense_moe_fn(weights)).tolist() == [table[t] for t in tokens.tolist()]
    out = reference_generate(weights, 5, 6, table=table)
    assert out[0] == table[5] and out[1] == table[out[0]] and len(out) == 6
