"""Source mixtures in the train loader: shares follow the weights, repeat caps hold, resume and reshard exactly."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.training.loader import LoaderState, MixtureSampler

# 600 windows of "web", 100 of "books", interleaved as a tokenize shard would hold them
OWNERS = np.array([0] * 300 + [1] * 50 + [0] * 300 + [1] * 50)
SOURCES = ["web", "books"]


def _sampler(weights=(1.0, 1.0), caps=(None, None), rank=0, world=1, state=None) -> MixtureSampler:
    return MixtureSampler(OWNERS, SOURCES, list(weights), list(caps), seed=7, rank=rank, world_size=world, state=state)


def test_every_prefix_of_the_stream_is_within_one_window_of_the_target_shares():
    sampler = _sampler(weights=(3.0, 1.0))
    drawn = np.array([OWNERS[sampler.next(8)] for _ in range(40)]).ravel()
    for n in (8, 80, 320):
        books = int((drawn[:n] == 1).sum())
        assert abs(books - n / 4) <= 1
    assert sampler.state.consumed == [240, 80] and sampler.state.offset == 320


def test_a_small_source_is_repeated_in_fresh_permutations_up_to_its_cap_then_the_others_fill_in():
    sampler = _sampler(weights=(1.0, 1.0), caps=(None, 2.0))
    drawn = np.concatenate([sampler.next(50) for _ in range(12)])  # 600 windows; books may give 200
    books = drawn[OWNERS[drawn] == 1]
    assert len(books) == 200
    first, second = books[:100], books[100:]
    assert sorted(first) == sorted(second) == sorted(np.flatnonzero(OWNERS == 1))  # each window once per epoch
    assert not np.array_equal(first, second)  # in a new order
    assert (OWNERS[drawn[400:]] == 0).all()  # after the cap, web alone
    with pytest.raises(ValueError, match="repeat cap"):
        _sampler(caps=(0.1, 0.1)).next(200)


def test_resume_from_the_saved_position_continues_the_same_stream():
    whole = _sampler(weights=(2.0, 1.0))
    expected = [whole.next(16) for _ in range(10)]
    first = _sampler(weights=(2.0, 1.0))
    got = [first.next(16) for _ in range(4)]
    saved = LoaderState(
        **{"epoch": first.state.epoch, "offset": first.state.offset, "consumed": list(first.state.consumed)}
    )
    resumed = _sampler(weights=(2.0, 1.0), state=saved)
    got += [resumed.next(16) for _ in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_ranks_share_out_the_single_process_stream_and_can_reshard_at_a_checkpoint():
    single = _sampler(weights=(2.0, 1.0))
    stream = np.concatenate([single.next(8) for _ in range(6)])
    ranks = [_sampler(weights=(2.0, 1.0), rank=r, world=2) for r in range(2)]
    batches = [[s.next(4) for _ in range(3)] for s in ranks]  # 3 micro-steps of 2 x 4 windows = 24
    interleaved = np.array([[batches[r][k][j] for j in range(4) for r in range(2)] for k in range(3)]).ravel()
    assert np.array_equal(interleaved, stream[:24])
    state = ranks[0].state  # every rank holds the same global position
    assert state.offset == 24 and state.consumed == ranks[1].state.consumed
    tail = _sampler(weights=(2.0, 1.0), state=LoaderState(0, state.offset, list(state.consumed)))  # back to one process
    assert np.array_equal(np.concatenate([tail.next(8) for _ in range(3)]), stream[24:])


def test_a_weighted_source_without_training_windows_is_refused():
    with pytest.raises(ValueError, match="no training window"):
        MixtureSampler(np.zeros(10, dtype=np.int64), SOURCES, [1.0, 1.0], [None, None], seed=0)


def test_killed_and_resumed_weighted_training_is_bit_identical_to_a_straight_run(tmp_path, monkeypatch):
    from storage.artifacts import StageContext
    from storage.faults import InjectedFault
    from storage.shards import LedgerWriter, write_token_shard
    from tasks.config import ModelConfig, TrainConfig
    from tasks.training.train import train
    from tests.training.test_train import _tokens

    folder = tmp_path / "tokens"
    folder.mkdir()
    shards = {
        "train": [folder / "train-00000.arrow", folder / "train-00001.arrow"],
        "val": [folder / "val-00000.arrow"],
    }
    for path, n in zip([*shards["train"], *shards["val"]], (1500, 900, 600), strict=True):
        write_token_shard(path, _tokens(n, n))
    ledger = LedgerWriter(tmp_path / "ledger", "tokenize")
    spans = [("train-00000", 0, 1200, "web"), ("train-00000", 1200, 1500, "books"), ("train-00001", 0, 900, "web")]
    ledger.record(
        [{"doc_id": f"d{i}", "source": src, "fate": "kept", "split": "train", "shard": sh, "token_start": a,
          "token_end": b} for i, (sh, a, b, src) in enumerate(spans)]
    )  # fmt: skip
    ledger.close()
    mixture = {"sources": ["web", "books"], "weights": [1.0, 1.0], "max_repeats": [None, None],
               "ledger_files": [str(p) for p in sorted((tmp_path / "ledger").rglob("*.parquet"))]}  # fmt: skip
    model = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    cfg = TrainConfig(max_steps=6, batch_size=4, grad_accum=2, warmup_steps=2, eval_interval=3, eval_batches=2,
                      checkpoint_interval=2, threads=1, device="cpu")  # fmt: skip

    def run(name: str, work: str) -> dict:
        (tmp_path / name).mkdir()
        ctx = StageContext(tmp_path / name, tmp_path / work, lambda m: None)
        return train(shards["train"], shards["val"], 64, model, cfg, 7, ctx, mixture=mixture)

    straight = run("straight", "work-straight")
    monkeypatch.setenv("TOKENMILL_FAULT", "train:step5")
    monkeypatch.setenv("TOKENMILL_FAULT_DIR", str(tmp_path / "faults"))
    with pytest.raises(InjectedFault):
        run("attempt1", "work")
    resumed = run("attempt2", "work")
    assert resumed["resumed_from_step"] == 4
    for name in ("model.safetensors", "train_log.jsonl"):
        assert (tmp_path / "attempt2" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    assert (
        straight["tokens_per_source"] == resumed["tokens_per_source"] == {"web": 24 * 16, "books": 24 * 16}
    )  # 6 x 2 x 4 windows
