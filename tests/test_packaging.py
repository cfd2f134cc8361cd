"""Packages: the Debian package, the RPM, the Arch PKGBUILD and the PyInstaller binary.

Each package is built for real from a copy of the repository (dpkg-deb, rpmbuild, the
PKGBUILD's own package() function, PyInstaller) and what it installs is checked: the
programs in /usr/bin (osync.py the launcher of the module in /usr/share/osync, which has
its current .pyc: built in the package, or by the Debian postinst), the example config
as a config file, the units with their ExecStart moved to /usr/bin, the dependencies.
The binary is used for a sync on a local and on an ssh target, where the agent runs the
osync.py source that travels inside the binary.

The units, the SysV/OpenRC scripts and packaging/exclude.list.example come with install.py;
where one of them is missing from the repository, the copy gets a placeholder, so that
these tests check the package builds and not those files.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv

import pytest

import osync
from conftest import REPO, build, describe, expected, make_pair, need, shell_quote, snapshot

VERSION = osync.VERSION
SCRIPTS = ("osync.py", "osync-batch.py", "ssh_filter.py")
# /usr/bin/osync.py is packaging/osync-launcher.py with its module folder moved here.
MODULE = "usr/share/osync/osync.py"
LAUNCHER_SOURCE = "packaging/osync-launcher.py"
PACKAGED_MODULE_DIR = 'MODULE_DIR = "../share/osync"'
SYSTEM_UNITS = ("osync-srv@.service", "osync-target-helper-srv@.service", "osync@.service", "osync@.timer")
USER_UNITS = ("osync-srv@.service", "osync-target-helper-srv@.service")
PLACEHOLDER_UNIT = ("[Unit]\nDescription=placeholder for a unit that install.py brings\n\n[Service]\n"
                    "ExecStart=/usr/local/bin/osync.py /etc/osync/%i --on-changes --errors-only\n")
PLACEHOLDER_TIMER = "[Unit]\nDescription=placeholder\n\n[Timer]\nOnCalendar=daily\n"
PLACEHOLDER_SYSV = "#!/bin/sh\nOSYNC_BIN=${OSYNC_BIN:-/usr/local/bin/osync.py}\n"
BUILD_TIMEOUT = 300


def run(argv, cwd=None, env=None, timeout=BUILD_TIMEOUT):
    """A build tool run to its end; the CompletedProcess with text stdout and stderr."""
    result = subprocess.run([str(word) for word in argv], cwd=str(cwd) if cwd else None, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def succeeded(result):
    assert result.returncode == 0, "%s failed (exit code %d):\n%s" % (
        " ".join(result.args), result.returncode, result.output[-6000:])
    return result


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    """A copy of the repository's shipped files, with placeholders for the service files
    and the exclude list when the repository does not have them (yet)."""
    top = tmp_path_factory.mktemp("source") / ("osync-%s" % VERSION)
    top.mkdir()
    for name in SCRIPTS + ("sync.conf", "README.md"):
        shutil.copy2(str(REPO / name), str(top / name))
    shutil.copytree(str(REPO / "packaging"), str(top / "packaging"))
    for unit in SYSTEM_UNITS:
        placeholder(top / "packaging" / "systemd" / unit,
                    PLACEHOLDER_TIMER if unit.endswith(".timer") else PLACEHOLDER_UNIT)
    for unit in USER_UNITS:
        placeholder(top / "packaging" / "systemd" / "user" / unit, PLACEHOLDER_UNIT)
    placeholder(top / "packaging" / "exclude.list.example", "*.tmp\n")
    placeholder(top / "packaging" / "sysv" / "osync-srv", PLACEHOLDER_SYSV)
    return top


def placeholder(path, text):
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def unit_exec_programs(text):
    """The programs that the Exec*= lines of a unit start."""
    return re.findall(r"^Exec\w*=[-@:+!]*(\S+)", text, re.M)


def pyc_is_current(pyc, source):
    """Whether Python imports `pyc` for `source` instead of compiling the source: a
    hash-checked .pyc holds the source's hash, a time-checked one its time and size."""
    header = pyc.read_bytes()[:16]
    if header[:4] != importlib.util.MAGIC_NUMBER:
        return True   # another Python's .pyc: its own import checks it
    flags = int.from_bytes(header[4:8], "little")
    if flags & 1:
        return header[8:16] == importlib.util.source_hash(source.read_bytes())
    stat = os.stat(str(source))
    return (int.from_bytes(header[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(header[12:16], "little") == stat.st_size & 0xFFFFFFFF)


def check_module(root):
    """The module in /usr/share/osync with at least one .pyc, all current; the .pyc files."""
    module = root / MODULE
    assert module.read_bytes() == (REPO / "osync.py").read_bytes()
    assert os.stat(str(module)).st_mode & 0o777 == 0o644
    compiled = sorted((module.parent / "__pycache__").glob("osync.*.pyc"))
    assert compiled, "no .pyc of %s" % module
    for pyc in compiled:
        assert pyc_is_current(pyc, module), "%s is not the byte code of %s" % (pyc, module)
    return compiled


def check_installed_tree(root, unit_dir, user_unit_dir, compiled=True):
    """What every package installs, as an unpacked tree under `root`; its byte code too
    unless the package leaves that to its install scripts (compiled=False)."""
    for script in SCRIPTS:
        program = root / "usr" / "bin" / script
        assert program.is_file(), "%s is not in the package" % program
        assert os.stat(str(program)).st_mode & 0o777 == 0o755, "%s is not mode 755" % program
        assert program.read_text().splitlines()[0] == "#!/usr/bin/python3", program
        body = program.read_text().splitlines()[1:]
        original = (REPO / (LAUNCHER_SOURCE if script == "osync.py" else script)).read_text().splitlines()[1:]
        if script == "osync.py":
            assert PACKAGED_MODULE_DIR in body, "%s does not look for its module in /usr/share/osync" % program
            original = [PACKAGED_MODULE_DIR if line.startswith("MODULE_DIR = ") else line for line in original]
        assert body == original, "%s differs from the repository's" % script
    if compiled:
        check_module(root)
    else:
        assert (root / MODULE).read_bytes() == (REPO / "osync.py").read_bytes()
        assert not list(root.glob("**/*.pyc")), "the package holds byte code"
    example = root / "etc" / "osync" / "sync.conf.example"
    assert example.read_text() == (REPO / "sync.conf").read_text()
    assert (root / "etc" / "osync" / "exclude.list.example").is_file()
    for directory, units in ((unit_dir, SYSTEM_UNITS), (user_unit_dir, USER_UNITS)):
        for unit in units:
            path = root / directory.lstrip("/") / unit
            assert path.is_file(), "%s is not in the package" % path
            programs = unit_exec_programs(path.read_text())
            ours = [program for program in programs if os.path.basename(program) in SCRIPTS]
            assert ours or unit.endswith(".timer"), "%s starts none of %s" % (path, ", ".join(SCRIPTS))
            for program in programs:
                assert not program.startswith("/usr/local/"), "%s starts %s" % (path, program)
            for program in ours:
                assert program == "/usr/bin/" + os.path.basename(program), "%s starts %s" % (path, program)
                assert (root / program.lstrip("/")).is_file(), "%s starts %s, which the package lacks" % (
                    path, program)
    version = run([sys.executable, root / "usr" / "bin" / "osync.py", "--version"])
    assert succeeded(version).stdout.strip() == "osync.py %s" % VERSION


# --------------------------------------------------------------------------------------
# Debian
# --------------------------------------------------------------------------------------

def test_debian_package_installs_programs_config_and_units(source_tree, tmp_path):
    if not shutil.which("dpkg-deb"):
        need("dpkg-deb is not installed (apt-get install dpkg)")
    script = source_tree / "packaging" / "debian" / "build-deb.sh"
    built = succeeded(run(["bash", script, tmp_path], cwd=tmp_path))
    package = tmp_path / ("osync_%s_all.deb" % VERSION)
    assert built.stdout.strip() == str(package) and package.is_file(), built.output

    def field(name):
        return succeeded(run(["dpkg-deb", "-f", package, name])).stdout.strip()
    assert field("Package") == "osync"
    assert field("Version") == VERSION
    assert field("Architecture") == "all"
    assert field("Depends") == "python3 (>= 3.6), rsync, openssh-client"
    assert field("Recommends") == "inotify-tools"
    assert field("Suggests") == "sshpass, acl, attr"
    assert field("Maintainer")
    conffiles = succeeded(run(["dpkg-deb", "-I", package, "conffiles"])).stdout.split()
    assert conffiles == ["/etc/osync/sync.conf.example", "/etc/osync/exclude.list.example", "/etc/init.d/osync-srv"]

    listing = succeeded(run(["dpkg-deb", "-c", package])).stdout
    entries = {}
    for line in listing.splitlines():
        words = line.split()
        entries[words[-1].lstrip(".")] = (words[0], words[1])
    for path in ["/usr/bin/" + script for script in SCRIPTS]:
        assert entries.get(path) == ("-rwxr-xr-x", "root/root"), "%s in the package:\n%s" % (path, listing)
    assert entries.get("/etc/osync/sync.conf.example") == ("-rw-r--r--", "root/root"), listing
    for unit in SYSTEM_UNITS:
        assert "/lib/systemd/system/" + unit in entries, listing
    for unit in USER_UNITS:
        assert "/usr/lib/systemd/user/" + unit in entries, listing
    assert entries.get("/", ("", ""))[0] == "drwxr-xr-x", "the package would change the mode of /:\n" + listing

    assert entries.get("/" + MODULE) == ("-rw-r--r--", "root/root"), listing
    assert not [path for path in entries if path.endswith(".pyc") or "__pycache__" in path], listing
    assert entries.get("/usr/share/python3/runtime.d/osync.rtupdate") == ("-rwxr-xr-x", "root/root"), listing

    unpacked = tmp_path / "root"
    succeeded(run(["dpkg-deb", "-x", package, unpacked]))
    check_installed_tree(unpacked, "/lib/systemd/system", "/usr/lib/systemd/user", compiled=False)
    # The postinst compiles the module (for the python3 of the host), the prerm removes the
    # byte code, so that dpkg finds only its own files to remove; the runtime.d hook
    # compiles again for a new default python3.
    control = tmp_path / "control"
    succeeded(run(["dpkg-deb", "-e", package, control]))
    scripts_env = dict(os.environ, DPKG_ROOT=str(unpacked))
    succeeded(run(["sh", control / "postinst", "configure"], env=scripts_env))
    check_module(unpacked)
    version = run([sys.executable, unpacked / "usr" / "bin" / "osync.py", "--version"])
    assert succeeded(version).stdout.strip() == "osync.py %s" % VERSION
    succeeded(run(["sh", control / "prerm", "remove"], env=scripts_env))
    assert sorted(os.listdir(str(unpacked / "usr/share/osync"))) == ["osync.py"]
    rtupdate = unpacked / "usr/share/python3/runtime.d/osync.rtupdate"
    succeeded(run(["sh", rtupdate, "rtupdate", "3.10", "3.11"], env=scripts_env))
    check_module(unpacked)
    assert entries.get("/etc/init.d/osync-srv") == ("-rwxr-xr-x", "root/root"), listing
    init_script = (unpacked / "etc" / "init.d" / "osync-srv").read_text()
    assert "/usr/local/bin" not in init_script and "/usr/bin/osync.py" in init_script


# --------------------------------------------------------------------------------------
# RPM
# --------------------------------------------------------------------------------------

def spec_field(spec_text, name):
    found = re.findall(r"^%s:\s*(.+?)\s*$" % re.escape(name), spec_text, re.M)
    return found


def test_rpm_spec_builds_a_noarch_package(source_tree, tmp_path):
    spec = source_tree / "packaging" / "rpm" / "osync.spec"
    text = spec.read_text()
    assert spec_field(text, "Version") == [VERSION], "packaging/rpm/osync.spec: Version is not osync.py's VERSION"
    assert spec_field(text, "BuildArch") == ["noarch"]
    if not shutil.which("rpmbuild"):
        need("rpmbuild is not installed (apt-get install rpm, or dnf install rpm-build): tests/run installs it")
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    with tarfile.open(str(top / "SOURCES" / ("osync-%s.tar.gz" % VERSION)), "w:gz") as archive:
        archive.add(str(source_tree), arcname=source_tree.name)
    env = dict(os.environ, HOME=str(tmp_path))   # no ~/.rpmmacros of the caller
    succeeded(run(["rpmbuild", "-bb", "--define", "_topdir %s" % top, spec], env=env))
    package = top / "RPMS" / "noarch" / ("osync-%s-1.noarch.rpm" % VERSION)
    found = sorted(str(p.relative_to(top)) for p in top.glob("RPMS/*/*.rpm"))
    assert package.is_file(), "rpmbuild made %s" % found

    def query(*options):
        return succeeded(run(["rpm", "-qp"] + list(options) + [package], env=env)).stdout.split("\n")
    requires = set(line.strip() for line in query("--requires"))
    assert {"rsync", "python3", "openssh-clients"} <= requires, requires
    assert "inotify-tools" in query("--recommends")
    assert query("--qf", "%{ARCH}")[0] == "noarch"
    config_files = set(line for line in query("-c") if line)
    assert config_files == {"/etc/osync/sync.conf.example", "/etc/osync/exclude.list.example"}
    files = set(line for line in query("-l") if line)
    assert set("/usr/bin/" + script for script in SCRIPTS) <= files, files
    assert "/" + MODULE in files, files
    assert [path for path in files if path.startswith("/usr/share/osync/__pycache__/osync.")], files
    assert not [path for path in files if path.startswith("/usr/local")], files

    unpacked = tmp_path / "root"
    archive_path = tmp_path / "payload.tgz"
    with open(str(package), "rb") as rpm_file, open(str(archive_path), "wb") as archive_file:
        converted = subprocess.run(["rpm2archive", "-"], stdin=rpm_file, stdout=archive_file, stderr=subprocess.PIPE)
    assert converted.returncode == 0, converted.stderr
    with tarfile.open(str(archive_path)) as payload:
        payload.extractall(str(unpacked))
    check_installed_tree(unpacked, "/usr/lib/systemd/system", "/usr/lib/systemd/user")


# --------------------------------------------------------------------------------------
# Arch
# --------------------------------------------------------------------------------------

def test_arch_pkgbuild_package_function_installs_everything(source_tree, tmp_path):
    """makepkg is Arch's; its part that matters here is the PKGBUILD's package(), which
    bash runs the way makepkg does: startdir is the PKGBUILD's folder, errors stop it."""
    pkgbuild = source_tree / "packaging" / "arch" / "PKGBUILD"
    succeeded(run(["bash", "-n", pkgbuild]))
    pkgdir = tmp_path / "pkg"
    pkgdir.mkdir()
    program = ('set -eu; startdir=%s; srcdir="$startdir/src"; pkgdir=%s; source ./PKGBUILD; '
               'echo "$pkgname $pkgver ${arch[*]}"; echo "${depends[*]}"; package'
               % (shell_quote(pkgbuild.parent), shell_quote(pkgdir)))
    result = succeeded(run(["bash", "-c", program], cwd=pkgbuild.parent))
    lines = result.stdout.splitlines()
    assert lines[0] == "osync %s any" % VERSION, "PKGBUILD: pkgname, pkgver (osync.py's VERSION) or arch"
    assert lines[1] == "python rsync openssh"
    check_installed_tree(pkgdir, "/usr/lib/systemd/system", "/usr/lib/systemd/user")


# --------------------------------------------------------------------------------------
# PyInstaller
# --------------------------------------------------------------------------------------

def pyinstaller_command(workspace):
    """How to run PyInstaller: this Python's, else one pip installs into a new venv.  Only
    a pip that cannot install it (no network, no index) makes the tests skip."""
    try:
        import PyInstaller  # noqa: F401
        return [sys.executable, "-m", "PyInstaller"]
    except ImportError:
        pass
    environment = workspace / "venv"
    try:
        venv.create(str(environment), with_pip=True)
    except Exception as error:   # venv or ensurepip missing: a prerequisite, not a network limit
        need("a venv with pip for PyInstaller cannot be made with %s: %s (install python3-venv, or pip install "
             "pyinstaller)" % (sys.executable, error))
    python = environment / "bin" / "python"
    installed = run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "pyinstaller"])
    if installed.returncode != 0:
        pytest.skip("pip cannot install pyinstaller here: %s" % installed.output.strip()[-400:])
    return [str(python), "-m", "PyInstaller"]


@pytest.fixture(scope="module")
def pyinstaller(tmp_path_factory):
    return pyinstaller_command(tmp_path_factory.mktemp("pyinstaller-venv"))


def build_binary(pyinstaller, tmp_path_factory, arguments, built_name):
    """Run PyInstaller with `arguments` in a scratch folder; the binary it made, copied
    alone into a folder of its own (it must need nothing beside it)."""
    workspace = tmp_path_factory.mktemp("pyinstaller")
    succeeded(run(pyinstaller + ["--noconfirm", "--log-level", "WARN", "--distpath", workspace / "dist",
                                 "--workpath", workspace / "build"] + arguments, cwd=workspace))
    lonely = tmp_path_factory.mktemp("bin") / "osync"
    shutil.copy2(str(workspace / "dist" / built_name), str(lonely))
    shutil.rmtree(str(workspace), ignore_errors=True)
    return lonely


@pytest.fixture(scope="module")
def binary(pyinstaller, tmp_path_factory):
    """The osync binary built once from packaging/pyinstaller/osync.spec."""
    return build_binary(pyinstaller, tmp_path_factory, [REPO / "packaging" / "pyinstaller" / "osync.spec"], "osync")


def run_binary(binary, pair, *args, env=None):
    """The binary run on `pair` as pair.run() runs osync.py (same options, same environment)."""
    extra = dict(getattr(pair, "quick_env", {}))
    extra.update(env or {})
    argv = [str(binary)] + pair.quick_args() + list(args)
    result = subprocess.run(argv, env=pair.env(extra), cwd=str(pair.cwd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            errors="surrogateescape", timeout=120)
    result.output = result.stdout + result.stderr
    result.logfile = pair.logfile
    return result


def test_binary_is_one_file_that_runs_without_osync_py(binary, tmp_path):
    assert sorted(os.listdir(str(binary.parent))) == ["osync"]
    result = run([binary, "--version"], cwd=tmp_path, env=dict(os.environ, PATH="/usr/bin:/bin", PYTHONPATH=""))
    assert succeeded(result).stdout.strip() == "osync.py %s" % VERSION
    assert "Traceback" not in result.output


def test_binary_syncs_and_streams_its_bundled_source_to_the_target(binary, pair, tmp_path):
    """On an ssh target the agent is the binary's bundled osync.py, run by the target's
    Python (3.6 for the remote pair, while the binary holds a newer one).  rsync and ssh,
    started by the binary, get the caller's LD_LIBRARY_PATH, not the bundle's libraries."""
    build(pair.initiator, {"from_initiator": "i", "dir/deep": "d", "name with space": "s"})
    build(pair.target, {"from_target": "t"})
    seen = tmp_path / "rsync-library-path"
    wrapper = tmp_path / "rsync-wrapper"
    wrapper.write_text('#!/bin/sh\nprintf "%%s\\n" "${LD_LIBRARY_PATH-unset}" >> %s\nexec %s "$@"\n'
                       % (shell_quote(seen), shutil.which("rsync")))
    wrapper.chmod(0o755)
    env = {"RSYNC_EXECUTABLE": wrapper, "LD_LIBRARY_PATH": "/nonexistent/osync-test-lib"}
    result = run_binary(binary, pair, "--verbose", env=env)
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.output and "Unexpected internal error" not in result.output, describe(result)
    synced = expected({"from_initiator": "i", "dir/deep": "d", "name with space": "s", "from_target": "t"})
    assert snapshot(pair.initiator) == synced
    assert snapshot(pair.target) == synced
    if pair.kind.startswith("remote"):
        agent_python = subprocess.run([pair.python, "-c", "import sys; print(sys.version.split()[0])"],
                                      stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        assert "runs under Python %s" % agent_python in result.output, describe(result)
    # Every rsync started here saw the caller's value (one on a remote target: "unset").
    library_paths = set(seen.read_text().split())
    assert "/nonexistent/osync-test-lib" in library_paths, library_paths
    assert library_paths <= {"/nonexistent/osync-test-lib", "unset"}, library_paths
    again = run_binary(binary, pair, env=env)
    assert again.returncode == 0, describe(again)
    assert snapshot(pair.initiator) == synced and snapshot(pair.target) == synced


def test_binary_built_without_the_spec_says_it_lacks_its_source(pyinstaller, tmp_path_factory, request, tmp_path):
    """`pyinstaller --onefile osync.py` leaves the source out of the bundle: a sync to an
    ssh target then stops with a sentence that says how to build the binary, and
    changes nothing."""
    sources = tmp_path_factory.mktemp("plain-source")
    shutil.copy2(str(REPO / "osync.py"), str(sources / "osync.py"))
    plain = build_binary(pyinstaller, tmp_path_factory, ["--onefile", "--specpath", sources, sources / "osync.py"],
                         "osync")
    remote = make_pair("remote", tmp_path / "p", request)
    build(remote.initiator, {"from_initiator": "i"})
    build(remote.target, {"from_target": "t"})
    before = remote.full_snapshot(with_state=True)
    result = run_binary(plain, remote)
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.output and "Unexpected internal error" not in result.output, describe(result)
    assert "cannot read its own source" in result.output, describe(result)
    assert "packaging/pyinstaller/osync.spec" in result.output, describe(result)
    assert remote.full_snapshot(with_state=True) == before
