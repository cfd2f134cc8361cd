#!/usr/bin/env python3
"""osync.py - two-way file synchronization for sysadmins.

Keeps two directory trees in step: the *initiator* (a local directory) and the *target*.
It is stateful: each run compares both replicas with the state recorded at the end of the
previous run, so it knows what changed where, resolves conflicts on its own (newer wins,
the loser is kept in a backup) and never throws a version away without keeping it.
Transfers go through rsync.  Standard library only; CPython 3.6 to 3.13.

Drop-in replacement for osync v1.3 (bash): same options, config keys, work dir layout,
lock files, log names and exit codes (0 ok, 1 error, 2 warnings only).

The file reads top to bottom in sections, each using only the ones above it:
settings, config, output, processes, agent protocol, replica, transport, scan and state,
planner, executor, run and command line.
"""

import argparse
import codecs
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib

PROGRAM = "osync.py"
VERSION = "2.0.0"
CONFIG_FILE_REVISION_REQUIRED = "1.3.0"
WORK_DIR_NAME = ".osync_workdir"
PUSH_FILE_NAME = ".osync-update.push"
STATE_FORMAT = "osync.py-state"
STATE_VERSION = 1


class OsyncError(Exception):
    """Root of every error osync.py reports as one sentence (exit code 1, no traceback)."""


class ConfigError(OsyncError):
    """A bad command line, config file line, environment value or setting."""


class ReplicaError(OsyncError):
    """A replica cannot be used: missing, unwritable, locked, unmounted..."""


class StopRun(BaseException):
    """Raised inside the run by a signal or the hard time limit, to stop it cleanly.

    It derives from BaseException so that no `except Exception` on the way swallows it."""

    def __init__(self, reason, level="WARN"):
        BaseException.__init__(self, reason)
        self.reason = reason
        self.level = level


# ======================================================================================
# Settings
# ======================================================================================
# One table of every config key and command-line switch.  The config reader, the
# environment overrides, the command line, --help and the example sync.conf are all
# derived from it.

class Setting(object):
    """One config key (key set) or one command-line-only switch (key None)."""

    def __init__(self, key, kind, default, section, help, option=None, quick=None,
                 old_names=(), choices=None, conf=True):
        self.key = key              # config / environment name, None for a run switch
        self.kind = kind            # bool, int, str, choice, list, switch
        self.default = default      # value in config-file mode (and quicksync unless quick)
        self.section = section      # [SECTION] of sync.conf
        self.help = help            # one line, used by --help and sync.conf
        self.option = option        # command-line option, e.g. "--rsakey"
        self.quick = quick          # different default in quicksync mode, or None
        self.old_names = old_names  # names used by osync v1.0 / v1.1 configs
        self.choices = choices      # allowed values for choice and list kinds
        self.conf = conf            # listed in sync.conf

    def takes_value(self):
        return self.kind in ("int", "str", "choice", "list")


S = Setting
SETTINGS = [
    # ---------------------------------------------------------------- [GENERAL]
    S("CONFIG_FILE_REVISION", "str", "1.3.0", "GENERAL",
      "Format revision of this file; configs older than 1.3.0 are read with their old names translated."),
    S("INSTANCE_ID", "str", "", "GENERAL",
      "Name of this sync job: used in state file names, the lock, the log file name and mails.",
      option="--instance-id", quick="quicksync_task", old_names=("SYNC_ID",)),
    S("INITIATOR_SYNC_DIR", "str", "", "GENERAL",
      "The local replica (directory).", option="--initiator", old_names=("MASTER_SYNC_DIR",)),
    S("TARGET_SYNC_DIR", "str", "", "GENERAL",
      "The other replica: a local directory or ssh://[user@]host[:port]//absolute/path.",
      option="--target", old_names=("SLAVE_SYNC_DIR",)),
    S("SSH_RSA_PRIVATE_KEY", "str", "~/.ssh/id_rsa", "GENERAL",
      "ssh private key used to reach a remote target.", option="--rsakey"),
    S("SSH_PASSWORD_FILE", "str", "", "GENERAL",
      "File holding the ssh password (used through sshpass) when no key is used.",
      option="--password-file"),
    S("KRB5", "bool", False, "GENERAL",
      "Authenticate with the Kerberos credential cache instead of a key or password.", option="--krb5"),
    S("_REMOTE_TOKEN", "str", "", "GENERAL",
      "Token that ssh_filter.py on the remote host checks before it runs anything.",
      option="--remote-token"),
    S("CREATE_DIRS", "bool", False, "GENERAL",
      "Create missing replica directories (off: a missing replica is an error, e.g. an unmounted disk)."),
    S("LOGFILE", "str", "", "GENERAL",
      "Log file; empty: /var/log/osync.INSTANCE_ID.log, else ~/osync.INSTANCE_ID.log, else ./osync.INSTANCE_ID.log."),
    S("MINIMUM_SPACE", "int", 10240, "GENERAL",
      "Warn when a replica has less free space than this, in KiB; 0 disables the check.", quick=1024),
    S("BANDWIDTH", "int", 0, "GENERAL", "rsync bandwidth limit in KiB/s; 0 means no limit."),
    S("SUDO_EXEC", "bool", False, "GENERAL",
      "Run the remote agent and the remote rsync through sudo."),
    S("RSYNC_EXECUTABLE", "str", "rsync", "GENERAL", "rsync program name, locally and on the remote host."),
    S("RSYNC_REMOTE_PATH", "str", "", "GENERAL", "Directory of rsync on the remote host, if not in its PATH."),
    S("RSYNC_PATTERN_FIRST", "choice", "include", "GENERAL",
      "Which pattern list is checked first: include or exclude (the first matching pattern wins).",
      choices=("include", "exclude")),
    S("RSYNC_INCLUDE_PATTERN", "str", "", "GENERAL",
      "rsync include patterns, separated by PATH_SEPARATOR_CHAR."),
    S("RSYNC_EXCLUDE_PATTERN", "str", "", "GENERAL",
      "rsync exclude patterns, separated by PATH_SEPARATOR_CHAR (e.g. \"tmp;*.bak;/cache/\")."),
    S("RSYNC_INCLUDE_FROM", "str", "", "GENERAL",
      "File of include patterns, one a line; a bare name is looked up next to this config file."),
    S("RSYNC_EXCLUDE_FROM", "str", "", "GENERAL",
      "File of exclude patterns, one a line; a bare name is looked up next to this config file."),
    S("PATH_SEPARATOR_CHAR", "str", ";", "GENERAL", "Separator of the pattern lists above."),
    S("INITIATOR_CUSTOM_STATE_DIR", "str", "", "GENERAL",
      "Absolute path of a state dir to use instead of INITIATOR/.osync_workdir/state.",
      option="--initiator-state-dir"),
    S("TARGET_CUSTOM_STATE_DIR", "str", "", "GENERAL",
      "Absolute path (on the target host) of a state dir to use instead of TARGET/.osync_workdir/state.",
      option="--target-state-dir"),
    # ---------------------------------------------------------------- [REMOTE_OPTIONS]
    S("SSH_COMPRESSION", "bool", True, "REMOTE_OPTIONS",
      "Compress the ssh connection (turn off on fast links)."),
    S("SSH_OPTIONAL_ARGS", "str", "", "REMOTE_OPTIONS", "Extra options added to every ssh command."),
    S("SSH_IGNORE_KNOWN_HOSTS", "bool", False, "REMOTE_OPTIONS",
      "Do not check the remote host key (dangerous: only on trusted networks)."),
    S("SSH_CONTROLMASTER", "bool", False, "REMOTE_OPTIONS",
      "Kept for compatibility: osync.py always uses one ssh connection per run.",
      option="--ssh-controlmaster"),
    S("REMOTE_HOST_PING", "bool", False, "REMOTE_OPTIONS",
      "Ping the remote host first; if it does not answer, the task is skipped (exit 1)."),
    S("REMOTE_PYTHON", "str", "", "REMOTE_OPTIONS",
      "Python interpreter (3.6 or newer) that runs the osync.py agent on the target host; empty tries python3, then python."),
    S("REMOTE_3RD_PARTY_HOSTS", "str", "", "REMOTE_OPTIONS",
      "Hosts pinged to check internet access before a remote sync; none answering is a warning.",
      old_names=("REMOTE_3RD_PARTY_HOST",)),
    # ---------------------------------------------------------------- [MISC_OPTIONS]
    S("RSYNC_OPTIONAL_ARGS", "str", "", "MISC_OPTIONS",
      "Extra rsync arguments (e.g. --modify-window=2 for FAT/SMB)."),
    S("PRESERVE_PERMISSIONS", "bool", True, "MISC_OPTIONS", "Sync permission bits."),
    S("PRESERVE_OWNER", "bool", True, "MISC_OPTIONS", "Sync file owners (only when running as root)."),
    S("PRESERVE_GROUP", "bool", True, "MISC_OPTIONS", "Sync file groups (only when running as root)."),
    S("PRESERVE_EXECUTABILITY", "bool", True, "MISC_OPTIONS",
      "Sync the executable bits even when permissions are not synced."),
    S("PRESERVE_ACL", "bool", False, "MISC_OPTIONS", "Sync ACLs (the filesystems must support them)."),
    S("PRESERVE_XATTR", "bool", False, "MISC_OPTIONS", "Sync extended attributes."),
    S("COPY_SYMLINKS", "bool", False, "MISC_OPTIONS",
      "Copy what symlinks point to instead of the links (a broken link is then an error)."),
    S("KEEP_DIRLINKS", "bool", False, "MISC_OPTIONS",
      "Treat symlinks to directories as directories (follows links out of the replica)."),
    S("PRESERVE_HARDLINKS", "bool", False, "MISC_OPTIONS", "Keep hard links as hard links."),
    S("CHECKSUM", "bool", False, "MISC_OPTIONS",
      "Detect changes by content hash instead of size and modification time (slow)."),
    S("RSYNC_COMPRESS", "bool", True, "MISC_OPTIONS", "Compress remote rsync transfers."),
    S("SOFT_MAX_EXEC_TIME", "int", 7200, "MISC_OPTIONS",
      "Warn when a run takes longer than this many seconds; 0 disables.", quick=0,
      old_names=("SOFT_MAX_EXEC_TIME_FILE_TASK", "MAX_SOFT_EXEC_TIME")),
    S("HARD_MAX_EXEC_TIME", "int", 10600, "MISC_OPTIONS",
      "Stop a run (exit 1) that takes longer than this many seconds; 0 disables.", quick=0,
      old_names=("HARD_MAX_EXEC_TIME_FILE_TASK", "MAX_HARD_EXEC_TIME")),
    S("KEEP_LOGGING", "int", 1801, "MISC_OPTIONS",
      "Log a 'still running' line every this many seconds; 0 disables."),
    S("MIN_WAIT", "int", 60, "MISC_OPTIONS",
      "Monitor mode: seconds to wait after a change before syncing.", quick=30),
    S("MAX_WAIT", "int", 7200, "MISC_OPTIONS",
      "Monitor mode: sync anyway after this many seconds without changes; 0 waits forever."),
    # ---------------------------------------------------------------- [BACKUP_DELETE_OPTIONS]
    S("LOG_CONFLICTS", "bool", False, "BACKUP_DELETE_OPTIONS",
      "Write the list of conflicts of each run to the state dir (conflicts are always logged).",
      option="--log-conflicts"),
    S("ALERT_CONFLICTS", "bool", False, "BACKUP_DELETE_OPTIONS",
      "Also send a mail listing the conflicts (turns LOG_CONFLICTS on).", option="--alert-conflicts"),
    S("CONFLICT_BACKUP", "bool", True, "BACKUP_DELETE_OPTIONS",
      "Keep the old version of every file a sync overwrites in .osync_workdir/backup (the loser of a conflict is always kept)."),
    S("CONFLICT_BACKUP_MULTIPLE", "bool", False, "BACKUP_DELETE_OPTIONS",
      "Keep every backup, named PATH.YYYY.MM.DD-HH.MM.SS, instead of the newest one only."),
    S("CONFLICT_BACKUP_DAYS", "int", 30, "BACKUP_DELETE_OPTIONS",
      "Remove backups older than this many days after a successful sync; 0 keeps them forever."),
    S("CONFLICT_PREVALANCE", "choice", "initiator", "BACKUP_DELETE_OPTIONS",
      "Replica that wins a conflict when both versions have the same modification time.",
      choices=("initiator", "target")),
    S("SOFT_DELETE", "bool", True, "BACKUP_DELETE_OPTIONS",
      "Move deleted items to .osync_workdir/deleted instead of removing them."),
    S("SOFT_DELETE_DAYS", "int", 30, "BACKUP_DELETE_OPTIONS",
      "Remove soft-deleted items older than this many days after a successful sync; 0 keeps them forever."),
    S("SKIP_DELETION", "list", "", "BACKUP_DELETE_OPTIONS",
      "Never propagate deletions to these replicas: initiator, target or initiator,target.",
      option="--skip-deletion", choices=("initiator", "target")),
    S("SYNC_TYPE", "choice", "", "BACKUP_DELETE_OPTIONS",
      "Empty for two-way sync, or initiator2target / target2initiator to mirror one way.",
      option="--sync-type", choices=("", "initiator2target", "target2initiator")),
    # ---------------------------------------------------------------- [RESUME_OPTIONS]
    S("RESUME_SYNC", "bool", True, "RESUME_OPTIONS",
      "Count and report runs that continue an interrupted one (every run continues where the last stopped)."),
    S("RESUME_TRY", "int", 2, "RESUME_OPTIONS",
      "Interrupted runs in a row after which a warning is raised; 0 never warns.", quick=1),
    S("FORCE_STRANGER_LOCK_RESUME", "bool", False, "RESUME_OPTIONS",
      "Take over a dead remote target lock left by another INSTANCE_ID."),
    S("PARTIAL", "bool", False, "RESUME_OPTIONS",
      "Keep partly transferred files in .osync_workdir/_partial so the next run resumes them.",
      option="--partial"),
    S("DELTA_COPIES", "bool", True, "RESUME_OPTIONS",
      "Use the rsync delta algorithm (off: whole files, less CPU on fast links)."),
    # ---------------------------------------------------------------- [ALERT_OPTIONS]
    S("DESTINATION_MAILS", "str", "", "ALERT_OPTIONS",
      "Alert mail recipients, separated by spaces; empty sends no mail.", option="--destination-mails"),
    S("ALWAYS_SEND_MAILS", "bool", False, "ALERT_OPTIONS", "Also send a mail after a clean run."),
    S("MAIL_BODY_CHARSET", "str", "", "ALERT_OPTIONS", "Charset of the mail body; empty means UTF-8."),
    S("SENDER_MAIL", "str", "", "ALERT_OPTIONS", "Sender address of alert mails."),
    S("SMTP_SERVER", "str", "", "ALERT_OPTIONS", "SMTP server for alert mails."),
    S("SMTP_PORT", "int", 25, "ALERT_OPTIONS", "SMTP port."),
    S("SMTP_ENCRYPTION", "choice", "none", "ALERT_OPTIONS", "SMTP encryption: none, tls or ssl.",
      choices=("none", "tls", "ssl")),
    S("SMTP_USER", "str", "", "ALERT_OPTIONS", "SMTP user, if the server needs one."),
    S("SMTP_PASSWORD", "str", "", "ALERT_OPTIONS", "SMTP password."),
    # ---------------------------------------------------------------- [EXECUTION_HOOKS]
    S("LOCAL_RUN_BEFORE_CMD", "str", "", "EXECUTION_HOOKS", "Shell command run on this host before the sync."),
    S("LOCAL_RUN_AFTER_CMD", "str", "", "EXECUTION_HOOKS", "Shell command run on this host after the sync."),
    S("REMOTE_RUN_BEFORE_CMD", "str", "", "EXECUTION_HOOKS", "Command run on the target host before the sync."),
    S("REMOTE_RUN_AFTER_CMD", "str", "", "EXECUTION_HOOKS", "Command run on the target host after the sync."),
    S("MAX_EXEC_TIME_PER_CMD_BEFORE", "int", 0, "EXECUTION_HOOKS",
      "Seconds after which a before command is killed; 0 means no limit."),
    S("MAX_EXEC_TIME_PER_CMD_AFTER", "int", 0, "EXECUTION_HOOKS",
      "Seconds after which an after command is killed; 0 means no limit."),
    S("STOP_ON_CMD_ERROR", "bool", True, "EXECUTION_HOOKS", "A failing before command stops the run (exit 1)."),
    S("RUN_AFTER_CMD_ON_ERROR", "bool", False, "EXECUTION_HOOKS",
      "Also run the after commands when the run had errors or warnings."),
    # ---------------------------------------------------------------- run switches
    S(None, "switch", False, None, "Show what would be done; change nothing.", option="--dry"),
    S(None, "switch", False, None, "Print nothing on screen (the log file is still written).", option="--silent"),
    S(None, "switch", False, None, "Print more detail (rsync output, every action).", option="--verbose"),
    S(None, "switch", False, None, "Print only warnings and errors.", option="--errors-only"),
    S(None, "switch", False, None, "No time prefix on log lines.", option="--no-prefix"),
    S(None, "switch", False, None, "No progress animation (osync.py never shows one).", option="--non-interactive"),
    S(None, "switch", False, None, "List transferred and deleted files at the end.", option="--summary"),
    S(None, "switch", False, None, "Log rsync transfer statistics.", option="--stats"),
    S(None, "switch", False, None, "Ignore SOFT_MAX_EXEC_TIME and HARD_MAX_EXEC_TIME.", option="--no-maxtime"),
    S(None, "switch", False, None, "Remove existing locks without checking them.", option="--force-unlock"),
    S(None, "switch", False, None, "Neither check nor take locks.", option="--no-locks"),
    S(None, "switch", False, None, "Same as RESUME_TRY=0.", option="--no-resume"),
    S(None, "switch", False, None, "Record both replicas as the baseline for the next run; sync nothing.",
      option="--initialize"),
    S(None, "switch", False, None, "Monitor mode: sync whenever the initiator changes.", option="--on-changes"),
    S(None, "switch", False, None, "Monitor mode on the target host: notify the initiator of changes.",
      option="--on-changes-target"),
]
del S

SETTINGS_BY_KEY = dict((s.key, s) for s in SETTINGS if s.key)
OLD_NAMES = dict((old, s.key) for s in SETTINGS for old in s.old_names)
# osync v1.0 called the replicas master and slave.
OLD_VALUES = {"master": "initiator", "slave": "target"}
BOOL_WORDS = {"yes": True, "true": True, "on": True, "1": True,
              "no": False, "false": False, "off": False, "0": False}
SECTION_TITLES = {
    "GENERAL": "General settings",
    "REMOTE_OPTIONS": "Remote (ssh) targets",
    "MISC_OPTIONS": "rsync and run options",
    "BACKUP_DELETE_OPTIONS": "Conflicts, backups and deletions",
    "RESUME_OPTIONS": "Interrupted runs and transfers",
    "ALERT_OPTIONS": "Alert mails",
    "EXECUTION_HOOKS": "Commands run before and after the sync",
}


def default_value(setting, quicksync):
    """The value a setting has when nothing sets it."""
    if quicksync and setting.quick is not None:
        return setting.quick
    return setting.default


def convert_value(setting, text):
    """Turn a config/env/command-line string into the setting's type; ValueError says why."""
    text = text.strip() if setting.kind != "str" else text
    if setting.kind == "str":
        return text
    if setting.kind == "bool":
        try:
            return BOOL_WORDS[text.lower()]
        except KeyError:
            raise ValueError("%r is not a boolean (use yes or no)" % text)
    if setting.kind == "int":
        if not re.match(r"^[0-9]+$", text):
            raise ValueError("%r is not a whole number of 0 or more" % text)
        return int(text)
    if setting.kind == "choice":
        value = OLD_VALUES.get(text, text)
        if value not in setting.choices:
            raise ValueError("%r is not one of: %s" % (text, ", ".join(c or '""' for c in setting.choices)))
        return value
    if setting.kind == "list":
        items = [OLD_VALUES.get(part.strip(), part.strip()) for part in text.split(",") if part.strip()]
        for item in items:
            if item not in setting.choices:
                raise ValueError("%r is not one of: %s" % (item, ", ".join(setting.choices)))
        return ",".join(items)
    raise AssertionError(setting.kind)


def format_value(setting, value):
    """The config-file spelling of a value (used by sync.conf)."""
    if setting.kind == "bool":
        return "true" if value else "false"
    if setting.kind == "int" or re.match(r"^[A-Za-z0-9_./~@:+-]+$", value):
        return str(value)
    return '"%s"' % value


def example_config():
    """The text of sync.conf: every key with its default and a comment saying what it does."""
    lines = [
        "#!/usr/bin/env osync.py",
        "# Example configuration for %s.  Every key is listed with its default value." % PROGRAM,
        "# Copy this file to /etc/osync/NAME.conf and run: osync.py /etc/osync/NAME.conf",
        "# The file is read, never executed: KEY=value lines, quotes, $VARIABLES and ~ only.",
        "# Any key can also be set in the environment, which overrides the file;",
        "# command-line options override both.  Booleans take yes/no or true/false.",
        "",
    ]
    section = None
    for setting in SETTINGS:
        if not setting.key or not setting.conf:
            continue
        if setting.section != section:
            section = setting.section
            lines.append("[%s]" % section)
            lines.append("# ---- %s" % SECTION_TITLES[section])
            lines.append("")
        lines.append("# %s" % setting.help)
        if setting.choices:
            lines.append("# One of: %s" % ", ".join(c or '""' for c in setting.choices))
        if setting.quick is not None:
            lines.append("# Quicksync default: %s" % format_value(setting, setting.quick))
        if setting.option:
            lines.append("# Command line: %s" % setting.option)
        lines.append("%s=%s" % (setting.key, format_value(setting, setting.default)))
        lines.append("")
    return "\n".join(lines)


# ======================================================================================
# Config
# ======================================================================================
# A strict reader for the shell-assignment subset osync configs use.  It never runs the
# file: anything that would make a shell run code is an error naming file, line and key.

ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
SHELL_CODE_CHARS = ";|&<>(){}"


def expand_word(text, variables, where):
    """Expand one shell word: quotes, backslashes, $VAR, ${VAR} and a leading ~.

    `where` is the "file:line: KEY" prefix of error messages.  Returns the value."""
    out = []
    i = 0
    n = len(text)
    if text.startswith("~") and (n == 1 or text[1] == "/"):
        out.append(os.path.expanduser("~"))
        i = 1

    def variable(i, quoted):
        # text[i] == "$"; returns (value, next index)
        if i + 1 < n and text[i + 1] == "{":
            end = text.find("}", i + 2)
            if end < 0:
                raise ConfigError("%s: unclosed ${ in value" % where)
            name = text[i + 2:end]
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ConfigError("%s: ${%s} is shell code, not a variable; the config is never executed"
                                  % (where, name))
            return variables(name), end + 1
        if i + 1 < n and text[i + 1] == "(":
            raise ConfigError("%s: command substitution $(...) is not allowed; the config is never executed"
                              % where)
        match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1:])
        if not match:
            return "$", i + 1
        return variables(match.group(0)), i + 1 + match.end()

    while i < n:
        char = text[i]
        if char == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ConfigError("%s: unclosed single quote" % where)
            out.append(text[i + 1:end])
            i = end + 1
        elif char == '"':
            i += 1
            while True:
                if i >= n:
                    raise ConfigError("%s: unclosed double quote" % where)
                char = text[i]
                if char == '"':
                    i += 1
                    break
                if char == "\\" and i + 1 < n and text[i + 1] in '$`"\\':
                    out.append(text[i + 1])
                    i += 2
                elif char == "`":
                    raise ConfigError("%s: command substitution `...` is not allowed; the config is never executed"
                                      % where)
                elif char == "$":
                    value, i = variable(i, True)
                    out.append(value)
                else:
                    out.append(char)
                    i += 1
        elif char == "\\":
            if i + 1 < n:
                out.append(text[i + 1])
            i += 2
        elif char == "`":
            raise ConfigError("%s: command substitution `...` is not allowed; the config is never executed"
                              % where)
        elif char == "$":
            value, i = variable(i, False)
            out.append(value)
        elif char in " \t":
            rest = text[i:].strip()
            if rest and not rest.startswith("#"):
                raise ConfigError("%s: unquoted space in value; put the value in quotes" % where)
            break
        elif char in SHELL_CODE_CHARS:
            raise ConfigError("%s: %r is shell code; quote the value if it is part of it" % (where, char))
        else:
            out.append(char)
            i += 1
    return "".join(out)


def read_config_file(path):
    """Read a config file into a list of (line number, key, raw value string).

    Keys are returned as written (old names included); values are expanded."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigError("Cannot read config file %s: %s." % (path, error.strerror))
    text = data.decode("utf-8", "surrogateescape")
    assignments = []
    known = {}

    def lookup(name):
        if name in known:
            return known[name]
        return os.environ.get(name, "")

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"^\[[A-Za-z0-9_ -]*\]$", stripped):
            continue
        match = ASSIGNMENT.match(stripped)
        if not match:
            raise ConfigError("%s:%d: not a KEY=value line: %s" % (path, number, stripped[:80]))
        key, raw = match.group(1), match.group(2)
        value = expand_word(raw, lookup, "%s:%d: %s" % (path, number, key))
        known[key] = value
        assignments.append((number, key, value))
    return assignments


class Config(object):
    """All settings of one run, plus the run switches and where each value came from."""

    def __init__(self, quicksync):
        self.quicksync = quicksync
        self.values = {}
        self.origin = {}
        self.switches = {}
        self.config_file = None
        self.warnings = []          # reported once the log is open
        for setting in SETTINGS:
            if setting.key:
                self.values[setting.key] = default_value(setting, quicksync)
                self.origin[setting.key] = "default"
            else:
                self.switches[setting.option.lstrip("-").replace("-", "_")] = False

    def __getitem__(self, key):
        return self.values[key]

    def switch(self, name):
        return self.switches[name]

    def set_from_text(self, key, text, where):
        """Set a key from a string; `where` names the origin for error messages."""
        setting = SETTINGS_BY_KEY[key]
        if setting.kind != "str" and text.strip() == "":
            # An empty value means the documented default, in every mode.
            self.values[key] = default_value(setting, self.quicksync)
        else:
            try:
                self.values[key] = convert_value(setting, text)
            except ValueError as error:
                raise ConfigError("%s: %s: %s." % (where, key, error))
        self.origin[key] = where

    def load_file(self, path):
        """Apply a config file.  Unknown keys warn; old names are translated with a warning."""
        if not os.path.exists(path):
            raise ConfigError("Config file %s does not exist." % path)
        if not path.endswith(".conf"):
            raise ConfigError("Config file %s must have a name ending in .conf." % path)
        self.config_file = os.path.abspath(path)
        revision = None
        for number, key, value in read_config_file(path):
            where = "%s:%d" % (path, number)
            if key in OLD_NAMES:
                self.warnings.append("%s: %s is the osync v1.0/v1.1 name of %s; please rename it."
                                     % (where, key, OLD_NAMES[key]))
                key = OLD_NAMES[key]
            if key == "CONFIG_FILE_REVISION":
                revision = value
            if key in ("REMOTE_SYNC", "OSYNC_DIR", "COMPRESSION_LEVEL"):
                continue  # obsolete internals of osync.sh, without meaning here
            if key not in SETTINGS_BY_KEY:
                self.warnings.append("%s: %s: unknown setting, ignored." % (where, key))
                continue
            setting = SETTINGS_BY_KEY[key]
            if setting.kind == "choice" and value in OLD_VALUES:
                self.warnings.append("%s: %s: value %s is the osync v1.0 name of %s; please rename it."
                                     % (where, key, value, OLD_VALUES[value]))
            self.set_from_text(key, value, where)
        if revision is None or not re.match(r"^[0-9]+(\.[0-9]+)*$", revision.strip()):
            self.warnings.append("%s: CONFIG_FILE_REVISION is missing or not a number; "
                                 "add CONFIG_FILE_REVISION=%s." % (path, CONFIG_FILE_REVISION_REQUIRED))
        elif version_tuple(revision) < version_tuple(CONFIG_FILE_REVISION_REQUIRED):
            self.warnings.append("%s: written for osync %s; its old names were translated. "
                                 "Compare it with sync.conf and set CONFIG_FILE_REVISION=%s."
                                 % (path, revision, CONFIG_FILE_REVISION_REQUIRED))

    def load_environment(self, environ):
        """Environment variables named like config keys (or their old names) override the file."""
        for name, key in list(OLD_NAMES.items()) + [(k, k) for k in SETTINGS_BY_KEY]:
            if name in environ and key in SETTINGS_BY_KEY:
                self.set_from_text(key, environ[name], "environment variable %s" % name)

    def finish(self):
        """Checks and derived values once every source has been applied."""
        if self.values["ALERT_CONFLICTS"]:
            self.values["LOG_CONFLICTS"] = True
        if self.switches["no_resume"]:
            self.values["RESUME_TRY"] = 0
        if self.switches["no_maxtime"]:
            self.values["SOFT_MAX_EXEC_TIME"] = 0
            self.values["HARD_MAX_EXEC_TIME"] = 0
        for key in ("INSTANCE_ID", "INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR"):
            if not self.values[key]:
                raise ConfigError("%s is not set%s." % (
                    key, " in %s" % self.config_file if self.config_file else ""))
        if not re.match(r"^[A-Za-z0-9_.@+-]+$", self.values["INSTANCE_ID"]):
            raise ConfigError("INSTANCE_ID %r may only hold letters, digits and _ . @ + -."
                              % self.values["INSTANCE_ID"])
        if not self.values["PATH_SEPARATOR_CHAR"]:
            raise ConfigError("PATH_SEPARATOR_CHAR must not be empty.")
        for key in ("INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR", "SSH_RSA_PRIVATE_KEY", "SSH_PASSWORD_FILE"):
            if self.values[key].startswith("~"):
                self.values[key] = os.path.expanduser(self.values[key])


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"[0-9]+", text))


# ======================================================================================
# Output
# ======================================================================================
# Levels, the time prefix, the log file, the screen switches, and the warning/error
# counts that decide the exit code.

VERBOSE = 15
NOTICE = 20
ALWAYS = 25
logging.addLevelName(VERBOSE, "VERBOSE")
logging.addLevelName(NOTICE, "NOTICE")
logging.addLevelName(ALWAYS, "ALWAYS")
logging.addLevelName(logging.WARNING, "WARN")
TAGGED_LEVELS = (VERBOSE, logging.WARNING, logging.ERROR, logging.CRITICAL)
LOG_MESSAGE_LIMIT = 16384


class LineFormatter(logging.Formatter):
    """osync's line format: PREFIX(LEVEL):message, or PREFIX message for notices."""

    def __init__(self, output, colour=False):
        logging.Formatter.__init__(self)
        self.output = output
        self.colour = colour

    def format(self, record):
        message = record.getMessage()
        if len(message) > LOG_MESSAGE_LIMIT:
            message = message[:LOG_MESSAGE_LIMIT] + " [...]"
        if getattr(record, "bare", False):
            return message
        prefix = self.output.prefix(record.created)
        if record.levelno in TAGGED_LEVELS:
            line = "%s(%s):%s" % (prefix, record.levelname, message)
        else:
            line = prefix + message
        if self.colour and record.levelno >= logging.WARNING:
            code = {logging.WARNING: "33", logging.ERROR: "31"}.get(record.levelno, "33;41")
            line = "\033[%sm%s\033[0m" % (code, line)
        return line


class ScreenFilter(logging.Filter):
    """Applies --silent, --errors-only and --verbose to one screen stream."""

    def __init__(self, output, stream_errors):
        logging.Filter.__init__(self)
        self.output = output
        self.stream_errors = stream_errors

    def filter(self, record):
        if self.output.silent:
            return False
        if (record.levelno >= logging.WARNING) != self.stream_errors:
            return False
        if self.output.errors_only and record.levelno < logging.WARNING and record.levelno != ALWAYS:
            return False
        return record.levelno >= self.output.screen_threshold or record.levelno == ALWAYS


class CountingHandler(logging.Handler):
    """Counts the warnings and errors logged: they decide the exit code."""

    def __init__(self):
        logging.Handler.__init__(self, VERBOSE)
        self.warnings = 0
        self.errors = 0

    def emit(self, record):
        if record.levelno >= logging.ERROR:
            self.errors += 1
        elif record.levelno == logging.WARNING:
            self.warnings += 1


class Output(object):
    """The run's logger: screen, log file, prefix, switches and exit code."""

    def __init__(self):
        self.start = time.time()
        self.silent = False
        self.errors_only = False
        self.screen_threshold = NOTICE
        self.prefix_mode = "time"
        self.logfile = None
        self.logger = logging.Logger(PROGRAM, logging.DEBUG)
        self.counter = CountingHandler()
        self.logger.addHandler(self.counter)
        self.pending = []          # records logged before the log file is known
        for stream, errors in ((sys.stdout, False), (sys.stderr, True)):
            handler = logging.StreamHandler(stream)
            handler.setFormatter(LineFormatter(self, colour=self._is_tty(stream)))
            handler.addFilter(ScreenFilter(self, errors))
            self.logger.addHandler(handler)
        self.file_handler = None
        self.logger.addHandler(_PendingHandler(self))

    @staticmethod
    def _is_tty(stream):
        try:
            return stream.isatty() and os.environ.get("TERM") not in (None, "dumb")
        except (AttributeError, ValueError):
            return False

    def configure(self, silent=False, errors_only=False, verbose=False, debug=False, prefix="time"):
        self.silent = silent
        self.errors_only = errors_only
        self.screen_threshold = logging.DEBUG if debug else (VERBOSE if verbose else NOTICE)
        self.prefix_mode = prefix

    def wants(self, level):
        """Is a message of this level shown or logged anywhere?  Saves building
        per-file messages nobody reads."""
        return level >= self.screen_threshold

    def prefix(self, created):
        if self.prefix_mode == "none":
            return ""
        if self.prefix_mode == "date":
            return time.strftime("%Y-%m-%d %H:%M:%S - ", time.localtime(created))
        return "TIME: %d - " % int(created - self.start)

    def open_log(self, candidates):
        """Use the first log file of `candidates` that can be opened (mode 0600, appended)."""
        for path in candidates:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError:
                continue
            stream = os.fdopen(fd, "a", encoding="utf-8", errors="surrogateescape")
            handler = logging.StreamHandler(stream)
            handler.setLevel(min(self.screen_threshold, NOTICE))
            handler.setFormatter(LineFormatter(self))
            self.file_handler = handler
            self.logger.addHandler(handler)
            self.logfile = path
            for record in self.pending:
                if record.levelno >= handler.level:
                    handler.handle(record)
            self.pending = None
            return path
        self.pending = None
        self.warn("Cannot write to any log file (tried %s)." % ", ".join(candidates))
        return None

    def close(self):
        if self.file_handler:
            self.file_handler.flush()
            self.file_handler.stream.close()
            self.logger.removeHandler(self.file_handler)
            self.file_handler = None

    def log(self, level, message, bare=False):
        self.logger.log(level, message, extra={"bare": bare})

    def debug(self, message):
        self.log(logging.DEBUG, message)

    def verbose(self, message):
        self.log(VERBOSE, message)

    def notice(self, message):
        self.log(NOTICE, message)

    def always(self, message, bare=False):
        self.log(ALWAYS, message, bare=bare)

    def warn(self, message):
        self.log(logging.WARNING, message)

    def error(self, message):
        self.log(logging.ERROR, message)

    def critical(self, message):
        self.log(logging.CRITICAL, message)

    def exit_code(self):
        if self.counter.errors:
            return 1
        if self.counter.warnings:
            return 2
        return 0


class _PendingHandler(logging.Handler):
    """Keeps records until the log file is chosen, so early messages reach it too."""

    def __init__(self, output):
        logging.Handler.__init__(self, logging.DEBUG)
        self.output = output

    def emit(self, record):
        if self.output.pending is not None:
            self.output.pending.append(record)


def log_file_candidates(instance_id, configured):
    """Where the log goes, as osync does: LOGFILE, else /var/log, $HOME, the working dir."""
    if configured:
        return [configured]
    name = "osync.%s.log" % instance_id if instance_id else "osync.log"
    places = ["/var/log", os.path.expanduser("~"), os.getcwd()]
    if not instance_id:
        places.append(tempfile.gettempdir())
    return [os.path.join(place, name) for place in places]


# ======================================================================================
# Processes
# ======================================================================================
# Commands run as argv lists (never a shell string), in their own process group so a
# stop kills them with all their children; plus the signal handlers and the run-time
# watchdog that turn SIGTERM/SIGINT and the hard time limit into StopRun.

def kill_process_group(process, grace=5.0):
    """Stop a child and everything it started: SIGTERM, then SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except OSError:
            return  # the whole group is gone
        deadline = time.time() + wait
        while time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        if process.poll() is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever the leader left behind
            except OSError:
                pass
            return


def run_command(argv, timeout=None, stdin_data=None, env=None, cwd=None):
    """Run argv; return (exit code, stdout text, stderr text).  Exit code 127: not found.

    A StopRun (signal or time limit) arriving meanwhile kills the command and propagates."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                                   start_new_session=True)
    except OSError as error:
        return 127, "", "%s: %s" % (argv[0], error.strerror)
    try:
        out, err = process.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(process)
        out, err = process.communicate()
        return -1, out.decode("utf-8", "replace"), err.decode("utf-8", "replace") + "\n(killed after %ss)" % timeout
    except BaseException:
        kill_process_group(process, grace=2.0)
        raise
    return process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


class Watchdog(object):
    """Soft and hard run-time limits, 'still running' lines, and clean stops on signals.

    A one-second interval timer checks the limits; SIGTERM, SIGINT, SIGHUP and SIGQUIT
    raise StopRun in the main thread so the run unwinds: children killed, locks released,
    state left consistent."""

    def __init__(self, output, soft, hard, keep_logging):
        self.output = output
        self.soft = soft
        self.hard = hard
        self.keep_logging = keep_logging
        self.start = time.time()
        self.soft_warned = False
        self.last_keep = self.start
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            self.previous[sig] = signal.signal(sig, self._on_signal)
        if self.soft or self.hard or self.keep_logging:
            self.previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_tick)
            signal.setitimer(signal.ITIMER_REAL, 1.0, 1.0)
        return self

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        for sig in self.previous:
            if sig != signal.SIGALRM:
                signal.signal(sig, signal.SIG_IGN)  # one clean stop; a second signal is not needed
        raise StopRun("Stopped by signal %s; the next run continues where this one stopped."
                      % signal.Signals(signum).name)

    def _on_tick(self, signum, frame):
        elapsed = time.time() - self.start
        if self.hard and elapsed >= self.hard:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise StopRun("Max hard execution time [%d] exceeded; stopping the run. "
                          "The next run continues where this one stopped." % self.hard, level="ERROR")
        if self.soft and elapsed >= self.soft and not self.soft_warned:
            self.soft_warned = True
            self.output.warn("Max soft execution time [%d] exceeded; the run goes on." % self.soft)
        if self.keep_logging and time.time() - self.last_keep >= self.keep_logging:
            self.last_keep = time.time()
            self.output.notice("Still running after %d seconds." % elapsed)


# ======================================================================================
# Agent protocol
# ======================================================================================
# A remote target is served by this same file running on the remote host as an agent.
# Everything a replica operation takes or returns is plain JSON data (paths are str
# decoded with surrogateescape, so any byte name round-trips), which is what lets the
# remote side run the very same LocalReplica code below.  Entries travel as lists
# (to_wire / from_wire, next section).

# Messages are framed as one type byte (J: JSON, Z: zlib-compressed JSON), a 4-byte
# big-endian length and the payload.  JSON is written with ensure_ascii, so the stream
# is pure ASCII whatever the names.  A request is {"op": NAME, "args": [...]}; the
# reply is {"ok": RESULT} or {"error": SENTENCE}; a scan replies with {"batch": [...]}
# messages and a final {"end": true}.

# Paths travel (and are stored in the state) as their bytes decoded as UTF-8 with
# surrogateescape, whatever the local filesystem encoding: a Python 3.6 under the C
# locale decodes names as ASCII, and its str for a name must still mean the same bytes
# on the other side.  Where the filesystem encoding is UTF-8 (nearly always) the
# conversions are the identity and cost nothing.
FS_IS_UTF8 = codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def wire_text(native):
    """A native str (as os functions return it) in the wire form."""
    try:
        return os.fsencode(native).decode("utf-8", "surrogateescape")
    except UnicodeError:
        return native


def native_text(wire):
    """A wire-form str as os functions want it here."""
    try:
        return os.fsdecode(wire.encode("utf-8", "surrogateescape"))
    except UnicodeError:
        return wire


def transcode(value, convert):
    """Apply convert to every str inside lists, tuples and dicts (a no-op on UTF-8 systems)."""
    if FS_IS_UTF8:
        return value
    if isinstance(value, str):
        return convert(value)
    if isinstance(value, (list, tuple)):
        return [transcode(item, convert) for item in value]
    if isinstance(value, dict):
        return dict((key, transcode(item, convert)) for key, item in value.items())
    return value


AGENT_BANNER = b"OSYNC-AGENT "
AGENT_STUB = ("import sys;sys.version_info<(3,6) and sys.exit('osync.py agent: Python 3.6 or newer is needed, "
              "this is '+sys.version.split()[0]);sys.path=[p for p in sys.path if p not in ('','.')];"
              "n=int(sys.argv[1]);c=sys.stdin.buffer.read(n);g={'__name__':'osync_agent'};"
              "exec(compile(c,'osync.py','exec'),g);g['agent_main']()")
COMPRESS_ABOVE = 2048


class ProtocolError(Exception):
    """The agent stream ended or carried something that is not a message."""


def send_message(stream, message):
    payload = json.dumps(message, separators=(",", ":")).encode("ascii")
    kind = b"J"
    if len(payload) > COMPRESS_ABOVE:
        payload = zlib.compress(payload, 1)
        kind = b"Z"
    stream.write(kind + struct.pack(">I", len(payload)) + payload)
    stream.flush()


def read_exactly(stream, size):
    data = stream.read(size)
    if data is None or len(data) != size:
        raise ProtocolError("the stream ended")
    return data


def read_message(stream):
    """The next message, or None at a clean end of stream."""
    header = stream.read(5)
    if not header:
        return None
    if len(header) != 5 or header[:1] not in (b"J", b"Z"):
        raise ProtocolError("unexpected data %r" % header[:40])
    payload = read_exactly(stream, struct.unpack(">I", header[1:])[0])
    if header[:1] == b"Z":
        payload = zlib.decompress(payload)
    return json.loads(payload.decode("ascii"))


class AgentClient(object):
    """The local end of an agent: sends requests, reads replies, streams scans."""

    def __init__(self, process, host, stderr_file):
        self.process = process
        self.host = host
        self.stderr_file = stderr_file
        self.streaming = None   # the id of a streamed reply not read to its end

    def lost(self, what):
        detail = read_tail(self.stderr_file)
        return ReplicaError("The connection to the agent on %s was lost (%s)%s." % (
            self.host, what, ": " + detail if detail else ""))

    def _request(self, op, args):
        if self.streaming is not None:
            # An abandoned scan: read the rest of it so the next reply is ours.
            self.streaming = None
            while not self._reply().get("end"):
                pass
        try:
            send_message(self.process.stdin, {"op": op, "args": transcode(list(args), wire_text)})
        except (OSError, ValueError) as error:
            raise self.lost(str(error))

    def _reply(self):
        try:
            reply = read_message(self.process.stdout)
        except (ProtocolError, OSError, ValueError, zlib.error) as error:
            raise self.lost(str(error))
        if reply is None:
            raise self.lost("end of stream")
        reply = transcode(reply, native_text)
        if "error" in reply:
            raise ReplicaError("On %s: %s" % (self.host, reply["error"]))
        return reply

    def call(self, op, *args):
        self._request(op, args)
        return self._reply()["ok"]

    def stream(self, op, *args):
        """Send a streamed request now; return an iterator over the items of its reply."""
        self._request(op, args)
        stream_id = object()
        self.streaming = stream_id
        return self._items(stream_id)

    def _items(self, stream_id):
        while self.streaming is stream_id:
            try:
                reply = self._reply()
            except ReplicaError:
                self.streaming = None
                raise
            if reply.get("end"):
                self.streaming = None
                return
            for item in reply["batch"]:
                yield item

    def close(self):
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_process_group(self.process)


def read_tail(stderr_file, limit=600):
    """The last lines a process wrote to its stderr file, as one line."""
    try:
        stderr_file.seek(0)
        text = stderr_file.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines)[-limit:]


# ======================================================================================
# Replica
# ======================================================================================
# Entries, path filters, the tree walk, and LocalReplica: every operation the sync needs
# on one replica.  Each operation takes and returns JSON-able data and checks what it is
# about to touch against what the scan saw, so a file changed during the run is left
# alone for the next run instead of being overwritten or deleted.

class Entry(tuple):
    """What a scan saw of one path: kind f(ile), d(ir) or l(ink), size, times, attributes.

    `error` is set when the item could not be read (an unreadable directory, a broken
    link with COPY_SYMLINKS): the planner then leaves the path and its subtree alone."""
    __slots__ = ()
    FIELDS = ("path", "kind", "size", "mtime_ns", "mode", "uid", "gid", "ino", "ctime_ns",
              "link", "digest", "error")

    def __new__(cls, path, kind, size=0, mtime_ns=0, mode=0, uid=0, gid=0, ino=0, ctime_ns=0,
                link="", digest="", error=""):
        return tuple.__new__(cls, (path, kind, size, mtime_ns, mode, uid, gid, ino, ctime_ns,
                                   link, digest, error))

    path = property(lambda self: self[0])
    kind = property(lambda self: self[1])
    size = property(lambda self: self[2])
    mtime_ns = property(lambda self: self[3])
    mode = property(lambda self: self[4])
    uid = property(lambda self: self[5])
    gid = property(lambda self: self[6])
    ino = property(lambda self: self[7])
    ctime_ns = property(lambda self: self[8])
    link = property(lambda self: self[9])
    digest = property(lambda self: self[10])
    error = property(lambda self: self[11])


def to_wire(entry):
    """An Entry as a JSON-able list (None stays None)."""
    return None if entry is None else list(entry)


def from_wire(data):
    """The Entry a to_wire() list stands for."""
    return None if data is None else Entry(*data)


KIND_NAMES = {"f": "file", "d": "directory", "l": "symlink"}


def path_key(path):
    """Sort key of the canonical order: components compared as bytes, parent first.

    Mapping "/" to NUL (which no name contains) makes plain byte order equal to a
    depth-first walk with siblings sorted by their bytes."""
    return os.fsencode(path).replace(b"/", b"\0")


def same_version(old, new):
    """Did this item stay the same on one replica (ignoring attributes)?"""
    if old.kind != new.kind:
        return False
    if old.kind == "f":
        if old.digest and new.digest:
            return old.size == new.size and old.digest == new.digest
        return old.size == new.size and old.mtime_ns == new.mtime_ns
    if old.kind == "l":
        return old.link == new.link
    return True


def same_content(one, other):
    """Do the two replicas hold the same content at a path?  rsync's quick check:
    size and mtime (or the content hash with CHECKSUM)."""
    if one.kind != other.kind:
        return False
    if one.kind == "f":
        if one.digest and other.digest:
            return one.size == other.size and one.digest == other.digest
        return one.size == other.size and same_mtime(one.mtime_ns, other.mtime_ns)
    if one.kind == "l":
        return one.link == other.link
    return True


def same_mtime(one, other):
    """Equal modification times: to the nanosecond where both filesystems keep
    sub-second times, to the second where one of them does not (FAT, some network
    filesystems)."""
    if one % 10 ** 9 and other % 10 ** 9:
        return one == other
    return one // 10 ** 9 == other // 10 ** 9


def unchanged_since_scan(expected, current):
    """Is `current` (a fresh lstat) still what the scan saw?  None means absent."""
    if expected is None or current is None:
        return expected is None and current is None
    return same_version(expected, current) and (expected.kind != "f" or expected.mtime_ns == current.mtime_ns)


# Pattern filters -----------------------------------------------------------------------

def pattern_to_regex(pattern):
    """Translate one rsync include/exclude pattern into (regex, dir_only, match_full_path)."""
    dir_only = pattern.endswith("/") and len(pattern) > 1
    if dir_only:
        pattern = pattern.rstrip("/")
    anchored = pattern.startswith("/")
    if anchored:
        pattern = pattern.lstrip("/")
    everything_below = pattern.endswith("/***")
    if everything_below:
        pattern = pattern[:-4]
    full_path = anchored or "/" in pattern or "**" in pattern or everything_below
    wildcards = any(char in pattern for char in "*?[")
    if not wildcards:
        body = re.escape(pattern)
    else:
        parts = []
        i = 0
        while i < len(pattern):
            char = pattern[i]
            if char == "*":
                if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
                    parts.append("(?:.*/)?")  # "**/" also matches no directory at all
                    i += 3
                    continue
                if pattern.startswith("**", i):
                    parts.append(".*")
                    i += 2
                    continue
                parts.append("[^/]*")
            elif char == "?":
                parts.append("[^/]")
            elif char == "[":
                end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^", "]") else i + 1)
                if end < 0:
                    parts.append(re.escape(char))
                else:
                    inner = pattern[i + 1:end]
                    if inner.startswith("!"):
                        inner = "^" + inner[1:]
                    parts.append("[" + inner.replace("\\", "\\\\") + "]")
                    i = end
            elif char == "\\" and i + 1 < len(pattern):
                parts.append(re.escape(pattern[i + 1]))
                i += 1
            else:
                parts.append(re.escape(char))
            i += 1
        body = "".join(parts)
    if everything_below:
        body += "(?:/.*)?"
    if anchored:
        regex = "^" + body + "$"
    elif full_path:
        regex = "(?:^|/)" + body + "$"
    else:
        regex = "^" + body + "$"
    return re.compile(regex, re.DOTALL), dir_only, full_path


class PathFilter(object):
    """rsync-style include/exclude rules; the first rule that matches a path decides.

    Built from a JSON-able spec, a list of ["+" or "-", pattern], so that a remote
    replica applies exactly the same rules.  The work dir is always left out."""

    def __init__(self, spec):
        self.spec = spec
        self.rules = []
        for sign, pattern in spec:
            regex, dir_only, full_path = pattern_to_regex(pattern)
            self.rules.append((sign == "+", regex, dir_only, full_path))

    def excluded(self, path, is_dir):
        if path == WORK_DIR_NAME:
            return True   # the root's work dir is never synced, even as a link or a file
        name = path.rpartition("/")[2]
        if is_dir and name == WORK_DIR_NAME:
            return True
        if path == PUSH_FILE_NAME:
            return True
        for include, regex, dir_only, full_path in self.rules:
            if dir_only and not is_dir:
                continue
            if regex.search(path if full_path else name):
                return not include
        return False


# The walk --------------------------------------------------------------------------------

def file_digest(path):
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_entry(abs_path, rel_path, info, options):
    """An Entry from an lstat result; follows links where COPY_SYMLINKS/KEEP_DIRLINKS say so."""
    mode = info.st_mode
    if stat.S_ISLNK(mode) and (options.get("copy_links") or options.get("dir_links")):
        try:
            target_info = os.stat(abs_path)
        except OSError:
            if options.get("copy_links"):
                return Entry(rel_path, "l", error="broken symbolic link (COPY_SYMLINKS is on)")
            target_info = None
        if target_info is not None and (options.get("copy_links") or stat.S_ISDIR(target_info.st_mode)):
            info = target_info
            mode = info.st_mode
    if stat.S_ISREG(mode):
        kind = "f"
    elif stat.S_ISDIR(mode):
        kind = "d"
    elif stat.S_ISLNK(mode):
        kind = "l"
    else:
        return None  # devices, fifos and sockets are not synced
    link = ""
    digest = ""
    size = info.st_size if kind == "f" else 0
    if kind == "l":
        link = os.readlink(abs_path)
    elif kind == "f" and options.get("checksum"):
        try:
            digest = file_digest(abs_path)
        except OSError as error:
            return Entry(rel_path, "f", error="cannot read: %s" % error.strerror)
    return Entry(rel_path, kind, size, info.st_mtime_ns, stat.S_IMODE(mode), info.st_uid, info.st_gid,
                 info.st_ino, info.st_ctime_ns, link, digest, "")


def walk_tree(root, path_filter, options):
    """Yield an Entry for every item below root in canonical order, holding one
    directory listing per level at most.  An unreadable directory is yielded with its
    error set and not descended into."""
    stack = [_sorted_listing(root, "", path_filter, options)]
    while stack:
        try:
            abs_path, rel_path, info = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(info, OSError):
            # Unreadable, but there: the planner leaves it alone rather than take it for deleted.
            yield Entry(rel_path, "?", error="cannot read: %s" % info.strerror)
            continue
        try:
            entry = make_entry(abs_path, rel_path, info, options)
        except FileNotFoundError:
            continue  # vanished between the listing and the stat
        except OSError as error:
            yield Entry(rel_path, "?", error="cannot read: %s" % error.strerror)
            continue
        if entry is None:
            continue
        if entry.kind == "d" and not entry.error:
            try:
                listing = _sorted_listing(abs_path, rel_path + "/", path_filter, options)
            except OSError as error:
                entry = Entry(*(entry[:11] + ("cannot list directory: %s" % error.strerror,)))
                listing = None
            yield entry
            if listing is not None:
                stack.append(listing)
        else:
            yield entry


def _sorted_listing(abs_dir, rel_prefix, path_filter, options):
    """The children of one directory, sorted by name bytes, filtered; an iterator of
    (absolute path, relative path, lstat result).  Listing errors raise at once."""
    with os.scandir(abs_dir) as iterator:
        children = list(iterator)
    children.sort(key=lambda child: os.fsencode(child.name))
    return _listing_items(children, rel_prefix, path_filter, options)


def _listing_items(children, rel_prefix, path_filter, options):
    follow = options.get("copy_links") or options.get("dir_links")
    for child in children:
        rel_path = rel_prefix + child.name
        try:
            is_dir = child.is_dir(follow_symlinks=bool(follow))
            if path_filter.excluded(rel_path, is_dir):
                continue
            info = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # vanished since the listing
        except OSError as error:
            info = error
        yield child.path, rel_path, info


# The replica -------------------------------------------------------------------------------

def pid_alive(pid):
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_any(path):
    """Remove a file, link or whole directory tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def lexists(path):
    return os.path.lexists(path)


def check_private_dir(path, what, other_owners=()):
    """Refuse a directory that osync writes into unless lstat shows a real directory
    owned by this user (or one of `other_owners`) that nobody else can write: through a
    link, or a directory someone else controls, a run could be made to empty, replace or
    delete files outside the replica.  `what` names it ("The work dir of the initiator
    replica").  Returns False when nothing is there yet."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise ReplicaError("Cannot check %s (%s): %s." % (what.lower(), path, error.strerror))
    euid = os.geteuid()
    if stat.S_ISLNK(info.st_mode):
        raise ReplicaError("%s (%s) is a symbolic link, which osync never follows; remove the link (not what it "
                           "points to) and run again." % (what, path))
    if not stat.S_ISDIR(info.st_mode):
        raise ReplicaError("%s (%s) is not a directory; move it away and run again." % (what, path))
    if info.st_uid != euid and info.st_uid not in other_owners:
        raise ReplicaError("%s (%s) belongs to uid %d, not to the user running osync (%s, uid %d); give it to "
                           "that user (chown) or move it away, and run again."
                           % (what, path, info.st_uid, current_user(), euid))
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ReplicaError("%s (%s) can be written by other users (mode %04o); remove their write permission "
                           "(chmod go-w) and run again." % (what, path, stat.S_IMODE(info.st_mode)))
    return True


class LocalReplica(object):
    """One replica on this host.  A remote target runs this same class on its host."""

    def __init__(self, role, root, state_dir=""):
        self.role = role
        self.root = os.path.abspath(root)
        self.work_dir = os.path.join(self.root, WORK_DIR_NAME)
        self.state_dir = state_dir or os.path.join(self.work_dir, "state")
        self.custom_state_dir = bool(state_dir)
        self.lock_path = os.path.join(self.work_dir, "lock")
        self.display = self.root    # how messages name this replica

    def location(self):
        """What rsync is given for this replica's root."""
        return self.root + "/"

    def abs(self, rel_path):
        return os.path.join(self.root, rel_path)

    def inside(self, rel_path):
        """The absolute path of rel_path for an operation that deletes, moves, backs up or
        changes it, once lstat shows that none of its parents is a symbolic link.  With
        COPY_SYMLINKS or KEEP_DIRLINKS the scan goes through links, but what lies behind
        one may be outside the replica, so it is left alone.  Raises OSError whose text
        names the link (callers put the path in front)."""
        parts = rel_path.split("/")
        if any(part in ("", ".", "..") for part in parts) or parts[0] == WORK_DIR_NAME:
            raise OSError(errno.EINVAL, "not a path of the replica")
        current = self.root
        for depth, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            try:
                info = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                break   # nothing there yet: nothing to be reached through
            if stat.S_ISLNK(info.st_mode):
                raise OSError(errno.ELOOP, "%s is a symbolic link, and nothing reached through a link is deleted, "
                                           "moved, backed up or changed, as it may lie outside the replica"
                              % "/".join(parts[:depth + 1]))
        return os.path.join(self.root, rel_path)

    # -- checks -----------------------------------------------------------------------
    def probe(self, create):
        """Check the replica root.  Returns facts the run decides on; creates the root
        only when `create` (CREATE_DIRS) says so."""
        facts = {"root": self.root, "created": False}
        if not os.path.isdir(self.root):
            if lexists(self.root):
                raise ReplicaError("The %s replica %s exists but is not a directory." % (self.role, self.root))
            if not create:
                raise ReplicaError("The %s replica %s does not exist; create it, mount it, "
                                   "or set CREATE_DIRS=yes." % (self.role, self.root))
            try:
                os.makedirs(self.root)
            except OSError as error:
                raise ReplicaError("Cannot create the %s replica %s: %s." % (self.role, self.root, error.strerror))
            facts["created"] = True
        facts["realpath"] = os.path.realpath(self.root)
        facts["work_dir"] = os.path.isdir(self.work_dir)
        facts["writable"] = os.access(self.root, os.W_OK | os.X_OK)
        facts["euid"] = os.geteuid()
        try:
            usage = os.statvfs(self.root)
            facts["free_kb"] = usage.f_bavail * usage.f_frsize // 1024
        except OSError:
            facts["free_kb"] = None
        return facts

    def work_dir_parts(self):
        """The work dir, then each directory in it that osync writes into."""
        parts = [self.work_dir]
        if not self.custom_state_dir:
            parts.append(self.state_dir)
        for name in ("backup", "deleted", "_partial"):
            parts.append(os.path.join(self.work_dir, name))
        parts.append(self.temp_dir())
        return parts

    def _work_dir_what(self, path):
        if path == self.work_dir:
            return "The work dir of the %s replica" % self.role
        return "The %s/ dir in the work dir of the %s replica" % (os.path.basename(path), self.role)

    def check_work_dir(self):
        """Check, with lstat and without creating anything (dry runs too), the work dir,
        each part of it that exists, the lock and a custom state dir."""
        if check_private_dir(self.work_dir, self._work_dir_what(self.work_dir)):
            for path in self.work_dir_parts()[1:]:
                check_private_dir(path, self._work_dir_what(path))
            self._check_lock_file()
        if self.custom_state_dir:
            self._check_custom_state_dir()
        return True

    def _check_custom_state_dir(self):
        """A custom state dir is the admin's choice and may lie anywhere, also be root's;
        it must still be a real directory that nobody else can write."""
        check_private_dir(self.state_dir, "The custom state dir of the %s replica" % self.role, other_owners=(0,))

    def prepare_work_dir(self):
        """Create the work dir: state, backup, deleted, _partial and _tmp, each checked
        with lstat before anything is written into it.  Safe when several runs start at
        once: a directory another run just made is fine once it passes the check."""
        for path in self.work_dir_parts():
            try:
                os.mkdir(path, 0o700)  # backups and deleted files are nobody else's business
            except FileExistsError:
                pass
            except OSError as error:
                raise ReplicaError("Cannot prepare the work dir of the %s replica (%s): %s."
                                   % (self.role, error.filename or path, error.strerror))
            check_private_dir(path, self._work_dir_what(path))
        if self.custom_state_dir:
            try:
                os.makedirs(self.state_dir, 0o700, exist_ok=True)
            except FileExistsError:
                pass   # something that is not a directory: the check below says so
            except OSError as error:
                raise ReplicaError("Cannot create the custom state dir of the %s replica (%s): %s."
                                   % (self.role, error.filename or self.state_dir, error.strerror))
            self._check_custom_state_dir()
        self._check_lock_file()
        return True

    def temp_dir(self):
        """Where transfers in progress and the run's scratch files live."""
        return os.path.join(self.work_dir, "_tmp")

    def clear_leftovers(self):
        """Remove what a killed run left behind: temp files of transfers in progress and
        half-written state files.  Called once the lock is held."""
        self.check_work_dir()
        try:
            for name in os.listdir(self.temp_dir()):
                remove_any(os.path.join(self.temp_dir(), name))
            for name in os.listdir(self.state_dir):
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(self.state_dir, name))
        except OSError as error:
            raise ReplicaError("Cannot clear the temporary files of the %s replica (%s): %s."
                               % (self.role, error.filename or self.work_dir, error.strerror))
        return True

    # -- locks --------------------------------------------------------------------------
    def acquire_lock(self, content, replace=None):
        """Create the lock holding `content`, atomically.  Returns None once it is ours,
        else what the existing lock holds ("" if empty).  With `replace`, a lock that
        still holds exactly that (a dead run's lock the caller chose to take over) is
        removed first.  Who may take over what is decided by the caller, on the
        initiator's host, where the pid in a lock is alive or not."""
        check_private_dir(self.work_dir, self._work_dir_what(self.work_dir))
        if replace is not None and self._read_lock() == replace:
            aside = "%s.stale.%d" % (self.lock_path, os.getpid())
            try:
                os.rename(self.lock_path, aside)
                moved = self._read_lock(aside)
                if moved != replace:
                    # Another run took the dead lock over just before us: its lock goes back.
                    try:
                        os.link(aside, self.lock_path)
                    except FileExistsError:
                        pass
                os.unlink(aside)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise ReplicaError("Cannot remove the lock %s: %s." % (self.lock_path, error.strerror))
        for attempt in range(3):
            try:
                created = self._create_lock(content)
            except OSError as error:
                raise ReplicaError("Cannot create the lock %s: %s." % (self.lock_path, error.strerror))
            if created:
                return None
            existing = self._read_lock()
            if existing is not None:
                return existing
            # released between our attempt and the read: try again
        return ""

    def _create_lock(self, content):
        """Make the lock appear with its content already in it, so that a run starting
        at the same moment never reads it empty: the content goes to a temp file that is
        then hard-linked to the lock name.  False when a lock is there already."""
        fd, temp = tempfile.mkstemp(prefix="lock.new-", dir=self.work_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(content)
            try:
                os.link(temp, self.lock_path)
                return True
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
                    raise
        finally:
            os.unlink(temp)
        # A filesystem without hard links: exclusive create, then write.
        try:
            fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(content)
        return True

    def _check_lock_file(self):
        """The lock, when there is one, must be a plain file: never followed through a link."""
        try:
            info = os.lstat(self.lock_path)
        except FileNotFoundError:
            return
        except OSError as error:
            raise ReplicaError("Cannot check the lock %s: %s." % (self.lock_path, error.strerror))
        if not stat.S_ISREG(info.st_mode):
            raise ReplicaError("The lock %s of the %s replica is not a regular file (a symbolic link or something "
                               "else); remove it (not what it points to) and run again." % (self.lock_path, self.role))

    def _read_lock(self, path=None):
        """What the lock (or the lock moved to `path`) holds, None when there is none.
        Opened without following a link and without blocking on a fifo."""
        try:
            fd = os.open(path or self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                self._check_lock_file()
            raise ReplicaError("Cannot read the lock %s: %s." % (self.lock_path, error.strerror))
        with os.fdopen(fd, "r", errors="replace") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self._check_lock_file()
            try:
                return handle.read(4096).strip()
            except OSError as error:
                raise ReplicaError("Cannot read the lock %s: %s." % (self.lock_path, error.strerror))

    def release_lock(self, content):
        """Remove the lock if it still holds `content`: never another run's lock."""
        if self._read_lock() == content:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
        return True

    # -- scanning -----------------------------------------------------------------------
    def scan(self, filter_spec, options):
        return walk_tree(self.root, PathFilter(filter_spec), options)

    def stat_paths(self, paths, options):
        """Fresh entries for the given paths (None where absent)."""
        result = []
        for path in paths:
            result.append(self._stat(path, options))
        return result

    def _stat(self, path, options):
        abs_path = self.abs(path)
        try:
            return make_entry(abs_path, path, os.lstat(abs_path), options)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            return Entry(path, "?", error=error.strerror)

    # -- changes --------------------------------------------------------------------------
    def prepare_overwrite(self, items, stamp, multiple, options):
        """Before a transfer onto this replica: check each destination is still what the
        scan saw, keep a backup of it when asked, and clear the way when a directory is
        replaced by a non-directory or the reverse.  items: [path, expected, backup, new kind].
        Returns one result a path: "ok", "changed" or an error sentence."""
        results = []
        for path, expected, backup, new_kind in items:
            expected = from_wire(expected)
            current = self._stat(path, options)
            if not unchanged_since_scan(expected, current):
                results.append("changed")
                continue
            try:
                abs_path = self.inside(path)
                if current is not None and current.kind != "d":
                    if backup:
                        self._keep_copy(path, "backup", stamp, multiple, link=True)
                    if new_kind == "d":
                        os.unlink(abs_path)
                elif current is not None and new_kind != "d":
                    os.rmdir(abs_path)
                results.append("ok")
            except OSError as error:
                results.append("%s: %s" % (error.filename or path, error.strerror))
        return results

    def remove_paths(self, items, soft, stamp, multiple, options):
        """Delete items (children listed before their parents), moving them into
        deleted/ when `soft`.  An item changed since the scan is left alone ("changed");
        a directory that still holds something is kept ("kept")."""
        results = []
        for path, expected in items:
            expected = from_wire(expected)
            current = self._stat(path, options)
            if current is None:
                results.append("ok")
                continue
            if not unchanged_since_scan(expected, current):
                results.append("changed")
                continue
            try:
                abs_path = self.inside(path)
                if current.kind == "d":
                    if os.listdir(abs_path):
                        results.append("kept")
                        continue
                    if soft and not lexists(os.path.join(self.work_dir, "deleted", path)):
                        self._keep_copy(path, "deleted", stamp, multiple, link=False)
                    else:
                        os.rmdir(abs_path)
                elif soft:
                    self._keep_copy(path, "deleted", stamp, multiple, link=False)
                else:
                    os.unlink(abs_path)
                results.append("ok")
            except OSError as error:
                results.append("%s: %s" % (error.filename or path, error.strerror))
        return results

    def _keep_copy(self, path, area, stamp, multiple, link):
        """Put the item at `path` into backup/ or deleted/ under the same relative path.
        link=True keeps the item in place (hard link, or a copy where links fail);
        link=False moves it.  With `multiple`, or when the name is taken in deleted/,
        older copies are kept: the new one gets a .YYYY.MM.DD-HH.MM.SS suffix."""
        source = self.inside(path)
        area_root = os.path.join(self.work_dir, area)
        if not check_private_dir(area_root, self._work_dir_what(area_root)):
            raise OSError(errno.ENOENT, "the work dir has no %s/" % area, area_root)
        base = os.path.join(area_root, path)
        self._make_parent(area_root, path, stamp)
        if multiple and (area == "backup" or lexists(base)):
            destination = self._free_name(base, "." + stamp)
        else:
            destination = base
            if lexists(destination):
                remove_any(destination)
        if link:
            try:
                os.link(source, destination, follow_symlinks=False)
            except OSError:
                if os.path.islink(source):
                    os.symlink(os.readlink(source), destination)
                else:
                    shutil.copy2(source, destination)
        else:
            try:
                os.rename(source, destination)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                shutil.move(source, destination)

    @staticmethod
    def _free_name(base, suffix=""):
        """A free name for base + suffix, then base + suffix + ".1", ".2"...  The name part
        of base is shortened (at a character boundary, counted in bytes) so that the name
        fits the filesystem's limit with the whole suffix kept."""
        directory, name = os.path.split(base)
        try:
            name_max = os.pathconf(directory, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        name_bytes = os.fsencode(name)
        number = 0
        while True:
            tail = os.fsencode(suffix + (".%d" % number if number else ""))
            room = max(name_max - len(tail), 1)
            cut = len(name_bytes)
            if cut > room:
                cut = room
                while cut > 1 and 0x80 <= name_bytes[cut] <= 0xBF:
                    cut -= 1   # never split a UTF-8 character
            candidate = os.path.join(directory, os.fsdecode(name_bytes[:cut] + tail))
            if not lexists(candidate):
                return candidate
            number += 1

    def _make_parent(self, area_root, path, stamp):
        """Create the parent directories of area_root/path; an older item that stands where
        a directory is needed is renamed aside (kept), not removed."""
        current = area_root
        for part in path.split("/")[:-1]:
            current = os.path.join(current, part)
            if lexists(current) and not (os.path.isdir(current) and not os.path.islink(current)):
                os.rename(current, self._free_name(current, "." + stamp))
            if not lexists(current):
                os.mkdir(current, 0o700)

    def set_attributes(self, items, options):
        """Apply [path, expected, mode, uid, gid] (None: leave as is) to unchanged items."""
        results = []
        for path, expected, mode, uid, gid in items:
            expected = from_wire(expected)
            current = self._stat(path, options)
            if not unchanged_since_scan(expected, current):
                results.append("changed")
                continue
            try:
                abs_path = self.inside(path)
                if (uid is not None or gid is not None) and os.geteuid() == 0:
                    os.chown(abs_path, -1 if uid is None else uid, -1 if gid is None else gid,
                             follow_symlinks=False)
                # chmod would follow a link (COPY_SYMLINKS shows it as its target): leave it be
                if mode is not None and current.kind != "l" and not os.path.islink(abs_path):
                    os.chmod(abs_path, mode)
                results.append("ok")
            except OSError as error:
                results.append("%s: %s" % (path, error.strerror))
        return results

    # -- housekeeping -----------------------------------------------------------------------
    def clean_old(self, area, days, filter_spec, now=None):
        """Remove items of backup/ or deleted/ whose ctime is more than `days` days old,
        then the directories that this leaves empty and old.  Excluded paths are kept.
        Returns [removed count, [error sentences]]."""
        top = os.path.join(self.work_dir, area)
        if days <= 0:
            return [0, []]
        try:
            if not check_private_dir(top, self._work_dir_what(top)):
                return [0, []]
        except ReplicaError as error:
            return [0, [str(error).rstrip(".")]]
        cutoff = (now if now is not None else time.time()) - days * 86400
        path_filter = PathFilter(filter_spec)
        removed = 0
        errors = []
        for directory, dir_names, file_names in os.walk(top, topdown=False):
            rel_dir = os.path.relpath(directory, top)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            for name in file_names + [d for d in dir_names if os.path.islink(os.path.join(directory, d))]:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                    if info.st_ctime < cutoff and not path_filter.excluded(rel_dir + name, False):
                        os.unlink(path)
                        removed += 1
                except OSError as error:
                    errors.append("%s: %s" % (path, error.strerror))
            if directory != top:
                try:
                    if not os.listdir(directory) and os.lstat(directory).st_ctime < cutoff:
                        os.rmdir(directory)
                        removed += 1
                except OSError as error:
                    errors.append("%s: %s" % (directory, error.strerror))
        return [removed, errors]

    # -- small state files ---------------------------------------------------------------------
    def read_state_file(self, name):
        """Text of a file of the state dir, or None when it does not exist."""
        self._check_state_dir()
        try:
            with open(os.path.join(self.state_dir, name), "r", encoding="utf-8", errors="surrogateescape") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ReplicaError("Cannot read %s in the state dir %s: %s." % (name, self.state_dir, error.strerror))

    def _check_state_dir(self):
        if self.custom_state_dir:
            self._check_custom_state_dir()
        else:
            check_private_dir(self.work_dir, self._work_dir_what(self.work_dir))
            check_private_dir(self.state_dir, self._work_dir_what(self.state_dir))

    def write_state_file(self, name, text):
        """Replace a file of the state dir atomically (temp file, fsync, rename)."""
        self._check_state_dir()
        write_atomically(os.path.join(self.state_dir, name), [text])
        return True


class RemoteReplica(object):
    """A replica on another host: the same interface as LocalReplica, each call carried
    out by a LocalReplica in the agent that osync.py runs there."""

    REMOTE_CALLS = ("probe", "check_work_dir", "prepare_work_dir", "clear_leftovers", "acquire_lock", "release_lock",
                    "prepare_overwrite", "remove_paths", "set_attributes", "clean_old", "read_state_file",
                    "write_state_file")

    def __init__(self, role, agent, rsync_host, paths):
        self.role = role
        self.agent = agent
        self.rsync_host = rsync_host    # "user@host" as rsync wants it
        self.root = paths["root"]
        self.work_dir = paths["work_dir"]
        self.state_dir = paths["state_dir"]
        self.display = "%s:%s" % (agent.host, self.root)

    CHUNKED_CALLS = ("prepare_overwrite", "remove_paths", "set_attributes")
    CHUNK = 2000

    def __getattr__(self, name):
        if name in self.CHUNKED_CALLS:
            return lambda items, *args: self._chunked(name, items, *args)
        if name in self.REMOTE_CALLS:
            return lambda *args: self.agent.call(name, *args)
        raise AttributeError(name)

    def _chunked(self, name, items, *args):
        """A call on a long list goes as several messages of bounded size, in order."""
        results = []
        for start in range(0, len(items), self.CHUNK):
            results += self.agent.call(name, items[start:start + self.CHUNK], *args)
        return results

    def location(self):
        return "%s:%s/" % (self.rsync_host, self.root)

    def temp_dir(self):
        return posixpath.join(self.work_dir, "_tmp")

    def scan(self, filter_spec, options):
        return (from_wire(item) for item in self.agent.stream("scan", filter_spec, options))

    def stat_paths(self, paths, options):
        return [from_wire(item) for item in self._chunked("stat_paths", paths, options)]


def serve_agent(reader, writer):
    """The agent's loop: one LocalReplica, driven by requests until the stream ends."""
    replica = None
    while True:
        request = read_message(reader)
        if request is None:
            return
        op, args = request.get("op"), transcode(request.get("args", []), native_text)
        try:
            if op == "open":
                replica = LocalReplica(*args)
                reply = {"ok": {"root": replica.root, "work_dir": replica.work_dir,
                                "state_dir": replica.state_dir, "python": sys.version.split()[0]}}
            elif replica is None:
                reply = {"error": "no replica opened"}
            elif op == "scan":
                batch = []
                for entry in replica.scan(*args):
                    batch.append(entry)
                    if len(batch) >= 1000:
                        send_message(writer, {"batch": transcode(batch, wire_text)})
                        batch = []
                send_message(writer, {"batch": transcode(batch, wire_text)})
                reply = {"end": True}
            elif op == "stat_paths" or op in RemoteReplica.REMOTE_CALLS:
                reply = {"ok": getattr(replica, op)(*args)}
            else:
                reply = {"error": "unknown request %r" % op}
        except OsyncError as error:
            reply = {"error": str(error)}
        except OSError as error:
            reply = {"error": "%s: %s" % (error.filename or op, error.strerror)}
        except Exception as error:  # report, keep serving: the client decides what to do
            reply = {"error": "internal error in %s: %s: %s" % (op, type(error).__name__, error)}
        send_message(writer, transcode(reply, wire_text))


def write_atomically(path, chunks):
    """Write an iterable of text chunks to `path` so it holds the old or the new content,
    never a mix: a temp file beside it, fsync, rename, fsync of the directory."""
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ======================================================================================
# Transport
# ======================================================================================
# The rsync command line for one direction.  Argv lists only; the paths to transfer are
# given NUL-separated through --files-from, so no name is ever parsed by a shell.

def rsync_command(cfg, source, destination, list_file, verbose, transport=None):
    """rsync argv that copies exactly the listed paths from source to destination."""
    # --no-implied-dirs: the root and parents that are not listed keep their own attributes.
    argv = [cfg["RSYNC_EXECUTABLE"], "-ltD", "-8", "--no-implied-dirs", "--from0", "--files-from=" + list_file]
    for key, flag in (("PRESERVE_PERMISSIONS", "-p"), ("PRESERVE_OWNER", "-o"), ("PRESERVE_GROUP", "-g"),
                      ("PRESERVE_ACL", "-A"), ("PRESERVE_XATTR", "-X"), ("COPY_SYMLINKS", "-L"),
                      ("KEEP_DIRLINKS", "-K"), ("PRESERVE_HARDLINKS", "-H"), ("CHECKSUM", "--checksum")):
        if cfg[key]:
            argv.append(flag)
    if cfg["PRESERVE_EXECUTABILITY"] and not cfg["PRESERVE_PERMISSIONS"]:
        argv.append("--executability")
    if cfg["BANDWIDTH"]:
        argv.append("--bwlimit=%d" % cfg["BANDWIDTH"])
    argv.append("--no-whole-file" if cfg["DELTA_COPIES"] else "--whole-file")
    # Files are written to a temp file in the destination's work dir, then renamed into
    # place: a path holds its old or its new content, never a mix.
    argv.append("--temp-dir=" + destination.temp_dir())
    if cfg["PARTIAL"]:
        argv += ["--partial", "--partial-dir=" + destination.work_dir + "/_partial"]
    if cfg.switch("stats"):
        argv.append("--stats")
    if verbose:
        argv.append("-i")
    if transport is not None:
        argv += transport.rsync_arguments()
        if cfg["RSYNC_COMPRESS"]:
            argv.append("-z")
    argv += shlex.split(cfg["RSYNC_OPTIONAL_ARGS"])
    argv += [source.location(), destination.location()]
    return argv


SSH_URI = re.compile(r"^ssh://(?:(?P<user>[^@/\[\]]+)@)?(?P<host>\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^:/@\[\]]+)"
                     r"(?::(?P<port>[^/]*))?/(?P<path>.+)$")


def parse_ssh_uri(uri):
    """ssh://[user@]host[:port]//absolute/path or ssh://[user@]host[:port]/path/in/home
    -> (user or None, host, port, path).  IPv6 hosts go in brackets."""
    match = SSH_URI.match(uri)
    if not match:
        raise ConfigError("%s is not a valid target: use ssh://[user@]host[:port]//absolute/path." % uri)
    port = match.group("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError("%s is not a valid target: the port %r is not a number from 1 to 65535." % (uri, port))
    host = match.group("host")
    if host.startswith("["):
        host = host[1:-1]
    return match.group("user"), host, int(port) if port else 22, match.group("path")


def ssh_failure(host, port, stderr, code):
    """One sentence for a failed ssh connection, from what ssh said."""
    text = stderr.lower()
    where = "%s port %d" % (host, port)
    if "connection refused" in text:
        return "ssh to %s was refused: is sshd running there and is the port right?" % where
    if "timed out" in text or "no route to host" in text or "network is unreachable" in text:
        return "ssh to %s timed out: the host is unreachable or a firewall is in the way." % where
    if "could not resolve" in text or "name or service not known" in text:
        return "The host name %s cannot be resolved." % host
    if "permission denied" in text or "authentication" in text or "too many authentication failures" in text:
        return ("Authentication to %s failed: check SSH_RSA_PRIVATE_KEY (or SSH_PASSWORD_FILE) and the remote "
                "authorized_keys." % where)
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return ("The host key of %s is unknown or has changed: add it to known_hosts (ssh-keyscan -p %d %s) or set "
                "SSH_IGNORE_KNOWN_HOSTS=yes on a trusted network." % (where, port, host))
    detail = " ".join(line.strip() for line in stderr.splitlines() if line.strip())[-400:]
    return "ssh to %s failed (exit code %s)%s." % (where, code, ": " + detail if detail else "")


class SshTransport(object):
    """One ssh connection per run: a ControlMaster that the agent and every rsync share.

    The ssh command line carries the key (or sshpass with the password file, or the
    Kerberos cache), compression, known-hosts handling and SSH_OPTIONAL_ARGS; every
    remote command starts with `env _REMOTE_TOKEN=...` for ssh_filter.py, and with
    `sudo -n` when SUDO_EXEC is on."""

    def __init__(self, cfg, uri, out):
        self.cfg = cfg
        self.out = out
        self.user, self.host, self.port, self.path = parse_ssh_uri(uri)
        self.control_dir = None
        self.master = None
        self.master_stderr = None
        self.password_file = None
        key = cfg["SSH_RSA_PRIVATE_KEY"]
        self.key = key if key and os.path.isfile(key) else None
        if not self.key and cfg["SSH_PASSWORD_FILE"]:
            if not os.path.isfile(cfg["SSH_PASSWORD_FILE"]):
                raise ConfigError("SSH_PASSWORD_FILE %s does not exist." % cfg["SSH_PASSWORD_FILE"])
            self.password_file = cfg["SSH_PASSWORD_FILE"]

    def destination(self):
        return "%s@%s" % (self.user, self.host) if self.user else self.host

    def rsync_host(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s@%s" % (self.user, host) if self.user else host

    def options(self):
        """ssh options shared by the master, the agent and rsync."""
        cfg = self.cfg
        options = ["-p", str(self.port), "-o", "ControlPath=" + os.path.join(self.control_dir, "master"),
                   "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=30",
                   "-o", "LogLevel=ERROR"]
        options += ["-C"] if cfg["SSH_COMPRESSION"] else ["-o", "Compression=no"]
        if self.key:
            options += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.key or cfg["KRB5"] or not self.password_file:
            options += ["-o", "BatchMode=yes"]
        if cfg["KRB5"]:
            options += ["-o", "GSSAPIAuthentication=yes"]
        if cfg["SSH_IGNORE_KNOWN_HOSTS"]:
            options += ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
        options += shlex.split(cfg["SSH_OPTIONAL_ARGS"])
        return options

    def remote_prefix(self):
        prefix = ["env", "_REMOTE_TOKEN=" + self.cfg["_REMOTE_TOKEN"]]
        if self.cfg["SUDO_EXEC"]:
            prefix += ["sudo", "-n"]
        return prefix

    def start(self):
        """Open the master connection; a failure is one sentence naming the host."""
        self.control_dir = tempfile.mkdtemp(prefix="osync-ssh-")
        argv = ["ssh"] + self.options() + ["-M", "-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                                           self.destination()]
        if self.password_file:
            if not shutil.which("sshpass"):
                raise ReplicaError("SSH_PASSWORD_FILE needs sshpass, which is not installed.")
            argv = ["sshpass", "-f", self.password_file] + argv
        if not shutil.which("ssh"):
            raise ReplicaError("ssh is not installed; it is needed for the target %s." % self.destination())
        self.master_stderr = tempfile.TemporaryFile()
        self.master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=self.master_stderr, start_new_session=True)
        socket_path = os.path.join(self.control_dir, "master")
        deadline = time.time() + 60
        while time.time() < deadline:
            code = self.master.poll()
            if code is not None:
                if self.password_file and code == 5:
                    raise ReplicaError("Authentication to %s port %d failed: the password in %s was refused."
                                       % (self.host, self.port, self.password_file))
                raise ReplicaError(ssh_failure(self.host, self.port, read_tail(self.master_stderr, 2000), code))
            if os.path.exists(socket_path):
                check = run_command(["ssh"] + self.options() + ["-O", "check", self.destination()], timeout=30)
                if check[0] == 0:
                    return
            time.sleep(0.05)
        raise ReplicaError("ssh to %s port %d did not connect within a minute." % (self.host, self.port))

    def command(self, remote_argv):
        """ssh argv that runs remote_argv through the master connection."""
        line = " ".join(shlex.quote(arg) for arg in self.remote_prefix() + remote_argv)
        return ["ssh"] + self.options() + ["-o", "ControlMaster=no", self.destination(), line]

    def rsync_arguments(self):
        """What rsync needs to reach the remote side through the master connection."""
        shell = " ".join(shlex.quote(arg) for arg in ["ssh"] + self.options() + ["-o", "ControlMaster=no"])
        remote_rsync = self.cfg["RSYNC_EXECUTABLE"]
        if self.cfg["RSYNC_REMOTE_PATH"]:
            remote_rsync = posixpath.join(self.cfg["RSYNC_REMOTE_PATH"], remote_rsync)
        rsync_path = " ".join(shlex.quote(arg) for arg in self.remote_prefix() + [remote_rsync])
        return ["-e", shell, "--rsync-path=" + rsync_path, "-s"]

    def start_agent(self, role, state_dir):
        """Stream osync.py to the remote Python, wait for its banner, open the replica."""
        with open(os.path.abspath(__file__), "rb") as handle:
            source = handle.read()
        interpreters = [self.cfg["REMOTE_PYTHON"]] if self.cfg["REMOTE_PYTHON"] else ["python3", "python"]
        tried = []
        for python in interpreters:
            stderr_file = tempfile.TemporaryFile()
            process = subprocess.Popen(self.command([python, "-c", AGENT_STUB, str(len(source))]),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file,
                                       start_new_session=True)
            try:
                process.stdin.write(source)
                process.stdin.flush()
            except OSError:
                pass
            banner = self._read_banner(process)
            if banner is not None:
                agent = AgentClient(process, self.host, stderr_file)
                paths = agent.call("open", role, self.path, state_dir)
                self.out.verbose("Agent on %s runs under Python %s." % (self.host, paths["python"]))
                return RemoteReplica(role, agent, self.rsync_host(), paths)
            code = process.wait()
            detail = read_tail(stderr_file)
            tried.append(python)
            if "3.6 or newer" in detail:
                raise ReplicaError("The Python on %s is too old: %s. Install Python 3.6 or newer, or name one with "
                                   "REMOTE_PYTHON." % (self.host, detail.split(": ", 1)[-1]))
            if code == 127 or "not found" in detail or "no such file" in detail.lower():
                continue
            if "ssh_filter" in detail or "refused" in detail.lower():
                raise ReplicaError("%s refused to start the osync.py agent (ssh_filter.py): check _REMOTE_TOKEN."
                                   % self.host)
            raise ReplicaError("The osync.py agent could not start on %s (exit code %d)%s." % (
                self.host, code, ": " + detail if detail else ""))
        raise ReplicaError("No suitable Python on %s (tried %s): install Python 3.6 or newer there, or set "
                           "REMOTE_PYTHON to its path." % (self.host, ", ".join(tried)))

    @staticmethod
    def _read_banner(process):
        """Skip login noise (motd, echo in .bashrc) up to the agent's banner line."""
        for _ in range(1000):
            line = process.stdout.readline()
            if not line:
                return None
            if line.startswith(AGENT_BANNER):
                return line
        return None

    def close(self):
        if self.master is not None:
            run_command(["ssh"] + self.options() + ["-O", "exit", self.destination()], timeout=15)
            try:
                self.master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_process_group(self.master)
            self.master = None
        if self.control_dir:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            self.control_dir = None


def ping(host):
    """Does the host answer ping?  None when ping is not installed."""
    code, _, _ = run_command(["ping", "-c", "2", "-W", "3", host], timeout=30)
    if code == 127:
        return None
    return code == 0


def one_line(text, limit=2000):
    """A command's multi-line complaint as one line."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())[-limit:]


RSYNC_EXIT_MEANINGS = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting input/output files",
    5: "error starting client-server protocol", 10: "error in socket I/O", 11: "error in file I/O",
    12: "error in rsync protocol data stream", 20: "received SIGUSR1 or SIGINT",
    23: "some files could not be transferred", 24: "some files vanished before they could be transferred",
    30: "timeout in data send/receive", 35: "timeout waiting for daemon connection",
    127: "rsync was not found",
}


# ======================================================================================
# Scan and state
# ======================================================================================
# The state is one file per job in the initiator's state dir: a JSON header line, then
# one line per path in canonical order holding what each replica had at the end of the
# last sync of that path.  It is written atomically, so it only moves forward.  Each
# replica's state dir also gets a small marker (how many items each side held), which
# the unmounted-replica guard reads.

class StateError(Exception):
    """The state file cannot be read; the run falls back to a first run."""


def state_file_name(instance_id):
    return "osync.py-state-%s" % instance_id


def marker_file_name(instance_id):
    return "osync.py-marker-%s" % instance_id


def read_state_header(path):
    """The header dict of a state file, None if there is none."""
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
            line = handle.readline()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateError("cannot read %s: %s" % (path, error.strerror))
    try:
        header = json.loads(line)
        if header.get("format") != STATE_FORMAT:
            raise ValueError("not a state file")
    except (ValueError, AttributeError):
        raise StateError("%s is not an osync.py state file" % path)
    if header.get("version", 0) > STATE_VERSION:
        raise StateError("%s was written by a newer osync.py (state version %s)" % (path, header.get("version")))
    return header


def read_state(path):
    """Yield (path, initiator entry, target entry) from a state file, in canonical order."""
    if read_state_header(path) is None:
        return
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
        handle.readline()
        previous_key = None
        for number, line in enumerate(handle, 2):
            try:
                rel_path, initiator, target = transcode(json.loads(line), native_text)
                initiator = None if initiator is None else Entry(rel_path, *initiator)
                target = None if target is None else Entry(rel_path, *target)
            except (ValueError, TypeError):
                raise StateError("%s: line %d is damaged" % (path, number))
            key = path_key(rel_path)
            if previous_key is not None and key <= previous_key:
                raise StateError("%s: line %d is out of order" % (path, number))
            previous_key = key
            yield rel_path, initiator, target


def state_line(rel_path, initiator, target):
    """The state file line of one path (names in the wire form)."""
    return json.dumps(transcode([rel_path, None if initiator is None else list(initiator[1:]),
                                 None if target is None else list(target[1:])], wire_text)) + "\n"


def state_lines(records):
    """State file lines for (path, initiator entry, target entry) records."""
    for rel_path, initiator, target in records:
        yield state_line(rel_path, initiator, target)


def write_state(path, header, lines):
    """Write the state file atomically; lines (from state_line) in canonical order."""
    header = dict(header, format=STATE_FORMAT, version=STATE_VERSION)

    def chunks():
        yield json.dumps(header, sort_keys=True) + "\n"
        for line in lines:
            yield line
    write_atomically(path, chunks())


def read_legacy_state(state_dir, instance_id):
    """Records made from osync.sh's *-tree-after lists, so that a first osync.py run after
    osync.sh knows what both sides held and does not take old deletions for new files.
    Entries are of kind '?' with the list's time as mtime.  None if there are no lists."""
    lists = {}
    for side in ("initiator", "target"):
        path = os.path.join(state_dir, "%s-tree-after-%s" % (side, instance_id))
        try:
            with open(path, "rb") as handle:
                names = [os.fsdecode(line.rstrip(b"\n")) for line in handle if line.strip()]
            lists[side] = (names, os.stat(path).st_mtime_ns)
        except OSError:
            return None
    paths = {}
    for index, side in enumerate(("initiator", "target")):
        names, when = lists[side]
        for name in names:
            slot = paths.setdefault(name, [None, None])
            slot[index] = Entry(name, "?", 0, when)
    return [(name, pair[0], pair[1]) for name, pair in sorted(paths.items(), key=lambda item: path_key(item[0]))]


def merge_streams(previous, initiator, target):
    """Merge-join the state records and both scans, all in canonical order.
    Yields (path, previous initiator, previous target, initiator now, target now)."""
    END = object()

    def keyed_state():
        for record in previous:
            yield path_key(record[0]), record
    def keyed_scan(entries):
        for entry in entries:
            yield path_key(entry.path), entry

    streams = [keyed_state(), keyed_scan(initiator), keyed_scan(target)]
    heads = [next(stream, END) for stream in streams]
    while True:
        keys = [head[0] for head in heads if head is not END]
        if not keys:
            return
        key = min(keys)
        taken = [None, None, None]
        for index in range(3):
            if heads[index] is not END and heads[index][0] == key:
                taken[index] = heads[index][1]
                heads[index] = next(streams[index], END)
        record, now_initiator, now_target = taken
        rel_path = record[0] if record else (now_initiator or now_target).path
        yield (rel_path, record[1] if record else None, record[2] if record else None,
               now_initiator, now_target)


# ======================================================================================
# Planner
# ======================================================================================
# A pure function: (previous state, initiator scan, target scan, policy) -> decisions,
# one per path, in canonical order.  Every sync rule lives here and only here.

NEW, SAME, CHANGED, DELETED, ABSENT = "new", "same", "changed", "deleted", "absent"
NOTHING, COPY, DELETE, ATTRS, SKIP = "nothing", "copy", "delete", "attrs", "skip"
OTHER_SIDE = {"initiator": "target", "target": "initiator"}


class Policy(object):
    """The settings the planner needs, as plain values."""

    def __init__(self, sync_type="", prevalence="initiator", skip_deletion=(), backup_overwrites=True,
                 permissions=True, executability=True, owner=False, group=False):
        self.sync_type = sync_type
        self.prevalence = prevalence
        self.skip_deletion = frozenset(skip_deletion)
        self.backup_overwrites = backup_overwrites
        self.permissions = permissions
        self.executability = executability
        self.owner = owner
        self.group = group

    def attributes(self, entry):
        """The attributes of an entry that are synced: (mode, uid, gid), None where not."""
        if entry is None or entry.kind in ("l", "?"):
            return (None, None, None)
        if self.permissions:
            mode = entry.mode
        elif self.executability and entry.kind == "f":
            mode = entry.mode & 0o111
        else:
            mode = None
        return (mode, entry.uid if self.owner else None, entry.gid if self.group else None)


class Decision(object):
    """What to do with one path.  `source` is the side whose version is copied (COPY,
    ATTRS); `side` the side where something is deleted (DELETE)."""
    __slots__ = ("path", "prev_initiator", "prev_target", "initiator", "target", "action", "source", "side",
                 "conflict", "edit_won", "backup", "note")

    def __init__(self, path, prev_initiator, prev_target, initiator, target):
        self.path = path
        self.prev_initiator = prev_initiator
        self.prev_target = prev_target
        self.initiator = initiator
        self.target = target
        self.action = NOTHING
        self.source = None
        self.side = None
        self.conflict = False
        self.edit_won = False
        self.backup = False
        self.note = ""

    def now(self, side):
        return self.initiator if side == "initiator" else self.target

    def before(self, side):
        return self.prev_initiator if side == "initiator" else self.prev_target

    def destination(self):
        return OTHER_SIDE[self.source]

    def copy(self, source, policy, conflict=False, edit_won=False):
        self.action = COPY
        self.source = source
        self.conflict = conflict
        self.edit_won = edit_won
        loser = self.now(OTHER_SIDE[source])
        # The old version on the destination is kept: always for a conflict's loser,
        # for any overwrite when CONFLICT_BACKUP is on.
        self.backup = loser is not None and loser.kind != "d" and (conflict or policy.backup_overwrites)
        return self

    def delete(self, side):
        self.action = DELETE
        self.side = side
        return self

    def kind_after(self, side):
        """Kind of item this path holds on `side` once the decision is carried out."""
        if self.action == COPY:
            return self.now(self.source).kind
        if self.action == DELETE and self.side == side:
            return None
        entry = self.now(side)
        return entry.kind if entry is not None else None

    def __repr__(self):
        return "<Decision %s %s %s>" % (self.path, self.action, self.source or self.side or "")


def side_status(before, now):
    if now is None:
        return DELETED if before is not None else ABSENT
    if before is None:
        return NEW
    if before.kind == "?":  # from osync.sh lists: changed if modified after that run
        return SAME if now.mtime_ns <= before.mtime_ns else CHANGED
    return SAME if same_version(before, now) else CHANGED


def newer_side(one, other, policy):
    """The side whose version wins a conflict: newer mtime, CONFLICT_PREVALANCE on a tie."""
    if same_mtime(one.mtime_ns, other.mtime_ns):
        return policy.prevalence
    return "initiator" if one.mtime_ns > other.mtime_ns else "target"


def decide_attributes(decision, policy):
    """Same content on both sides: sync the attributes if they differ."""
    initiator_attrs = policy.attributes(decision.initiator)
    target_attrs = policy.attributes(decision.target)
    if initiator_attrs == target_attrs:
        return decision
    changed = {}
    for side in ("initiator", "target"):
        before = decision.before(side)
        changed[side] = before is None or before.kind == "?" or policy.attributes(before) != policy.attributes(
            decision.now(side))
    if changed["initiator"] != changed["target"]:
        source = "initiator" if changed["initiator"] else "target"
    elif decision.initiator.ctime_ns != decision.target.ctime_ns:
        source = "initiator" if decision.initiator.ctime_ns > decision.target.ctime_ns else "target"
    else:
        source = policy.prevalence
    decision.action = ATTRS
    decision.source = source
    return decision


def decide_two_way(decision, policy):
    """The rules of DESIGN §3 for one path."""
    initiator, target = decision.initiator, decision.target
    status = {"initiator": side_status(decision.prev_initiator, initiator),
              "target": side_status(decision.prev_target, target)}
    legacy = any(entry is not None and entry.kind == "?" for entry in (decision.prev_initiator, decision.prev_target))
    if initiator is not None and target is not None:
        if same_content(initiator, target):
            return decide_attributes(decision, policy)
        if status["initiator"] == SAME and status["target"] == SAME and not legacy:
            return decide_attributes(decision, policy)
        modified = [side for side in ("initiator", "target") if status[side] in (NEW, CHANGED)]
        if len(modified) == 1:
            return decision.copy(modified[0], policy)
        return decision.copy(newer_side(initiator, target, policy), policy, conflict=True)
    if initiator is None and target is None:
        return decision
    present = "initiator" if initiator is not None else "target"
    missing = OTHER_SIDE[present]
    if status[present] == SAME:
        if status[missing] == DELETED:
            if present in policy.skip_deletion:
                decision.note = "deletion skipped (SKIP_DELETION)"
                return decision
            return decision.delete(present)
        return decision  # kept on one side only, as a skipped deletion left it
    return decision.copy(present, policy, edit_won=status[missing] == DELETED)


def decide_one_way(decision, policy):
    """SYNC_TYPE mirror: the destination is made equal to the source."""
    source = "initiator" if policy.sync_type == "initiator2target" else "target"
    destination = OTHER_SIDE[source]
    now_source, now_destination = decision.now(source), decision.now(destination)
    if now_source is not None:
        if now_destination is not None and same_content(now_source, now_destination):
            decision_attrs = decide_attributes(decision, policy)
            if decision_attrs.action == ATTRS:
                decision_attrs.source = source
            return decision_attrs
        destination_edited = side_status(decision.before(destination), now_destination) in (NEW, CHANGED)
        return decision.copy(source, policy, conflict=now_destination is not None and destination_edited)
    if now_destination is not None:
        if destination in policy.skip_deletion:
            decision.note = "deletion skipped (SKIP_DELETION)"
            return decision
        return decision.delete(destination)
    return decision


class _DirFrame(object):
    """A directory whose decision may change once its subtree has been seen."""
    __slots__ = ("decision", "needs")

    def __init__(self, decision):
        self.decision = decision
        self.needs = set()


def plan(previous, initiator_scan, target_scan, policy):
    """Yield one Decision per path, in canonical order.

    Directories are settled after their subtree: a directory that one side deleted (or
    replaced by a file) is kept, and recreated on that side, when something below it
    stays, so that an edit made inside a deleted directory is never lost."""
    two_way = not policy.sync_type
    frames = []
    held = []              # decisions waiting for an open directory frame to close
    skipped_prefix = None  # an unreadable directory: its whole subtree is left alone

    def close_frame():
        frame = frames.pop()
        decision = frame.decision
        for side in frame.needs:
            if decision.kind_after(side) != "d" and (decision.now(OTHER_SIDE[side]) or Entry("", "?")).kind == "d":
                loser = decision.now(side)
                decision.copy(OTHER_SIDE[side], policy, conflict=loser is not None, edit_won=True)
        if frames:
            for side in ("initiator", "target"):
                if decision.kind_after(side) is not None:
                    frames[-1].needs.add(side)

    for rel_path, prev_initiator, prev_target, now_initiator, now_target in merge_streams(
            previous, initiator_scan, target_scan):
        while frames and not rel_path.startswith(frames[-1].decision.path + "/"):
            close_frame()
            if not frames:
                for decision in held:
                    yield decision
                held = []
        decision = Decision(rel_path, prev_initiator, prev_target, now_initiator, now_target)
        broken = [entry for entry in (now_initiator, now_target) if entry is not None and entry.error]
        if skipped_prefix is not None and rel_path.startswith(skipped_prefix):
            decision.action = SKIP
        elif broken:
            decision.action = SKIP
            decision.note = broken[0].error
            if broken[0].kind == "d":
                skipped_prefix = rel_path + "/"
        else:
            skipped_prefix = None
            if two_way:
                decide_two_way(decision, policy)
            else:
                decide_one_way(decision, policy)
        if frames:
            for side in ("initiator", "target"):
                if decision.action == SKIP or decision.kind_after(side) is not None:
                    frames[-1].needs.add(side)
        is_dir = any(entry is not None and entry.kind == "d" for entry in (now_initiator, now_target))
        if two_way and is_dir and decision.action != SKIP and not all(
                decision.kind_after(side) == "d" for side in ("initiator", "target")):
            frames.append(_DirFrame(decision))
        if frames:
            held.append(decision)
        else:
            yield decision
    while frames:
        close_frame()
    for decision in held:
        yield decision


def baseline(initiator_scan, target_scan):
    """--initialize: records for the paths both replicas hold with the same content, so
    a later deletion on one side is propagated; anything else is left to the first run."""
    for rel_path, _, _, now_initiator, now_target in merge_streams([], initiator_scan, target_scan):
        if now_initiator is not None and now_target is not None and not now_initiator.error \
                and not now_target.error and same_content(now_initiator, now_target):
            yield rel_path, now_initiator, now_target


# ======================================================================================
# Executor
# ======================================================================================
# Carries out the decisions: deletions and backups through the replica interface, one
# rsync per direction for the transfers, attribute updates; then writes the new state
# from what was verified, not from a rescan.  Decisions that need no work stream
# straight into a spool file, so memory grows with the number of changes only.

class Outcome(object):
    """What a run did, for the summary, the conflict list and the exit code.  The paths
    themselves are kept only when the summary will list them."""

    KINDS = ("updated", "attributes", "deleted")

    def __init__(self, keep_paths):
        self.keep_paths = keep_paths
        self.counts = dict(((kind, side), 0) for kind in self.KINDS for side in OTHER_SIDE)
        self.paths = dict(((kind, side), []) for kind in self.KINDS for side in OTHER_SIDE)
        self.conflicts = []                                  # (path, winner)
        self.failed = 0
        self.entries = {"initiator": 0, "target": 0}        # items each side holds after the run

    def add(self, kind, side, path):
        self.counts[(kind, side)] += 1
        if self.keep_paths:
            self.paths[(kind, side)].append(path)


class WorkList(object):
    """Items (JSON-able lists) written to a temp file in the order they come, and read
    back in that order: the executor's lists of changes never need to fit in memory."""

    def __init__(self, directory):
        self.file = io.TextIOWrapper(tempfile.TemporaryFile("w+b", dir=directory), encoding="utf-8",
                                     errors="surrogateescape")
        self.count = 0

    def add(self, item):
        self.file.write(json.dumps(item) + "\n")
        self.count += 1

    def __iter__(self):
        self.file.seek(0)
        for line in self.file:
            yield json.loads(line)

    def close(self):
        self.file.close()


def in_chunks(items, size=2000):
    """Lists of up to `size` items from an iterable."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def children_first(items):
    """Removal items [path, expected] in canonical order -> the same items with every
    directory after everything below it."""
    open_dirs = []
    for item in items:
        while open_dirs and not item[0].startswith(open_dirs[-1][0] + "/"):
            yield open_dirs.pop()
        if item[1] is not None and item[1][1] == "d":
            open_dirs.append(item)
        else:
            yield item
    while open_dirs:
        yield open_dirs.pop()


def decision_record(decision):
    """A Decision as a JSON-able list, for the spool."""
    return [decision.path, decision.action, decision.source, decision.side, decision.conflict, decision.edit_won,
            decision.backup, to_wire(decision.prev_initiator), to_wire(decision.prev_target),
            to_wire(decision.initiator), to_wire(decision.target)]


def decision_from_record(record):
    (path, action, source, side, conflict, edit_won, backup, prev_initiator, prev_target, initiator,
     target) = record
    decision = Decision(path, from_wire(prev_initiator), from_wire(prev_target), from_wire(initiator),
                        from_wire(target))
    decision.action, decision.source, decision.side = action, source, side
    decision.conflict, decision.edit_won, decision.backup = conflict, edit_won, backup
    return decision


class Executor(object):
    """Carries out a plan in four passes over lists spooled to disk: removals (children
    first), backups and clearing of destinations, one rsync per direction, attributes.
    The new state is then produced while re-reading the spool, verifying each change in
    batches: memory stays flat however many paths change."""

    CHUNK = 2000
    FAILURES_SHOWN = 50

    def __init__(self, cfg, out, replicas, policy, options, stamp, dry, transport=None):
        self.cfg = cfg
        self.transport = transport
        self.policy = policy
        self.out = out
        self.replicas = replicas      # {"initiator": replica, "target": replica}
        self.options = options        # scan options (copy_links, dir_links, checksum)
        self.stamp = stamp
        self.dry = dry
        self.outcome = Outcome(keep_paths=cfg.switch("summary"))
        self.problems = {}            # (step, side, path) -> what went wrong; success is the rule
        self.state_unchanged = True   # every path still exactly as recorded: no need to rewrite the state
        self.spool = None
        self.lists = {}

    # -- the whole run ----------------------------------------------------------------------
    def execute(self, decisions, spool_dir):
        """Spool the decisions, carry out the actions; return the new state's lines (a
        generator, to be consumed once) and the outcome."""
        self.spool_dir = spool_dir
        self.spool = WorkList(spool_dir)
        for step in ("remove", "overwrite", "attrs"):
            for side in OTHER_SIDE:
                self.lists[(step, side)] = WorkList(spool_dir)
        actions = 0
        for decision in decisions:
            if decision.action in (NOTHING, SKIP):
                if decision.note:
                    self._report_note(decision)
                if decision.action == SKIP:
                    pair = (decision.prev_initiator, decision.prev_target)
                else:
                    pair = (decision.initiator, decision.target)
                    if pair != (decision.prev_initiator, decision.prev_target):
                        self.state_unchanged = False
                if pair[0] is not None or pair[1] is not None:
                    self._count_entries(pair)
                    self.spool.file.write(state_line(decision.path, pair[0], pair[1]))
            else:
                actions += 1
                self.state_unchanged = False
                self._report_plan(decision)
                self.spool.file.write("@" + json.dumps(decision_record(decision)) + "\n")
                self._list_work(decision)
        if actions and not self.dry:
            self._carry_out()
        if self.dry:
            self.close()
            self.report_failures()
            return iter(()), self.outcome
        return self._new_state(), self.outcome

    def close(self):
        for work_list in [self.spool] + list(self.lists.values()):
            if work_list is not None:
                work_list.close()

    def _list_work(self, decision):
        if decision.action == DELETE:
            self.lists[("remove", decision.side)].add([decision.path, to_wire(decision.now(decision.side))])
        elif decision.action == COPY:
            destination = decision.destination()
            if decision.now(destination) is not None:
                self.lists[("overwrite", destination)].add([
                    decision.path, to_wire(decision.now(destination)), decision.backup,
                    decision.now(decision.source).kind])
        elif decision.action == ATTRS:
            destination = decision.destination()
            mode, uid, gid = self.policy.attributes(decision.now(decision.source))
            self.lists[("attrs", destination)].add([decision.path, to_wire(decision.now(destination)), mode,
                                                     uid, gid])

    def _count_entries(self, pair):
        for side, entry in zip(("initiator", "target"), pair):
            if entry is not None and entry.kind != "?":
                self.outcome.entries[side] += 1

    def _spooled_actions(self):
        """The spooled decisions that need work, in canonical order."""
        self.spool.file.seek(0)
        for line in self.spool.file:
            if line.startswith("@"):
                yield decision_from_record(json.loads(line[1:]))

    # -- the new state ------------------------------------------------------------------------
    def _new_state(self):
        """The new state's lines, in canonical order: spooled lines as they are, each
        action replaced by its verified result (or by the previous state where it failed)."""
        try:
            self.spool.file.seek(0)
            pending = []      # lines and decisions, in order, up to a batch of decisions
            waiting = 0
            for line in self.spool.file:
                if line.startswith("@"):
                    pending.append(decision_from_record(json.loads(line[1:])))
                    waiting += 1
                elif not waiting:
                    yield line
                    continue
                else:
                    pending.append(line)
                if waiting >= self.CHUNK or len(pending) >= 10 * self.CHUNK:
                    for item in self._settle(pending):
                        yield item
                    pending, waiting = [], 0
            for item in self._settle(pending):
                yield item
            self.report_failures()
        finally:
            self.close()

    def _settle(self, pending):
        """Verify a batch of decisions with one stat call per replica; yield the lines."""
        wanted = {"initiator": [], "target": []}
        for item in pending:
            if isinstance(item, Decision) and item.action in (COPY, ATTRS):
                destination = item.destination()
                if item.action == COPY and ("overwrite", destination, item.path) not in self.problems:
                    wanted[item.source].append(item.path)
                    wanted[destination].append(item.path)
                elif item.action == ATTRS and ("attrs", destination, item.path) not in self.problems:
                    wanted[destination].append(item.path)
        fresh = {}
        for side, paths in wanted.items():
            if paths:
                for path, entry in zip(paths, self.replicas[side].stat_paths(paths, self.options)):
                    fresh[(side, path)] = entry
        for item in pending:
            if not isinstance(item, Decision):
                yield item
                continue
            pair = self._result(item, fresh)
            if pair[0] is None and pair[1] is None:
                continue
            self._count_entries(pair)
            yield state_line(item.path, pair[0], pair[1])

    def _result(self, decision, fresh):
        """(initiator entry, target entry) to record for a decision that was carried out."""
        previous = (decision.prev_initiator, decision.prev_target)
        if decision.action == DELETE:
            problem = self.problems.get(("remove", decision.side, decision.path))
            if problem is None:
                self.outcome.add("deleted", decision.side, decision.path)
                return (None, None)
            return (decision.initiator, decision.target) if problem == "kept" else previous
        destination = decision.destination()
        source = decision.source
        if decision.action == COPY:
            if ("overwrite", destination, decision.path) in self.problems:
                return previous
            sent = decision.now(source)
            arrived = fresh[(destination, decision.path)]
            if arrived is None or arrived.error or not same_content(sent, arrived):
                self._fail("Could not copy %s from the %s to the %s; the next run tries again."
                           % (decision.path, source, destination))
                return previous
            if not unchanged_since_scan(sent, fresh[(source, decision.path)]):
                sent = decision.before(source)   # changed during the run: the next run sends it again
            self.outcome.add("updated", destination, decision.path)
            pair = {source: sent, destination: arrived}
            return (pair["initiator"], pair["target"])
        if ("attrs", destination, decision.path) in self.problems or fresh[(destination, decision.path)] is None:
            return previous
        self.outcome.add("attributes", destination, decision.path)
        pair = {source: decision.now(source), destination: fresh[(destination, decision.path)]}
        return (pair["initiator"], pair["target"])

    # -- reporting ----------------------------------------------------------------------------
    def _report_note(self, decision):
        if decision.action == SKIP:
            self.out.error("Left %s alone on both replicas: %s." % (decision.path, decision.note))
            self.outcome.failed += 1
        else:
            self.out.verbose("%s: %s." % (decision.path, decision.note))

    def _report_plan(self, decision):
        if decision.conflict:
            loser = decision.destination()
            self.out.notice("Conflict on %s: changed on both replicas; the %s's version wins (%s), the %s's "
                            "version %s." % (decision.path, decision.source,
                                             "newer" if decision.now(loser) is None or not same_mtime(
                                                 decision.now(loser).mtime_ns,
                                                 decision.now(decision.source).mtime_ns)
                                             else "CONFLICT_PREVALANCE",
                                             loser, "is kept in its backup dir" if decision.backup else
                                             "was a directory"))
            self.outcome.conflicts.append((decision.path, decision.source))
        elif decision.edit_won:
            self.out.notice("%s was deleted on the %s but changed on the %s: the changed version %s back."
                            % (decision.path, decision.destination(), decision.source,
                               "would be copied" if self.dry else "is copied"))
        if self.dry:
            kind = {COPY: "updated", ATTRS: "attributes", DELETE: "deleted"}[decision.action]
            self.outcome.add(kind, decision.side if decision.action == DELETE else decision.destination(),
                             decision.path)
        if not self.out.wants(VERBOSE):
            return
        prefix = "Would " if self.dry else ""
        if decision.action == COPY:
            self.out.verbose("%scopy %s %s to the %s." % (prefix, KIND_NAMES.get(
                decision.now(decision.source).kind), decision.path, decision.destination()))
        elif decision.action == DELETE:
            self.out.verbose("%sdelete %s on the %s." % (prefix, decision.path, decision.side))
        elif decision.action == ATTRS:
            self.out.verbose("%supdate attributes of %s on the %s." % (prefix, decision.path,
                                                                      decision.destination()))

    def _fail(self, message):
        """Count a failed path; the first ones are named, the rest summed up at the end."""
        self.outcome.failed += 1
        if self.outcome.failed <= self.FAILURES_SHOWN:
            self.out.error(message)
        else:
            self.out.verbose(message)

    def report_failures(self):
        hidden = self.outcome.failed - self.FAILURES_SHOWN
        if hidden > 0:
            self.out.error("%d more paths failed (run with --verbose to list them all); the next run tries them "
                           "again." % hidden)

    # -- carrying out -----------------------------------------------------------------------------
    def _carry_out(self):
        soft = self.cfg["SOFT_DELETE"]
        multiple = self.cfg["CONFLICT_BACKUP_MULTIPLE"]
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            # Children before their parents, so emptied directories can go too.
            self._apply("remove", side, children_first(self.lists[("remove", side)]),
                        lambda chunk: replica.remove_paths(chunk, soft, self.stamp, multiple, self.options),
                        "Cannot delete %s on the %s replica: %s.")
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            self._apply("overwrite", side, self.lists[("overwrite", side)],
                        lambda chunk: replica.prepare_overwrite(chunk, self.stamp, multiple, self.options),
                        "Cannot replace %s on the %s replica: %s.")
        for destination in OTHER_SIDE:
            self._transfer(OTHER_SIDE[destination], destination)
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            self._apply("attrs", side, self.lists[("attrs", side)],
                        lambda chunk: replica.set_attributes(chunk, self.options),
                        "Cannot set the attributes of %s on the %s replica: %s.")

    def _apply(self, step, side, items, call, failure):
        """Run one replica operation over a work list in chunks; remember and report
        every path that did not come out "ok" (success is the rule, so only those are kept)."""
        for chunk in in_chunks(items, self.CHUNK):
            for item, answer in zip(chunk, call(chunk)):
                if answer == "ok":
                    continue
                path = item[0]
                self.problems[(step, side, path)] = answer
                if answer == "kept":
                    self.out.notice("Kept directory %s on the %s: it still holds items that are excluded or new."
                                    % (path, side))
                elif answer == "changed":
                    self.out.notice("%s changed on the %s during the run; it is left for the next run."
                                    % (path, side))
                else:
                    self._fail(failure % (path, side, answer))

    def _transfer(self, source, destination):
        """One rsync for every path going from source to destination (verified later,
        while the new state is written)."""
        source_replica, destination_replica = self.replicas[source], self.replicas[destination]
        with tempfile.NamedTemporaryFile("wb", prefix="osync-files-", dir=self.spool_dir) as listing:
            count = 0
            for decision in self._spooled_actions():
                if decision.action == COPY and decision.source == source \
                        and ("overwrite", destination, decision.path) not in self.problems:
                    # "./" keeps rsync from reading a name that starts with # or ; as a comment.
                    listing.write(b"./" + os.fsencode(decision.path) + b"\0")
                    count += 1
            if not count:
                return
            listing.flush()
            argv = rsync_command(self.cfg, source_replica, destination_replica, listing.name,
                                 verbose=self.out.screen_threshold <= VERBOSE, transport=self.transport)
            self.out.debug("Running: %s" % " ".join(shlex.quote(arg) for arg in argv))
            code, stdout, stderr = run_command(argv)
        if stdout.strip():
            self.out.verbose("rsync %s -> %s:\n%s" % (source, destination, stdout.strip()))
        if code == 24:
            self.out.warn("Some files vanished on the %s during the transfer; the next run handles them." % source)
        elif code not in (0, 23):
            self.out.error("rsync from the %s to the %s failed with exit code %d (%s): %s" % (
                source, destination, code, RSYNC_EXIT_MEANINGS.get(code, "unknown error"), one_line(stderr)))
        elif stderr.strip():
            self.out.warn("rsync from the %s to the %s said: %s" % (source, destination, one_line(stderr)))


# ======================================================================================
# Run and command line
# ======================================================================================
# One sync end to end: checks, guards, locks, plan, execution, state, cleanup, summary,
# exit code.  Then the command line and main().

def read_pattern_file(cfg, key):
    """Patterns of RSYNC_INCLUDE_FROM / RSYNC_EXCLUDE_FROM as [sign, pattern] rules.
    A bare file name is looked up next to the config file; a missing file is an error."""
    name = cfg[key]
    default_sign = "+" if key == "RSYNC_INCLUDE_FROM" else "-"
    if "/" not in name and cfg.config_file:
        path = os.path.join(os.path.dirname(cfg.config_file), name)
    else:
        path = os.path.expanduser(name)
    try:
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ConfigError("%s: cannot read the pattern file %s: %s." % (key, path, error.strerror))
    rules = []
    for line in lines:
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith(("+ ", "- ")):
            rules.append([line[0], line[2:]])
        else:
            rules.append([default_sign, line])
    return rules


def filter_spec(cfg):
    """The include/exclude rules of the settings, in the order rsync would apply them."""
    separator = cfg["PATH_SEPARATOR_CHAR"]
    includes = [["+", pattern] for pattern in cfg["RSYNC_INCLUDE_PATTERN"].split(separator) if pattern]
    excludes = [["-", pattern] for pattern in cfg["RSYNC_EXCLUDE_PATTERN"].split(separator) if pattern]
    if cfg["RSYNC_INCLUDE_FROM"]:
        includes += read_pattern_file(cfg, "RSYNC_INCLUDE_FROM")
    if cfg["RSYNC_EXCLUDE_FROM"]:
        excludes += read_pattern_file(cfg, "RSYNC_EXCLUDE_FROM")
    for sign, pattern in includes + excludes:
        try:
            pattern_to_regex(pattern)
        except re.error as error:
            raise ConfigError("Pattern %r is not valid: %s." % (pattern, error))
    return includes + excludes if cfg["RSYNC_PATTERN_FIRST"] == "include" else excludes + includes


def make_replica(cfg, role):
    """The replica object of a local side of the sync (a remote target is opened by
    SyncRun.connect once the checks allow it)."""
    location = cfg["INITIATOR_SYNC_DIR"] if role == "initiator" else cfg["TARGET_SYNC_DIR"]
    state_dir = cfg["INITIATOR_CUSTOM_STATE_DIR"] if role == "initiator" else cfg["TARGET_CUSTOM_STATE_DIR"]
    if location.startswith("ssh://") and role == "initiator":
        raise ConfigError("INITIATOR_SYNC_DIR must be a local directory, not %s." % location)
    if state_dir and not os.path.isabs(state_dir):
        raise ConfigError("The %s custom state dir %s must be an absolute path." % (role, state_dir))
    return LocalReplica(role, location, state_dir)


class SyncRun(object):
    """One run of a sync task."""

    def __init__(self, cfg, out):
        self.cfg = cfg
        self.out = out
        self.dry = cfg.switch("dry")
        self.instance = cfg["INSTANCE_ID"]
        self.stamp = time.strftime("%Y.%m.%d-%H.%M.%S")
        self.transport = None
        if cfg["TARGET_SYNC_DIR"].startswith("ssh://"):
            self.transport = SshTransport(cfg, cfg["TARGET_SYNC_DIR"], out)
            self.replicas = {"initiator": make_replica(cfg, "initiator"), "target": None}
        else:
            self.replicas = {"initiator": make_replica(cfg, "initiator"), "target": make_replica(cfg, "target")}
        self.options = {"copy_links": cfg["COPY_SYMLINKS"], "dir_links": cfg["KEEP_DIRLINKS"],
                        "checksum": cfg["CHECKSUM"]}
        self.missing = set()   # sides that do not exist yet (dry run with CREATE_DIRS)
        self.locked = []

    def run(self):
        cfg, out = self.cfg, self.out
        for key in ("LOCAL_RUN_BEFORE_CMD", "LOCAL_RUN_AFTER_CMD", "REMOTE_RUN_BEFORE_CMD", "REMOTE_RUN_AFTER_CMD"):
            if cfg[key]:
                out.warn("%s is not available in this version of osync.py yet; the command is not run." % key)
        if cfg["DESTINATION_MAILS"]:
            out.notice("Alert mails are not available in this version of osync.py yet; none is sent.")
        spec = filter_spec(cfg)
        if not shutil.which(cfg["RSYNC_EXECUTABLE"]):
            raise ReplicaError("rsync (RSYNC_EXECUTABLE=%s) is not installed or not in PATH; install rsync."
                               % cfg["RSYNC_EXECUTABLE"])
        try:
            if self.transport is not None:
                self.connect()
            self.run_checked(spec)
        finally:
            if self.transport is not None:
                if self.replicas["target"] is not None:
                    self.replicas["target"].agent.close()
                self.transport.close()

    def connect(self):
        """Reach the remote target: the pings, the master connection, the agent."""
        cfg, host = self.cfg, self.transport.host
        if cfg["REMOTE_3RD_PARTY_HOSTS"].split():
            answers = [ping(other) for other in cfg["REMOTE_3RD_PARTY_HOSTS"].split()]
            if None in answers:
                self.out.warn("ping is not installed: REMOTE_3RD_PARTY_HOSTS cannot be checked.")
            elif not any(answers):
                self.out.warn("No remote 3rd party host responded to ping (%s). No internet?"
                              % cfg["REMOTE_3RD_PARTY_HOSTS"])
        if cfg["REMOTE_HOST_PING"]:
            answer = ping(host)
            if answer is None:
                self.out.warn("ping is not installed: REMOTE_HOST_PING cannot be checked.")
            elif not answer:
                raise ReplicaError("Cannot ping %s; this task is skipped (REMOTE_HOST_PING)." % host)
        self.transport.start()
        self.replicas["target"] = self.transport.start_agent("target", cfg["TARGET_CUSTOM_STATE_DIR"])

    def run_checked(self, spec):
        cfg, out = self.cfg, self.out
        facts = self.check_replicas()
        for replica in self.replicas.values():
            replica.check_work_dir()   # before anything is read from or written to a work dir
        self.guard_unmounted(facts)
        if not self.dry:
            for replica in self.replicas.values():
                replica.prepare_work_dir()
        try:
            self.take_locks()
            if not self.dry:
                for replica in self.replicas.values():
                    replica.clear_leftovers()
            if cfg.switch("initialize"):
                self.initialize(spec)
                return
            outcome = self.sync(spec, facts)
            if not self.dry and outcome.failed == 0 and out.counter.errors == 0:
                self.cleanup(spec)
            if cfg.switch("summary"):
                self.print_summary(outcome)
        finally:
            self.release_locks()

    # -- checks -----------------------------------------------------------------------------
    def check_replicas(self):
        create = self.cfg["CREATE_DIRS"]
        facts = {}
        for side, replica in self.replicas.items():
            try:
                facts[side] = replica.probe(create and not self.dry)
            except ReplicaError:
                if not (self.dry and create):
                    raise
                self.out.notice("The %s replica %s does not exist; a real run would create it." % (
                    side, replica.display))
                self.missing.add(side)
                facts[side] = {"realpath": os.path.abspath(replica.root), "work_dir": False, "writable": True,
                               "free_kb": None, "euid": os.geteuid(), "created": False}
            if facts[side]["created"]:
                self.out.notice("Created the %s replica %s (CREATE_DIRS)." % (side, replica.display))
        one, other = facts["initiator"]["realpath"], facts["target"]["realpath"]
        if self.transport is not None:
            one = other = None
        if one is not None and one == other:
            raise ReplicaError("The initiator and the target are the same directory (%s)." % one)
        for inner, outer in ((one, other), (other, one)):
            if inner is not None and inner.startswith(outer.rstrip("/") + "/"):
                raise ReplicaError("The replica %s lies inside the replica %s; they must not overlap." % (inner, outer))
        for side, replica in self.replicas.items():
            if not facts[side]["writable"] and not self.dry:
                raise ReplicaError("The %s replica %s is not writable by this user." % (side, replica.display))
            free = facts[side]["free_kb"]
            if self.cfg["MINIMUM_SPACE"] and free is not None and free < self.cfg["MINIMUM_SPACE"]:
                self.out.warn("There is not enough free space on the %s replica %s (%d KiB, MINIMUM_SPACE is %d)."
                              % (side, replica.display, free, self.cfg["MINIMUM_SPACE"]))
        return facts

    def read_marker(self, replica):
        try:
            text = replica.read_state_file(marker_file_name(self.instance))
            return json.loads(text) if text else {}
        except (ReplicaError, ValueError):
            return {}

    def guard_unmounted(self, facts):
        """Refuse to touch anything when a replica lost its work dir although the last sync
        left items in it: an unmounted disk or a replaced directory looks exactly so."""
        for side, replica in self.replicas.items():
            if facts[side]["work_dir"] or side in self.missing:
                continue
            held = 0
            witnesses = []
            for witness in self.replicas.values():
                marker = self.read_marker(witness)
                if marker.get("replicas", self.pair_identity()) != self.pair_identity():
                    continue  # a marker of another pair of replicas says nothing about these
                if marker.get("%s_entries" % side, 0):
                    held = max(held, marker["%s_entries" % side])
                    witnesses.append(os.path.join(witness.state_dir, marker_file_name(self.instance)))
            if held:
                raise ReplicaError(
                    "The %s replica %s has no %s although the last sync left %d items in it: it looks unmounted "
                    "or replaced, so nothing was changed. Mount it; or, if it really is meant to start over, delete "
                    "%s and %s (the next run then merges both sides and deletes nothing)."
                    % (side, replica.display, WORK_DIR_NAME, held, " and ".join(witnesses), self.state_path()))

    def take_locks(self):
        if self.dry or self.cfg.switch("no_locks"):
            return
        for side in ("initiator", "target"):
            self.take_lock(self.replicas[side])

    def take_lock(self, replica):
        """Lock one replica.  A lock whose pid runs on this host refuses; a dead one is
        taken over; on a remote target, a dead lock of another INSTANCE_ID is taken over
        only with FORCE_STRANGER_LOCK_RESUME (the pid in a lock is always the initiator
        host's, so it is checked here)."""
        content = "%d@%s" % (os.getpid(), self.instance)
        replace = None
        for attempt in range(5):
            existing = replica.acquire_lock(content, replace)
            if existing is None:
                self.locked.append((replica, content))
                return
            if self.cfg.switch("force_unlock"):
                self.out.notice("Removing the lock [%s] of the %s replica (--force-unlock)." % (existing, replica.role))
                replace = existing
                continue
            owner = existing.rpartition("@")[0] if "@" in existing else existing
            owner_instance = existing.partition("@")[2] if "@" in existing else existing
            if existing and not re.match(r"^[0-9]+$", owner.strip()):
                raise ReplicaError("The lock of the %s replica holds %r, which is not PID@INSTANCE_ID; remove it or "
                                   "run with --force-unlock." % (replica.role, existing[:80]))
            if existing and pid_alive(int(owner)):
                raise ReplicaError("There is already a running instance [%s] of osync for the %s replica %s. "
                                   "Cannot start." % (existing, replica.role, replica.display))
            if (isinstance(replica, RemoteReplica) and existing and owner_instance != self.instance
                    and not self.cfg["FORCE_STRANGER_LOCK_RESUME"]):
                raise ReplicaError("The %s replica %s holds a dead lock [%s] of another instance; it will not be "
                                   "taken over unless FORCE_STRANGER_LOCK_RESUME=yes." % (
                                       replica.role, replica.display, existing))
            self.out.notice("There is a dead osync lock [%s] on the %s replica; taking it over." % (existing,
                                                                                                  replica.role))
            replace = existing
        raise ReplicaError("Cannot take the lock of the %s replica: other runs keep taking it." % replica.role)

    def release_locks(self):
        while self.locked:
            replica, content = self.locked.pop()
            try:
                replica.release_lock(content)
            except OsyncError as error:
                self.out.error("Cannot release the lock of the %s replica: %s" % (replica.role, error))

    # -- the sync -----------------------------------------------------------------------------
    def policy(self, facts):
        cfg = self.cfg
        root = all(side_facts["euid"] == 0 for side_facts in facts.values())
        return Policy(sync_type=cfg["SYNC_TYPE"], prevalence=cfg["CONFLICT_PREVALANCE"],
                      skip_deletion=[side for side in cfg["SKIP_DELETION"].split(",") if side],
                      backup_overwrites=cfg["CONFLICT_BACKUP"], permissions=cfg["PRESERVE_PERMISSIONS"],
                      executability=cfg["PRESERVE_EXECUTABILITY"], owner=cfg["PRESERVE_OWNER"] and root,
                      group=cfg["PRESERVE_GROUP"] and root)

    def scan(self, side, spec):
        if side in self.missing:
            return iter(())
        return self.replicas[side].scan(spec, self.options)

    def state_path(self):
        return os.path.join(self.replicas["initiator"].state_dir, state_file_name(self.instance))

    def pair_identity(self):
        """Which two replicas this job syncs: the state and markers apply to them only."""
        identity = {}
        for side, replica in self.replicas.items():
            host = self.transport.destination() + ":" if side == "target" and self.transport else ""
            identity[side] = host + replica.root
        return identity

    def state_header(self):
        return {"instance": self.instance, "written": self.stamp, "replicas": self.pair_identity()}

    def previous_state(self):
        path = self.state_path()
        header = read_state_header(path)
        if header is not None:
            if header.get("replicas") != self.pair_identity():
                self.out.warn("The state %s was recorded for other replicas (%s); this run merges both replicas "
                              "and deletes nothing." % (path, ", ".join(sorted((header.get("replicas") or {}).values()))))
                return iter(())
            return read_state(path)
        legacy = read_legacy_state(self.replicas["initiator"].state_dir, self.instance)
        if legacy is not None:
            self.out.notice("No osync.py state yet: using the osync.sh lists of the last run as the baseline.")
            return iter(legacy)
        self.out.notice("No state from an earlier run: this first run merges both replicas and deletes nothing.")
        return iter(())

    def sync(self, spec, facts):
        out = self.out
        self.note_resume()
        policy = self.policy(facts)
        spool_dir = tempfile.gettempdir() if self.dry else self.replicas["initiator"].temp_dir()
        executor = Executor(self.cfg, out, self.replicas, policy, self.options, self.stamp, self.dry,
                            self.transport)
        try:
            decisions = plan(self.previous_state(), self.scan("initiator", spec), self.scan("target", spec), policy)
            lines, outcome = executor.execute(decisions, spool_dir)
        except StateError as error:
            executor.close()
            out.warn("The state of the last run cannot be used (%s); this run merges both replicas and deletes "
                     "nothing." % error)
            executor = Executor(self.cfg, out, self.replicas, policy, self.options, self.stamp, self.dry,
                                self.transport)
            decisions = plan(iter(()), self.scan("initiator", spec), self.scan("target", spec), policy)
            lines, outcome = executor.execute(decisions, spool_dir)
        if self.dry:
            return outcome
        if executor.state_unchanged:
            executor.close()   # every path is exactly as recorded: the state file stays as it is
        else:
            write_state(self.state_path(), self.state_header(), lines)
        self.write_markers(outcome)
        if self.cfg["LOG_CONFLICTS"]:
            self.write_conflicts(outcome)
        if outcome.failed == 0:
            self.replicas["initiator"].write_state_file("initiator-last-action-%s" % self.instance, "synced\n")
            self.replicas["initiator"].write_state_file("resume-count-%s" % self.instance, "0\n")
        return outcome

    def note_resume(self):
        """osync's resume bookkeeping: every run continues where the previous one stopped,
        and interrupted runs are counted and reported."""
        if self.dry:
            return
        initiator = self.replicas["initiator"]
        last = (initiator.read_state_file("initiator-last-action-%s" % self.instance) or "synced").strip()
        count_text = (initiator.read_state_file("resume-count-%s" % self.instance) or "0").strip()
        count = int(count_text) if count_text.isdigit() else 0
        if last != "synced" and self.cfg["RESUME_SYNC"]:
            if self.cfg["RESUME_TRY"] and count >= self.cfg["RESUME_TRY"]:
                self.out.warn("The last %d runs did not finish; check the log. This run continues where they "
                              "stopped." % (count + 1))
                count = 0
            else:
                self.out.notice("Continuing the interrupted run [%d previous tries]." % count)
                count += 1
            initiator.write_state_file("resume-count-%s" % self.instance, "%d\n" % count)
        initiator.write_state_file("initiator-last-action-%s" % self.instance, "update-replica\n")

    def write_markers(self, outcome):
        marker = json.dumps({"instance": self.instance, "written": self.stamp, "replicas": self.pair_identity(),
                             "initiator_entries": outcome.entries["initiator"],
                             "target_entries": outcome.entries["target"]}) + "\n"
        for replica in self.replicas.values():
            replica.write_state_file(marker_file_name(self.instance), marker)

    def write_conflicts(self, outcome):
        initiator, target = self.replicas["initiator"], self.replicas["target"]
        lines = ["%s%s << >> %s%s\n" % (initiator.location(), path, target.location(), path)
                 for path, winner in outcome.conflicts]
        initiator.write_state_file("conflicts-%s" % self.instance, "".join(lines))
        if lines:
            self.out.notice("File conflicts: INITIATOR << >> TARGET\n%sThere are %d conflicting files."
                            % ("".join(lines), len(lines)))

    def initialize(self, spec):
        """--initialize: record both replicas as the baseline and sync nothing."""
        if self.dry:
            self.out.notice("Dry run: --initialize would record both replicas as the baseline.")
            return
        counts = {"initiator": 0, "target": 0}

        def counted(records):
            for record in records:
                counts["initiator"] += 1
                counts["target"] += 1
                yield record
        write_state(self.state_path(), self.state_header(),
                    state_lines(counted(baseline(self.scan("initiator", spec), self.scan("target", spec)))))
        outcome = Outcome(keep_paths=False)
        outcome.entries = counts
        self.write_markers(outcome)
        self.out.notice("Recorded %d paths held by both replicas as the baseline; nothing was synced."
                        % counts["initiator"])

    def cleanup(self, spec):
        """Remove backups and soft-deleted items older than their limits, on both sides."""
        for area, key in (("backup", "CONFLICT_BACKUP_DAYS"), ("deleted", "SOFT_DELETE_DAYS")):
            days = self.cfg[key]
            if not days:
                continue
            for side, replica in self.replicas.items():
                removed, errors = replica.clean_old(area, days, spec)
                if removed:
                    self.out.notice("Removed %d items older than %d days from the %s's %s dir."
                                    % (removed, days, side, area))
                for error in errors[:20]:
                    self.out.error("Cannot clean %s: %s." % (area, error))

    def print_summary(self, outcome):
        """The --summary listing, in osync's format."""
        initiator = self.replicas["initiator"].location()
        target = self.replicas["target"].location()
        lines = ["Attributes only updates: INITIATOR << >> TARGET"]
        lines += ["UPDATE >> %s%s" % (target, path) for path in outcome.paths[("attributes", "target")]]
        lines += ["UPDATE << %s%s" % (initiator, path) for path in outcome.paths[("attributes", "initiator")]]
        lines.append("File transfers and simple deletions: INITIATOR << >> TARGET "
                     "(may include file ownership and timestamp attributes)")
        lines += ["UPDATE >> %s%s" % (target, path) for path in outcome.paths[("updated", "target")]]
        lines += ["UPDATE << %s%s" % (initiator, path) for path in outcome.paths[("updated", "initiator")]]
        lines.append("File deletions: INITIATOR << >> TARGET")
        lines += ["DELETE >> %s%s" % (target, path) for path in outcome.paths[("deleted", "target")]]
        lines += ["DELETE << %s%s" % (initiator, path) for path in outcome.paths[("deleted", "initiator")]]
        for side, title in (("initiator", "Initiator"), ("target", "Target")):
            lines.append("%s has %d updates." % (title, outcome.counts[("updated", side)]
                                                 + outcome.counts[("attributes", side)]))
        for side, title in (("initiator", "Initiator"), ("target", "Target")):
            lines.append("%s has %d deletions." % (title, outcome.counts[("deleted", side)]))
        for line in lines:
            self.out.always(line, bare=True)


# Command line -------------------------------------------------------------------------------

class CommandLineParser(argparse.ArgumentParser):
    """argparse, but every error is a ConfigError: one sentence, exit code 1."""

    def error(self, message):
        raise ConfigError("%s%s. Run %s --help for the options." % (message[0].upper(), message[1:], PROGRAM))


def option_dest(setting):
    return setting.option.lstrip("-").replace("-", "_")


def build_parser():
    parser = CommandLineParser(prog=PROGRAM, add_help=False, allow_abbrev=False)
    parser.add_argument("config", nargs="?")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-v", "--version", action="store_true")
    for setting in SETTINGS:
        if not setting.option:
            continue
        if setting.kind in ("switch", "bool"):
            parser.add_argument(setting.option, dest=option_dest(setting), action="store_true")
        else:
            parser.add_argument(setting.option, dest=option_dest(setting), metavar="VALUE")
    return parser


def help_text():
    """--help: usage and one line per option, from the settings table."""
    lines = ["%s %s - two-way file synchronization" % (PROGRAM, VERSION), "",
             "usage: %s /etc/osync/NAME.conf [options]" % PROGRAM,
             "       %s --initiator=DIR --target=DIR|ssh://[user@]host[:port]//path [options]" % PROGRAM, "",
             "Any config key can also be set as an environment variable (e.g. SOFT_DELETE_DAYS=365).",
             "Exit codes: 0 success, 1 errors, 2 warnings only.", "", "options:"]
    rows = [("-h, --help", "Show this help."), ("-v, --version", "Show the version.")]
    for setting in SETTINGS:
        if not setting.option:
            continue
        name = setting.option if not setting.takes_value() else setting.option + "=VALUE"
        text = setting.help + (" (%s)" % setting.key if setting.key else "")
        rows.append((name, text))
    width = max(len(name) for name, _ in rows) + 2
    lines += ["  %s%s" % (name.ljust(width), text) for name, text in rows]
    return "\n".join(lines) + "\n"


def parse_command_line(argv):
    """The Config of this run, or an exit code when only help/version was asked for."""
    args = build_parser().parse_args(argv)
    if args.help:
        sys.stdout.write(help_text())
        return 0
    if args.version:
        sys.stdout.write("%s %s\n" % (PROGRAM, VERSION))
        return 0
    if not argv:
        sys.stdout.write(help_text())
        return 1
    if args.config is not None and args.config.startswith("-"):
        raise ConfigError("Unknown option %s. Run %s --help for the options." % (args.config, PROGRAM))
    cfg = Config(quicksync=args.config is None)
    if args.config is not None:
        cfg.load_file(args.config)
    elif not (args.initiator or os.environ.get("INITIATOR_SYNC_DIR")) or not (
            args.target or os.environ.get("TARGET_SYNC_DIR")):
        raise ConfigError("Give a config file, or both --initiator=DIR and --target=DIR. Run %s --help."
                          % PROGRAM)
    cfg.load_environment(os.environ)
    for setting in SETTINGS:
        if not setting.option:
            continue
        value = getattr(args, option_dest(setting))
        if value in (None, False):
            continue
        if setting.key:
            cfg.set_from_text(setting.key, "yes" if value is True else value,
                              "command line %s" % setting.option)
        else:
            cfg.switches[option_dest(setting)] = True
    cfg.finish()
    return cfg


def early_log_candidates():
    """Where messages go when the config itself cannot be read."""
    if os.environ.get("LOGFILE"):
        return [os.environ["LOGFILE"]]
    return log_file_candidates(None, "")


def main(argv=None):
    """Run osync.py with command-line arguments; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    os.environ["LC_ALL"] = "C"
    out = Output()
    debug = os.environ.get("_DEBUG", "").lower() in ("true", "yes", "1")
    try:
        cfg = parse_command_line(argv)
    except ConfigError as error:
        out.configure(silent="--silent" in argv, debug=debug)
        out.open_log(early_log_candidates())
        out.critical(str(error))
        out.close()
        return 1
    if isinstance(cfg, int):
        return cfg
    out.configure(silent=cfg.switch("silent"), errors_only=cfg.switch("errors_only"),
                  verbose=cfg.switch("verbose"), debug=debug,
                  prefix="none" if cfg.switch("no_prefix") else "time")
    out.open_log(log_file_candidates(cfg["INSTANCE_ID"], cfg["LOGFILE"]))
    out.notice("-------------------------------------------------------------")
    out.notice("%s - %s %s%s started." % (time.strftime("%Y-%m-%d %H:%M:%S"), PROGRAM, VERSION,
                                          " (dry run)" if cfg.switch("dry") else ""))
    out.notice("Sync task [%s] launched as %s@%s (PID %d)." % (cfg["INSTANCE_ID"], current_user(),
                                                              socket.gethostname(), os.getpid()))
    for warning in cfg.warnings:
        out.warn(warning)
    try:
        if cfg.switch("on_changes") or cfg.switch("on_changes_target"):
            raise ConfigError("Monitor mode (--on-changes) is not available in this version of osync.py yet.")
        with Watchdog(out, cfg["SOFT_MAX_EXEC_TIME"], cfg["HARD_MAX_EXEC_TIME"], cfg["KEEP_LOGGING"]):
            SyncRun(cfg, out).run()
    except OsyncError as error:
        out.critical(str(error))
    except StopRun as stop:
        out.log(logging.ERROR if stop.level == "ERROR" else logging.WARNING, stop.reason)
    except OSError as error:  # the disk or the system refused something osync.py itself does
        out.critical("Stopped: %s%s. Nothing was lost; the next run continues where this one stopped."
                     % (error.strerror or error, " (%s)" % error.filename if error.filename else ""))
    except Exception as error:  # a bug: say it plainly, keep the traceback in the log
        import traceback
        out.debug(traceback.format_exc())
        out.critical("Unexpected internal error: %s: %s. Please report it with the log %s."
                     % (type(error).__name__, error, out.logfile))
    code = out.exit_code()
    out.notice("%s finished%s." % (PROGRAM, {0: "", 1: " with errors", 2: " with warnings"}[code]))
    out.close()
    return code


def agent_main():
    """Entry point of the agent on a remote host (started by the AGENT_STUB bootstrap):
    serve replica requests on stdin/stdout until the initiator closes the stream."""
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # a stray print must never corrupt the protocol stream
    os.environ["LC_ALL"] = "C"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer.write(AGENT_BANNER + ("%s %s\n" % (VERSION, sys.version.split()[0])).encode("ascii"))
    writer.flush()
    try:
        serve_agent(reader, writer)
    except (ProtocolError, BrokenPipeError, KeyboardInterrupt):
        pass


def current_user():
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


if __name__ == "__main__":
    sys.exit(main())
