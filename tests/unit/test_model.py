import pytest
import torch

from recsys.config import ModelConfig
from recsys.model.gru4rec import GRU4Rec

VARIANTS = [(c, e) for c in ("gru", "lstm", "rnn") for e in ("shared", "separate", "none")]


@pytest.mark.parametrize(("cell", "embedding"), VARIANTS)
def test_shapes_causality_and_step_agree(cell, embedding):
    torch.manual_seed(0)
    model = GRU4Rec(
        20, ModelConfig(cell=cell, embedding=embedding, hidden_size=8, n_layers=2, embedding_dim=5)
    ).eval()
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    lengths = torch.tensor([4, 2])
    out = model.sequence_outputs(items, lengths)
    assert out.shape == (2, 4, 8)
    # right padding is harmless: changing the padded items does not change earlier outputs
    other = model.sequence_outputs(torch.tensor([[1, 2, 3, 4], [5, 6, 19, 7]]), lengths)
    assert torch.allclose(out[1, :2], other[1, :2])
    final = model.final_states(items, lengths)
    assert torch.allclose(final[1], out[1, 1]) and torch.allclose(final[0], out[0, 3])
    # the session-parallel step from a zero state reproduces the sequence outputs
    state = model.init_state(2)
    for t in range(2):
        h, state = model.step(items[:, t], state)
        assert torch.allclose(h, out[:, t], atol=1e-6)
    assert model.score_items(final).shape == (2, 20)


def test_shared_embedding_uses_output_weights_as_input():
    model = GRU4Rec(7, ModelConfig(embedding="shared", hidden_size=4))
    assert model.item_in is None and model.input_table() is model.item_out
    none = GRU4Rec(7, ModelConfig(embedding="none", cell="gru", hidden_size=4))
    assert none.item_in.shape == (7, 12) and none.layers[0].w_ih is None  # one-hot input = weight row lookup


def test_dropout_only_in_training():
    model = GRU4Rec(10, ModelConfig(hidden_size=6, dropout_embed=0.5, dropout_hidden=0.5))
    items, lengths = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    model.eval()
    assert torch.equal(model.final_states(items, lengths), model.final_states(items, lengths))
    model.train()
    torch.manual_seed(1)
    a = model.final_states(items, lengths)
    torch.manual_seed(2)
    assert not torch.equal(a, model.final_states(items, lengths))


def test_dropout_state_carries_the_dropped_out_output_like_the_published_code():
    from recsys.config import ModelConfig
    from recsys.model.gru4rec import GRU4Rec

    torch.manual_seed(0)
    for carry in (False, True):
        model = GRU4Rec(20, ModelConfig(hidden_size=16, dropout_hidden=0.5, dropout_state=carry)).train()
        out, state = model.step(torch.tensor([1, 2, 3]), model.init_state(3))  # [3, H], [1, 3, H]
        assert torch.equal(state[0], out) is carry  # dropped units are zero in the carried state too
