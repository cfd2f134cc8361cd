"""Memory does not grow with the number of files (DESIGN §6): the scans, the state and
the plan stream, and the lists of changes live in files, not in memory."""
import os
import shutil
import sys

from conftest import clean_env, run_osync

# Runs osync.py as a child and prints the child's peak resident set in KiB.
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def make_tree(root, files):
    for number in range(files):
        directory = os.path.join(str(root), "d%03d" % (number // 200))
        if number % 200 == 0:
            os.makedirs(directory)
        with open(os.path.join(directory, "f%05d" % number), "w") as handle:
            handle.write(str(number))


def peak_kib(tmp_path, initiator, target, *options):
    """The run goes through the shared runner with MEASURE's Python as its prefix."""
    result = run_osync(["--initiator=%s" % initiator, "--target=%s" % target, "--silent"] + list(options),
                       clean_env(tmp_path / "log"), tmp_path, expect=0, logfile=tmp_path / "log",
                       prefix=[sys.executable, "-c", MEASURE])
    return int(result.stdout.split()[-1])


def test_peak_memory_is_flat_in_the_number_of_files(tmp_path):
    peaks = {}
    for files in (1000, 30000):
        initiator, target = tmp_path / ("a%d" % files), tmp_path / ("b%d" % files)
        make_tree(initiator, files)
        target.mkdir()
        peaks[("initial", files)] = peak_kib(tmp_path, initiator, target)
        peaks[("nochange", files)] = peak_kib(tmp_path, initiator, target)
    # rsync runs as a child of osync.py and its own peak is included: the bounds allow for it.
    for scenario in ("initial", "nochange"):
        growth = peaks[(scenario, 30000)] - peaks[(scenario, 1000)]
        assert growth < 16 * 1024, "%s: %d KiB more for 30x the files (%r)" % (scenario, growth, peaks)


def test_deleting_a_large_directory_does_not_hold_its_subtree_in_memory(tmp_path):
    """A directory deleted on one side: every decision below it waits until its whole
    subtree has been seen (something in it may have to stay); they wait in a file."""
    peaks = {}
    for files in (1000, 30000):
        initiator, target = tmp_path / ("a%d" % files), tmp_path / ("b%d" % files)
        make_tree(initiator / "big", files)
        target.mkdir()
        peak_kib(tmp_path, initiator, target)
        shutil.rmtree(str(initiator / "big"))
        peaks[files] = peak_kib(tmp_path, initiator, target, "--allow-mass-deletion")
        assert not (target / "big").exists(), "the deletion must reach the target"
    growth = peaks[30000] - peaks[1000]
    assert growth < 6 * 1024, "%d KiB more to delete a directory of 30x the files (%r)" % (growth, peaks)
