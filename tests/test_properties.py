"""Property-based test of osync.py (DESIGN §4.1, §4.3, §4.5): random edits on both replicas between
runs, runs that are killed at a random moment, and after every normal run:

1. the run exits 0 (or 2, warnings only);
2. both replicas are equal outside .osync_workdir (paths, types, contents, link targets, mode bits);
3. every file content that existed in either replica (tree, backup/, deleted/) before the run -- or before
   any killed run since the last normal run -- is still somewhere in the tree, backup/ or deleted/;
4. an immediate second run exits 0 and changes nothing (tree, backup/ and deleted/, mtimes and inodes).

Every content ever written is unique and one byte longer than the one before, so a modification is always
visible to a size/mtime comparison and a content always says where it came from.

Longer runs: OSYNC_HYPOTHESIS_EXAMPLES=500 OSYNC_HYPOTHESIS_STEPS=30 python3 -m pytest tests/test_properties.py
(OSYNC_HYPOTHESIS_SHRINK_SECONDS caps the time spent shrinking a failure, 120 s by default).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hypothesis import HealthCheck, event, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule  # noqa: E402

import treeutil as tu  # noqa: E402
from conftest import clean_env, describe, popen_osync, run_osync  # noqa: E402
from test_unreadable import SYSTEM_PYTHON, USER, chown_tree, ensure_plain_user  # noqa: E402

EXAMPLES = int(os.environ.get("OSYNC_HYPOTHESIS_EXAMPLES", "50"))
STEPS = int(os.environ.get("OSYNC_HYPOTHESIS_STEPS", "15"))
# Every example runs osync.py several times, so shrinking a failure is slow; Hypothesis gives it five
# minutes.  Cap that (a private knob: ignored when a Hypothesis version does not have it).
SHRINK_SECONDS = int(os.environ.get("OSYNC_HYPOTHESIS_SHRINK_SECONDS", "120"))
try:
    from hypothesis.internal.conjecture import engine as _engine
    if hasattr(_engine, "MAX_SHRINKING_SECONDS"):
        _engine.MAX_SHRINKING_SECONDS = SHRINK_SECONDS
except ImportError:  # pragma: no cover
    pass

SETTINGS = {
    "CONFLICT_BACKUP": "yes",
    "CONFLICT_BACKUP_MULTIPLE": "yes",
    "SOFT_DELETE": "yes",
}

SIDES = ("initiator", "target")
side_st = st.sampled_from(SIDES)
# a small name space, so that both sides touch the same paths often
path_st = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(
    lambda parts: "/".join(parts).encode())
pick_st = st.integers(min_value=0, max_value=10 ** 6)
file_mode_st = st.sampled_from([0o644, 0o600, 0o755])
dir_mode_st = st.sampled_from([0o755, 0o700, 0o750])
mtime_st = st.sampled_from(["now", "equal-to-other-side", "past", "ancient", "future"])
link_target_st = st.sampled_from([b"a", b"b/c", b"../a", b"nowhere"])


class OsyncMachine(RuleBasedStateMachine):

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="osync-prop-").encode()
        self.roots = {side: self.tmp + b"/" + side.encode() for side in SIDES}
        for root in self.roots.values():
            os.mkdir(root)
        self.logfile = self.tmp + b"/osync.log"
        self.counter = 0
        self.pending = set()   # contents present before a run (normal or killed) not yet checked
        self.dirty = False     # edits or a killed run since the last checked normal run
        self.actions = []
        self.runs = 0
        self.syncs = 0         # checked (normal) syncs so far
        self.failed = False    # a check failed: teardown must not run (and fail) another sync

    # ------------------------------------------------------------------ helpers

    def log(self, text):
        self.actions.append(text)
        note(text)

    def other(self, side):
        return "target" if side == "initiator" else "initiator"

    def path(self, side, rel):
        return tu.join(self.roots[side], rel)

    def content(self, side, rel):
        """A new content: unique, and strictly longer than every content written before."""
        self.counter += 1
        head = "<v%d %s %s>" % (self.counter, side, rel.decode())
        return (head + "." * (64 + self.counter - len(head)) + "\n").encode()

    def ancestors_ok(self, side, rel):
        """True when no ancestor of rel is a file or a symlink (absent ancestors are fine)."""
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            t = tu.ltype(self.path(side, b"/".join(parts[:i])))
            if t is None:
                return True
            if t != "dir":
                return False
        return True

    def entries(self, side, kinds):
        return sorted(rel for rel, st_ in tu.walk(self.roots[side])
                      if tu.kind(st_.st_mode) in kinds)

    def choose(self, side, kinds, pick):
        found = self.entries(side, kinds)
        if not found:
            return None
        return found[pick % len(found)]

    def skip(self, what):
        self.log("(skipped: %s)" % what)

    def write(self, side, rel):
        data = self.content(side, rel)
        tu.write_file(self.path(side, rel), data)
        self.dirty = True
        return data

    def contents_at(self, side, rel):
        """Contents of the file at rel, or of every file below it when it is a dir."""
        path = self.path(side, rel)
        t = tu.ltype(path)
        if t == "file":
            return {tu.read_file(path)}
        if t == "dir":
            return {tu.read_file(tu.join(path, sub)) for sub, st_ in tu.walk(path)
                    if tu.kind(st_.st_mode) == "file"}
        return set()

    def user_destroyed(self, contents):
        """The user (not osync.py) overwrote or removed these contents.  Contents recorded before a
        killed run are owed only while some copy of them is left: forget those that had no other."""
        if not self.pending or not contents:
            return
        present = set()
        for root in self.roots.values():
            present |= tu.file_contents(root)
        forgotten = (contents - present) & self.pending
        if forgotten:
            self.pending -= forgotten
            self.log("(no longer owed, the user destroyed their last copy: %s)" % ", ".join(
                repr(c[:24]) for c in sorted(forgotten)))

    def record_contents(self):
        for root in self.roots.values():
            self.pending |= tu.file_contents(root)

    def history(self):
        return "\n".join("  " + a for a in self.actions)

    def describe(self):
        return "actions so far:\n%s\ninitiator:\n%s\ntarget:\n%s" % (
            self.history(), tu.dump_tree(self.roots["initiator"]), tu.dump_tree(self.roots["target"]))

    # how osync.py is started (see conftest.osync_command): this Python, as this user
    prefix = ()
    python = None
    script = None

    def before_run(self):
        """What the machine does to the trees before each run (nothing here)."""

    def osync_argv(self):
        return ["--initiator=" + os.fsdecode(self.roots["initiator"]),
                "--target=" + os.fsdecode(self.roots["target"]), "--instance-id=prop", "--non-interactive"]

    def osync_env(self, settings=None):
        return clean_env(os.fsdecode(self.logfile), settings or SETTINGS)

    def run(self, settings=None):
        self.runs += 1
        self.before_run()
        return run_osync(self.osync_argv(), self.osync_env(settings), os.fsdecode(self.tmp), timeout=300,
                         logfile=os.fsdecode(self.logfile), python=self.python, prefix=self.prefix,
                         script=self.script)

    # ------------------------------------------------------------------ edits

    @initialize(files=st.lists(path_st, max_size=6, unique=True))
    def start(self, files):
        """Most examples start from a synced tree, so that edits hit paths with a previous state."""
        for rel in files:
            if self.ancestors_ok("initiator", rel) and tu.ltype(self.path("initiator", rel)) is None:
                data = self.write("initiator", rel)
                self.log("initiator: create file %r = %r" % (rel, data[:24]))
        if files:
            self.log("initial sync")
            self.sync()

    @rule(side=side_st, rel=path_st)
    def create_file(self, side, rel):
        if not self.ancestors_ok(side, rel):
            return self.skip("%s: create %r, an ancestor is not a dir" % (side, rel))
        t = tu.ltype(self.path(side, rel))
        if t not in (None, "file"):
            return self.skip("%s: create %r, it is a %s" % (side, rel, t))
        old = self.contents_at(side, rel)
        data = self.write(side, rel)
        self.log("%s: create file %r = %r" % (side, rel, data[:24]))
        self.user_destroyed(old)

    @rule(side=side_st, pick=pick_st, mtime=mtime_st)
    def modify_file(self, side, pick, mtime):
        rel = self.choose(side, ("file",), pick)
        if rel is None:
            return self.skip("%s: modify, no file" % side)
        old = self.contents_at(side, rel)
        data = self.write(side, rel)
        path = self.path(side, rel)
        when = None
        if mtime == "equal-to-other-side":
            try:
                when = os.lstat(self.path(self.other(side), rel)).st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                when = None
        elif mtime == "past":
            when = time.time_ns() - 7200 * 10 ** 9
        elif mtime == "ancient":
            when = 946684800 * 10 ** 9  # 2000-01-01
        elif mtime == "future":
            when = time.time_ns() + 86400 * 10 ** 9
        if when is not None:
            os.utime(path, ns=(when, when))
        self.log("%s: modify file %r = %r, mtime %s (%s)" % (side, rel, data[:24], mtime, when))
        self.user_destroyed(old)

    @rule(side=side_st, pick=pick_st)
    def delete(self, side, pick):
        """rm a file or a symlink, rm -rf a directory."""
        rel = self.choose(side, ("file", "link", "dir"), pick)
        if rel is None:
            return self.skip("%s: delete, nothing" % side)
        old = self.contents_at(side, rel)
        path = self.path(side, rel)
        if tu.ltype(path) == "dir":
            shutil.rmtree(path)
            self.log("%s: rm -rf %r" % (side, rel))
        else:
            os.unlink(path)
            self.log("%s: rm %r" % (side, rel))
        self.dirty = True
        self.user_destroyed(old)

    @rule(side=side_st, rel=path_st, mode=dir_mode_st)
    def mkdir(self, side, rel, mode):
        if not self.ancestors_ok(side, rel):
            return self.skip("%s: mkdir %r, an ancestor is not a dir" % (side, rel))
        if tu.lexists(self.path(side, rel)):
            return self.skip("%s: mkdir %r, it exists" % (side, rel))
        os.makedirs(self.path(side, rel))
        os.chmod(self.path(side, rel), mode)
        self.dirty = True
        self.log("%s: mkdir -p %r, mode %o" % (side, rel, mode))

    @rule(side=side_st, pick=pick_st, file_mode=file_mode_st, dir_mode=dir_mode_st)
    def chmod(self, side, pick, file_mode, dir_mode):
        rel = self.choose(side, ("file", "dir"), pick)
        if rel is None:
            return self.skip("%s: chmod, nothing" % side)
        path = self.path(side, rel)
        mode = dir_mode if tu.ltype(path) == "dir" else file_mode
        os.chmod(path, mode)
        self.dirty = True
        self.log("%s: chmod %o %r" % (side, mode, rel))

    @rule(side=side_st, pick=pick_st, to_link=st.booleans(), with_child=st.booleans(),
          link_to=link_target_st)
    def change_type(self, side, pick, to_link, with_child, link_to):
        """file -> dir (to_link False) or symlink (to_link True); dir -> file; symlink -> file."""
        rel = self.choose(side, ("file", "dir", "link"), pick)
        if rel is None:
            return self.skip("%s: change type, nothing" % side)
        path = self.path(side, rel)
        t = tu.ltype(path)
        old = self.contents_at(side, rel)
        self.dirty = True
        if t == "file" and to_link:
            os.unlink(path)
            os.symlink(link_to, path)
            self.log("%s: file -> symlink %r -> %r" % (side, rel, link_to))
        elif t == "file":
            os.unlink(path)
            os.mkdir(path)
            if with_child:
                data = self.write(side, rel + b"/a")
                self.log("%s: file -> dir %r, with file %r = %r" % (side, rel, rel + b"/a", data[:24]))
            else:
                self.log("%s: file -> empty dir %r" % (side, rel))
        elif t == "dir":
            shutil.rmtree(path)
            data = self.write(side, rel)
            self.log("%s: dir -> file %r = %r" % (side, rel, data[:24]))
        else:
            os.unlink(path)
            data = self.write(side, rel)
            self.log("%s: symlink -> file %r = %r" % (side, rel, data[:24]))
        self.user_destroyed(old)

    # ------------------------------------------------------------------ the environment

    @rule(side=side_st, pick=pick_st)
    def editor_saves_during_a_run(self, side, pick):
        """A run in which an editor saves a file on `side` (write a temp file, rename it over the
        file) after osync.py checked it and before rsync replaces anything.  The run must not
        lose the save; the next checked sync verifies it is still somewhere and that all converges."""
        rel = self.choose(side, ("file",), pick)
        if rel is None:
            return self.skip("%s: editor save during a run, no file" % side)
        self.record_contents()
        old = self.contents_at(side, rel)
        data = self.content(side, rel)
        saved = self.tmp + b"/editor-save"
        with open(saved, "wb") as handle:
            handle.write(data)
        target_path = self.path(side, rel)
        done = self.tmp + b"/editor-save.done"
        script = self.tmp + b"/rsync-editor"
        quote = lambda path: "'" + os.fsdecode(path).replace("'", "'\\''") + "'"
        with open(script, "w") as handle:
            handle.write("#!/bin/sh\n[ -e {done} ] || {{ cp {saved} {dest}.swp && mv {dest}.swp {dest} && touch {done}; }}\n"
                         "exec {rsync} \"$@\"\n".format(done=quote(done), saved=quote(saved), dest=quote(target_path),
                                                      rsync=shutil.which("rsync")))
        os.chmod(script, 0o755)
        self.log("%s: run, with an editor saving %r = %r before rsync replaces anything" % (side, rel, data[:24]))
        result = self.run(settings=dict(SETTINGS, RSYNC_EXECUTABLE=os.fsdecode(script)))
        if os.path.exists(done):
            os.unlink(done)
            self.pending.add(data)   # saved by the user: never to be lost
            self.user_destroyed(old)
            event("editor save raced a transfer")
        else:
            self.log("(no rsync ran: nothing raced)")
        self.dirty = True
        assert result.returncode in (0, 2), "run with a racing editor failed\n%s\n%s" % (
            describe(result), self.describe())

    def last_sync_id(self):
        """The id of the last sync that wrote the state (a run that changed nothing keeps it)."""
        path = tu.join(self.roots["initiator"], tu.WORKDIR + b"/state/osync.py-state-prop")
        try:
            with open(path, "rb") as handle:
                return json.loads(handle.readline().decode()).get("sync_id")
        except (OSError, ValueError):
            return None

    @rule()
    def keep_the_target_disk(self):
        """Put a copy of the target (work dir included) on the shelf: an older disk, for later."""
        if self.dirty:
            return self.skip("keep the target disk: the replicas are not synced")
        shelf = self.tmp + b"/old-disk"
        if os.path.lexists(shelf):
            shutil.rmtree(shelf)
        shutil.copytree(self.roots["target"], shelf, symlinks=True)
        self.old_disk_syncs = self.syncs
        self.old_disk_sync_id = self.last_sync_id()
        self.log("keep a copy of the target disk (after sync %d)" % self.syncs)

    @rule()
    def rotate_in_the_old_disk(self):
        """Mount the older disk at the target's place: the run must refuse and change nothing;
        then the current disk comes back."""
        shelf = self.tmp + b"/old-disk"
        if not os.path.lexists(shelf) or self.last_sync_id() == getattr(self, "old_disk_sync_id", None):
            return self.skip("rotate in the old disk: no disk on the shelf older than the last sync")
        current = self.tmp + b"/current-disk"
        os.rename(self.roots["target"], current)
        shutil.copytree(shelf, self.roots["target"], symlinks=True)
        before = {side: tu.full_snapshot(self.roots[side]) for side in SIDES}
        self.log("rotate in the disk kept after sync %d, run" % self.old_disk_syncs)
        result = self.run()
        for side in SIDES:
            diff = tu.diff_snapshots(before[side], tu.full_snapshot(self.roots[side]), "before", "after")
            assert not diff, "a run on an older target disk changed the %s:\n%s\n%s\n%s" % (
                side, "\n".join(diff), describe(result), self.describe())
        # a disk kept before the first sync has no work dir at all: refused as unmounted or replaced
        assert result.returncode == 1 and ("older sync" in result.output or "unmounted or replaced" in result.output), \
            "an older target disk was not refused\n%s\n%s" % (describe(result), self.describe())
        shutil.rmtree(self.roots["target"])
        os.rename(current, self.roots["target"])
        self.log("the current disk is back")

    # ------------------------------------------------------------------ runs

    @rule(delay=st.floats(min_value=0.0, max_value=0.4), anchor=st.sampled_from(["start", "lock"]))
    def killed_sync(self, delay, anchor):
        """SIGKILL a run (and its rsync children) `delay` seconds after it started, or after it took
        the lock of the initiator (so that the kill lands inside the sync more often)."""
        self.record_contents()
        self.before_run()
        # in its own process group, so that the whole run, rsync included, can be killed
        proc = popen_osync(self.osync_argv(), self.osync_env(), os.fsdecode(self.tmp), python=self.python,
                           prefix=self.prefix, script=self.script, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
        if anchor == "lock":
            lock = tu.join(self.roots["initiator"], tu.WORKDIR + b"/lock")
            deadline = time.time() + 5
            while proc.poll() is None and not os.path.exists(lock) and time.time() < deadline:
                time.sleep(0.001)
        time.sleep(delay)
        finished = proc.poll()
        tu.kill_run(proc)
        self.runs += 1
        self.dirty = True
        event("killed run: %s" % ("had already exited" if finished is not None else "killed"))
        self.log("killed run %.3f s after its %s (%s)" % (
            delay, anchor, "it had already exited %s" % finished if finished is not None else "SIGKILL"))

    @rule()
    def sync(self):
        try:
            self.checked_sync()
        except BaseException:
            self.failed = True
            raise

    def checked_sync(self):
        self.record_contents()
        self.log("sync")
        result = self.run()
        self.syncs += 1
        # 1. exit code
        assert result.returncode in (0, 2), "sync failed\n%s\n%s" % (describe(result), self.describe())

        # 2. replicas equal
        init = tu.tree_snapshot(self.roots["initiator"])
        targ = tu.tree_snapshot(self.roots["target"])
        diff = tu.diff_snapshots(init, targ, "initiator", "target")
        assert not diff, "replicas differ after sync:\n%s\n%s\n%s" % (
            "\n".join(diff), self.describe(), describe(result))

        # 3. nothing lost
        present = tu.file_contents(self.roots["initiator"]) | tu.file_contents(self.roots["target"])
        lost = sorted(self.pending - present)
        assert not lost, "contents lost (not in either tree, backup/ or deleted/):\n%s\n%s\n%s" % (
            "\n".join("  %r" % c for c in lost), self.describe(), describe(result))
        self.pending = set()

        # 4. a second run changes nothing
        before = {side: tu.full_snapshot(self.roots[side]) for side in SIDES}
        self.log("second sync (must change nothing)")
        again = self.run()
        assert again.returncode == 0, "second sync did not exit 0\n%s\n%s" % (
            describe(again), self.describe())
        for side in SIDES:
            after = tu.full_snapshot(self.roots[side])
            diff = tu.diff_snapshots(before[side], after, "before", "after")
            assert not diff, "second sync changed the %s replica:\n%s\n%s\n%s" % (
                side, "\n".join(diff), self.describe(), describe(again))
        self.dirty = False

    def teardown(self):
        try:
            if self.dirty and not self.failed:
                self.log("final sync (teardown)")
                self.checked_sync()
        finally:
            # make everything removable (modes were changed), then remove
            for dirpath, dirnames, _ in os.walk(self.tmp):
                for d in dirnames:
                    p = os.path.join(dirpath, d)
                    if not os.path.islink(p):
                        os.chmod(p, 0o755)
            shutil.rmtree(self.tmp, ignore_errors=True)


class OsyncAsUserMachine(OsyncMachine):
    """The same machine with osync.py run as a user that permission bits apply to (root
    ignores them), so that directories can be made unreadable: chmod 000 or 644 of a directory
    on either replica leaves its whole subtree alone on both sides (DESIGN §4.10)."""

    def __init__(self):
        super().__init__()
        self.user = ensure_plain_user()
        os.chmod(self.tmp, 0o755)
        script = self.tmp + b"/osync.py"
        shutil.copy(str(tu.OSYNC), script)
        self.prefix = ["runuser", "-u", USER, "--"]
        self.python = SYSTEM_PYTHON
        self.script = os.fsdecode(script)

    def before_run(self):
        chown_tree(os.fsdecode(self.tmp), self.user)   # what the test built as root

    def subtree(self, side, rel):
        """Snapshot of whatever is at rel on side (a whole directory, one item, or nothing)."""
        path = self.path(side, rel)
        if tu.ltype(path) == "dir":
            return tu.tree_snapshot(path)
        if not tu.lexists(path):
            return {}
        return {b"": tu.entry(path, os.lstat(path))}

    @rule(side=side_st, pick=pick_st, mode=st.sampled_from([0o000, 0o644, 0o311]))
    def run_with_an_unreadable_directory(self, side, pick, mode):
        rel = self.choose(side, ("dir",), pick)
        if rel is None:
            return self.skip("%s: unreadable directory, no directory" % side)
        self.record_contents()
        path = self.path(side, rel)
        other_before = self.subtree(self.other(side), rel)
        os.chmod(path, mode)
        self.log("%s: chmod %o %r, run" % (side, mode, rel))
        try:
            result = self.run()
        finally:
            os.chmod(path, 0o755)
            self.log("%s: chmod 755 %r (fixed)" % (side, rel))
        self.dirty = True
        event("unreadable directory, mode %o: exit %d" % (mode, result.returncode))
        assert result.returncode in (0, 1, 2) and "Traceback" not in result.output, \
            "run with an unreadable directory\n%s\n%s" % (describe(result), self.describe())
        other_after = self.subtree(self.other(side), rel)
        diff = tu.diff_snapshots(other_before, other_after, "before", "after")
        assert not diff, "the other side's copy of an unreadable directory changed:\n%s\n%s\n%s" % (
            "\n".join(diff), describe(result), self.describe())
        present = tu.file_contents(self.roots["initiator"]) | tu.file_contents(self.roots["target"])
        lost = sorted(self.pending - present)
        assert not lost, "contents lost with an unreadable directory:\n%s\n%s\n%s" % (
            "\n".join("  %r" % c for c in lost), self.describe(), describe(result))


TestOsyncProperties = OsyncMachine.TestCase
TestOsyncProperties.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


TestOsyncAsUserProperties = OsyncAsUserMachine.TestCase
TestOsyncAsUserProperties.settings = settings(
    max_examples=max(5, EXAMPLES // 3),
    stateful_step_count=STEPS,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
