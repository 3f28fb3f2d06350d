"""The content-addressed image store: a deletion's sweep against uploads of the same file."""

from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from tinyllava_med.server import storage
from tinyllava_med.server.storage import ImageStore

OLD = time.time() - 3600


def stale_file(tmp_path):
    store = ImageStore(tmp_path)
    sha = store.put(b"pixels")
    os.utime(store.path(sha), (OLD, OLD))
    return store, sha


def test_a_file_stored_again_within_the_grace_period_outlives_the_sweep(tmp_path):
    """The race a deletion must not lose: an upload of the same content reuses the file (and
    touches it) while the deleted study's sweep is due; only a file untouched for the whole
    grace period is removed, with its renderings."""
    store, sha = stale_file(tmp_path)
    path = store.path(sha)
    store.rendered.put((sha, None, None, "limits"), Image.new("L", (2, 2)))
    assert store.put(b"pixels") == sha  # stored again: touched, not rewritten
    assert path.stat().st_mtime > OLD + 3000
    assert not store.remove_if_stale(sha, grace_s=600) and store.exists(sha)
    os.utime(path, (OLD, OLD))
    assert store.remove_if_stale(sha, grace_s=600) and not store.exists(sha)
    assert (sha, None, None, "limits") not in store.rendered
    assert store.remove_if_stale(sha, grace_s=600)  # already gone: nothing to do
    assert os.listdir(path.parent) == []  # nothing left aside


@pytest.mark.parametrize("upload_after_look", [1, 2])
def test_an_upload_between_the_sweeps_look_and_its_removal_keeps_its_file(
    tmp_path, monkeypatch, upload_after_look
):
    """The sweep has found the file stale when an upload of the same content stores it again
    (touching it, or writing it anew when the sweep has just moved it aside): the upload's
    file must be there afterwards, as its image row will refer to it. A sweep that looks once
    and then unlinks loses the first case's file."""
    store, sha = stale_file(tmp_path)
    looks = 0

    def look_then_upload(path, grace_s):
        nonlocal looks
        untouched = untouched_for(path, grace_s)
        looks += 1
        if looks == upload_after_look:
            assert store.put(b"pixels") == sha
        return untouched

    untouched_for = storage._untouched_for
    monkeypatch.setattr(storage, "_untouched_for", look_then_upload)
    removed = store.remove_if_stale(sha, grace_s=600)
    assert store.get(sha) == b"pixels"
    assert removed is (upload_after_look == 2)  # the stale copy went; the upload's is new
    assert looks == 2
    assert os.listdir(store.path(sha).parent) == [sha]  # nothing left aside


def test_a_damaged_copy_is_written_again_and_new_files_reach_the_disk(tmp_path, monkeypatch):
    """A power cut may leave a stored file short (written, renamed, not yet on disk): the same
    content arriving again (the PACS resending the study) replaces it, where before it was only
    touched and stayed damaged for good. Each new file, and its directory entry, is synced
    before `put` returns (and the database row naming it commits)."""
    synced: list[int] = []
    fsync = os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    store = ImageStore(tmp_path)
    sha = store.put(b"pixels" * 100)
    assert len(synced) == 3  # a new shard's entry in the root, the file, then its directory
    store.path(sha).write_bytes(b"pix")  # what the power cut left
    assert store.put(b"pixels" * 100) == sha
    assert store.get(sha) == b"pixels" * 100
    synced.clear()
    assert store.put(b"pixels" * 100) == sha and synced == []  # intact: touched only


def test_what_a_crash_left_in_the_store_goes_at_the_next_start(tmp_path):
    """A crash in the middle of a `put` or of a deletion leaves a `.tmp-*` or `.gone-*` file
    beside the images, which nothing else removes: the next `serve` does, once it is an hour
    old (another process may be writing its own now). Stored images stay."""
    store = ImageStore(tmp_path)
    sha = store.put(b"pixels")
    shard = store.path(sha).parent
    old_tmp, old_gone, fresh = shard / ".tmp-abc", shard / f".gone-{sha}-1234", shard / ".tmp-new"
    for leftover in (old_tmp, old_gone, fresh):
        leftover.write_bytes(b"x")
    for path in (old_tmp, old_gone, store.path(sha)):
        os.utime(path, (OLD - 3600, OLD - 3600))
    assert store.remove_leftovers() == 2
    assert sorted(p.name for p in shard.iterdir()) == [".tmp-new", sha]
