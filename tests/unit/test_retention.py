"""The retention planner (pure, property-tested) and local retention under the journal's word."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runctl.checkpoints import Checkpoint, is_alias, local_checkpoint
from runctl.exceptions import UsageError
from runctl.journal import Journal
from runctl.retention import (
    NOT_DURABLE,
    RetentionPlan,
    apply_local_retention,
    missing_partners,
    plan_retention,
    positions,
)

NOW = 1_000_000.0


def cp(name: str, step: int | None = None, *, complete: bool = True, mtime: float = NOW - 10, size: int = 1,
       is_dir: bool = False) -> Checkpoint:
    return Checkpoint(name, is_dir, step, None, mtime, size, complete, (name,))


def names(items: tuple[Checkpoint, ...]) -> list[str]:
    return [c.name for c in items]


def steps(*numbers: int) -> list[Checkpoint]:
    return [cp(f"step_{n}.pt", n) for n in numbers]


def test_keeps_newest_n_complete() -> None:
    plan = plan_retention(steps(5, 1, 4, 2, 3), keep_last_n=2, now=NOW)
    assert names(plan.delete) == ["step_1.pt", "step_2.pt", "step_3.pt"]
    assert names(plan.keep) == ["step_4.pt", "step_5.pt"]
    assert plan.reasons["step_5.pt"] == "newest complete"
    assert "newest 2" in plan.reasons["step_1.pt"]


@pytest.mark.parametrize("stray", ["embeddings_4096.pt", "embeddings_64.pt"])
def test_a_lone_file_named_by_a_number_beside_step_checkpoints_is_kept_and_not_counted(stray: str) -> None:
    # embeddings_4096.pt ranked as step 4,096: cleanup -n 1 kept it as the newest and deleted
    # step_100.pt and step_200.pt; embeddings_64.pt was deleted itself, as an old step.
    from runctl.checkpoints import parse_step

    found = [cp(n, parse_step(n)[0]) for n in ("step_100.pt", "step_200.pt", stray)]
    plan = plan_retention(found, keep_last_n=1)
    assert names(plan.delete) == ["step_100.pt"]
    assert plan.reasons["step_200.pt"] == "newest complete"
    assert plan.reasons[stray].startswith("kept, not counted")
    # A series is a kind of checkpoint (net_g_#.pth at two steps), and so is a lone numbered
    # name where nothing carries a step marker.
    gan = [cp(f"net_{p}_{s}.pth", s) for s in (1000, 2000) for p in "gd"]
    assert names(plan_retention([*gan, cp("step_3000.pt", 3000)], keep_last_n=2).delete) == [
        "net_d_1000.pth", "net_g_1000.pth"
    ]  # fmt: skip
    alone = [cp("model-00100.safetensors", 100), cp("ckpt_50.pt", 50)]
    assert names(plan_retention(alone, keep_last_n=1).delete) == ["ckpt_50.pt"]


@pytest.mark.parametrize(("keep_last_n", "max_total_size"), [(1, None), (2, None), (2, 3)])
def test_files_saved_at_one_step_count_once_and_go_together(keep_last_n: int, max_total_size: int | None) -> None:
    # BasicSR saves net_g_N.pth and net_d_N.pth: keep-last-1 kept net_g_5000.pth alone and
    # deleted the newest step's discriminator as "older than the newest 1 complete (#2)".
    items = [cp(f"net_{part}_{step}.pth", step, mtime=NOW - 100 + step / 100 + (part == "g"))
             for step in (3000, 4000, 5000) for part in ("g", "d")]
    plan = plan_retention(items, keep_last_n=keep_last_n, max_total_size=max_total_size, now=NOW)
    kept = 1 if max_total_size else keep_last_n  # 3 bytes hold one step's two files, not two steps'
    assert names(plan.keep) == [f"net_{part}_{step}.pth" for step in (4000, 5000)[2 - kept:] for part in ("d", "g")]
    assert plan.reasons["net_d_5000.pth"] == plan.reasons["net_g_5000.pth"] == "newest complete"


def test_a_step_with_a_file_on_its_way_neither_counts_nor_lets_the_one_before_go() -> None:
    # keep-last-1 deleted the 4000 pair once net_g_5000 landed, net_d_5000 still queued: a
    # preemption then left S3 without a whole step.
    items = [cp("net_g_4000.pth", 4000), cp("net_d_4000.pth", 4000), cp("net_g_5000.pth", 5000)]
    plan = plan_retention(items, keep_last_n=1, unsettled={"net_d_5000.pth"}, now=NOW)
    assert plan.delete == ()
    assert "net_d_5000.pth is on its way" in plan.reasons["net_g_5000.pth"]
    assert plan.reasons["net_g_4000.pth"] == "newest complete"
    landed = plan_retention([*items, cp("net_d_5000.pth", 5000)], keep_last_n=1, now=NOW)
    assert names(landed.delete) == ["net_d_4000.pth", "net_g_4000.pth"]


def test_a_step_with_an_incomplete_or_missing_file_does_not_count() -> None:
    # step_3.pt beside an unmarked checkpoint-3/ (its upload in progress): keep-last-1 kept
    # step_3.pt as the newest complete and deleted step 2, the last whole step anywhere.
    items = [*(cp(f"step_{n}.pt", n) for n in (1, 2, 3)),
             *(cp(f"checkpoint-{n}", n, is_dir=True) for n in (1, 2)),
             cp("checkpoint-3", 3, is_dir=True, complete=False)]
    plan = plan_retention(items, keep_last_n=1, now=NOW)
    assert names(plan.delete) == ["checkpoint-1", "step_1.pt"]
    assert plan.reasons["step_2.pt"] == "newest complete"
    assert plan.reasons["step_3.pt"] == "its step is not whole yet (checkpoint-3 is incomplete)"
    # A partner skipped as moot never comes: that old step goes once N whole ones are newer.
    pairs = [cp(f"net_{part}_{n}.pth", n) for n in (4, 5) for part in ("g", "d")]
    plan = plan_retention([cp("net_g_2.pth", 2), *pairs], keep_last_n=1, unfinished={"net_d_2.pth"}, now=NOW)
    assert names(plan.delete) == ["net_g_2.pth", "net_d_4.pth", "net_g_4.pth"]
    assert "not whole (net_d_2.pth was left unfinished)" in plan.reasons["net_g_2.pth"]


def test_protecting_one_file_keeps_what_was_saved_at_its_step() -> None:
    items = [cp(f"net_{part}_{step}.pth", step) for step in (4000, 5000) for part in ("g", "d")]
    plan = plan_retention(items, keep_last_n=1, protected={"net_g_4000.pth"}, now=NOW)
    assert plan.delete == ()
    assert plan.reasons["net_d_4000.pth"] == "saved at the step of net_g_4000.pth (protected)"


def test_the_newest_version_of_a_name_at_a_step_is_the_newest_whatever_its_suffix() -> None:
    # filename="{epoch}" with several saves an epoch: Lightning reuses epoch=0.ckpt once top-k
    # dropped it, so the plain name can be newer than epoch=0-v1.ckpt.
    older, newer = cp("epoch=0-v1.ckpt", None, mtime=NOW - 200), cp("epoch=0.ckpt", None, mtime=NOW - 100)
    older, newer = (Checkpoint(c.name, False, None, 0, c.mtime, 1, True, (c.name,)) for c in (older, newer))
    plan = plan_retention([older, newer], keep_last_n=1, now=NOW)
    assert names(plan.delete) == ["epoch=0-v1.ckpt"]
    resaved = Checkpoint("epoch=0-step=8-v1.ckpt", False, 8, 0, NOW - 50, 1, True, ())
    first = Checkpoint("epoch=0-step=8.ckpt", False, 8, 0, NOW - 500, 1, True, ())
    assert names(plan_retention([first, resaved], keep_last_n=1, now=NOW).delete) == ["epoch=0-step=8.ckpt"]


def test_versions_landing_in_one_second_go_by_their_number_and_a_protected_one_holds_its_step() -> None:
    # S3 stamps whole seconds: "x.ckpt" sorted after "x-v1.ckpt" by name, and S3 kept the older.
    first = Checkpoint("epoch=0-step=8.ckpt", False, 8, 0, NOW - 50, 1, True, ())
    again = Checkpoint("epoch=0-step=8-v1.ckpt", False, 8, 0, NOW - 50, 1, True, ())
    assert names(plan_retention([first, again], keep_last_n=1, now=NOW).delete) == ["epoch=0-step=8.ckpt"]
    # Protecting the older version keeps everything saved at step 8.
    partner = Checkpoint("ema-epoch=0-step=8.ckpt", False, 8, 0, NOW - 49, 1, True, ())
    newer = Checkpoint("epoch=0-step=9.ckpt", False, 9, 0, NOW - 10, 1, True, ())
    plan = plan_retention([first, again, partner, newer], keep_last_n=1, protected={"epoch=0-step=8.ckpt"}, now=NOW)
    assert plan.delete == ()


def test_none_keeps_everything() -> None:
    plan = plan_retention(steps(1, 2, 3), keep_last_n=None, now=NOW)
    assert plan.delete == ()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True])
def test_keep_last_n_below_one_is_a_usage_error(bad: object) -> None:
    with pytest.raises(UsageError, match="keep_last_n"):
        plan_retention(steps(1), keep_last_n=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("arg", "value"), [("max_total_size", -1), ("incomplete_older_than", -5)])
def test_negative_limits_are_usage_errors(arg: str, value: int) -> None:
    with pytest.raises(UsageError, match=arg):
        plan_retention(steps(1), keep_last_n=1, **{arg: value})


def test_incomplete_do_not_count_and_are_kept() -> None:
    items = [*steps(1, 2), cp("checkpoint-3", 3, complete=False, is_dir=True)]
    plan = plan_retention(items, keep_last_n=1, now=NOW)
    assert names(plan.keep) == ["step_2.pt", "checkpoint-3"]
    assert names(plan.delete) == ["step_1.pt"]
    assert "incomplete" in plan.reasons["checkpoint-3"]


def test_abandoned_incomplete_deleted_only_when_older_than() -> None:
    old = cp("checkpoint-3", 3, complete=False, mtime=NOW - 3600)
    fresh = cp("checkpoint-4", 4, complete=False, mtime=NOW - 10)
    plan = plan_retention([*steps(1), old, fresh], keep_last_n=1, incomplete_older_than=600, now=NOW)
    assert names(plan.delete) == ["checkpoint-3"]
    assert "abandoned" in plan.reasons["checkpoint-3"]
    plan = plan_retention([*steps(1), old, fresh], keep_last_n=1, now=NOW)
    assert plan.delete == ()
    # One with a marker that could not be read (503s, a timeout) or does not match is no
    # abandoned upload: cleanup --incomplete-older-than deleted every complete checkpoint whose
    # marker read failed, the newest too (fault pass).
    unread = dataclasses.replace(old, marker="checkpoint-3/.runctl-manifest.json")
    plan = plan_retention([*steps(1), unread, fresh], keep_last_n=1, incomplete_older_than=600, now=NOW)
    assert plan.delete == ()
    assert "marker could not be read" in plan.reasons["checkpoint-3"]
    # It goes as a complete one would: once the newest keep-last-N whole steps are newer (it
    # was kept for good, storage leaking; walkthrough).
    plan = plan_retention([unread, *steps(5, 6)], keep_last_n=2, now=NOW)
    assert names(plan.delete) == ["checkpoint-3"]
    assert "newest 2 whole are newer" in plan.reasons["checkpoint-3"]
    assert plan_retention([unread, *steps(5, 6)], keep_last_n=3, now=NOW).delete == ()


def test_unfinished_deletion_of_an_incomplete_checkpoint_is_finished() -> None:
    half = cp("checkpoint-1", 1, complete=False, is_dir=True)
    fresh = cp("checkpoint-4", 4, complete=False, is_dir=True)
    plan = plan_retention([half, fresh, *steps(2)], keep_last_n=5, unfinished={"checkpoint-1"}, now=NOW)
    assert names(plan.delete) == ["checkpoint-1"]
    assert "killed run" in plan.reasons["checkpoint-1"]
    # Protected still wins: the name may be the one this run resumed from.
    plan = plan_retention([half, *steps(2)], keep_last_n=5, unfinished={"checkpoint-1"},
                          protected={"checkpoint-1"}, now=NOW)
    assert plan.delete == ()


def test_protected_and_aliases_are_kept_and_do_not_use_up_n() -> None:
    items = [*steps(1, 2, 3, 4), cp("last.ckpt", mtime=NOW)]
    plan = plan_retention(items, keep_last_n=2, protected={"step_1.pt"}, now=NOW)
    assert names(plan.keep) == ["last.ckpt", "step_1.pt", "step_3.pt", "step_4.pt"]
    assert names(plan.delete) == ["step_2.pt"]
    assert plan.reasons["step_1.pt"] == "protected"
    assert plan.reasons["last.ckpt"].startswith("alias")


def test_protected_names_may_be_paths_or_one_string() -> None:
    items = [*steps(1, 2, 3), cp("checkpoint-0", 0, is_dir=True)]
    plan = plan_retention(items, keep_last_n=1, protected=["checkpoint-0/", "runs/7/step_1.pt"], now=NOW)
    assert names(plan.delete) == ["step_2.pt"]
    plan = plan_retention(items, keep_last_n=1, protected="step_2.pt", now=NOW)
    assert names(plan.delete) == ["checkpoint-0", "step_1.pt"]


def test_max_total_size_deletes_oldest_but_never_newest() -> None:
    items = [cp(f"step_{n}.pt", n, size=10) for n in range(1, 5)]
    plan = plan_retention(items, keep_last_n=None, max_total_size=25, now=NOW)
    assert names(plan.delete) == ["step_1.pt", "step_2.pt"]
    assert "max_total_size" in plan.reasons["step_1.pt"]
    plan = plan_retention(items, keep_last_n=None, max_total_size=0, now=NOW)
    assert names(plan.keep) == ["step_4.pt"]


def test_plan_to_json() -> None:
    plan = plan_retention(steps(1, 2), keep_last_n=1, now=NOW)
    doc = plan.to_json()
    assert [c["name"] for c in doc["delete"]] == ["step_1.pt"]
    assert doc["keep"][0]["reason"] == "newest complete"
    assert doc["bytes_freed"] == 1


# --- properties -------------------------------------------------------------------------------


@st.composite
def checkpoint_sets(draw: st.DrawFn) -> tuple[list[Checkpoint], set[str]]:
    count = draw(st.integers(0, 12))
    items: list[Checkpoint] = []
    for i in range(count):
        kind = draw(st.sampled_from(["step", "step", "step", "version", "mtime", "alias"]))
        step = draw(st.integers(0, 50)) if kind in ("step", "version") else None
        name = {
            "step": f"step_{step}-{i}.pt",
            "version": f"step_{step}-v{i}.pt",  # versions of step_{step}.pt, as Lightning names them
            "mtime": f"ckpt{i}.pt",
            "alias": f"last-v{i}.ckpt",
        }[kind]
        items.append(
            cp(
                name,
                step,
                complete=draw(st.booleans()) if kind != "alias" else True,
                mtime=NOW - draw(st.integers(0, 10_000)),
                size=draw(st.integers(0, 100)),
            )
        )
        if not items[-1].complete and draw(st.booleans()):  # a marker unread or not matching
            items[-1] = dataclasses.replace(items[-1], marker=f"{name}/.runctl-manifest.json")
    protected = set(draw(st.lists(st.sampled_from([c.name for c in items]), unique=True))) if items else set()
    return items, protected


limits = dict(
    keep_last_n=st.one_of(st.none(), st.integers(1, 6)),
    max_total_size=st.one_of(st.none(), st.integers(0, 500)),
    incomplete_older_than=st.one_of(st.none(), st.integers(0, 10_000)),
)


@settings(max_examples=300, deadline=None)
@given(data=checkpoint_sets(), **limits)
def test_plan_properties(
    data: tuple[list[Checkpoint], set[str]],
    keep_last_n: int | None,
    max_total_size: int | None,
    incomplete_older_than: int | None,
) -> None:
    items, protected = data
    kwargs = dict(protected=protected, max_total_size=max_total_size,
                  incomplete_older_than=incomplete_older_than, now=NOW)
    plan = plan_retention(items, keep_last_n, **kwargs)

    # Every checkpoint is either kept or deleted, with a reason.
    assert sorted(names(plan.keep) + names(plan.delete)) == sorted(c.name for c in items)
    assert set(plan.reasons) == {c.name for c in items}

    for c in plan.delete:
        assert c.name not in protected
        assert not is_alias(c.name)
        if not c.complete and c.marker is None:
            assert incomplete_older_than is not None and NOW - c.mtime > incomplete_older_than
        elif not c.complete:  # a marker unread or not matching: as keep-last-N would a complete one
            assert keep_last_n is not None

    ranked = sorted((c for c in items if c.complete and not is_alias(c.name)), key=Checkpoint.order_key)
    if ranked:
        assert ranked[-1] in plan.keep  # the newest complete

    at = positions(items)
    held = {at[name] for name in protected}
    not_whole = {c.order_key()[:2] for c in plan.keep if not c.complete and not is_alias(c.name)}
    not_whole |= set(missing_partners(items))  # a step lacking a kind of file its neighbours have
    if keep_last_n is not None:
        extra = [c for c in plan.keep
                 if at[c.name] in held or is_alias(c.name) or not c.complete or c.order_key()[:2] in not_whole]
        assert len({at[c.name] for c in plan.keep if c not in extra}) <= keep_last_n

    # Complete checkpoints saved at one step stay or go together, protected or not.
    for c in (c for c in plan.delete if c.complete):
        assert at[c.name] not in held
        assert not [k for k in plan.keep if at[k.name] == at[c.name] and k.complete and not is_alias(k.name)]

    # Deterministic, and independent of input order.
    assert plan_retention(list(reversed(items)), keep_last_n, **kwargs) == plan

    # Idempotent: once the plan is applied, planning again deletes nothing.
    again = plan_retention(list(plan.keep), keep_last_n, **kwargs)
    assert again.delete == ()


# --- local retention --------------------------------------------------------------------------


def write_steps(root: Path, *numbers: int) -> None:
    for n in numbers:
        path = root / f"step_{n}.pt"
        path.write_bytes(b"x" * n)
        os.utime(path, (1000 + n, 1000 + n))


def verify_all(root: Path) -> None:
    journal = Journal(root)
    for entry in sorted(root.iterdir()):
        if entry.name != ".runctl":
            c = local_checkpoint(entry, root)
            journal.record(c.name, "verified", size=c.size, mtime=c.mtime)


def test_local_keeps_what_is_not_durable(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2, 3, 4)
    (tmp_path / "train.log").write_text("log")
    plan = apply_local_retention(tmp_path, 1)
    assert plan.delete == ()
    assert {plan.reasons[n] for n in ("step_1.pt", "step_2.pt", "step_3.pt")} == {NOT_DURABLE}
    assert len(list(tmp_path.glob("step_*.pt"))) == 4


def test_local_deletes_durable_and_records_it(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2, 3)
    hf = tmp_path / "checkpoint-0"
    hf.mkdir()
    (hf / "model.bin").write_bytes(b"m")
    (tmp_path / "train.log").write_text("log")
    verify_all(tmp_path)
    plan = apply_local_retention(tmp_path, 2)
    assert names(plan.delete) == ["checkpoint-0", "step_1.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runctl", "step_2.pt", "step_3.pt", "train.log"]
    replay = Journal(tmp_path).replay()
    assert replay["step_1.pt"].state == "deleted_local"
    assert replay["checkpoint-0"].state == "deleted_local"


def test_local_rewritten_file_is_not_durable(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2)
    verify_all(tmp_path)
    (tmp_path / "step_1.pt").write_bytes(b"rewritten")
    plan = apply_local_retention(tmp_path, 1)
    assert plan.delete == () and plan.reasons["step_1.pt"] == NOT_DURABLE


def test_local_deleted_in_s3_after_verify_may_go(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2)
    verify_all(tmp_path)
    Journal(tmp_path).record("step_1.pt", "deleted_s3")
    plan = apply_local_retention(tmp_path, 1)
    assert names(plan.delete) == ["step_1.pt"]


def test_local_keeps_a_step_whole_when_one_of_its_files_is_not_durable(tmp_path: Path) -> None:
    # Only model_step_1..3.pt were in S3: keep-last-1 deleted them and kept optim_step_1..3.pt
    # as "not durable": every older step was split.
    for n in (1, 2, 3, 4):
        for part in ("model", "optim"):
            path = tmp_path / f"{part}_step_{n}.pt"
            path.write_bytes(b"x" * n)
            os.utime(path, (1000 + n, 1000 + n))
    journal = Journal(tmp_path)
    for n in (1, 2, 3):
        c = local_checkpoint(tmp_path / f"model_step_{n}.pt", tmp_path)
        journal.record(c.name, "verified", size=c.size, mtime=c.mtime)
    plan = apply_local_retention(tmp_path, 1)
    assert plan.delete == ()
    assert plan.reasons["model_step_2.pt"] == "saved at the step of optim_step_2.pt, which is not durable in S3"
    c = local_checkpoint(tmp_path / "optim_step_1.pt", tmp_path)
    journal.record(c.name, "verified", size=c.size, mtime=c.mtime)
    assert names(apply_local_retention(tmp_path, 1).delete) == ["model_step_1.pt", "optim_step_1.pt"]


def test_local_force_and_custom_predicate(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2, 3)
    plan = apply_local_retention(tmp_path, 1, also_durable=lambda c: c.name == "step_1.pt")
    assert names(plan.delete) == ["step_1.pt"] and plan.reasons["step_2.pt"] == NOT_DURABLE
    plan = apply_local_retention(tmp_path, 1, force=True)
    assert names(plan.delete) == ["step_2.pt"]
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_3.pt"]


def test_local_dry_run_changes_nothing(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2, 3)
    plan = apply_local_retention(tmp_path, 1, force=True, dry_run=True)
    assert isinstance(plan, RetentionPlan) and names(plan.delete) == ["step_1.pt", "step_2.pt"]
    assert len(list(tmp_path.glob("step_*"))) == 3
    assert "step_1.pt" not in Journal(tmp_path).replay()


def test_local_protected(tmp_path: Path) -> None:
    write_steps(tmp_path, 1, 2, 3)
    plan = apply_local_retention(tmp_path, 1, force=True, protected={"step_1.pt"})
    assert names(plan.delete) == ["step_2.pt"]


def test_local_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="keep_last_n"):
        apply_local_retention(tmp_path, 0)
    with pytest.raises(UsageError, match="does not exist"):
        apply_local_retention(tmp_path / "missing", 1)
    assert not (tmp_path / "missing").exists()


def test_a_newest_step_lacking_a_kind_of_file_the_step_before_has_is_not_whole() -> None:
    # What S3 cannot show (a partner queued in the writer, or lost with a crash) its shape can.
    def cp(name: str, step: int) -> Checkpoint:
        return Checkpoint(name, False, step, None, float(step), 1, True)

    pairs = [cp(f"{part}_step_{s}.pt", s) for s in (1, 2) for part in ("model", "optim")]
    plan = plan_retention([*pairs, cp("model_step_3.pt", 3)], keep_last_n=1)
    assert names(plan.delete) == ["model_step_1.pt", "optim_step_1.pt"]  # step 2 is the newest whole
    assert "optim_step_#.pt is missing, saved at step 2" in plan.reasons["model_step_3.pt"]
    # A kind of file that appears only now (an EMA copy) does not hold anything back.
    plan = plan_retention([*pairs, cp("model_step_3.pt", 3), cp("optim_step_3.pt", 3), cp("ema_step_3.pt", 3)], keep_last_n=1)
    assert sorted(names(plan.keep)) == ["ema_step_3.pt", "model_step_3.pt", "optim_step_3.pt"]
    # Only the newest step is judged: a run that stops saving its optimizer holds back one step.
    plan = plan_retention([*pairs, cp("model_step_3.pt", 3), cp("model_step_4.pt", 4)], keep_last_n=1)
    assert sorted(names(plan.keep)) == ["model_step_4.pt"]


def test_an_old_incomplete_checkpoint_never_costs_a_newer_one_its_place_under_a_size_cap() -> None:
    # checkpoint-200's marker could not be read: kept, and counted, so --max-total-size deleted
    # checkpoint-400 in its place (retention pass). It is not counted now: 400 and 500 stay.
    items = [cp(f"checkpoint-{n}", n, size=100, is_dir=True) for n in (100, 200, 300, 400, 500)]
    items[1] = dataclasses.replace(items[1], complete=False, marker="checkpoint-200/.runctl-manifest.json")
    plan = plan_retention(items, keep_last_n=None, max_total_size=250, now=NOW)
    assert names(plan.delete) == ["checkpoint-100", "checkpoint-300"]
    # an upload under way (newer than the newest whole step) still counts: room is made for it
    newest = cp("checkpoint-600", 600, complete=False, size=100, is_dir=True)
    plan = plan_retention([*items, newest], keep_last_n=None, max_total_size=250, now=NOW)
    assert names(plan.delete) == ["checkpoint-100", "checkpoint-300", "checkpoint-400"]
