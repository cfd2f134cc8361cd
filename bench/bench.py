#!/usr/bin/env python3
"""Benchmark osync.py against rsync (one-way floor) and unison (two-way).

Run by hand, never from the test suite.  Python 3 standard library only.
See bench/README.md for what is measured and how to read the output.

Example:
    python3 bench/bench.py --files 10000,100000 --scenarios initial,nochange --repeat 2
"""

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OSYNC = os.path.normpath(os.path.join(HERE, "..", "osync.py"))
ALL_SCENARIOS = ("initial", "nochange", "changed1")
ALL_TOOLS = ("osync", "rsync", "unison")
FILES_PER_DIR = 100
# Files in the master tree get this age, so files modified by the changed1
# scenario are unambiguously newer (no same-second mtime ambiguity).
BASE_AGE_S = 86400
# Entries at the root of a replica that are tool state, not user data.
STATE_PREFIXES = (".osync_workdir", ".unison")

# Fallback when GNU time is missing: runs COMMAND... and writes
# "<wall seconds> <peak RSS KiB>" to OUTFILE, the format of
# `/usr/bin/time -f '%e %M' -o OUTFILE`.  A fresh process, so RUSAGE_CHILDREN
# covers only the measured command tree.  Plain fork+exec (not subprocess,
# which uses vfork and would charge the whole interpreter to the child) and
# `python -S` keep the floor low, but the forked child still starts with the
# interpreter's copied pages (~6-7 MiB): the floor is measured and reported.
RSS_WRAPPER = r"""
import os, resource, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
status = os.waitpid(pid, 0)[1]
t = time.perf_counter() - t
with open(out, "w") as f:
    f.write("%.2f %d\n" % (t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# argument parsing helpers

def parse_size(text):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError("bad size %r" % text)
    mult = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_sizes(text):
    """'0-4K' | '1M' | '0-4K:99,1M-8M:1' -> [(weight, lo, hi), ...]"""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        weight = 1.0
        if ":" in part:
            part, w = part.rsplit(":", 1)
            weight = float(w)
        if "-" in part:
            lo, hi = part.split("-", 1)
            lo, hi = parse_size(lo), parse_size(hi)
        else:
            lo = hi = parse_size(part)
        if lo > hi or weight <= 0:
            raise argparse.ArgumentTypeError("bad size range %r" % part)
        out.append((weight, lo, hi))
    if not out:
        raise argparse.ArgumentTypeError("empty --sizes")
    return out


def parse_list(text, allowed=None, conv=str):
    items = [conv(x.strip()) for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                "unknown %s (choose from %s)" % (", ".join(map(str, bad)), ", ".join(allowed)))
    return items


def parse_count(text):
    text = text.strip().lower()
    mult = 1
    if text.endswith("k"):
        text, mult = text[:-1], 1000
    elif text.endswith("m"):
        text, mult = text[:-1], 1000000
    return int(float(text) * mult)


def parse_target_prefix(prefix):
    """'ssh://user@host:2222/' -> (user, host, port).  Port may be None."""
    m = re.fullmatch(r"ssh://(?:([^@/]+)@)?([^:/]+|\[[^\]]+\])(?::(\d+))?/?", prefix)
    if not m:
        raise SystemExit("--target-prefix must look like ssh://[user@]host[:port]/ (got %r)" % prefix)
    return m.group(1), m.group(2), m.group(3)


# --------------------------------------------------------------------------
# tree generation and mutation

def leaf_dir(index, n_leaves):
    """Relative directory of leaf number `index`: three directory levels,
    top/mid/leaf, each directory holding at most ~FILES_PER_DIR entries."""
    branch = max(2, int(round(n_leaves ** 0.5 + 0.4999)))
    top, mid = divmod(index, branch)
    return os.path.join("d%03d" % top, "m%03d" % mid, "leaf")


def random_size(rng, sizes):
    weight, lo, hi = rng.choices(sizes, weights=[s[0] for s in sizes])[0]
    return rng.randint(lo, hi)


def write_file(path, rng, sizes, mtime=None):
    with open(path, "wb") as f:
        f.write(rng.randbytes(random_size(rng, sizes)))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def generate_tree(root, n_files, sizes, seed):
    """Create n_files random files under root.  Returns the sorted list of
    relative file paths."""
    rng = random.Random(seed)
    n_leaves = max(1, -(-n_files // FILES_PER_DIR))
    mtime = time.time() - BASE_AGE_S
    paths = []
    for leaf in range(n_leaves):
        rel_dir = leaf_dir(leaf, n_leaves)
        os.makedirs(os.path.join(root, rel_dir), exist_ok=True)
        for j in range(min(FILES_PER_DIR, n_files - leaf * FILES_PER_DIR)):
            rel = os.path.join(rel_dir, "f%03d.bin" % j)
            write_file(os.path.join(root, rel), rng, sizes, mtime)
            paths.append(rel)
    return sorted(paths)


def plan_changes(paths, seed, modify_pct, delete_pct, add_pct):
    """Pick, deterministically, the files to modify/delete and the new files
    to add.  The same plan is applied to every tool's copy."""
    rng = random.Random(seed + 1)
    n = len(paths)

    def count(pct):
        return max(1, int(round(n * pct / 100.0))) if pct > 0 else 0

    picked = rng.sample(paths, min(n, count(modify_pct) + count(delete_pct)))
    modify = sorted(picked[:count(modify_pct)])
    delete = sorted(picked[count(modify_pct):])
    dirs = sorted({os.path.dirname(p) for p in paths})
    add = sorted({os.path.join(rng.choice(dirs), "new%06d.bin" % i) for i in range(count(add_pct))})
    return {"modify": modify, "delete": delete, "add": add}


def apply_changes(plan, initiator, target, sizes, seed, delete_side):
    rng = random.Random(seed + 2)
    now = time.time()
    for rel in plan["modify"]:
        write_file(os.path.join(initiator, rel), rng, sizes, now)
    del_root = initiator if delete_side == "initiator" else target
    for rel in plan["delete"]:
        os.unlink(os.path.join(del_root, rel))
    for rel in plan["add"]:
        write_file(os.path.join(target, rel), rng, sizes, now)


def snapshot(root):
    """{relpath: size} of regular files, tool state at the root excluded."""
    out = {}
    root = root.rstrip("/")
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if not d.startswith(STATE_PREFIXES)]
            filenames = [f for f in filenames if not f.startswith(STATE_PREFIXES)]
        for name in filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full).st_size
    return out


def copy_tree(src, dst):
    if shutil.which("cp"):
        subprocess.run(["cp", "-a", src, dst], check=True)
    else:
        shutil.copytree(src, dst, symlinks=True)


def remove_tree(path):
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):  # read-only leftovers
            subprocess.run(["chmod", "-R", "u+rwx", path], check=False)
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# measurement

class Runner:
    def __init__(self, args, scratch):
        self.args = args
        self.scratch = scratch
        self.time_bin = None
        if args.rss_method in ("auto", "time"):
            for cand in ("/usr/bin/time", shutil.which("gnutime") or ""):
                if cand and os.access(cand, os.X_OK) and self._time_works(cand):
                    self.time_bin = cand
                    break
            if args.rss_method == "time" and not self.time_bin:
                raise SystemExit("--rss-method=time but GNU /usr/bin/time is not usable")
        self.rss_method = "gnu-time" if self.time_bin else "python-wrapper"
        # Peak RSS this method reports for `true`: figures near it are noise.
        self.rss_floor_mib = self.run(["true"], dict(os.environ), "rss-floor-probe")["rss_mib"]

    def _time_works(self, path):
        out = os.path.join(self.scratch, "time-probe")
        try:
            r = subprocess.run([path, "-f", "%e %M", "-o", out, "true"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            with open(out) as f:
                ok = r.returncode == 0 and self._parse_time_file(f.read()) is not None
        except (OSError, subprocess.SubprocessError):
            ok = False
        finally:
            if os.path.exists(out):
                os.unlink(out)
        return ok

    @staticmethod
    def _parse_time_file(text):
        for line in reversed(text.strip().splitlines()):
            parts = line.split()
            if len(parts) == 2:
                try:
                    return float(parts[0]), int(parts[1])
                except ValueError:
                    pass
        return None

    def run(self, cmd, env, label):
        """Run cmd, return dict(wall=s, rss_mib=MiB or None, rc=int, log=path)."""
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        tfile = os.path.join(self.scratch, "logs", tag + ".time")
        lfile = os.path.join(self.scratch, "logs", tag + ".log")
        os.makedirs(os.path.dirname(tfile), exist_ok=True)
        if self.time_bin:
            full = [self.time_bin, "-f", "%e %M", "-o", tfile] + cmd
        else:
            full = [sys.executable, "-S", "-E", "-c", RSS_WRAPPER, tfile] + cmd
        with open(lfile, "wb") as logf:
            logf.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
            logf.flush()
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(full, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, timeout=self.args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
        rss = None
        if os.path.exists(tfile):
            with open(tfile) as f:
                parsed = self._parse_time_file(f.read())
            if parsed:
                rss = parsed[1] / 1024.0  # KiB -> MiB
        return {"wall": wall, "rss_mib": rss, "rc": rc, "log": lfile}


def fmt_mib(v):
    return "?" if v is None else "%.1f" % v


def file_sha256(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("    " + l for l in lines[-n:])
    except OSError:
        return "    (no log)"


# --------------------------------------------------------------------------
# tools

def tool_version(cmd):
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        return r.stdout.decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


class Tool:
    name = "?"
    two_way = True

    def __init__(self, args, scratch):
        self.args = args
        self.scratch = scratch

    def remote_target(self, path):
        return self.args.target_prefix + path if self.args.target_prefix else path

    def reset_state(self, run_dir):
        """Forget any sync state (called before each 'initial' run)."""

    def command(self, a, b, run_dir):
        raise NotImplementedError

    def env(self, run_dir):
        return dict(os.environ)


class OsyncTool(Tool):
    name = "osync"

    def command(self, a, b, run_dir):
        return ([self.args.python, self.args.osync, "--initiator=" + a,
                 "--target=" + self.remote_target(b), "--instance-id=bench",
                 "--non-interactive", "--silent"] + shlex.split(self.args.osync_args))

    def env(self, run_dir):
        env = dict(os.environ)
        env["LOGFILE"] = os.path.join(run_dir, "osync.log")
        return env


class RsyncTool(Tool):
    name = "rsync"
    two_way = False

    def command(self, a, b, run_dir):
        cmd = ["rsync", "-a", "--delete"]
        if self.args.target_prefix:
            user, host, port = parse_target_prefix(self.args.target_prefix)
            cmd += ["-e", "ssh" + (" -p %s" % port if port else "")]
            dest = "%s%s:%s/" % (user + "@" if user else "", host, b)
        else:
            dest = b + "/"
        return cmd + [a + "/", dest]


class UnisonTool(Tool):
    name = "unison"

    def reset_state(self, run_dir):
        remove_tree(os.path.join(run_dir, "unison-home"))

    def command(self, a, b, run_dir):
        cmd = ["unison", a, self.remote_target(b), "-batch", "-auto", "-silent", "-times"]
        if self.args.target_prefix:
            # The remote unison must find its archive in the same place too.
            cmd += ["-servercmd", "env UNISON=%s unison" % shlex.quote(self.unison_home(run_dir))]
        return cmd + shlex.split(self.args.unison_args)

    def unison_home(self, run_dir):
        return os.path.join(run_dir, "unison-home")

    def env(self, run_dir):
        env = dict(os.environ)
        env["UNISON"] = self.unison_home(run_dir)
        return env


TOOL_CLASSES = {"osync": OsyncTool, "rsync": RsyncTool, "unison": UnisonTool}


def check_tools(args):
    """Return (available tool names, notes, versions)."""
    notes, versions, ok = [], {}, []
    for name in args.tools:
        if name == "osync":
            if not os.path.isfile(args.osync):
                notes.append("osync skipped: %s not found" % args.osync)
                continue
            if not shutil.which(args.python) and not os.path.isfile(args.python):
                notes.append("osync skipped: interpreter %s not found" % args.python)
                continue
            versions["osync"] = "%s (python: %s)" % (
                args.osync, tool_version([args.python, "--version"]))
        else:
            exe = shutil.which(name)
            if not exe:
                notes.append("%s skipped: not installed (apt-get install -y %s)" % (name, name))
                continue
            versions[name] = tool_version([name, "-version" if name == "unison" else "--version"])
        ok.append(name)
    return ok, notes, versions


# --------------------------------------------------------------------------
# benchmark driver

def run_chain(tool, runner, master, master_paths, plan, n_files, rep, scenarios, args, results):
    """For one tool and one repetition: fresh copy of the master tree as
    initiator, empty target, then run initial -> nochange -> changed1 in
    order.  Runs that belong to a scenario not asked for still happen (they
    build the state the later scenarios need) but are not recorded."""
    run_dir = os.path.join(runner.scratch, "runs", "%d-%s-r%d" % (n_files, tool.name, rep))
    remove_tree(run_dir)
    os.makedirs(run_dir)
    a = os.path.join(run_dir, "initiator")
    b = os.path.join(run_dir, "target")
    copy_tree(master, a)
    os.makedirs(b)
    tool.reset_state(run_dir)
    last = max(ALL_SCENARIOS.index(s) for s in scenarios)
    for scen in ALL_SCENARIOS[:last + 1]:
        if scen == "changed1":
            apply_changes(plan, a, b, args.sizes, args.seed, args.delete_side)
        label = "%s-%d-%s-r%d" % (scen, n_files, tool.name, rep)
        log("run %s" % label)
        # Flush dirty pages left by the copy/changes so their writeback is
        # not charged to the measured command.
        os.sync()
        if args.drop_caches:
            drop_caches()
        res = runner.run(tool.command(a, b, run_dir), tool.env(run_dir), label)
        ok = res["rc"] == 0
        if not ok:
            log("  %s exited with %s, log %s:\n%s" % (tool.name, res["rc"], res["log"], tail(res["log"])))
        verify = None
        if args.verify:
            verify = verify_result(tool, scen, a, b, master_paths, plan, args)
            if verify != "ok":
                log("  verify %s: %s" % (label, verify))
        log("  %.2f s, %s MiB, rc=%s, verify=%s" % (
            res["wall"], "%.1f" % res["rss_mib"] if res["rss_mib"] is not None else "?",
            res["rc"], verify))
        if scen in scenarios:
            results.append({"scenario": scen, "files": n_files, "tool": tool.name, "repeat": rep,
                            "wall_s": round(res["wall"], 4),
                            "peak_rss_mib": None if res["rss_mib"] is None else round(res["rss_mib"], 2),
                            "rc": res["rc"], "verify": verify})
        if res["rc"] == "timeout":
            break
    return run_dir


def drop_caches():
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def tree_footprint(root):
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += os.lstat(dirpath).st_blocks * 512
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def verify_result(tool, scen, a, b, master_paths, plan, args):
    """After a run: both replicas must hold the same files (same sizes) and
    the expected file set.  Returns 'ok' or a short description."""
    if args.target_prefix:
        # Target may not be on this machine; still try if the path exists.
        if not os.path.isdir(b):
            return "skipped (remote)"
    sa, sb = snapshot(a), snapshot(b)
    expected = set(master_paths)
    if scen == "changed1":
        if args.delete_side == "initiator" or tool.two_way:
            expected -= set(plan["delete"])
        if tool.two_way:
            expected |= set(plan["add"])
    problems = []
    if set(sa) != expected:
        problems.append("initiator has %d files, expected %d (%d missing, %d extra)" % (
            len(sa), len(expected), len(expected - set(sa)), len(set(sa) - expected)))
    if sa != sb:
        only_a = len(set(sa) - set(sb))
        only_b = len(set(sb) - set(sa))
        diff = sum(1 for k in set(sa) & set(sb) if sa[k] != sb[k])
        problems.append("replicas differ (%d only on initiator, %d only on target, %d size mismatch)"
                        % (only_a, only_b, diff))
    return "ok" if not problems else "; ".join(problems)


def summarize(results, tools, scenarios, files_list):
    rows = []
    for n in files_list:
        for scen in scenarios:
            med = {}
            for tool in tools:
                rs = [r for r in results if r["files"] == n and r["scenario"] == scen and r["tool"] == tool]
                if not rs:
                    continue
                walls = [r["wall_s"] for r in rs]
                rss = [r["peak_rss_mib"] for r in rs if r["peak_rss_mib"] is not None]
                row = {"scenario": scen, "files": n, "tool": tool, "runs": len(rs),
                       "wall_s_median": statistics.median(walls),
                       "wall_s_min": min(walls), "wall_s_max": max(walls),
                       "peak_rss_mib_median": statistics.median(rss) if rss else None,
                       "failed_runs": sum(1 for r in rs if r["rc"] != 0),
                       "verify_failed_runs": sum(1 for r in rs if r["verify"] not in (None, "ok"))}
                med[tool] = row["wall_s_median"]
                rows.append(row)
            for row in rows:
                if row["files"] == n and row["scenario"] == scen and row["tool"] == "osync":
                    for ref in ("rsync", "unison"):
                        if ref in med and med[ref] > 0:
                            row["ratio_vs_" + ref] = round(row["wall_s_median"] / med[ref], 2)
    return rows


def format_table(rows):
    head = ["scenario", "files", "tool", "wall s", "peak RSS MiB", "osync/rsync", "osync/unison", "notes"]
    lines = []
    for r in rows:
        notes = []
        if r["failed_runs"]:
            notes.append("%d/%d runs rc!=0" % (r["failed_runs"], r["runs"]))
        if r["verify_failed_runs"]:
            notes.append("%d/%d runs verify failed" % (r["verify_failed_runs"], r["runs"]))
        lines.append([r["scenario"], str(r["files"]), r["tool"], "%.2f" % r["wall_s_median"],
                      "%.1f" % r["peak_rss_mib_median"] if r["peak_rss_mib_median"] is not None else "?",
                      "%.2f" % r["ratio_vs_rsync"] if "ratio_vs_rsync" in r else "",
                      "%.2f" % r["ratio_vs_unison"] if "ratio_vs_unison" in r else "",
                      ", ".join(notes)])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in (1, 3, 4, 5, 6) else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(l) for l in lines]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", default="10000", type=lambda s: parse_list(s, conv=parse_count),
                   help="comma-separated tree sizes in files, e.g. 10000,100000 or 10k,100k (default 10000)")
    p.add_argument("--sizes", default="0-4K", type=parse_sizes,
                   help="file sizes: MIN-MAX or SIZE, optionally a weighted list like "
                        "'0-4K:99,1M-8M:1' (default 0-4K, random bytes)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   type=lambda s: parse_list(s, ALL_SCENARIOS),
                   help="comma-separated subset of %s (default all)" % ",".join(ALL_SCENARIOS))
    p.add_argument("--tools", default=",".join(ALL_TOOLS), type=lambda s: parse_list(s, ALL_TOOLS),
                   help="comma-separated subset of %s (default all)" % ",".join(ALL_TOOLS))
    p.add_argument("--repeat", type=int, default=3, help="measurements per cell; median reported (default 3)")
    p.add_argument("--osync", default=DEFAULT_OSYNC, help="osync.py under test (default %(default)s)")
    p.add_argument("--python", default=sys.executable, help="interpreter for osync.py (default %(default)s)")
    p.add_argument("--osync-args", default="", help="extra arguments appended to the osync.py command line")
    p.add_argument("--unison-args", default="", help="extra arguments appended to the unison command line")
    p.add_argument("--target-prefix", default="",
                   help="for remote runs: prefix of the target, e.g. ssh://user@127.0.0.1:2222/ ; "
                        "osync.py/unison get PREFIX+/abs/path, rsync gets user@host:/abs/path with -e 'ssh -p PORT'. "
                        "The target path is prepared and verified locally, so the remote must see the same "
                        "filesystem (ssh to localhost or a container sharing the scratch dir)")
    p.add_argument("--workdir", default=None,
                   help="parent of the scratch dir (default: a temp dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (trees, logs)")
    p.add_argument("--json", metavar="FILE", help="also write raw and summarized results to FILE")
    p.add_argument("--seed", type=int, default=42, help="random seed for trees and changes")
    p.add_argument("--modify-pct", type=float, default=1.0, help="changed1: %% of files modified on the initiator")
    p.add_argument("--delete-pct", type=float, default=0.1, help="changed1: %% of files deleted")
    p.add_argument("--add-pct", type=float, default=0.1, help="changed1: %% of files added on the target")
    p.add_argument("--delete-side", choices=("initiator", "target"), default="initiator",
                   help="changed1: replica the deleted files are removed from (default initiator)")
    p.add_argument("--timeout", type=float, default=3600, help="per-command timeout in seconds")
    p.add_argument("--rss-method", choices=("auto", "time", "python"), default="auto",
                   help="peak RSS via GNU /usr/bin/time (auto if present) or a python wrapper")
    p.add_argument("--drop-caches", action="store_true",
                   help="write 3 to /proc/sys/vm/drop_caches before each measured run (needs root "
                        "on a machine you own; affects the whole machine): cold-cache figures")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not check the replicas after each run")
    args = p.parse_args(argv)
    args.osync = os.path.abspath(args.osync)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.target_prefix:
        parse_target_prefix(args.target_prefix)
    if args.drop_caches:
        try:
            os.sync()
            drop_caches()
        except OSError as e:
            p.error("--drop-caches: cannot write /proc/sys/vm/drop_caches (%s)" % e)

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="osync-bench-", dir=args.workdir or "/tmp")
    log("scratch dir %s" % scratch)
    try:
        return bench(args, scratch)
    finally:
        if args.keep:
            log("kept %s" % scratch)
        else:
            remove_tree(scratch)


def bench(args, scratch):
    tools, notes, versions = check_tools(args)
    for n in notes:
        log("NOTE: " + n)
    if not tools:
        log("no tool available, nothing to do")
        return 1
    runner = Runner(args, scratch)
    osync_sha = file_sha256(args.osync) if "osync" in tools else None
    log("load average at start: %s (other load on the machine skews the figures)" % loadavg())
    log("peak RSS via %s (floor %s MiB); tools: %s" % (
        runner.rss_method, fmt_mib(runner.rss_floor_mib), ", ".join(tools)))
    tool_objs = [TOOL_CLASSES[t](args, scratch) for t in tools]
    results = []
    started = time.time()
    for n_files in args.files:
        master = os.path.join(scratch, "master-%d" % n_files)
        log("generating %d files in %s" % (n_files, master))
        t0 = time.perf_counter()
        master_paths = generate_tree(master, n_files, args.sizes, args.seed)
        plan = plan_changes(master_paths, args.seed, args.modify_pct, args.delete_pct, args.add_pct)
        log("  done in %.1f s (%d files, %.1f MiB)" % (
            time.perf_counter() - t0, len(master_paths),
            sum(os.path.getsize(os.path.join(master, p)) for p in master_paths) / 2 ** 20))
        # Deleting a big tree leaves the file system slower for a while
        # (journal, discard), which would be charged to whichever tool runs
        # next; so run dirs are removed only after the whole block, when the
        # disk has room for all of them.
        need = 2.5 * tree_footprint(master) * len(tool_objs) * args.repeat
        defer = need < 0.7 * shutil.disk_usage(scratch).free
        if not defer:
            log("NOTE: not enough disk to keep all run dirs (%.1f GiB), removing each after use: "
                "later runs may be slowed by the deletions" % (need / 2 ** 30))
        # Repetition outermost, tools innermost: drift on the machine (other
        # load, cache state) spreads over all tools instead of hitting one.
        run_dirs = []
        for rep in range(1, args.repeat + 1):
            for tool in tool_objs:
                run_dirs.append(run_chain(tool, runner, master, master_paths, plan, n_files, rep,
                                          args.scenarios, args, results))
                if not defer and not args.keep:
                    remove_tree(run_dirs.pop())
        if not args.keep:
            for d in run_dirs:
                remove_tree(d)
            remove_tree(master)

    rows = summarize(results, tools, args.scenarios, args.files)
    if osync_sha and file_sha256(args.osync) != osync_sha:
        notes.append("%s changed during the benchmark: osync figures may mix versions" % args.osync)
        log("WARNING: " + notes[-1])
    print()
    print("osync.py benchmark: median of %d run(s); wall = perf_counter around the command; "
          "peak RSS = max RSS of the largest process in the command's tree (%s, floor %s MiB)"
          % (args.repeat, runner.rss_method, fmt_mib(runner.rss_floor_mib)))
    for n in notes:
        print("note: " + n)
    print(format_table(rows))
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                "platform": platform.platform(), "cpus": os.cpu_count(),
                "python": sys.version.split()[0], "versions": versions, "notes": notes,
                "osync_sha256": osync_sha, "loadavg_end": loadavg(),
                "rss_method": runner.rss_method, "rss_floor_mib": runner.rss_floor_mib, "duration_s": round(time.time() - started, 1),
                "argv": sys.argv,
                "options": {k: v for k, v in vars(args).items() if k not in ("sizes",)},
                "sizes": [list(s) for s in args.sizes]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": rows, "runs": results}, f, indent=2)
        log("wrote %s" % args.json)
    failed = any(r["failed_runs"] for r in rows)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
