"""The test harness itself: what a caller exports never reaches a run, and strict mode
turns a missing prerequisite into a failure (what .ci/run relies on)."""

import os
import subprocess
import sys

import osync
from conftest import CONFIG_KEYS, INTERNAL_VARIABLES, REPO, Pair, build, expected, snapshot

TESTS = REPO / "tests"


class RecordingEnvironment(dict):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self):
        dict.__init__(self)
        self.consulted = set()

    def __contains__(self, name):
        self.consulted.add(name)
        return False

    def get(self, name, default=None):
        self.consulted.add(name)
        return default


def names_osync_reads_from_the_environment():
    """What Config.load_environment consults, plus the variables read outside it."""
    environment = RecordingEnvironment()
    osync.Config(True).load_environment(environment)
    return environment.consulted | set(INTERNAL_VARIABLES) | set(osync.LEGACY_REMOTE_KEYS)


def test_every_name_the_config_reads_from_the_environment_is_dropped():
    consulted = names_osync_reads_from_the_environment()
    assert "MAX_SOFT_EXEC_TIME" in consulted and "SOFT_DELETE_DAYS" in consulted   # the spy works
    leaking = sorted(consulted - CONFIG_KEYS)
    assert not leaking, "a caller's exported %s would reach every test run" % ", ".join(leaking)


def test_exported_settings_do_not_change_a_run(tmp_path, monkeypatch):
    """Every name osync.py reads, exported with a value it refuses, leaves a run alone."""
    for name in sorted(names_osync_reads_from_the_environment()):
        monkeypatch.setenv(name, "not-a-value;")
    pair = Pair(tmp_path / "p")
    build(pair.initiator, {"a": "from the initiator"})
    build(pair.target, {"b": "from the target"})
    pair.run(expect=0)
    both = expected({"a": "from the initiator", "b": "from the target"})
    assert snapshot(pair.initiator) == both and snapshot(pair.target) == both


PROBE = '''
def test_probe(pair):
    assert pair.initiator.is_dir()
'''


def run_probe(tmp_path, strict):
    """pytest on a one-test file that asks for a local-oldest pair while pyenv has no 3.6."""
    probe = tmp_path / "probe"
    probe.mkdir(parents=True)
    (probe / "test_probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(TESTS), PYENV_ROOT=str(tmp_path / "no-pyenv"),
               OSYNC_PAIR_KINDS="local-oldest", OSYNC_REMOTE_NEWEST="all")
    env.pop("OSYNC_TEST_STRICT", None)
    if strict:
        env["OSYNC_TEST_STRICT"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(probe), "--basetemp", str(tmp_path / "basetemp"),
                           str(probe / "test_probe.py")],
                          cwd=str(probe), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)


def test_a_missing_python_skips_its_pair_kind_but_fails_in_strict_mode(tmp_path):
    """On a developer's machine the pair kind is skipped; .ci/run's strict mode fails it."""
    relaxed = run_probe(tmp_path / "relaxed", strict=False)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
    strict = run_probe(tmp_path / "strict", strict=True)
    assert strict.returncode == 1 and "1 error" in strict.stdout, strict.stdout   # the fixture fails
    assert "missing prerequisite" in strict.stdout and "Python 3.6 from pyenv" in strict.stdout, strict.stdout


def test_ci_counts_an_empty_selection_as_a_failure():
    """pytest's exit code 5 (no tests collected) must not pass a CI run."""
    env = dict(os.environ, OSYNC_PAIR_KINDS="local")
    r = subprocess.run(["bash", str(REPO / ".ci" / "run"), "-k", "no_test_has_this_name"], cwd=str(REPO),
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=300)
    assert r.returncode == 1, r.stdout
    assert "no tests" in r.stdout, r.stdout
