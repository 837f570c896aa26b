import polars as pl
import torch

from recsys.config import load_config
from recsys.data.vocab import Vocab
from recsys.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from recsys.model.gru4rec import GRU4Rec
from recsys.model.optim import SparseRowOptimizer


def test_round_trip_with_weights_only(tmp_path):
    config = load_config(overrides=["model.hidden_size=6", "model.cell=lstm", "train.epochs=3"])
    vocab = Vocab.from_items(pl.Series("item_id", ["b", "a", "a", "c"]))
    model = GRU4Rec(len(vocab), config.model)
    opt = SparseRowOptimizer([model.layers[0].w_hh], {"item_out": model.item_out}, momentum=0.2)
    path = save_checkpoint(
        tmp_path / "c" / "x.pt",
        model=model,
        optimizer=opt,
        config=config,
        vocab=vocab,
        epoch=2,
        metrics={"mrr@20": 0.5},
        extra={"history": [{"epoch": 1}]},
    )
    assert not list(path.parent.glob(".*tmp*"))  # atomic: no temporary left behind
    torch.load(path, weights_only=True)  # plain tensors/lists only
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 2 and ckpt.metrics == {"mrr@20": 0.5} and ckpt.extra["history"] == [{"epoch": 1}]
    assert ckpt.config == config
    assert ckpt.vocab.frame.equals(vocab.frame)
    rebuilt = build_model(ckpt)
    assert not rebuilt.training
    states = torch.randn(3, 6)
    assert torch.equal(rebuilt.score_items(states), model.eval().score_items(states))
    assert ckpt.optimizer_state["kind"] == "adagrad_momentum"
