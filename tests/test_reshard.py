"""`--resume --reshard`: a checkpoint of 2 ranks continued on 1 and on 3 ranks, and on changed shards.

One 2-rank gloo run of 10 steps (global batch 6 on 24 records: 4 steps per epoch, 2.5 epochs, a
cosine schedule) checkpoints at step 6, in the middle of epoch 1. From that checkpoint:
- 1 rank (in this process) and 3 ranks (spawned) continue to the end with `reshard`: the step
  counter, the samples seen and the learning rate continue exactly (the same total of 10 steps), the
  model after the first resumed step is one optimizer step from the checkpoint on that step's
  global batch (the reference loads the checkpoint directly), every rank starts from the checkpoint's
  gate EMAs and Adam moments bitwise, and epoch 1 reads each of its records exactly once (the README's
  "Resume");
- a checkpoint of 4 ranks at global batch 8 is refused on 3 ranks with the accumulation hint, and a
  checkpoint of another world size without `--reshard` is refused naming the flag.
At the loader level (no training): with 27 records, a continued epoch repeats none and leaves out
N mod global batch, as an uninterrupted epoch does (drop); pad and fill repeat only their padding rows,
except where the records left give no step (counted). A changed dataset is refused without `--reshard`
and continues with it (the data order restarts, the schedule continues). The refusals name what to pass.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from dist_harness import join_rank_env, run_ranks
from shard_factory import write_test_shards

from alip.config import ConfigError, load_config, to_dict, validate
from alip.data.loaders.config import LoaderConfig, steps_per_epoch
from alip.data.loaders.torch_loader import TorchLoader
from alip.model import CheckpointError
from alip.train.checkpoint import load_training_state, save_checkpoint
from alip.train.resume import check_resume
from alip.train.run import batch_split_hint, train
from alip.train.trainer import Trainer, build_loader

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
TOTAL = 10  # 2.5 epochs of 24 // 6 = 4 steps
RESUMED_AT = 6  # epoch 1, step 2


def overrides(data, out_dir, *extra):
    return [
        f"data.train={data}",
        f"output_dir={out_dir}",
        "train.batch_size=6",
        "train.max_steps=null",
        "train.epochs=2.5",
        "schedule.name=cosine",
        "schedule.warmup=0.2",
        "checkpoint.every_steps=6",
        "checkpoint.keep_last=10",
        "checkpoint.export=false",
        "log.every_steps=100",
        *extra,
    ]


RESUMED = ["checkpoint.every_steps=1"]  # a checkpoint after every resumed step (applied on resume)


def keys(batch):
    """The record keys of a batch (shard_factory: raw tokens [49406, 1000 + key, 49407])."""
    return [int(t) - 1000 for t in batch["text"][:, 1]]


def recording(record):
    """Trainer.train_step that also records each step's record keys, and for the first step its whole batch
    and the gate EMAs and optimizer state it starts from (what the resume loaded)."""
    original = Trainer.train_step

    def train_step(self, batch):
        if "first" not in record:
            record["first"] = {k: v.clone() for k, v in batch.items()}
            record["loss_state"] = copy.deepcopy(self.loss_fn.state_dict())
            record["optimizer_state"] = copy.deepcopy(self.optimizer.state_dict()["state"])
        record["keys"].append(keys(batch))
        return original(self, batch)

    return train_step


def _two_ranks(rank, port, data, out_dir):
    join_rank_env(rank, 2, port)
    record = {"keys": []}
    Trainer.train_step = recording(record)  # a spawned process: patched here only
    train(load_config(TINY, overrides(data, Path(out_dir) / "a")))
    torch.save(record, Path(out_dir) / f"a_rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _three_ranks(rank, port, data, out_dir):
    join_rank_env(rank, 3, port)
    out_dir = Path(out_dir)
    start = out_dir / "a" / "checkpoints" / f"step-{RESUMED_AT:08d}.pt"
    refusals = {}
    # 4 ranks x 2 at global batch 8 cannot split over 3 ranks: refused before anything is read or written.
    try:
        cfg = load_config(TINY, overrides(data, out_dir / "c8", "train.batch_size=8"))
        train(cfg, str(out_dir / "four_ranks.pt"), reshard=True)
    except ConfigError as e:
        refusals["batch"] = str(e)
    record = {"keys": []}
    Trainer.train_step = recording(record)
    train(load_config(TINY, overrides(data, out_dir / "c", *RESUMED)), str(start), reshard=True)
    record["refusals"] = refusals
    torch.save(record, out_dir / f"c_rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    run_ranks(_two_ranks, (str(shards.meta), str(out)), nprocs=2)
    # A 4-rank checkpoint at global batch 8, made from the 2-rank one (only its world size and batch are read).
    state = load_training_state(out / "a" / "checkpoints" / f"step-{RESUMED_AT:08d}.pt")
    state["world_size"], state["ranks"] = 4, state["ranks"] * 2
    state["config"]["train"]["batch_size"] = 8
    torch.save(state, out / "four_ranks.pt")
    run_ranks(_three_ranks, (str(shards.meta), str(out)), nprocs=3)
    return out


@pytest.fixture(scope="module")
def one_rank(shards, runs, one_thread):
    """The 2-rank checkpoint continued on 1 rank, in this process."""
    record = {"keys": []}
    original = Trainer.train_step
    Trainer.train_step = recording(record)
    try:
        start = runs / "a" / "checkpoints" / f"step-{RESUMED_AT:08d}.pt"
        train(load_config(TINY, overrides(shards.meta, runs / "b", *RESUMED)), str(start), reshard=True)
    finally:
        Trainer.train_step = original
    return record


def ckpt(run_dir, step):
    return load_training_state(Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt")


def losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines()]


def lr(state):
    return state["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("world", [1, 3])
def test_a_resharded_run_continues_the_counters_and_schedule_exactly(runs, one_rank, world):
    run_dir = runs / ("b" if world == 1 else "c")
    assert [r["step"] for r in losses(run_dir)] == list(range(RESUMED_AT + 1, TOTAL + 1))  # a new folder
    final, reference = ckpt(run_dir, TOTAL), ckpt(runs / "a", TOTAL)
    assert final["world_size"] == world and len(final["ranks"]) == world
    assert final["train_state"]["step"] == TOTAL and final["train_state"]["samples_seen"] == 6 * TOTAL
    assert final["scheduler"]["last_epoch"] == TOTAL
    assert lr(final) == lr(reference)  # the same total of 10 steps: the cosine ends where it would have
    other = runs / ("c" if world == 1 else "b")
    for step in range(RESUMED_AT + 1, TOTAL + 1):
        assert lr(ckpt(run_dir, step)) == lr(ckpt(other, step))


def assert_same_tree(got, expected, where=""):
    """Equal nested dicts/lists of tensors and numbers; tensors bitwise (torch.equal)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for k in expected:
            assert_same_tree(got[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_tree(a, b, f"{where}/{i}")
    else:
        assert got == expected, where


def resumed_records(runs, one_rank, world):
    if world == 1:
        return [one_rank]
    return [torch.load(runs / f"c_rank{r}.pt", weights_only=True) for r in range(3)]


@pytest.mark.parametrize("world", [1, 3])
def test_a_resharded_run_starts_from_the_checkpoints_gate_emas_and_adam_moments(runs, one_rank, world):
    """What each rank of the resumed run held when its first step began: the checkpoint's gate EMAs and the
    checkpoint's optimizer state (Adam moments and step counts), every tensor bitwise."""
    state = ckpt(runs / "a", RESUMED_AT)
    assert state["optimizer"]["state"] and state["loss"]  # there is something to carry over
    for record in resumed_records(runs, one_rank, world):
        assert_same_tree(record["loss_state"], state["loss"], "loss")
        assert_same_tree(record["optimizer_state"], state["optimizer"]["state"], "optimizer")


@pytest.mark.parametrize("world", [1, 3])
def test_the_first_resumed_step_is_one_optimizer_step_from_the_checkpoint(runs, one_rank, shards, world):
    """The reference loads the checkpoint's model, optimizer, scheduler and gate EMAs directly (not through
    Trainer.load_state_dict, which the resumed run used), then takes one step on the resumed run's first
    global batch."""
    parts = [record["first"] for record in resumed_records(runs, one_rank, world)]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # global index = rank * B + i
    assert len(batch["text"]) == 6
    cfg = load_config(TINY, overrides(shards.meta, runs / f"ref{world}"))
    reference = Trainer(cfg, validate(cfg, 1), runs / f"ref{world}", torch.device("cpu"))
    state = ckpt(runs / "a", RESUMED_AT)
    reference.clip.load_state_dict(state["model"])
    reference.optimizer.load_state_dict(state["optimizer"])
    reference.scheduler.load_state_dict(state["scheduler"])
    reference.loss_fn.load_state_dict(state["loss"])
    assert reference.train_step(batch).applied
    resumed = ckpt(runs / ("b" if world == 1 else "c"), RESUMED_AT + 1)["model"]
    for name, value in reference.clip.state_dict().items():
        if world == 1:  # the same process, the same arithmetic
            assert torch.equal(value, resumed[name]), name
        else:  # 3 ranks: DDP's averaged gradient, equal up to float rounding
            torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("world", [1, 3])
def test_the_interrupted_epoch_reads_each_record_once(runs, one_rank, world):
    """Epoch 1 is steps 5..8: steps 5-6 on 2 ranks, 7-8 on the new ranks. 24 records, global batch 6:
    an uninterrupted epoch reads all 24 once; so does the resharded one (no repeat, nothing left out)."""
    before = [torch.load(runs / f"a_rank{r}.pt", weights_only=True)["keys"] for r in range(2)]
    after = (
        [one_rank["keys"]]
        if world == 1
        else [torch.load(runs / f"c_rank{r}.pt", weights_only=True)["keys"] for r in range(3)]
    )
    read = [k for rank in before for step in rank[4:6] for k in step]
    read += [k for rank in after for step in rank[:2] for k in step]
    assert sorted(read) == list(range(24))
    epoch2 = [k for rank in after for step in rank[2:4] for k in step]  # a new epoch: distinct records
    assert len(set(epoch2)) == len(epoch2) == 12


def test_refusals_name_the_flag_and_the_accumulation(runs, shards):
    refusal = torch.load(runs / "c_rank0.pt", weights_only=True)["refusals"]["batch"]
    assert "train.batch_size=8 does not divide across 3 ranks" in refusal and "train.accum_steps" in refusal
    assert "2 ranks" in refusal and "4 ranks" in refusal
    state = ckpt(runs / "a", RESUMED_AT)
    cfg = load_config(TINY, overrides(shards.meta, runs / "x"))
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 3.*--reshard"):
        check_resume(state, cfg, 3)
    check_resume(state, cfg, 3, reshard=True)


# ----- the loader on its own: a continued epoch, counted -------------------------------------------------


@pytest.fixture(scope="module")
def shards27(tmp_path_factory):
    return write_test_shards(tmp_path_factory.mktemp("shards27"), num_records=27, per_shard=10).meta


def _loader(meta, batch, rank, world, mode="drop"):
    cfg = LoaderConfig(batch_size=batch, image_size=32, num_workers=0, last_batch=mode)
    return TorchLoader(meta, cfg, train=True, rank=rank, world_size=world)


@pytest.mark.parametrize(("new_world", "new_batch"), [(1, 6), (3, 2)])
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("done", [1, 3, 4])
def test_a_continued_epoch_repeats_nothing_and_leaves_out_n_mod_global_batch(
    shards27, new_world, new_batch, epoch, done
):
    """27 records, global batch 6: an epoch is 4 steps and leaves out 3 records (last_batch=drop). After
    `done` steps on 2 ranks, the epoch continues on `new_world` ranks: 4 - done more steps, no record
    read twice, and 3 left out, as uninterrupted. A finished epoch (done = 4) goes on to the next."""
    meta = shards27
    old = [_loader(meta, 3, r, 2) for r in range(2)]
    read = []
    for loader in old:
        for _ in range(epoch):  # whole epochs before
            list(loader)
        it = iter(loader)
        read += [k for _ in range(done) for k in keys(next(it))]
    states = [loader.state_dict() for loader in old]
    new = [_loader(meta, new_batch, r, new_world) for r in range(new_world)]
    for loader in new:
        loader.continue_epoch(states)
    if done == 4:
        assert all(loader.epoch == epoch + 1 and loader.step == 0 for loader in new)
        return
    rest = [list(loader) for loader in new]  # the rest of the epoch
    assert all(len(r) == 4 - done for r in rest)
    read += [k for batches in rest for b in batches for k in keys(b)]
    assert len(read) == len(set(read)) == 24  # none twice, 27 mod 6 = 3 left out
    assert all(loader.epoch == epoch + 1 for loader in new)
    nxt = [k for loader in new for b in loader for k in keys(b)]  # then a whole epoch on the new ranks
    assert len(nxt) == len(set(nxt)) == 24


@pytest.mark.parametrize("mode", ["drop", "pad", "fill"])
def test_an_epoch_resharded_twice_still_reads_each_record_once(shards27, mode):
    """2 ranks x 3 for a step, then 3 ranks x 2 for a step, then 1 rank x 6 to the end of the epoch: the
    epoch keeps its steps (drop: 4, 24 records once; pad and fill: 5, 27 records once and 3 rows again)."""
    loaders, read = [_loader(shards27, 3, r, 2, mode) for r in range(2)], []
    for world, batch in [(3, 2), (1, 6)]:
        for loader in loaders:
            read += keys(next(iter(loader)))
        states = [loader.state_dict() for loader in loaders]
        loaders = [_loader(shards27, batch, r, world, mode) for r in range(world)]
        for loader in loaders:
            loader.continue_epoch(states)
    rest = list(loaders[0])
    read += [k for b in rest for k in keys(b)]
    if mode == "drop":
        assert len(rest) == 2  # (27 - 12) // 6: the epoch still has its 4 steps in all
        assert len(read) == len(set(read)) == 24
    else:
        assert len(rest) == 3  # ceil((27 - 12) / 6): 5 in all
        assert len(read) == 30 and sorted(set(read)) == list(range(27))
        if mode == "fill":
            assert all(len(set(keys(b))) == 6 for b in rest)


def test_loader_states_from_before_the_global_positions_continue_the_same_way(shards27):
    """A checkpoint written before `seen`/`excluded`/`shards_digest` existed: its ranks' progress is
    recomputed from epoch, step and the old world size, and the continuation is the same."""
    old = [_loader(shards27, 3, r, 2) for r in range(2)]
    for loader in old:
        next(iter(loader))
    states = [loader.state_dict() for loader in old]
    legacy = [{k: v for k, v in s.items() if k not in ("seen", "excluded", "shards_digest")} for s in states]
    got = []
    for given in (states, legacy):
        loader = _loader(shards27, 2, 2, 3)
        loader.continue_epoch(given)
        got.append([keys(b) for b in loader])
    assert got[0] == got[1] and len(got[0]) == 3


@pytest.mark.parametrize("mode", ["pad", "fill"])
@pytest.mark.parametrize(("new_world", "new_batch"), [(3, 2), (6, 1), (1, 6)])
@pytest.mark.parametrize("done", [1, 4])
def test_a_continued_padded_or_filled_epoch_repeats_only_its_padding(shards27, mode, new_world, new_batch, done):
    """last_batch=pad or fill: an epoch of 27 records at global batch 6 is 5 steps, every record once and 3
    rows of padding (pad: copies of a rank's last record; fill: other records of the epoch a second time).
    Continued on `new_world` ranks after `done` steps on 2, the same: 5 - done more steps, 30 rows, 27 records.

    Except where the records left give no step: after 4 steps 3 records are left, and a continued epoch
    needs, with pad, one record per rank (3 ranks: yes, 6 ranks: no), with fill, a whole batch per rank
    (never: 3 < 6 = the global batch). Then the next epoch starts at once: those 3 records are not read in
    this epoch, which has 4 steps instead of 5, and the run (same total steps) reads one more step later on."""

    def loader(rank, world, batch):
        cfg = LoaderConfig(batch_size=batch, image_size=32, num_workers=0, last_batch=mode)
        return TorchLoader(shards27, cfg, train=True, rank=rank, world_size=world)

    old = [loader(r, 2, 3) for r in range(2)]
    read = []
    for each in old:
        it = iter(each)
        read += [k for _ in range(done) for k in keys(next(it))]
    states = [each.state_dict() for each in old]
    new = [loader(r, new_world, new_batch) for r in range(new_world)]
    said = [each.continue_epoch(states) for each in new]
    left = 27 - 6 * done
    if left < (new_world if mode == "pad" else 6):
        assert all(each.epoch == 1 and each.step == 0 for each in new)
        assert "the 3 left fill no step: next epoch" in said[0]
        assert len(read) == len(set(read)) == 24  # 3 records not read in epoch 0
        nxt = [[keys(b) for b in each] for each in new]  # epoch 1 as usual: 5 steps, every record
        assert all(len(r) == 5 for r in nxt) and sorted({k for r in nxt for b in r for k in b}) == list(range(27))
        return
    rest = [list(each) for each in new]
    assert all(len(r) == 5 - done for r in rest)
    if mode == "fill":  # no global batch holds a record twice
        for step in zip(*rest, strict=True):
            got = [k for b in step for k in keys(b)]
            assert len(got) == len(set(got)) == 6
    read += [k for batches in rest for b in batches for k in keys(b)]
    assert len(read) == 30 and sorted(set(read)) == list(range(27))
    assert all(each.epoch == 1 for each in new)


def test_steps_per_epoch_depend_on_the_global_batch_only():
    """Why a resharded run keeps its total steps: N // G ("drop") and ceil(ceil(N / W) / B) = ceil(N / G)
    ("pad", "fill")."""
    for n in range(12, 80):
        for w, b in [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]:
            for mode in ("drop", "fill", "pad"):
                assert steps_per_epoch(n, b, w, mode) == steps_per_epoch(n, 12, 1, mode), (n, w, mode)


def test_a_launcher_batch_on_other_ranks_is_refused_with_the_checkpoints_global_batch(shards):
    """8 ranks at global batch 4096, back on 4 ranks with a launcher that passes 4 x 512: the refusal says which
    batch to pass (not "start a new run"), with --reshard and without it."""
    cfg = load_config(TINY, [f"data.train={shards.meta}", "train.batch_size=4096"])
    state = {"world_size": 8, "config": to_dict(cfg)}
    smaller = load_config(TINY, [f"data.train={shards.meta}", "train.batch_size=2048"])
    hint = "--reshard keeps the checkpoint's global batch: pass train.batch_size=4096 (launcher: GLOBAL_BATCH=4096)"
    with pytest.raises(CheckpointError) as refused:
        check_resume(state, smaller, 4, reshard=True)
    assert hint in str(refused.value) and "train.batch_size 4096 -> 2048" in str(refused.value)
    assert "start a new run" not in str(refused.value)
    with pytest.raises(CheckpointError) as refused:
        check_resume(state, smaller, 4)
    assert "written by 8 ranks, this run has 4" in str(refused.value) and hint in str(refused.value)
    # With another refused change as well, both are named and the hint is kept.
    other = load_config(TINY, [f"data.train={shards.meta}", "train.batch_size=2048", "train.seed=1"])
    with pytest.raises(CheckpointError, match="train.seed.*start a new run.*GLOBAL_BATCH=4096"):
        check_resume(state, other, 4, reshard=True)
    check_resume(state, cfg, 4, reshard=True)  # the checkpoint's batch: accepted
    with pytest.raises(CheckpointError) as refused:  # the same world size: no hint about --reshard
        check_resume({"world_size": 4, "config": to_dict(cfg)}, smaller, 4)
    assert "GLOBAL_BATCH" not in str(refused.value)


@pytest.mark.parametrize(
    ("batch", "accum", "world", "expected"),
    [
        (8, 4, 4, "On 4 ranks each rank takes 2 samples per step: train.accum_steps must divide it (1, 2)"),
        (24, 5, 4, "train.accum_steps must divide it (1, 2, 3, 6)"),
        (8, 1, 3, "splits evenly over 1, 2, 4, 8 ranks only"),
        (8, 2, 4, None),
    ],
)
def test_batch_split_hint(shards, batch, accum, world, expected):
    cfg = load_config(TINY, [f"data.train={shards.meta}", f"train.batch_size={batch}", f"train.accum_steps={accum}"])
    hint = batch_split_hint(cfg, world)
    assert hint == expected if expected is None else expected in hint


def test_reshard_needs_resume(capsys):
    from alip.train.__main__ import main

    assert main([str(TINY), "--reshard"]) == 2
    assert "--reshard" in capsys.readouterr().err


def test_a_continued_epoch_resumes_exactly_on_its_own_world_size(shards27):
    meta = shards27
    old = [_loader(meta, 3, r, 2) for r in range(2)]
    for loader in old:
        next(iter(loader))
    states = [loader.state_dict() for loader in old]
    a = _loader(meta, 2, 1, 3)
    a.continue_epoch(states)
    it = iter(a)
    next(it)
    saved = a.state_dict()
    expected = [keys(b) for b in it]
    b = _loader(meta, 2, 1, 3)
    b.load_state_dict(saved)
    assert [keys(x) for x in b] == expected and len(expected) == 2


# ----- changed shards ---------------------------------------------------------------------------------------


def test_changed_shards_are_refused_without_reshard_and_continue_with_it(shards, tmp_path, one_thread, caplog):
    """24 records, checkpointed at step 3 of 5 (epoch 0), continued on 30 records: the data order restarts
    (the steps after the resume read the first batches of a fresh loader on the 30), and the schedule
    continues (a cosine: the last step's learning rate is the uninterrupted run's)."""
    run_dir = tmp_path / "run"
    base = ["train.batch_size=4", "train.max_steps=5", "checkpoint.every_steps=3", "checkpoint.export=false"]
    base += ["schedule.name=cosine", "schedule.warmup=0.2"]
    train(load_config(TINY, [f"data.train={shards.meta}", f"output_dir={run_dir}", *base]))
    grown = write_test_shards(tmp_path / "grown", num_records=30, per_shard=10).meta
    start = str(run_dir / "checkpoints" / "step-00000003.pt")
    assert load_training_state(start)["ranks"][0]["loader"]["epoch"] == 0
    cfg = load_config(TINY, [f"data.train={grown}", f"output_dir={tmp_path / 'b'}", *base])
    with pytest.raises(CheckpointError, match="data.train.*--reshard"):
        train(cfg, start)
    assert not (tmp_path / "b" / "config.yaml").exists()
    record = {"keys": []}
    original = Trainer.train_step
    Trainer.train_step = recording(record)
    try:
        with caplog.at_level(logging.WARNING, logger="alip.train"):
            trainer = train(cfg, start, reshard=True)
    finally:
        Trainer.train_step = original
    assert trainer.state.step == 5 and trainer.loader.num_records == 30
    assert "starts afresh over the 30 records" in caplog.text
    assert [r["step"] for r in losses(tmp_path / "b")] == [4, 5]  # a new folder
    fresh = build_loader(cfg, validate(cfg, 1), torch.device("cpu"))
    it = iter(fresh)
    assert record["keys"] == [keys(next(it)) for _ in range(2)]  # epoch 0 of the 30 records, from its start
    assert lr(ckpt(tmp_path / "b", 5)) == lr(ckpt(run_dir, 5))
    assert lr(ckpt(tmp_path / "b", 5)) != lr(ckpt(run_dir, 3))  # the cosine moved: the check means something
    # The same folder regrown under the same name: its digest differs, refused the same way without the flag.
    state = load_training_state(start)
    state["ranks"][0]["loader"]["shards_digest"] = "0" * 64
    save_checkpoint(state, tmp_path / "edited", 3)
    cfg = load_config(TINY, [f"data.train={shards.meta}", f"output_dir={tmp_path / 'c'}", *base])
    with pytest.raises(CheckpointError, match="shards differ.*--reshard"):
        train(cfg, str(tmp_path / "edited" / "step-00000003.pt"))


# ----- DALI: the epoch starts again, on the parts the new ranks would read -----------------------------------


@pytest.mark.parametrize("epoch", [0, 1])
def test_dali_restarts_the_epoch_on_another_world_size(shards, epoch):
    """DALI's reader position means nothing on other parts: the interrupted epoch starts again from its
    beginning on the new ranks, rank r reading part (r + epoch) % W as an uninterrupted run would, and a
    later resume on the new world size is exact again."""
    pytest.importorskip("nvidia.dali")
    from alip.data.loaders.dali import DaliLoader

    def dali(rank, world, batch):
        cfg = LoaderConfig(batch_size=batch, image_size=32, num_threads=1, shuffle_buffer=8)
        return DaliLoader(shards.meta, cfg, train=True, rank=rank, world_size=world, device="cpu")

    old = [dali(r, 2, 3) for r in range(2)]
    for loader in old:
        for _ in range(epoch):
            list(loader)
        it = iter(loader)
        next(it), next(it)
    states = [loader.state_dict() for loader in old]
    new = [dali(r, 3, 2) for r in range(3)]
    said = [loader.continue_epoch(states) for loader in new]
    assert all((loader.epoch, loader.step) == (epoch, 0) for loader in new)
    assert "12 samples of its first 2 steps are read a second time" in said[0]
    for _ in range(2):  # this epoch and the next: every rank on its own part of the file order, 8 records each
        at = new[0].epoch
        for rank, loader in enumerate(new):
            got = sorted(k for b in loader for k in keys(b))
            part = (rank + at) % 3
            assert got == list(range(8 * part, 8 * part + 8)), (rank, at)
    it = iter(new[1])
    next(it)
    saved = new[1].state_dict()
    expected = [keys(b) for b in it]
    again = dali(1, 3, 2)
    again.load_state_dict(saved)
    assert [keys(b) for b in again] == expected
