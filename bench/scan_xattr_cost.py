#!/usr/bin/env python3
"""What PRESERVE_ACL / PRESERVE_XATTR cost the scan: osync.py's walk over a generated
tree, timed with neither, with each and with both (best of --repeat runs, warm cache).
Run by hand, e.g.  python3 bench/scan_xattr_cost.py --files 100000 --workdir /var/tmp

A share of the files (--with-attrs percent) gets an ACL entry and a user xattr, so that
the reads of values are counted too, not only the listings."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import osync  # noqa: E402


def build_tree(root, files, with_attrs):
    per_dir = 1000
    marked = []
    for number in range(files):
        directory = os.path.join(root, "d%04d" % (number // per_dir))
        if number % per_dir == 0:
            os.mkdir(directory)
        path = os.path.join(directory, "f%06d" % number)
        with open(path, "w") as handle:
            handle.write("x")
        if with_attrs and number % 100 < with_attrs:
            os.setxattr(path, "user.bench", b"value %d" % number)
            marked.append(path)
    for start in range(0, len(marked), 500):
        subprocess.run(["setfacl", "-m", "u:1234:r--"] + marked[start:start + 500], check=True)


def scan_seconds(root, options, repeat):
    best = None
    for _ in range(repeat):
        started = time.perf_counter()
        count = sum(1 for _ in osync.walk_tree(root, osync.PathFilter({}), options))
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100000)
    parser.add_argument("--with-attrs", type=int, default=10, help="percent of files with an ACL and an xattr")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="osync-xattr-bench-", dir=args.workdir)
    try:
        print("building %d files in %s ..." % (args.files, root), flush=True)
        build_tree(root, args.files, args.with_attrs)
        cases = (("neither", {}), ("PRESERVE_ACL", {"acl": True}), ("PRESERVE_XATTR", {"xattr": True}),
                 ("both", {"acl": True, "xattr": True}))
        baseline = None
        for name, options in cases:
            seconds, count = scan_seconds(root, options, args.repeat)
            baseline = baseline or seconds
            print("%-15s %7.2f s  (%d entries, x%.2f)" % (name, seconds, count, seconds / baseline), flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
