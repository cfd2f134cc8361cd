#!/usr/bin/env python3
"""Deterministic benchmark trees for osync.py, and the "1% changed on each side" edits.

The same seed, file count and scale always give the same names, sizes, contents and
mtimes, so every tool and every run works on identical data.  A tree of N files has
about N/20 directories nested like a real home or project tree (a random recursive tree,
a few levels deep), a size mix of many small files and a few MiB-size ones (about
1.5 GB at 100,000 files with --scale 1), and awkward names: spaces, unicode, a leading
dash, quotes and shell glob characters (never a newline).

    python3 bench/make_tree.py --files 100000 /tmp/osync-bench/tree   # build one tree
    python3 bench/make_tree.py --files 10000 --dry-run                # print its figures

run.py imports this module: tree_spec() lists the tree without touching the disk,
build_tree() writes it, cached_tree() builds it once under /tmp/osync-bench and reuses
it, and apply_edits() makes one round of edits on both replicas.

Python 3 standard library only.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time

DEFAULT_SEED = 11
DEFAULT_CACHE = "/tmp/osync-bench"
FILES_PER_DIRECTORY = 20
MAX_DEPTH = 10
# Every generated file has this mtime (2023-11-14), so edits made now are clearly newer.
BASE_MTIME = 1700000000
# Share of files and directories whose name is awkward.
AWKWARD_SHARE = 0.08

# (weight, smallest, largest) in bytes at --scale 1: a mean of about 15 KB per file.
SIZE_MIX = (
    (80.0, 0, 4 * 1024),
    (17.0, 4 * 1024, 32 * 1024),
    (2.88, 32 * 1024, 512 * 1024),
    (0.12, 1024 * 1024, 4 * 1024 * 1024),
)
# File contents are slices of one block of seeded random bytes (quick to make, and
# incompressible like most large files), each behind a header naming its path.
POOL_SIZE = 8 * 1024 * 1024

WORDS = ("report", "photo", "notes", "src", "build", "data", "old", "backup", "mail", "music",
         "docs", "img", "archive", "test", "draft", "final", "cache", "lib", "misc", "work")
EXTENSIONS = (".txt", ".jpg", ".c", ".py", ".pdf", ".dat", ".log", ".json", ".png", ".md", "")
AWKWARD_NAMES = ("with space", "  two  spaces ", "-leading-dash", "--double-dash", "café",
                 "naïve résumé", "日本語のファイル", "Ελληνικά", "emoji 🎉", "quote's", 'say "hi"',
                 "star*", "what?", "[bracket]", "back`tick`", "dollar $HOME", "semi;colon",
                 "amp & and", "tab\there", "hash #1", "percent %d", "trailing.", "Ünïcödé")


class TreeSpec:
    """What a tree holds: directories (parents first) and files as (path, size, seed)."""

    def __init__(self, directories, files, seed, scale):
        self.directories = directories
        self.files = files
        self.seed = seed
        self.scale = scale

    def total_bytes(self):
        return sum(size for _, size, _ in self.files)


def random_size(rng, scale):
    weights = [weight for weight, _, _ in SIZE_MIX]
    _, smallest, largest = rng.choices(SIZE_MIX, weights=weights)[0]
    return int(rng.randint(smallest, largest) * scale)


def random_name(rng, index, extension):
    """A plain name most of the time, an awkward one sometimes; `index` keeps it unique."""
    if rng.random() < AWKWARD_SHARE:
        base = rng.choice(AWKWARD_NAMES)
    else:
        base = rng.choice(WORDS)
    return "%s %d%s" % (base, index, extension) if base.startswith(" ") else "%s-%d%s" % (base, index, extension)


def tree_spec(files=100000, seed=DEFAULT_SEED, scale=1.0):
    """The tree for these parameters, computed without touching the disk."""
    rng = random.Random("tree-%d-%s" % (seed, files))
    directory_count = max(1, files // FILES_PER_DIRECTORY)
    directories = [""]
    depths = [0]
    for index in range(1, directory_count):
        while True:
            parent = rng.randrange(len(directories))
            if depths[parent] < MAX_DEPTH:
                break
        name = random_name(rng, index, "")
        directories.append(os.path.join(directories[parent], name))
        depths.append(depths[parent] + 1)
    file_list = []
    for index in range(files):
        directory = directories[rng.randrange(len(directories))]
        name = random_name(rng, index, rng.choice(EXTENSIONS))
        file_list.append((os.path.join(directory, name), random_size(rng, scale), rng.getrandbits(32)))
    return TreeSpec(directories[1:], file_list, seed, scale)


def content_pool(seed):
    return random.Random("pool-%d" % seed).getrandbits(POOL_SIZE * 8).to_bytes(POOL_SIZE, "little")


def file_content(pool, path, size, content_seed):
    """`size` bytes: a header naming the file, then a slice of the random pool."""
    header = ("%s %d\n" % (path, content_seed)).encode("utf-8")[:size]
    body_size = size - len(header)
    if body_size <= 0:
        return header
    offset = content_seed % (POOL_SIZE - min(body_size, POOL_SIZE) + 1)
    body = pool[offset:offset + body_size]
    while len(body) < body_size:        # sizes above the pool (a large --scale) repeat it
        body += pool[:body_size - len(body)]
    return header + body


def write_file(root, path, data, mtime):
    full = os.path.join(root, path)
    with open(full, "wb") as handle:
        handle.write(data)
    os.utime(full, (mtime, mtime))


def build_tree(spec, root):
    """Write the tree under `root` (which must not exist yet)."""
    pool = content_pool(spec.seed)
    os.makedirs(root)
    for directory in spec.directories:
        os.mkdir(os.path.join(root, directory))
    for path, size, content_seed in spec.files:
        write_file(root, path, file_content(pool, path, size, content_seed), BASE_MTIME)
    # Directory mtimes last: writing the files changed them.
    for directory in reversed(spec.directories):
        os.utime(os.path.join(root, directory), (BASE_MTIME, BASE_MTIME))
    os.utime(root, (BASE_MTIME, BASE_MTIME))


def cached_tree(files, seed=DEFAULT_SEED, scale=1.0, cache=DEFAULT_CACHE, log=print):
    """The path of the tree, built on first use and reused afterwards.  A manifest next
    to the tree (never inside it) records that it was completed."""
    name = "tree-%d-seed%d-scale%g" % (files, seed, scale)
    root = os.path.join(cache, name)
    manifest = root + ".json"
    spec = tree_spec(files, seed, scale)
    if os.path.exists(manifest) and os.path.isdir(root):
        return root, spec
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(cache, exist_ok=True)
    log("building %s (%d files, %d directories, %.2f GB)"
        % (root, len(spec.files), len(spec.directories) + 1, spec.total_bytes() / 1e9))
    started = time.time()
    build_tree(spec, root)
    with open(manifest, "w") as handle:
        json.dump({"files": files, "directories": len(spec.directories) + 1, "seed": seed,
                   "scale": scale, "bytes": spec.total_bytes(),
                   "build_seconds": round(time.time() - started, 1)}, handle)
    log("built in %.0f s" % (time.time() - started))
    return root, spec


# --------------------------------------------------------------------------------------
# One round of edits: 1% of the files changed on each side
# --------------------------------------------------------------------------------------

# Of the edited files on each side: (kind, share).
EDIT_MIX = (("modify", 0.50), ("create", 0.20), ("delete", 0.15), ("rename", 0.15))


def edit_plan(spec, round_number, fraction=0.01):
    """The edits of one round, per side: {"a": [...], "b": [...]}, each edit a tuple
    (kind, path, other) where `other` is the new path of a rename or a create.

    Each round and side edits its own slice of the original files (a fixed shuffle),
    so no file is edited twice and the two sides never edit the same file: the
    edits converge without conflicts whatever tool syncs them."""
    order = list(range(len(spec.files)))
    random.Random("edits-%d" % spec.seed).shuffle(order)
    per_side = max(len(EDIT_MIX), int(len(spec.files) * fraction))
    rng = random.Random("round-%d-%d" % (spec.seed, round_number))
    directories = [""] + spec.directories
    plan = {}
    for side_number, side in enumerate(("a", "b")):
        start = (round_number * 2 + side_number) * per_side
        picked = [order[(start + offset) % len(order)] for offset in range(per_side)]
        edits = []
        position = 0
        for kind, share in EDIT_MIX:
            count = int(round(per_side * share))
            for index in picked[position:position + count]:
                path = spec.files[index][0]
                other = None
                if kind in ("create", "rename"):
                    extension = os.path.splitext(path)[1]
                    new_name = random_name(rng, index, extension)
                    other = os.path.join(rng.choice(directories), "r%d%s-%s" % (round_number, side, new_name))
                edits.append((kind, path, other))
            position += count
        plan[side] = edits
    return plan


def apply_edits(spec, round_number, root_a, root_b, fraction=0.01, now=None):
    """Make round `round_number`'s edits on both replicas.  An edit whose file is not
    there (a one-way tool did not bring it back) is skipped.  Returns the number of
    edits made."""
    plan = edit_plan(spec, round_number, fraction)
    pool = content_pool(spec.seed)
    rng = random.Random("content-%d-%d" % (spec.seed, round_number))
    mtime = int(now if now is not None else time.time())
    made = 0
    for side, root in (("a", root_a), ("b", root_b)):
        for kind, path, other in plan[side]:
            full = os.path.join(root, path)
            if not os.path.isfile(full):
                continue
            if kind == "modify":
                size = random_size(rng, spec.scale)
                write_file(root, path, file_content(pool, path, size, rng.getrandbits(32)), mtime)
            elif kind == "create":
                size = random_size(rng, spec.scale)
                if not os.path.isdir(os.path.dirname(os.path.join(root, other))):
                    continue
                write_file(root, other, file_content(pool, other, size, rng.getrandbits(32)), mtime)
            elif kind == "delete":
                os.unlink(full)
            elif kind == "rename":
                if not os.path.isdir(os.path.dirname(os.path.join(root, other))):
                    continue
                os.rename(full, os.path.join(root, other))
            made += 1
    return made


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", help="where to build the tree (default: the cache, %s)" % DEFAULT_CACHE)
    parser.add_argument("--files", type=int, default=100000, help="number of files (default 100000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every file size (e.g. 0.05 keeps a 1M-file tree small)")
    parser.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    args = parser.parse_args(argv)
    spec = tree_spec(args.files, args.seed, args.scale)
    sizes = sorted(size for _, size, _ in spec.files)
    print("%d files in %d directories, %.3f GB; median %d B, largest %d B, %d files of 1 MiB or more"
          % (len(spec.files), len(spec.directories) + 1, spec.total_bytes() / 1e9, sizes[len(sizes) // 2],
             sizes[-1], sum(1 for size in sizes if size >= 1024 * 1024)))
    if args.dry_run:
        return 0
    if args.root:
        if os.path.exists(args.root):
            print("%s exists: remove it or name a new directory." % args.root, file=sys.stderr)
            return 1
        build_tree(spec, args.root)
        print("built %s" % args.root)
    else:
        print("tree at %s" % cached_tree(args.files, args.seed, args.scale)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
