"""Both loaders at the ends of epochs: no batch holds two copies of a record (unless last_batch=pad, the
release's at c507915), every record once per epoch except the ones dropped and counted ("drop") or
plus fill rows of the rank's own part ("fill"), equal steps on every rank, exact resume at the point
where the dropped tail is read or the fill rows are used; and the random crop's attempts.

Two ranks are two loader instances (rank=0/1, world_size=2): the loaders need no process group.
23 records in batches of 4 divide neither the batch nor the ranks: DALI's parts are 11 and 12.
"""

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import assert_same_batches, take_batches, write_test_shards
from torchvision import transforms as T

from alip.config import RunShape, load_config
from alip.data.format import schema
from alip.data.format.recordio import RecordIOWriter
from alip.data.loaders import config as loader_config
from alip.data.loaders.config import LoaderConfig, fill_rows, rank_part
from alip.data.loaders.torch_loader import TorchLoader, build_transform, crop_window
from alip.train.trainer import build_loader

RECORDS, BATCH, WORLD = 23, 4, 2
KINDS = ["dali", "torch"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("odd"), num_records=RECORDS, per_shard=10)


def loader_class(kind):
    if kind == "dali":
        from alip.data.loaders.dali import DaliLoader

        return DaliLoader
    return TorchLoader


def config(**kw) -> LoaderConfig:
    base = {"batch_size": BATCH, "image_size": 32, "num_threads": 1, "num_workers": 0, "shuffle_buffer": 8, "seed": 7}
    return LoaderConfig(**{**base, **kw})


def ranks(kind, meta, train, **kw):
    cfg = config(**kw)
    return [loader_class(kind)(meta, cfg, train=train, rank=r, world_size=WORLD, device="cpu") for r in range(WORLD)]


def keys(batch) -> list[int]:
    return [int(k) - 1000 for k in batch["text"][:, 1]]


def epochs(loaders, n) -> list[list[list[list[int]]]]:
    """[epoch][step][rank] -> the record keys of that batch; every rank must take len(loader) steps."""
    steps = {len(loader) for loader in loaders}
    assert len(steps) == 1, f"ranks disagree on the steps per epoch: {steps}"
    out = []
    for _ in range(n):
        per_rank = [[keys(b) for b in loader] for loader in loaders]
        assert [len(batches) for batches in per_rank] == [len(loaders[0])] * len(loaders)
        out.append([list(step) for step in zip(*per_rank, strict=True)])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_drop_keeps_batches_free_of_copies_and_counts_what_it_drops(odd, kind):
    loaders = ranks(kind, odd.meta, train=True)  # last_batch defaults to "drop"
    assert [len(loader) for loader in loaders] == [RECORDS // (WORLD * BATCH)] * WORLD  # 2
    assert {loader.dropped_per_epoch for loader in loaders} == {RECORDS - 2 * WORLD * BATCH}  # 7
    seen_per_epoch = []
    for steps in epochs(loaders, 3):
        seen = []
        for step in steps:
            assert all(len(batch) == BATCH for batch in step)
            global_batch = [k for batch in step for k in batch]  # what the contrastive loss gathers
            assert len(set(global_batch)) == len(global_batch), f"copies in one step: {step}"
            seen += global_batch
        assert len(set(seen)) == len(seen), "a record came twice in one epoch"
        assert set(seen) <= set(odd.keys) and len(seen) + loaders[0].dropped_per_epoch == RECORDS
        seen_per_epoch.append(set(seen))
    # Shuffled: other records are dropped in other epochs.
    assert len(set.union(*seen_per_epoch)) > len(seen_per_epoch[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_records", [RECORDS, 17])  # 17: parts of 8 and 9, an empty last batch
def test_eval_reads_every_record_exactly_once_in_short_last_batches(tmp_path_factory, odd, kind, num_records):
    meta = odd.meta if num_records == RECORDS else write_test_shards(tmp_path_factory.mktemp("s17"), 17, 10).meta
    loaders = ranks(kind, meta, train=False)
    steps = math.ceil(math.ceil(num_records / WORLD) / BATCH)  # the largest part decides
    for epoch, by_step in enumerate(epochs(loaders, 2)):
        assert len(by_step) == steps
        for rank in range(WORLD):  # part (rank + epoch) % W, in file order, nothing added
            begin, end = rank_part(num_records, WORLD, (rank + epoch) % WORLD)
            assert [k for step in by_step for k in step[rank]] == list(range(begin, end))
        assert sorted(k for step in by_step for batch in step for k in batch) == list(range(num_records))
    if num_records == 17:
        last = list(loaders[0])[-1]  # epoch 2: rank 0 reads part 0 again, 8 records in 2 batches of 4
        assert last["image"].shape == (0, 3, 32, 32) and last["text"].shape == (0, 77)
        assert last["text"].dtype == last["caption"].dtype == torch.int64


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_pad_repeats_the_last_sample_as_the_release(odd, kind, train):
    loaders = ranks(kind, odd.meta, train=train, last_batch="pad")
    assert [len(loader) for loader in loaders] == [3, 3] and loaders[0].dropped_per_epoch == 0
    for epoch, by_step in enumerate(epochs(loaders, 2)):
        everything = [k for step in by_step for batch in step for k in batch]
        assert len(everything) == WORLD * 3 * BATCH and set(everything) == set(odd.keys)
        # One copy per epoch (24 slots, 23 records), in the last batch of the rank reading the part of 11.
        short = next(r for r in range(WORLD) if (r + epoch) % WORLD == 0)
        last = by_step[-1][short]
        assert [k for k, n in Counter(everything).items() if n > 1] == [last[-1]]
        assert last[-1] == last[-2]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("consumed", [1, 2])  # mid-epoch; the end of epoch 0, the dropped tail unread
def test_resume_is_exact_where_drop_reads_the_tail(odd, kind, consumed, tmp_path):
    assert_resumes_exactly(loader_class(kind), odd.meta, config(), 1, consumed, 5, tmp_path)


def assert_resumes_exactly(cls, meta, cfg, rank, consumed, then, tmp_path):
    """A loader stopped after `consumed` batches and restored from its saved state gives the next
    `then` batches bitwise as the uninterrupted one."""
    original = cls(meta, cfg, train=True, rank=rank, world_size=WORLD, device="cpu")
    take_batches(original, consumed)
    torch.save(original.state_dict(), tmp_path / "state.pt")
    expected = take_batches(original, then)
    resumed = cls(meta, cfg, train=True, rank=rank, world_size=WORLD, device="cpu")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_batches(expected, take_batches(resumed, then))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """17 records: parts of 8 and 9, so that one rank's last batch is all fill (pad: 4 copies of one)."""
    return write_test_shards(tmp_path_factory.mktemp("s17"), num_records=17, per_shard=10)


take = take_batches


def assert_fill_epoch(by_step, num_records, epoch, kind):
    """One epoch of "fill" on every rank: see test_fill_completes_the_last_batch_with_the_ranks_first_records."""
    steps = math.ceil(math.ceil(num_records / WORLD) / BATCH)  # pad's
    assert len(by_step) == steps
    for step in by_step:
        global_batch = [k for batch in step for k in batch]  # what the contrastive loss gathers
        assert all(len(batch) == BATCH for batch in step)
        assert len(set(global_batch)) == len(global_batch), f"copies in one step: {step}"
    per_rank = []
    for rank in range(WORLD):
        mine = [k for step in by_step for k in step[rank]]
        begin, end = rank_part(num_records, WORLD, (rank + epoch) % WORLD)
        fill = fill_rows(num_records, BATCH, WORLD, (rank + epoch) % WORLD)
        assert fill == steps * BATCH - (end - begin) and len(mine) == steps * BATCH
        # the part's records, each once, then its first `fill` again: the rank's own, in the same epoch
        assert len(set(mine[: end - begin])) == end - begin and mine[end - begin :] == mine[:fill]
        if kind == "dali":  # DALI shuffles within each part of the file order
            assert set(mine) == set(range(begin, end))
        per_rank.append(set(mine))
    assert set.union(*per_rank) == set(range(num_records))  # every record at least once
    assert sum(len(r) for r in per_rank) == num_records  # parts disjoint: the fill rows are the rank's own


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_records", [RECORDS, 17])  # fill rows 1 / 0 and 0 / 4 (a whole batch)
def test_fill_completes_the_last_batch_with_the_ranks_first_records(odd, small, kind, num_records):
    loaders = ranks(kind, (odd if num_records == RECORDS else small).meta, train=True, last_batch="fill")
    pad = ranks("torch", (odd if num_records == RECORDS else small).meta, train=True, last_batch="pad")
    assert [len(loader) for loader in loaders] == [len(pad[0])] * WORLD == [3] * WORLD
    assert {loader.dropped_per_epoch for loader in loaders} == {0}
    for epoch, by_step in enumerate(epochs(loaders, 3)):
        assert_fill_epoch(by_step, num_records, epoch, kind)


@pytest.mark.parametrize("consumed", [1, 2, 4])  # mid-epoch; just before the last batch (which fills); epoch 1
def test_fill_resumes_exactly_on_the_torch_loader(odd, consumed, tmp_path):
    # rank 0 reads part 0 in epoch 0: 11 records, 1 fill row
    assert_resumes_exactly(TorchLoader, odd.meta, config(last_batch="fill"), 0, consumed, 6, tmp_path)


@pytest.mark.parametrize("consumed", [1, 2])  # 1: rows kept from batch 1; 2: the last batch first (fallback)
@pytest.mark.parametrize("data", ["odd", "small"])
def test_fill_after_a_dali_resume_still_holds_no_copies(request, data, consumed, tmp_path):
    """Rank 0 reads part 0 in epoch 0, 11 records of 23 (its last batch: 3 of its own and 1 fill row) or
    8 of 17 (4 fill rows). A resume keeps the fill rows from the first batch it reads; one that lands on
    the last batch reads a fresh pipeline. Every batch but that last one is the uninterrupted run's."""
    from alip.data.loaders.dali import DaliLoader

    shards = request.getfixturevalue(data)
    part = rank_part(len(shards.keys), WORLD, 0)[1]
    cfg = config(last_batch="fill")
    original = DaliLoader(shards.meta, cfg, train=True, rank=0, world_size=WORLD, device="cpu")
    first = take(original, consumed)
    torch.save(original.state_dict(), tmp_path / "state.pt")
    expected = take(original, 3 - consumed + 3)  # the rest of epoch 0 and epoch 1
    resumed = DaliLoader(shards.meta, cfg, train=True, rank=0, world_size=WORLD, device="cpu")
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    got = take(resumed, len(expected))
    last = 3 - consumed - 1  # the last batch of epoch 0 among `got`
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        if i != last:
            for k in ("image", "text", "caption"):
                assert torch.equal(a[k], b[k]), f"batch {i} differs in {k}"
    epoch0 = [keys(b) for b in first + got[: last + 1]]
    assert all(len(set(batch)) == BATCH for batch in epoch0)
    assert {k for batch in epoch0 for k in batch} == set(range(part))  # part 0, every record
    filled = got[last]
    for i, key in enumerate(keys(filled)):  # every row's tokens are its record's
        assert torch.equal(filled["caption"][i], torch.from_numpy(shards.caption_tokens[key]))


def test_dali_fill_fallback_takes_no_record_of_the_last_batch(odd):
    """The fallback reads a fresh pipeline's first batch of the part (same seed: the same batch every
    time) and skips the records the last batch holds already, named by .rec path and byte offset."""
    from alip.data.loaders.dali import DaliLoader

    loader = DaliLoader(odd.meta, config(last_batch="fill"), train=True, rank=0, world_size=WORLD, device="cpu")
    fresh = loader._next(loader._build(first_part=0))  # what the fallback will read
    rows = loader._fallback_fill(fresh["source"][:3], 1, part=0)  # as if the last batch held these 3
    assert torch.equal(rows["label"], fresh["label"][3:4]) and torch.equal(rows["image"], fresh["image"][3:4])


@pytest.mark.parametrize("kind", KINDS)
def test_fill_refuses_a_part_smaller_than_one_batch(odd, kind):
    refused = r"data\.last_batch=fill .* holds 11 records, fewer than the per-rank batch of 12.*data\.last_batch=pad"
    with pytest.raises(ValueError, match=refused):
        loader_class(kind)(odd.meta, config(batch_size=12, last_batch="fill"), rank=0, world_size=WORLD, device="cpu")
    loader_class(kind)(odd.meta, config(batch_size=11, last_batch="fill"), rank=0, world_size=WORLD, device="cpu")
    # eval mode never fills: every record once, the last batches short
    assert len(loader_class(kind)(odd.meta, config(batch_size=12, last_batch="fill"), False, 0, WORLD, "cpu")) == 1


def test_pad_warns_once_that_it_repeats_samples(odd, caplog, monkeypatch):
    monkeypatch.setattr(loader_config, "_pad_warned", False)
    with caplog.at_level("WARNING", logger="alip.data.loaders.config"):
        ranks("torch", odd.meta, train=True, last_batch="pad")
        ranks("torch", odd.meta, train=True, last_batch="fill")
    warned = [r.getMessage() for r in caplog.records if "repeats samples within a batch" in r.getMessage()]
    assert len(warned) == 1 and "data.last_batch=pad" in warned[0]


def test_state_of_another_last_batch_mode_is_refused(odd):
    state = TorchLoader(odd.meta, config(last_batch="pad"), rank=0, world_size=WORLD).state_dict()
    drop = TorchLoader(odd.meta, config(), rank=0, world_size=WORLD)
    with pytest.raises(ValueError, match="last_batch=pad"):
        drop.load_state_dict(state)
    del state["last_batch"]  # written before the option existed: those loaders padded
    with pytest.raises(ValueError, match="last_batch=pad"):
        drop.load_state_dict(state)


def test_drop_refuses_a_dataset_smaller_than_one_global_batch(odd):
    with pytest.raises(ValueError, match="do not fill one global batch"):
        TorchLoader(odd.meta, config(batch_size=12), rank=0, world_size=WORLD)
    TorchLoader(odd.meta, config(batch_size=12, last_batch="pad"), rank=0, world_size=WORLD)  # pads instead


def test_trainer_passes_the_options_to_the_loader(odd):
    options = ["data.loader=torch", "data.num_workers=0", "data.last_batch=fill", "data.crop_attempts=7"]
    cfg = load_config(None, [f"data.train={odd.meta}", *options])
    loader = build_loader(cfg, RunShape(1, 4, 4), torch.device("cpu"))
    assert (loader.config.last_batch, loader.config.crop_attempts, len(loader)) == ("fill", 7, 6)
    assert build_transform(loader.config, train=True).transforms[0].attempts == 7


# ----- random crop attempts ---------------------------------------------------------------------------

H, W = 400, 600  # a 3:2 photo
FALLBACK = (0, 50, 400, 500)  # the whole height, width cut to ratio 1.25, centred


def test_crop_window_with_10_attempts_is_torchvisions_draw_for_draw():
    image = torch.zeros(3, H, W)
    for seed in range(300):
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(image, [0.7, 1.0], [0.8, 1.25])
        torch.manual_seed(seed)
        assert crop_window(H, W, (0.7, 1.0), (0.8, 1.25), attempts=10) == want, seed


def test_crop_fallback_rate_of_a_3_2_photo_10_against_100_attempts():
    def fallback_rate(attempts, n=1000):
        torch.manual_seed(0)
        return sum(crop_window(H, W, (0.7, 1.0), (0.8, 1.25), attempts) == FALLBACK for _ in range(n)) / n

    # One draw in ~12 fits (area >= 0.7 needs ratio >= 1.5 * area): 0.915 ** 10 = 0.41, 0.915 ** 100 = 1e-4.
    assert 0.33 < fallback_rate(10) < 0.49
    assert fallback_rate(100) < 0.005


def test_dali_crop_takes_the_configured_attempts(tmp_path):
    """Count identical outputs of one 3:2 photo: with ratios up to 1.5 the fallback window is the
    whole image, the same pixels every time (DALI places a smaller fallback window at random)."""
    pytest.importorskip("nvidia.dali")
    from alip.data.loaders.dali import DaliLoader

    rng = np.random.default_rng(0)
    image = (rng.random((H // 8, W // 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)  # [400, 600, 3]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    rec = tmp_path / "wide.rec"
    tokens = np.zeros(77, np.int64)
    tokens[:3] = [49406, 1000, 49407]
    with RecordIOWriter(rec, rec.with_suffix(".idx")) as w:
        for key in range(64):
            w.write(key, schema.make_record(key, buf.getvalue(), tokens, tokens))

    def most_repeated(attempts):
        # Area >= 0.9 fits a 3:2 photo only for ratios >= 1.35: one draw in 12 fits, as with the defaults.
        area, ratio = (0.9, 1.0), (0.8, 1.5)
        cfg = LoaderConfig(
            batch_size=64,
            image_size=16,
            random_area=area,
            random_aspect_ratio=ratio,
            flip_prob=0.0,
            num_threads=1,
            crop_attempts=attempts,
        )
        images = next(iter(DaliLoader(rec, cfg, train=True, device="cpu")))["image"]
        return Counter(bytes(img.numpy().tobytes()) for img in images).most_common(1)[0][1]

    assert most_repeated(10) >= 14  # ~42% of 64 fall back
    assert most_repeated(100) <= 2
