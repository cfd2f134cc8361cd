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
import base64
import codecs
import collections
import contextlib
import errno
import gc
import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import re
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zlib

PROGRAM = "osync.py"
VERSION = "2.0.0"
CONFIG_FILE_REVISION_REQUIRED = "1.3.0"
PUSH_FILE_NAME = ".osync-update.push"
# The work dir below each replica root, laid out as osync v1.3 has it (state, backup,
# deleted, _partial, lock) plus rsync's temp dir, the list of the run's children beside
# the lock, and the backup a transfer makes of what it replaces.
WORK_DIR_NAME = ".osync_workdir"
STATE_DIR_NAME = "state"
BACKUP_DIR_NAME = "backup"
DELETED_DIR_NAME = "deleted"
PARTIAL_DIR_NAME = "_partial"
TEMP_DIR_NAME = "_tmp"
LOCK_FILE_NAME = "lock"
CHILDREN_FILE_NAME = "lock.children"
TRANSFER_BACKUP_PREFIX = ".transfer-"   # backup/.transfer-STAMP
# The files of a job in a state dir, each name filled in with the job's INSTANCE_ID.
STATE_FILE_NAMES = {
    "state": "osync.py-state-%s",         # what both replicas held after the last sync
    "marker": "osync.py-marker-%s",       # ties a replica to that sync (one in each state dir)
    "transfers": "transfers-%s",          # the transfers of a run until they are settled
    "conflicts": "conflicts-%s",          # the conflicts of the last run
    "resume_count": "resume-count-%s",    # RESUME_TRY counting, as osync v1.3
    "last_action": "initiator-last-action-%s",
    "report": "run-report-%s.json",       # how the last run went (RunReport)
}
STATE_FORMAT = "osync.py-state"
STATE_VERSION = 1
MASS_DELETION_MINIMUM = 10  # the deletion breaker never trips for this many deletions or fewer
CLOCK_SKEW_LIMIT = 5        # seconds the target host's clock may differ before a warning


class OsyncError(Exception):
    """Root of every error osync.py reports as one sentence (exit code 1, no traceback)."""


class ConfigError(OsyncError):
    """A bad command line, config file line, environment value or setting."""


class ReplicaError(OsyncError):
    """A replica cannot be used: missing, unwritable, locked, unmounted..."""


class Refusal(ReplicaError):
    """A guard stopped the run before its first write.  The message is built here, in one
    shape for every guard: "<reason>, so nothing was changed. <way out>."  `guard` is a
    short name of the guard that refused ("missing-replica", "older-disk", "locked"...)."""

    def __init__(self, guard, reason, way_out):
        ReplicaError.__init__(self, "%s, so nothing was changed. %s." % (reason, way_out))
        self.guard = guard
        self.reason = reason
        self.way_out = way_out


def refuse(guard, reason, way_out):
    """Stop the run before any write: `reason` says what was found (naming the replica,
    host or path), `way_out` what the user can safely do about it, both without the final
    period."""
    raise Refusal(guard, reason, way_out)


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
    S("PROMETHEUS_TEXTFILE", "str", "", "GENERAL",
      "Also write each run's report as this Prometheus textfile-collector file (a path ending in .prom in "
      "node_exporter's --collector.textfile.directory); empty writes none."),
    S("MINIMUM_SPACE", "int", 10240, "GENERAL",
      "Warn when a replica has less free space than this, in KiB; 0 disables the check.", quick=1024),
    S("BANDWIDTH", "int", 0, "GENERAL", "rsync bandwidth limit of each transfer, in KiB/s; 0 means no limit."),
    S("SUDO_EXEC", "bool", False, "GENERAL",
      "Run the remote agent and the remote rsync through sudo."),
    S("RSYNC_EXECUTABLE", "str", "rsync", "GENERAL",
      "rsync program: a name looked up in PATH, or a path; the remote host runs it too, unless "
      "RSYNC_REMOTE_PATH is set."),
    S("RSYNC_REMOTE_PATH", "str", "", "GENERAL",
      "Directory of rsync on the remote host, if not in its PATH: the remote host runs the program of "
      "RSYNC_EXECUTABLE's name there."),
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
      "Extra rsync options for every transfer (e.g. --modify-window=2 for FAT/SMB); options osync.py sets "
      "itself or that would break its guarantees (--inplace, --delete, --partial, --temp-dir, --backup, "
      "filters...) are refused."),
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
    S("RSYNC_COMPRESS", "bool", True, "MISC_OPTIONS",
      "Compress the transfers to and from a remote target (copies between local directories never are)."),
    S("SOFT_MAX_EXEC_TIME", "int", 7200, "MISC_OPTIONS",
      "Warn when a run takes longer than this many seconds; 0 disables.", quick=0,
      old_names=("SOFT_MAX_EXEC_TIME_FILE_TASK", "MAX_SOFT_EXEC_TIME")),
    S("HARD_MAX_EXEC_TIME", "int", 10600, "MISC_OPTIONS",
      "Stop a run (exit 1) that takes longer than this many seconds; 0 disables.", quick=0,
      old_names=("HARD_MAX_EXEC_TIME_FILE_TASK", "MAX_HARD_EXEC_TIME")),
    S("KEEP_LOGGING", "int", 1801, "MISC_OPTIONS",
      "Log a 'still running' line every this many seconds; 0 disables."),
    S("MIN_WAIT", "int", 60, "MISC_OPTIONS",
      "Monitor mode: sync this many seconds after the last change (at most MAX_WAIT after the first).",
      quick=30),
    S("MAX_WAIT", "int", 7200, "MISC_OPTIONS",
      "Monitor mode: sync anyway after this many seconds without changes; 0 waits forever (and a burst of "
      "changes is synced after 10 x MIN_WAIT at most)."),
    # ---------------------------------------------------------------- [BACKUP_DELETE_OPTIONS]
    S("LOG_CONFLICTS", "bool", False, "BACKUP_DELETE_OPTIONS",
      "Log the run's conflicts as a list (INITIATOR/path << >> TARGET/path, both versions, which won and why, "
      "where the loser went) and write it to conflicts-INSTANCE_ID in the state dir.",
      option="--log-conflicts"),
    S("ALERT_CONFLICTS", "bool", False, "BACKUP_DELETE_OPTIONS",
      "Also mail that list to DESTINATION_MAILS (turns LOG_CONFLICTS on).", option="--alert-conflicts"),
    S("CONFLICT_BACKUP", "bool", True, "BACKUP_DELETE_OPTIONS",
      "Keep the old version of every file a sync overwrites, the loser of a conflict included, in "
      ".osync_workdir/backup; with no, nothing is kept (conflicts are still logged)."),
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
    S("MAX_DELETION_SHARE", "int", 50, "BACKUP_DELETE_OPTIONS",
      "Stop a run, before it changes anything, that would delete more than this percentage of the items a "
      "replica holds (and more than %d of them, so a small replica can always be tidied); "
      "--allow-mass-deletion lets one run through; 0 turns the check off." % MASS_DELETION_MINIMUM),
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
      "Keep partly transferred files in .osync_workdir/_partial so the next run sends only the rest "
      "(with DELTA_COPIES=yes).",
      option="--partial"),
    S("DELTA_COPIES", "bool", True, "RESUME_OPTIONS",
      "Send only the changed parts of changed files, also between local directories (off: whole files, less CPU "
      "on fast links)."),
    # ---------------------------------------------------------------- [ALERT_OPTIONS]
    S("DESTINATION_MAILS", "str", "", "ALERT_OPTIONS",
      "Alert mail recipients, separated by spaces; empty sends no mail.", option="--destination-mails"),
    S("ALWAYS_SEND_MAILS", "bool", False, "ALERT_OPTIONS", "Also send a mail after a clean run."),
    S("MAIL_BODY_CHARSET", "str", "", "ALERT_OPTIONS", "Charset of the mail body; empty means UTF-8."),
    S("SENDER_MAIL", "str", "", "ALERT_OPTIONS", "Sender address of alert mails."),
    S("SMTP_SERVER", "str", "", "ALERT_OPTIONS",
      "SMTP server for alert mails; empty sends them through the local sendmail, mutt or mail."),
    S("SMTP_PORT", "int", 25, "ALERT_OPTIONS", "SMTP port."),
    S("SMTP_ENCRYPTION", "choice", "none", "ALERT_OPTIONS",
      "SMTP encryption: none, tls (STARTTLS) or ssl (implicit TLS); the server's certificate is verified against "
      "the system's CA certificates, or the CA bundle the SSL_CERT_FILE environment variable names.",
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
    S(None, "switch", False, None, "Let this run delete more than MAX_DELETION_SHARE of a replica's items.",
      option="--allow-mass-deletion"),
    S(None, "switch", False, None, "Record both replicas as the baseline for the next run; sync nothing.",
      option="--initialize"),
    S(None, "switch", False, None, "Monitor mode: sync whenever either replica changes.", option="--on-changes"),
    S(None, "switch", False, None, "Monitor mode on the target host: notify the initiator of changes.",
      option="--on-changes-target"),
    S(None, "str", "", None,
      "Rewrite the osync v1.0-v1.2 config file VALUE to the current format (the original is kept as VALUE.save) "
      "and rename its replicas' old master-/slave- state files; syncs nothing.", option="--upgrade-conf"),
]
del S

SETTINGS_BY_KEY = dict((s.key, s) for s in SETTINGS if s.key)
# Whole numbers are bounded so that every value fits what it is handed to (timers,
# rsync, the SMTP library); keys not listed take 0 to INT_MAXIMUM.
INT_MAXIMUM = 2 ** 31 - 1
INT_LIMITS = {
    "SMTP_PORT": (1, 65535),
    "MINIMUM_SPACE": (0, 2 ** 50),   # KiB
}
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
        if not re.match(r"^[0-9]+\Z", text):
            raise ValueError("%r is not a whole number of 0 or more" % text)
        lowest, highest = INT_LIMITS.get(setting.key, (0, INT_MAXIMUM))
        # A long run of digits is refused before int() so no limit of Python's own applies.
        if len(text.lstrip("0")) > len(str(highest)) or int(text) > highest:
            raise ValueError("%s is too large: the largest value it takes is %d" % (text[:40], highest))
        if int(text) < lowest:
            raise ValueError("%s is too small: the smallest value it takes is %d" % (text, lowest))
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

# Keys of osync v1.0 configs that the Settings table no longer has (Config.apply_legacy_remote).
LEGACY_REMOTE_KEYS = ("REMOTE_SYNC", "REMOTE_USER", "REMOTE_HOST", "REMOTE_PORT", "REMOTE_RSYNC_PATH")
# A scheme followed by ":/" (sftp://, SSH://, ssh:/host, rsync://...): meant as a URL, not a directory.
URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
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
    if text.startswith("\ufeff"):
        text = text[1:]   # a byte-order mark some editors write at the start
    assignments = []
    known = {}

    def lookup(name):
        if name in known:
            return known[name]
        return os.environ.get(name, "")

    for number, line in enumerate(text.splitlines(), 1):
        if "\0" in line:
            raise ConfigError("%s:%d: the line holds a NUL byte: this is not a text config file, or it is damaged."
                              % (path, number))
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
        self.notices = []           # likewise, as notices (no effect on the exit code)
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
        if "\0" in text:
            raise ConfigError("%s: %s: the value holds a NUL byte, which no setting can hold." % (where, key))
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
        legacy = {}
        for number, key, value in read_config_file(path):
            where = "%s:%d" % (path, number)
            if key in LEGACY_REMOTE_KEYS:
                legacy[key] = (value, where)
                continue
            if key in OLD_NAMES:
                self.warnings.append("%s: %s is the osync v1.0/v1.1 name of %s; please rename it."
                                     % (where, key, OLD_NAMES[key]))
                key = OLD_NAMES[key]
            if key == "CONFIG_FILE_REVISION":
                revision = value
            if key in ("OSYNC_DIR", "COMPRESSION_LEVEL"):
                continue  # obsolete internals of osync.sh, without meaning here
            if key not in SETTINGS_BY_KEY:
                self.warnings.append("%s: %s: unknown setting, ignored." % (where, key))
                continue
            setting = SETTINGS_BY_KEY[key]
            if setting.kind == "choice" and value in OLD_VALUES:
                self.warnings.append("%s: %s: value %s is the osync v1.0 name of %s; please rename it."
                                     % (where, key, value, OLD_VALUES[value]))
            self.set_from_text(key, value, where)
        self.apply_legacy_remote(legacy, path)
        if revision is None or not re.match(r"^[0-9]+(\.[0-9]+)*$", revision.strip()):
            self.warnings.append("%s: CONFIG_FILE_REVISION is missing or not a number; "
                                 "add CONFIG_FILE_REVISION=%s." % (path, CONFIG_FILE_REVISION_REQUIRED))
        elif version_tuple(revision) < version_tuple(CONFIG_FILE_REVISION_REQUIRED):
            self.warnings.append("%s: written for osync %s; its old names were translated. "
                                 "Compare it with sync.conf and set CONFIG_FILE_REVISION=%s."
                                 % (path, revision, CONFIG_FILE_REVISION_REQUIRED))

    def apply_legacy_remote(self, legacy, path):
        """osync v1.0 named a remote target with REMOTE_SYNC=yes, REMOTE_USER, REMOTE_HOST
        and REMOTE_PORT next to a plain path: read that as the ssh:// target it meant.
        With REMOTE_SYNC=no those keys mean nothing (osync's upgrade script leaves them in
        place), and REMOTE_RSYNC_PATH is the old name of RSYNC_REMOTE_PATH."""
        if "REMOTE_RSYNC_PATH" in legacy:
            value, where = legacy["REMOTE_RSYNC_PATH"]
            if self.origin["RSYNC_REMOTE_PATH"] == "default":
                self.set_from_text("RSYNC_REMOTE_PATH", value, where)
            self.notices.append("%s: REMOTE_RSYNC_PATH is the osync v1.0 name of RSYNC_REMOTE_PATH; read as such."
                                % where)
        remote_keys = [key for key in ("REMOTE_SYNC", "REMOTE_USER", "REMOTE_HOST", "REMOTE_PORT") if key in legacy]
        if not remote_keys:
            return
        switch, switch_where = legacy.get("REMOTE_SYNC", ("", path))
        if switch.strip().lower() not in BOOL_WORDS and switch.strip():
            raise ConfigError("%s: REMOTE_SYNC: %r is not a boolean (use yes or no)." % (switch_where, switch))
        names = ", ".join(remote_keys)
        target = self.values["TARGET_SYNC_DIR"]
        if not BOOL_WORDS.get(switch.strip().lower(), False):
            self.notices.append("%s: %s: obsolete osync v1.0 settings, without meaning while REMOTE_SYNC is off; ignored."
                                % (path, names))
            return
        if target.startswith("ssh://"):
            self.notices.append("%s: %s: obsolete osync v1.0 settings; TARGET_SYNC_DIR already names the ssh "
                                "target, so they are ignored." % (path, names))
            return
        host = legacy.get("REMOTE_HOST", ("", path))[0].strip()
        if not host:
            raise ConfigError("%s: REMOTE_SYNC=yes but REMOTE_HOST is not set: set TARGET_SYNC_DIR="
                              "ssh://user@host:port//absolute/path instead." % switch_where)
        if not target:
            return   # reported as "TARGET_SYNC_DIR is not set"
        user = legacy.get("REMOTE_USER", ("", path))[0].strip()
        port = legacy.get("REMOTE_PORT", ("", path))[0].strip()
        uri = "ssh://%s%s%s/%s" % (user + "@" if user else "", "[%s]" % host if ":" in host else host,
                                   ":" + port if port else "", target)
        self.set_from_text("TARGET_SYNC_DIR", uri, switch_where)
        self.warnings.append("%s: %s are osync v1.0 settings: read as TARGET_SYNC_DIR=%s; please write that "
                             "instead." % (path, names, uri))

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
        instance = self.values["INSTANCE_ID"]
        if instance.strip() != instance:
            raise ConfigError("%s: INSTANCE_ID %r starts or ends with a space or line break; remove it (the lock "
                              "and state files are named after it)." % (self.origin["INSTANCE_ID"], instance))
        if not re.match(r"^[A-Za-z0-9_.@+-]+\Z", instance):
            raise ConfigError("%s: INSTANCE_ID %r may only hold letters, digits and _ . @ + -."
                              % (self.origin["INSTANCE_ID"], instance))
        if not self.values["PATH_SEPARATOR_CHAR"]:
            raise ConfigError("PATH_SEPARATOR_CHAR must not be empty.")
        for key in ("SSH_OPTIONAL_ARGS", "RSYNC_OPTIONAL_ARGS"):
            try:
                shlex.split(self.values[key])
            except ValueError as error:
                raise ConfigError("%s: %s: unbalanced quote or trailing backslash (%s) in %s; quote or escape it "
                                  "so that the value splits into arguments."
                                  % (self.origin[key], key, str(error).lower(), self.values[key]))
        problem = rsync_arguments_problem(shlex.split(self.values["RSYNC_OPTIONAL_ARGS"]))
        if problem:
            raise ConfigError("%s: RSYNC_OPTIONAL_ARGS: %s." % (self.origin["RSYNC_OPTIONAL_ARGS"], problem))
        self.check_rsync_program()
        if self.values["PARTIAL"] and not self.values["DELTA_COPIES"]:
            self.notices.append("%s: PARTIAL=yes keeps partly transferred files, but with DELTA_COPIES=no (%s) "
                                "rsync sends whole files and the next run sends them again from the start; set "
                                "DELTA_COPIES=yes to resume them."
                                % (self.origin["PARTIAL"], self.origin["DELTA_COPIES"]))
        for key in ("INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR"):
            value = self.values[key]
            if URL_LIKE.match(value) and not value.startswith("ssh://"):
                raise ConfigError("%s: %s %s is neither a local directory nor an ssh:// target: osync.py reaches "
                                  "a remote replica over ssh only, written ssh://user@host:port//absolute/path."
                                  % (self.origin[key], key, value))
        for key in ("INITIATOR_SYNC_DIR", "TARGET_SYNC_DIR", "SSH_RSA_PRIVATE_KEY", "SSH_PASSWORD_FILE"):
            if self.values[key].startswith("~"):
                self.values[key] = os.path.expanduser(self.values[key])

    def check_rsync_program(self):
        """RSYNC_EXECUTABLE names one program (a name on PATH or a path), RSYNC_REMOTE_PATH
        the directory of rsync on the remote host.  Whether the local program exists is
        checked when the run starts (a refusal, as for every missing tool)."""
        program, where = self.values["RSYNC_EXECUTABLE"], self.origin["RSYNC_EXECUTABLE"]
        if not program.strip():
            raise ConfigError("%s: RSYNC_EXECUTABLE is empty: set it to rsync, or to the path of the rsync program."
                              % where)
        words = program.split()
        if len(words) > 1 and not shutil.which(program) and shutil.which(words[0]):
            raise ConfigError("%s: RSYNC_EXECUTABLE %r holds more than a program: set it to %s and put the rest "
                              "in RSYNC_OPTIONAL_ARGS." % (where, program, words[0]))
        directory = self.values["RSYNC_REMOTE_PATH"]
        remote = self.values["TARGET_SYNC_DIR"].startswith("ssh://")
        if remote and directory and posixpath.basename(directory.rstrip("/")) == posixpath.basename(program):
            self.notices.append("%s: RSYNC_REMOTE_PATH %s is the directory of rsync on the remote host, so the "
                                "remote host runs %s; if %s is the program itself, set RSYNC_REMOTE_PATH to %s."
                                % (self.origin["RSYNC_REMOTE_PATH"], directory, remote_rsync_program(self),
                                   directory, posixpath.dirname(directory.rstrip("/")) or "/"))


# rsync options a user may add -------------------------------------------------------------
# RSYNC_OPTIONAL_ARGS goes to every transfer, right before the source and the destination.
# What osync.py manages itself, or what would break its guarantees (original or final
# content, nothing lost, the state recording what was done), is refused when the config is
# read, before anything is written, each with the reason and what to use instead.
REFUSED_RSYNC_OPTIONS = [
    # (spellings, why it is refused, what to do instead or None)
    (("--inplace", "--append", "--append-verify", "--write-devices"),
     "makes rsync write into the file it replaces, so an interrupted run would leave a mix of old and new "
     "content", None),
    (("--partial", "-P", "--partial-dir"),
     "keeps an interrupted transfer where osync.py does not look for it", "set PARTIAL=yes instead"),
    (("--delete", "--del", "--delete-before", "--delete-during", "--delete-delay", "--delete-after",
      "--delete-excluded", "--delete-missing-args", "--remove-source-files", "--remove-sent-files", "--force"),
     "lets rsync delete files, which osync.py does only itself (into .osync_workdir/deleted)", None),
    (("--backup", "-b", "--backup-dir", "--suffix", "--temp-dir", "-T", "--delay-updates"),
     "is set by osync.py itself: what rsync replaces goes to .osync_workdir/backup, transfers in progress to "
     ".osync_workdir/_tmp", None),
    (("--files-from", "--from0", "-0", "--recursive", "-r", "--no-implied-dirs",
      "--implied-dirs", "--list-only", "--update", "-u", "--existing", "--ignore-non-existing",
      "--ignore-existing", "--max-size", "--min-size", "--size-only", "--compare-dest", "--link-dest",
      "--remote-option", "-M", "--server", "--sender", "--daemon", "--read-batch", "--write-batch",
      "--only-write-batch", "--stop-after", "--stop-at", "--version", "-V", "--help"),
     "changes which files rsync transfers, which osync.py decides and hands to rsync as a list", None),
    (("--dry-run", "-n"), "is a run switch of osync.py", "run osync.py with --dry instead"),
    (("--exclude", "--include", "--filter", "-f", "-F", "--exclude-from", "--include-from", "--cvs-exclude", "-C"),
     "would hide files from rsync but not from osync.py's own scan",
     "use RSYNC_EXCLUDE_PATTERN, RSYNC_INCLUDE_PATTERN, RSYNC_EXCLUDE_FROM or RSYNC_INCLUDE_FROM instead"),
    (("--chmod", "--chown", "--usermap", "--groupmap", "--copy-dirlinks", "-k", "--copy-unsafe-links",
      "--safe-links", "--munge-links", "--iconv"),
     "makes the copy differ from its source, so every run would find it changed again", None),
    (("--rsh", "-e"), "is set by osync.py itself to reach the remote host", "use SSH_OPTIONAL_ARGS instead"),
    (("--rsync-path",), "is set by osync.py itself", "use RSYNC_REMOTE_PATH or RSYNC_EXECUTABLE instead"),
    (("--old-args", "--no-secluded-args", "--no-protect-args", "--no-s"),
     "lets the remote shell split and expand file names", None),
    (("--bwlimit",), "is set by osync.py itself", "use BANDWIDTH instead"),
    (("--compress", "-z"), "is set by osync.py itself", "use RSYNC_COMPRESS instead"),
    (("--whole-file", "-W", "--no-whole-file", "--no-W"), "is set by osync.py itself", "use DELTA_COPIES instead"),
    (("--copy-links", "-L"), "is set by osync.py itself", "use COPY_SYMLINKS instead"),
    (("--keep-dirlinks", "-K"), "is set by osync.py itself", "use KEEP_DIRLINKS instead"),
    (("--hard-links", "-H"), "is set by osync.py itself", "use PRESERVE_HARDLINKS instead"),
    (("--perms", "-p"), "is set by osync.py itself", "use PRESERVE_PERMISSIONS instead"),
    (("--owner", "-o"), "is set by osync.py itself", "use PRESERVE_OWNER instead"),
    (("--group", "-g"), "is set by osync.py itself", "use PRESERVE_GROUP instead"),
    (("--executability", "-E"), "is set by osync.py itself", "use PRESERVE_EXECUTABILITY instead"),
    (("--acls", "-A"), "is set by osync.py itself", "use PRESERVE_ACL instead"),
    (("--xattrs", "-X"), "is set by osync.py itself", "use PRESERVE_XATTR instead"),
    (("--checksum", "-c"), "is set by osync.py itself", "use CHECKSUM instead"),
    (("--archive", "-a"), "turns on options that osync.py sets itself",
     "use PRESERVE_PERMISSIONS, PRESERVE_OWNER and PRESERVE_GROUP instead"),
]
REFUSED_RSYNC_OPTION = dict((spelling, (why, instead)) for spellings, why, instead in REFUSED_RSYNC_OPTIONS
                            for spelling in spellings)
# What osync.py passes and needs: turning it off (--no-times, --no-D...) is refused too.
NEEDED_RSYNC_OPTIONS = ("--links", "-l", "--times", "-t", "-D", "--devices", "--specials", "--ignore-times", "-I",
                        "--relative", "-R", "--secluded-args", "--protect-args", "-s", "--8-bit-output", "-8")
# rsync options whose value may be the next word (--exclude PATTERN), and the short ones
# whose value may follow them in the same word (-T/tmp) or be the next one.
RSYNC_OPTIONS_WITH_VALUE = frozenset((
    "--info", "--debug", "--stderr", "--backup-dir", "--suffix", "--confine-root", "--chmod", "--checksum-choice",
    "--cc",
    "--block-size", "--rsh", "--rsync-path", "--max-delete", "--max-size", "--min-size", "--max-alloc",
    "--partial-dir", "--usermap", "--groupmap", "--chown", "--timeout", "--contimeout", "--modify-window",
    "--temp-dir", "--compare-dest", "--copy-dest", "--link-dest", "--compress-choice", "--zc",
    "--compress-level", "--zl", "--compress-threads", "--zt", "--skip-compress", "--filter", "--exclude",
    "--exclude-from", "--include", "--include-from", "--files-from", "--copy-as", "--address", "--port",
    "--sockopts", "--outbuf", "--remote-option", "--out-format", "--log-format", "--log-file",
    "--log-file-format", "--password-file", "--early-input", "--bwlimit", "--stop-after", "--stop-at",
    "--write-batch", "--only-write-batch", "--read-batch", "--protocol", "--iconv", "--checksum-seed"))
RSYNC_SHORT_OPTIONS_WITH_VALUE = "BeTfM@"


def refused_rsync_option(option, shown):
    """Why `option` (one spelling: --long or -x) may not be in RSYNC_OPTIONAL_ARGS, or None;
    `shown` is how the sentence names it (the option, or it and the word holding it)."""
    if option in REFUSED_RSYNC_OPTION:
        why, instead = REFUSED_RSYNC_OPTION[option]
        return "%s %s; remove it%s" % (shown, why, ", and " + instead if instead else "")
    if option.startswith("--no-"):
        for turned_off in ("--" + option[5:], "-" + option[5:]):
            if turned_off in NEEDED_RSYNC_OPTIONS:
                return "%s turns off %s, which osync.py needs to copy each file as its scan saw it; remove it" % (
                    shown, turned_off)
            if turned_off in REFUSED_RSYNC_OPTION:
                why, instead = REFUSED_RSYNC_OPTION[turned_off]
                return "%s turns off %s, which %s; remove it%s" % (
                    shown, turned_off, why, ", and " + instead if instead else "")
    return None


def rsync_arguments_problem(words):
    """What is wrong with these RSYNC_OPTIONAL_ARGS words, as the end of a sentence, or None.

    Every word must be an option (a stray word would be one more file to copy) or the
    value of the option before it; an option whose value is the next word needs one there
    (else it would take the source directory as its value)."""
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("--") and len(word) > 2:
            option, has_value = word.split("=", 1)[0], "=" in word
            problem = refused_rsync_option(option, option)
            if problem:
                return problem
            if option in RSYNC_OPTIONS_WITH_VALUE and not has_value:
                if index >= len(words):
                    return "%s needs a value: write %s=VALUE" % (option, option)
                index += 1
        elif word.startswith("-") and len(word) > 1:
            for position, letter in enumerate(word[1:], 1):
                shown = "-" + letter if len(word) == 2 else "-%s (in %s)" % (letter, word)
                problem = refused_rsync_option("-" + letter, shown)
                if problem:
                    return problem
                if letter in RSYNC_SHORT_OPTIONS_WITH_VALUE:
                    if position == len(word) - 1:
                        if index >= len(words):
                            return "-%s needs a value: write -%s VALUE" % (letter, letter)
                        index += 1
                    break
        else:
            return ("%r is not an option: rsync would take it as one more file to copy; RSYNC_OPTIONAL_ARGS holds "
                    "rsync options only" % word)
    return None


def remote_rsync_program(cfg):
    """The rsync the remote host runs: RSYNC_EXECUTABLE, or its program name in the
    directory RSYNC_REMOTE_PATH when that is set (RSYNC_EXECUTABLE may be a local path)."""
    program = cfg["RSYNC_EXECUTABLE"]
    if cfg["RSYNC_REMOTE_PATH"]:
        return posixpath.join(cfg["RSYNC_REMOTE_PATH"], posixpath.basename(program))
    return program


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"[0-9]+", text))


# Pattern files ----------------------------------------------------------------------------

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
        try:   # the filter's own translation (Entries and scan), so a bad pattern fails at load time
            pattern_to_regex(pattern)
        except re.error as error:
            raise ConfigError("Pattern %r is not valid: %s." % (pattern, error))
    return includes + excludes if cfg["RSYNC_PATTERN_FIRST"] == "include" else excludes + includes


# ======================================================================================
# Output
# ======================================================================================
# Levels, the time prefix, the log file, the screen switches, and the warning/error
# counts that decide the exit code.  Any name reaches the screen and the log under any
# locale: a name's undecodable bytes (surrogate escapes) are written as those bytes, and
# a character the screen's encoding lacks as a backslash escape.  A closed or broken
# screen stream (`| head`) is dropped quietly and the run goes on.

VERBOSE = 15
NOTICE = 20
ALWAYS = 25
# The levels whose lines carry their name, as osync writes it: PREFIX(WARN):message.
# They stay here, not registered in `logging`, so importing osync.py changes nothing
# for the program that imports it.
LEVEL_TAGS = {VERBOSE: "VERBOSE", logging.WARNING: "WARN", logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}
LOG_MESSAGE_LIMIT = 16384
# The syslog priority of each level, as journald reads it from a "<N>" line prefix.
JOURNAL_PRIORITIES = {logging.DEBUG: 7, VERBOSE: 6, NOTICE: 6, ALWAYS: 5, logging.WARNING: 4,
                      logging.ERROR: 3, logging.CRITICAL: 2}
HIDDEN_SECRET = "[hidden]"
# The keys whose values never appear in a log line, a mail or a run report.
SECRET_KEYS = ("SMTP_USER", "SMTP_PASSWORD", "_REMOTE_TOKEN")
SECRET_SHORTEST = 3   # a shorter value is left alone: replacing it would garble every line


def secret_values(cfg):
    """The values of SECRET_KEYS in this config that lines must not show, longest first."""
    values = set(cfg[key] for key in SECRET_KEYS if len(cfg[key]) >= SECRET_SHORTEST)
    return sorted(values, key=len, reverse=True)


def hide_secrets(text, secrets):
    """`text` with every secret (a password, a token) replaced, longest first."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, HIDDEN_SECRET)
    return text


def journal_stream(stream_fd):
    """Is this file descriptor systemd's journal stream?  systemd says so in JOURNAL_STREAM
    (device:inode of the stream it connected); a stream redirected elsewhere is not."""
    wanted = os.environ.get("JOURNAL_STREAM", "")
    if stream_fd is None or not wanted:
        return False
    try:
        info = os.fstat(stream_fd)
    except OSError:
        return False
    return wanted == "%d:%d" % (info.st_dev, info.st_ino)


class LineFormatter(logging.Formatter):
    """osync's line format: PREFIX(LEVEL):message, or PREFIX message for notices.  Under
    systemd's journal (journal=True) each line starts with its syslog priority instead of
    the time prefix, since the journal stamps every line itself."""

    def __init__(self, output, colour=False, journal=False):
        logging.Formatter.__init__(self)
        self.output = output
        self.colour = colour and not journal
        self.journal = journal

    def format(self, record):
        line = self.plain_format(record)
        if not self.journal:
            return line
        priority = "<%d>" % JOURNAL_PRIORITIES.get(record.levelno, 6)
        return "\n".join(priority + part for part in line.split("\n"))

    def plain_format(self, record):
        message = hide_secrets(record.getMessage(), self.output.secrets)
        if len(message) > LOG_MESSAGE_LIMIT:
            message = message[:LOG_MESSAGE_LIMIT] + " [...]"
        if getattr(record, "bare", False):
            return message
        prefix = "" if self.journal else self.output.prefix(record.created)
        if record.levelno in LEVEL_TAGS:
            line = "%s(%s):%s" % (prefix, LEVEL_TAGS[record.levelno], message)
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


def screen_bytes(text, encoding):
    """`text` encoded for a screen stream: never fails, whatever the name or locale."""
    try:
        return text.encode(encoding, "surrogateescape")
    except (UnicodeEncodeError, LookupError):
        pass
    parts = []
    for char in text:
        try:
            parts.append(char.encode(encoding, "surrogateescape"))
        except (UnicodeEncodeError, LookupError):
            parts.append(char.encode("ascii", "backslashreplace"))
    return b"".join(parts)


class ScreenHandler(logging.Handler):
    """Writes lines to stdout or stderr by file descriptor, unbuffered, so nothing is left
    for Python to flush at exit; the first write that fails (EPIPE, EBADF) drops the stream."""

    def __init__(self, stream):
        logging.Handler.__init__(self, logging.DEBUG)
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            self.fd = stream.fileno()
            os.fstat(self.fd)
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            self.fd = None   # started with the stream closed
        self.progress = None   # the ProgressLine shown on this stream's terminal, if any

    def emit(self, record):
        if self.fd is None:
            return
        if self.progress is not None:
            self.progress.clear()   # the line goes where the progress line was
        data = screen_bytes(self.format(record) + "\n", self.encoding)
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self.fd = None

    def handleError(self, record):
        """Never print logging's own traceback: a line that cannot be shown is dropped."""


class LogFileHandler(logging.StreamHandler):
    """The log file: names as their bytes; a line that cannot be encoded is written escaped."""

    def handleError(self, record):
        try:
            text = self.format(record).encode("utf-8", "backslashreplace").decode("utf-8")
            self.stream.write(text + self.terminator)
            self.flush()
        except Exception:
            pass   # a log file that cannot be written any more: the screen still has the line


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


class ProgressLine(object):
    """One line on a terminal that each update overwrites (carriage return, erase to the
    end of the line); never written to the log.  Shown only on a terminal, so never
    under cron or systemd, and only while the screen shows notices."""

    def __init__(self, output, handler):
        self.output = output
        self.handler = handler
        self.shown = False
        self.last_update = 0.0
        self.phase = None

    def enabled(self):
        output = self.output
        return self.handler.fd is not None and not output.silent and not output.errors_only

    def update(self, text, force=False):
        """Show `text` (cut to the terminal's width): the first line of a new phase (the
        words before the colon) at once, then at most ten updates a second."""
        now = time.time()
        phase = text.split(":", 1)[0]
        if not self.enabled():
            return
        if not force and phase == self.phase and now - self.last_update < 0.1:
            return
        self.last_update = now
        self.phase = phase
        try:
            width = os.get_terminal_size(self.handler.fd).columns
        except OSError:
            width = 0
        if width <= 0:
            width = 80   # a terminal that does not say its size
        self._write("\r" + printable(text, 2000)[:max(width - 1, 10)] + "\033[K")
        self.shown = True

    def clear(self):
        if self.shown:
            self.shown = False
            self._write("\r\033[K")

    def _write(self, text):
        data = screen_bytes(text, self.handler.encoding)
        try:
            while data:
                data = data[os.write(self.handler.fd, data):]
        except OSError:
            self.handler.fd = None


class Output(object):
    """The run's logger: screen, log file, prefix, switches and exit code."""

    def __init__(self):
        self.start = time.time()
        self.silent = False
        self.errors_only = False
        self.screen_threshold = NOTICE
        self.prefix_mode = "time"
        self.logfile = None
        self.secrets = []          # values no line may show (see add_secret)
        self.report = None         # the RunReport written when the run ends, once there is one
        self.logger = logging.Logger(PROGRAM, logging.DEBUG)
        self.counter = CountingHandler()
        self.logger.addHandler(self.counter)
        self.pending = []          # records logged before the log file is known
        self.progress_line = None  # on stdout when it is a terminal
        screens = []
        for stream, errors in ((sys.stdout, False), (sys.stderr, True)):
            handler = ScreenHandler(stream)
            journal = journal_stream(handler.fd)
            handler.setFormatter(LineFormatter(self, colour=self._is_tty(stream), journal=journal))
            handler.addFilter(ScreenFilter(self, errors))
            self.logger.addHandler(handler)
            screens.append(handler)
        if self._is_terminal(screens[0].fd):
            self.progress_line = ProgressLine(self, screens[0])
            for handler in screens:
                handler.progress = self.progress_line
        self.file_handler = None
        self.logger.addHandler(_PendingHandler(self))

    @staticmethod
    def _is_terminal(fd):
        try:
            return fd is not None and os.isatty(fd)
        except OSError:
            return False

    def add_secret(self, value):
        """Hide `value` (a password, a token) from every line written from now on."""
        if value and len(value) >= SECRET_SHORTEST and value not in self.secrets:
            self.secrets.append(value)
            self.secrets.sort(key=len, reverse=True)

    def progress(self, text, force=False):
        """Show `text` on the terminal's progress line, if there is one."""
        if self.progress_line is not None:
            self.progress_line.update(text, force)

    def progress_done(self):
        if self.progress_line is not None:
            self.progress_line.clear()

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
            handler = LogFileHandler(stream)
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

    def trace(self, text):
        """Write `text` (a traceback) to the log file only, whatever the log level."""
        record = self.logger.makeRecord(self.logger.name, logging.ERROR, __file__, 0, text, None, None,
                                        extra={"bare": False})
        if self.file_handler is not None:
            self.file_handler.handle(record)
        elif self.pending is not None:
            self.pending.append(record)

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


# Characters that move the cursor, recolour or reorder what a terminal shows, besides
# the C0/C1 controls: line and paragraph separators, zero-width and bidi controls.
INVISIBLE_CHARACTERS = frozenset([0x2028, 0x2029, 0xfeff] + list(range(0x200b, 0x2010)) +
                                 list(range(0x202a, 0x202f)) + list(range(0x2066, 0x206a)))


def printable(text, limit=500):
    """Text from elsewhere (a remote agent's error, a process's stderr) as it may reach
    the screen and the log: one line, no terminal escapes, at most about `limit` chars.
    Controls become \\xNN (\\uNNNN), a byte that is not UTF-8 (a surrogate) \\xNN."""
    if not isinstance(text, str):
        text = repr(text)
    pieces = []
    length = 0
    for char in text:
        code = ord(char)
        if 0xdc80 <= code <= 0xdcff:
            char = "\\x%02x" % (code - 0xdc00)
        elif code < 0x20 or 0x7f <= code <= 0x9f:
            char = "\\x%02x" % code
        elif 0xd800 <= code <= 0xdfff or code in INVISIBLE_CHARACTERS:
            char = "\\u%04x" % code
        pieces.append(char)
        length += len(char)
        if length > limit:
            pieces.append(" [...]")
            break
    return "".join(pieces)


def one_line(text, limit=2000):
    """A command's multi-line complaint (stderr) as one printable line; its end is kept,
    since that is where the reason is."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return printable(" / ".join(lines)[-limit:], limit)


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

# Children die with osync.py: on Linux each child asks the kernel for SIGTERM when its
# parent dies (PR_SET_PDEATHSIG); elsewhere a small watcher process, fed the process
# groups of the running children through a pipe, stops them when the pipe closes without
# a goodbye.  So nothing osync.py started goes on writing once it is gone (kill -9
# included), and the pids are recorded in the lock for the run that takes it over.

PR_SET_PDEATHSIG = 1
LIFELINE_CODE = r"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:
    word = line.strip()
    if word == "bye":
        sys.exit(0)
    if word[:1] in "+-" and word[1:].isdigit():
        (groups.add if word[0] == "+" else groups.discard)(int(word[1:]))
for sig in (signal.SIGTERM, signal.SIGKILL):
    for group in groups:
        try:
            os.killpg(group, sig)
        except OSError:
            pass
    time.sleep(2)
"""


class Children(object):
    """The children osync.py has running, and the means to take them down with it."""

    def __init__(self):
        self.running = {}         # pid -> Popen
        self.prctl = None
        self.lifeline = None
        self.loaded = False
        self.on_change = None     # called with the running pids whenever they change

    def _load(self):
        self.loaded = True
        if sys.platform.startswith("linux") and not os.environ.get("_OSYNC_LIFELINE"):
            try:
                import ctypes
                self.prctl = ctypes.CDLL(None, use_errno=True).prctl
                return
            except (ImportError, OSError, AttributeError):
                self.prctl = None
        try:
            self.lifeline = subprocess.Popen([sys.executable, "-c", LIFELINE_CODE], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True, universal_newlines=True)
        except OSError:
            self.lifeline = None

    def _tell(self, word):
        try:
            self.lifeline.stdin.write(word + "\n")
            self.lifeline.stdin.flush()
        except (OSError, ValueError):
            pass

    def start(self, argv, **options):
        """subprocess.Popen in a new session (so a stop kills the child's whole group),
        tied to this process's life."""
        if not self.loaded:
            self._load()
        parent = os.getpid()
        prctl = self.prctl

        def die_with_parent():
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                if os.getppid() != parent:   # the parent died before the request
                    os._exit(1)
        process = subprocess.Popen(argv, start_new_session=True,
                                   preexec_fn=die_with_parent if prctl is not None else None, **options)
        self.running[process.pid] = process
        if self.lifeline is not None:
            self._tell("+%d" % process.pid)
        self._changed()
        return process

    def _changed(self):
        if self.on_change is not None:
            self.on_change(sorted(self.running))

    def pids(self):
        """The pids of the children still running."""
        for pid, process in list(self.running.items()):
            if process.poll() is not None:
                self.ended(process)
        return sorted(self.running)

    def ended(self, process):
        if self.running.pop(process.pid, None) is not None:
            if self.lifeline is not None:
                self._tell("-%d" % process.pid)
            self._changed()

    def close(self):
        """A clean end: the watcher leaves alone whatever is still registered."""
        if self.lifeline is not None:
            self._tell("bye")
            try:
                self.lifeline.stdin.close()
                self.lifeline.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self.lifeline = None


CHILDREN = Children()


@contextlib.contextmanager
def waiting_for(process):
    """While the caller waits for a child: a stop on the way (a signal, a time limit, a
    bug) kills the child's whole process group before it goes on up; a child that has
    ended leaves the children list."""
    try:
        yield process
    except BaseException:
        kill_process_group(process, grace=2.0)
        raise
    finally:
        if process.poll() is not None:
            CHILDREN.ended(process)


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
            wait_for_group_to_end(process.pid, GROUP_EXIT_GRACE)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever the leader left behind
            except OSError:
                pass
            return


GROUP_EXIT_GRACE = 5.0  # seconds the rest of a group may take to end after its leader did


def wait_for_group_to_end(group, grace):
    """Give the rest of a stopped leader's group up to `grace` seconds to end by itself.

    rsync's receiver is a second process: after the leader exits on SIGTERM it still moves
    the partly received file into the partial dir (measured: up to two seconds later), and
    a SIGKILL then would lose it."""
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except OSError:
            return  # nobody left in the group
        time.sleep(0.05)


def run_command(argv, timeout=None, stdin_data=None, env=None, cwd=None):
    """Run argv; return (exit code, stdout text, stderr text).  Exit code 127: not found.

    A StopRun (signal or time limit) arriving meanwhile kills the command and propagates."""
    try:
        process = CHILDREN.start(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    except OSError as error:
        return 127, "", "%s: %s" % (argv[0], error.strerror)
    with waiting_for(process):
        try:
            out, err = process.communicate(stdin_data, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_group(process)
            out, err = process.communicate()
            return -1, out.decode("utf-8", "replace"), \
                err.decode("utf-8", "replace") + "\n(killed after %ss)" % timeout
    return process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def run_command_watched(argv, on_line):
    """Run argv like run_command, handing each line of its stdout (ended by a newline or
    a carriage return, as progress output is) to `on_line` as it comes; the lines for
    which on_line returns True are left out of the stdout text returned."""
    stderr_file = tempfile.TemporaryFile()
    try:
        try:
            process = CHILDREN.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file)
        except OSError as error:
            return 127, "", "%s: %s" % (argv[0], error.strerror)
        kept = []
        pending = b""
        with waiting_for(process), process.stdout:
            while True:
                data = os.read(process.stdout.fileno(), 65536)
                if not data:
                    break
                pieces = re.split(b"[\r\n]", pending + data)
                pending = pieces.pop()
                for piece in pieces:
                    line = piece.decode("utf-8", "replace")
                    if line.strip() and not on_line(line):
                        kept.append(line)
            if pending.strip():
                kept.append(pending.decode("utf-8", "replace"))
            process.wait()
        stderr_file.seek(0)
        return process.returncode, "\n".join(kept), stderr_file.read().decode("utf-8", "replace")
    finally:
        stderr_file.close()


def read_tail(stderr_file, limit=600):
    """The last lines a process wrote to its stderr file, as one line."""
    try:
        stderr_file.seek(0, os.SEEK_END)
        stderr_file.seek(max(0, stderr_file.tell() - 65536))   # however much was written
        text = stderr_file.read().decode("utf-8", "surrogateescape")
    except (OSError, ValueError):
        return ""
    return one_line(text, limit)


# Hook commands (LOCAL_/REMOTE_RUN_BEFORE/AFTER_CMD) are shell command lines, as osync
# v1.3 eval'd them in bash: they are the one place where osync.py runs a shell string,
# because the user wrote it for a shell.  How much of their output is kept for the log:
HOOK_OUTPUT_LIMIT = 16384


def hook_shell():
    """The shell a hook command line is given to: bash, as osync v1.3 ran it, else sh."""
    return shutil.which("bash") or "/bin/sh"


def run_shell_command(command, timeout, hung_up=None):
    """Run a hook's command line; return (exit code, killed at the limit, output).

    stdout and stderr go to one temp file, and only the shell itself is waited for, so a
    job the command leaves in the background does not hold the run (as under osync).  At
    `timeout` seconds (0: none), or as soon as `hung_up()` says that nobody waits for the
    answer any more, the command's whole process group is killed, children included.  The
    output kept is its last HOOK_OUTPUT_LIMIT bytes."""
    with tempfile.TemporaryFile() as output:
        try:
            process = CHILDREN.start([hook_shell(), "-c", command], stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT)
        except OSError as error:
            return 127, False, "%s: %s" % (hook_shell(), error.strerror)
        killed = False
        deadline = time.time() + timeout if timeout else None
        with waiting_for(process):
            while process.poll() is None:
                if deadline is not None and time.time() >= deadline:
                    killed = True
                    kill_process_group(process, grace=2.0)
                elif hung_up is not None and hung_up():
                    kill_process_group(process, grace=2.0)
                else:
                    try:
                        process.wait(timeout=0.5 if deadline is None else min(0.5, deadline - time.time()))
                    except subprocess.TimeoutExpired:
                        pass
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - HOOK_OUTPUT_LIMIT))
        text = output.read(HOOK_OUTPUT_LIMIT).decode("utf-8", "surrogateescape")
    if size > HOOK_OUTPUT_LIMIT:
        text = "[... the first %d bytes of output are not shown]\n%s" % (size - HOOK_OUTPUT_LIMIT, text)
    return process.returncode, killed, text


def ignore_late_signal(signum, frame):
    """The handler of stop signals once a stop is under way.  Unlike SIG_IGN it lets a
    signal that was already pending when it was set pass quietly, where Python would print
    "Signal N ignored due to race condition" with a traceback (SIGTERM and SIGINT at once)."""


class Watchdog(object):
    """Soft and hard run-time limits, 'still running' lines, and clean stops on signals.

    A one-second interval timer checks the limits; SIGTERM, SIGINT, SIGHUP and SIGQUIT
    raise StopRun in the main thread so the run unwinds: children killed, locks released,
    state left consistent."""

    def __init__(self, output, soft, hard, keep_logging, on_limit=None):
        self.output = output
        self.soft = soft
        self.hard = hard
        self.keep_logging = keep_logging
        # Called with "soft" or "hard" as the run passes a limit (the alert mail); it must
        # return at once: it runs in the signal handler, before the hard limit's stop.
        self.on_limit = on_limit
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
                signal.signal(sig, ignore_late_signal)  # one clean stop; a second signal is not needed
        raise StopRun("Stopped by signal %s; the next run continues where this one stopped."
                      % signal.Signals(signum).name)

    def _on_tick(self, signum, frame):
        elapsed = time.time() - self.start
        if self.hard and elapsed >= self.hard:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._tell_limit("hard")
            raise StopRun("Max hard execution time [%d] exceeded; stopping the run. "
                          "The next run continues where this one stopped." % self.hard, level="ERROR")
        if self.soft and elapsed >= self.soft and not self.soft_warned:
            self.soft_warned = True
            self.output.warn("Max soft execution time [%d] exceeded; the run goes on." % self.soft)
            self._tell_limit("soft")
        if self.keep_logging and time.time() - self.last_keep >= self.keep_logging:
            self.last_keep = time.time()
            self.output.notice("Still running after %d seconds." % elapsed)

    def _tell_limit(self, limit):
        if self.on_limit is not None:
            self.on_limit(limit)


# Other processes: is a pid alive, when did it start, what is it running (lock takeover).

def process_stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (state first), None where
    there is no /proc or no such process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rpartition(b")")[2].split()
    except OSError:
        return None


def pid_alive(pid):
    """Is a process with this pid running on this host (a zombie is not)?"""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = process_stat_fields(pid)
    return fields is None or fields[:1] != [b"Z"]


def boot_id():
    """What tells this boot of the host from the others ("-" where it cannot be known)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            return handle.read(64).decode("ascii", "replace").strip() or "-"
    except OSError:
        return "-"


def process_start_time(pid):
    """When a process started (clock ticks since boot, from /proc), to tell it from a later
    process that got the same pid; "" where it cannot be known."""
    fields = process_stat_fields(pid)
    try:
        return fields[19].decode("ascii")
    except (TypeError, IndexError, UnicodeDecodeError):
        return ""


def process_command_line(pid):
    """The argv of a running process, from /proc; None where it cannot be known."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            argv = [os.fsdecode(part) for part in handle.read().split(b"\0") if part]
        if not argv:   # a kernel thread or a zombie: only its name is left
            with open("/proc/%d/comm" % pid, "rb") as handle:
                argv = ["[%s]" % os.fsdecode(handle.read().strip())]
        return argv
    except OSError:
        return None


def looks_like_osync(argv):
    """Is this the command line of osync.py (or osync.sh, osync-batch.py, a Python that
    imports osync), under whatever interpreter?"""
    return any("osync" in os.path.basename(part) for part in argv[:4])


# How to install a package, by the package manager found first: (program, command).
PACKAGE_MANAGERS = (("apt-get", "apt install"), ("dnf", "dnf install"), ("yum", "yum install"),
                    ("zypper", "zypper install"), ("pacman", "pacman -S"), ("apk", "apk add"),
                    ("brew", "brew install"), ("pkg", "pkg install"))
# Package names that differ from the program's, where they do: {manager: {program: package}}.
PACKAGE_NAMES = {"apt-get": {"ssh": "openssh-client", "inotifywait": "inotify-tools"},
                 "dnf": {"ssh": "openssh-clients", "inotifywait": "inotify-tools"},
                 "yum": {"ssh": "openssh-clients", "inotifywait": "inotify-tools"},
                 "zypper": {"ssh": "openssh-clients", "inotifywait": "inotify-tools"},
                 "pacman": {"ssh": "openssh", "inotifywait": "inotify-tools"},
                 "apk": {"ssh": "openssh-client", "inotifywait": "inotify-tools"},
                 "brew": {"inotifywait": "fswatch"},
                 "pkg": {"ssh": "openssh", "inotifywait": "inotify-tools"}}


def install_hint(program):
    """How to install `program` on this host ("apt install rsync"), or "install PROGRAM"
    where no known package manager is found."""
    for manager, command in PACKAGE_MANAGERS:
        if shutil.which(manager):
            return "%s %s" % (command, PACKAGE_NAMES.get(manager, {}).get(program, program))
    return "install %s" % program


def current_user():
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


# ======================================================================================
# Entries and scan
# ======================================================================================
# What a scan saw of each path (Entry), the canonical path order, the include/exclude
# filter, and the walk that yields a replica's entries in that order without ever holding
# the whole tree.

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


# Every field of an Entry in its order, with its default: the one list that the class,
# the state lines, the wire form and the checks of what an agent sends derive from.
# The whole numbers are the lstat figures (nlink: how many hard links a file has, 0 for
# anything else); link, digest and error are texts; acl and xattr are fingerprints of the
# ACL and extended attribute sets (see attribute_fingerprints).
ENTRY_FIELDS = (("path", None), ("kind", None), ("size", 0), ("mtime_ns", 0), ("mode", 0), ("uid", 0),
                ("gid", 0), ("ino", 0), ("ctime_ns", 0), ("link", ""), ("digest", ""), ("error", ""),
                ("nlink", 0), ("acl", ""), ("xattr", ""))


class Entry(collections.namedtuple("Entry", [name for name, _ in ENTRY_FIELDS])):
    """What a scan saw of one path: kind f(ile), d(ir), l(ink) or s(pecial: a device,
    fifo or socket), size, times, attributes.

    `error` is set when the item could not be read (an unreadable directory, a broken
    link with COPY_SYMLINKS) and on every special file: the planner then leaves the path
    and its subtree alone."""
    __slots__ = ()


# Python 3.6's namedtuple takes no defaults= argument.
Entry.__new__.__defaults__ = tuple(default for _, default in ENTRY_FIELDS[2:])


def to_wire(entry):
    """An Entry as a JSON-able list (None stays None)."""
    return None if entry is None else list(entry)


def from_wire(data):
    """The Entry a to_wire() list stands for."""
    return None if data is None else Entry(*data)


KIND_NAMES = {"f": "file", "d": "directory", "l": "symlink", "s": "special file"}

# The note of an Entry of kind "s" (a device, fifo or socket: never synced, see make_entry).
SPECIAL_FILE_NOTE = "a %s, and devices, fifos and sockets are not synced"


def special_file_name(mode):
    """What a device, fifo or socket is, in words."""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def only_special_files(entries):
    """Are the entries with an error (of the paths a scan could not sync) all devices,
    fifos or sockets, left alone as a rule rather than because something failed?"""
    troubled = [entry for entry in entries if entry is not None and entry.error]
    return bool(troubled) and all(entry.kind == "s" for entry in troubled)


# What os.fsencode() does to a str, looked up once instead of on every call: path_key and
# the sort of a directory listing run once per path of a tree.
FS_ENCODING = sys.getfilesystemencoding()
FS_ENCODE_ERRORS = sys.getfilesystemencodeerrors()


def path_key(path):
    """Sort key of the canonical order: components compared as bytes, parent first.

    Mapping "/" to NUL (which no name contains) makes plain byte order equal to a
    depth-first walk with siblings sorted by their bytes."""
    return path.encode(FS_ENCODING, FS_ENCODE_ERRORS).replace(b"/", b"\0")


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


# ACLs and extended attributes ------------------------------------------------------------
# With PRESERVE_ACL / PRESERVE_XATTR the scan records a fingerprint of each item's ACL set
# and of its extended attribute set, so that a change of either alone is seen and synced
# while the state stays small; with both off the scan makes no xattr call at all.  An
# empty fingerprint means "not tracked" (the setting was off, or ACLs of a link) and
# ATTRIBUTES_UNSUPPORTED "this filesystem cannot hold them": neither is read as a change.
# On Linux the ACLs are the xattrs system.posix_acl_access and (directories)
# system.posix_acl_default; the values travel as they are, as rsync -A -X sends them.

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
ATTRIBUTES_UNSUPPORTED = "-"
ATTRIBUTE_FINGERPRINT_SIZE = 10
UNSUPPORTED_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOTSUP", "EOPNOTSUPP") if hasattr(errno, name))
ENODATA = getattr(errno, "ENODATA", getattr(errno, "ENOATTR", 61))
RSYNC_PRIVATE_XATTRS = "user.rsync.%"   # rsync's own (--fake-super): a single -X never copies them
XATTR_PROBE_NAME = "user.osync.probe"
ATTRIBUTE_BYTES_LIMIT = 256 * 1024       # the values of one set of one item (Linux: 64 KiB a value)
ATTRIBUTE_COUNT_LIMIT = 4096             # names in one set

# st_dev -> whether that filesystem takes user.* xattrs, probed once per process on the
# first item without any xattr (listxattr answers an empty list even where none can be set).
_user_xattr_support = {}


def acl_names(kind):
    """The xattrs that hold an item's POSIX ACLs; links have none."""
    if kind == "d":
        return (ACL_ACCESS, ACL_DEFAULT)
    if kind == "f":
        return (ACL_ACCESS,)
    return ()


def xattr_synced(name, all_namespaces):
    """Is `name` one of the xattrs rsync -X copies?  As root every namespace but system.*
    (the ACLs, which are -A's); otherwise user.* only (rsync's man page); never rsync's
    own user.rsync.%* names.  `all_namespaces` holds only when both replicas run as root:
    what one side could not set would otherwise differ on every run."""
    if name.startswith(RSYNC_PRIVATE_XATTRS):
        return False
    if all_namespaces:
        return not name.startswith("system.")
    return name.startswith("user.")


def read_acls(abs_path, kind):
    """[(name, value bytes)] of the ACL xattrs an item has (a link shown as its target,
    with COPY_SYMLINKS, has the target's)."""
    pairs = []
    for name in acl_names(kind):
        try:
            pairs.append((name, os.getxattr(abs_path, name)))
        except OSError as error:
            if error.errno != ENODATA:
                raise
    return pairs


def read_xattrs(abs_path, kind, device, options):
    """[(name, value bytes)] of the synced xattrs of an item, sorted by name; a link's own,
    never its target's.  Raises OSError(EOPNOTSUPP) where the filesystem holds none."""
    if not hasattr(os, "listxattr"):
        raise OSError(errno.EOPNOTSUPP, "extended attributes are not supported here")
    follow = kind != "l"
    names = os.listxattr(abs_path, follow_symlinks=follow)
    all_namespaces = bool(options.get("xattr_all"))
    pairs = []
    for name in sorted(names, key=os.fsencode):
        if not xattr_synced(name, all_namespaces):
            continue
        try:
            pairs.append((name, os.getxattr(abs_path, name, follow_symlinks=follow)))
        except OSError as error:
            if error.errno != ENODATA:   # removed since the listing: not there
                raise
    if not names and follow and not user_xattrs_supported(abs_path, device):
        raise OSError(errno.EOPNOTSUPP, "extended attributes are not supported here")
    return pairs


def user_xattrs_supported(abs_path, device):
    """Does the filesystem of abs_path (st_dev `device`) take user.* xattrs?"""
    if device not in _user_xattr_support:
        try:
            os.getxattr(abs_path, XATTR_PROBE_NAME)
            supported = True
        except OSError as error:
            if error.errno not in UNSUPPORTED_ERRNOS and error.errno != ENODATA:
                return True   # not known (no permission): assume it does, ask again later
            supported = error.errno == ENODATA
        _user_xattr_support[device] = supported
    return _user_xattr_support[device]


def attribute_fingerprint(pairs):
    """A short hex digest of a set of (name, value bytes): equal sets, equal digests."""
    digest = hashlib.blake2b(digest_size=ATTRIBUTE_FINGERPRINT_SIZE)
    for name, value in sorted(pairs, key=lambda pair: os.fsencode(pair[0])):
        encoded = os.fsencode(name)
        digest.update(struct.pack(">II", len(encoded), len(value)) + encoded + value)
    return digest.hexdigest()


def read_attribute_sets(abs_path, kind, device, options, acl, xattr):
    """(ACL pairs, xattr pairs) of an item, each None where not wanted or not tracked,
    ATTRIBUTES_UNSUPPORTED where the filesystem cannot hold them."""
    acls = xattrs = None
    if acl and kind in ("f", "d"):
        acls = _attribute_set(read_acls, abs_path, kind)
    if xattr and kind in ("f", "d", "l"):
        xattrs = _attribute_set(read_xattrs, abs_path, kind, device, options)
    return acls, xattrs


def _attribute_set(reader, *args):
    try:
        return reader(*args)
    except OSError as error:
        if error.errno in UNSUPPORTED_ERRNOS:
            return ATTRIBUTES_UNSUPPORTED
        if error.errno in (errno.EACCES, errno.EPERM):
            return None   # this user may not read them: not tracked (rsync cannot copy them either)
        raise


def attribute_fingerprints(abs_path, kind, info, options):
    """(acl, xattr) fingerprints of an item for its Entry, "" where not tracked."""
    if not options.get("acl") and not options.get("xattr"):
        return "", ""
    fingerprints = []
    for pairs in read_attribute_sets(abs_path, kind, info.st_dev, options, options.get("acl"), options.get("xattr")):
        if pairs is None:
            fingerprints.append("")
        elif pairs == ATTRIBUTES_UNSUPPORTED:
            fingerprints.append(ATTRIBUTES_UNSUPPORTED)
        else:
            fingerprints.append(attribute_fingerprint(pairs))
    return tuple(fingerprints)


def attribute_values_to_wire(pairs):
    """[(name, bytes)] as JSON-able [name, base64 text] lists."""
    return [[name, base64.b64encode(value).decode("ascii")] for name, value in pairs]


def attribute_values_from_wire(values):
    """The [(name, bytes)] that attribute_values_to_wire made."""
    return [(name, base64.b64decode(value.encode("ascii"))) for name, value in values]


def apply_acls(abs_path, kind, pairs):
    """Give an item exactly the ACLs `pairs` (absent ones removed)."""
    wanted = dict(pairs)
    for name in wanted:
        if name not in acl_names(kind):
            raise OSError(errno.EINVAL, "%s is not an ACL of a %s" % (name, KIND_NAMES.get(kind, "item")))
    for name in acl_names(kind):
        if name in wanted:
            os.setxattr(abs_path, name, wanted[name])
        else:
            _remove_xattr(abs_path, name, True)


def apply_xattrs(abs_path, kind, pairs, options):
    """Give an item exactly the synced xattrs `pairs`: those it has that are not among
    them are removed; a link's own, never its target's."""
    all_namespaces = bool(options.get("xattr_all"))
    follow = kind != "l"
    wanted = dict(pairs)
    for name in wanted:
        if not xattr_synced(name, all_namespaces):
            raise OSError(errno.EPERM, "%s is not an extended attribute this replica syncs" % name)
    for name in os.listxattr(abs_path, follow_symlinks=follow):
        if xattr_synced(name, all_namespaces) and name not in wanted:
            _remove_xattr(abs_path, name, follow)
    for name, value in sorted(wanted.items()):
        os.setxattr(abs_path, name, value, follow_symlinks=follow)


def _remove_xattr(abs_path, name, follow):
    try:
        os.removexattr(abs_path, name, follow_symlinks=follow)
    except OSError as error:
        if error.errno != ENODATA:
            raise


ACL_TAGS = {0x01: "user::", 0x02: "user:%d:", 0x04: "group::", 0x08: "group:%d:", 0x10: "mask::",
            0x20: "other::"}


def shown_acls(pairs):
    """ACL xattr values as getfacl would show them, for a notice."""
    shown = []
    for name, value in pairs:
        entries = []
        for offset in range(4, len(value) - 7, 8):
            tag, permissions, owner = struct.unpack_from("<HHI", value, offset)
            bits = "".join(letter if permissions & bit else "-" for letter, bit in (("r", 4), ("w", 2), ("x", 1)))
            label = ACL_TAGS.get(tag, "tag %d:" % tag)
            entries.append((label % owner if "%d" in label else label) + bits)
        shown.append("%s %s" % ("default" if name == ACL_DEFAULT else "access", ",".join(entries)))
    return "; ".join(shown) if shown else "none (the mode only)"


def shown_xattrs(pairs):
    """xattr names and values, for a notice."""
    if not pairs:
        return "none"
    return ", ".join("%s=%s" % (name, printable(value.decode("utf-8", "backslashreplace"), 80))
                     for name, value in pairs)


# The walk --------------------------------------------------------------------------------

# A test hook: with _OSYNC_DIGEST_LOG set to a file name, every digest appends the path
# it read to that file, so that tests can check which files a run read (nothing else
# reads the contents of a replica's files).
DIGEST_LOG_VARIABLE = "_OSYNC_DIGEST_LOG"


def file_digest(path):
    """The CHECKSUM digest of a file's content (blake2b, 160 bits, in hex)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    log_path = os.environ.get(DIGEST_LOG_VARIABLE)
    if log_path:
        with open(log_path, "ab") as log:
            log.write(os.fsencode(path) + b"\n")
    return digest.hexdigest()


def digest_still_valid(recorded, now):
    """May the digest the state recorded for a file stand for its content now, without
    reading it again?

    Size and mtime alone are not enough: CHECKSUM exists for the file rewritten with the
    same size whose mtime was kept or set back (touch -r, os.utime, a restore).  Every
    write and every change of mtime also sets the ctime to the current time, which no
    user can set back, and a file replaced by another (an editor's save by rename, a
    copy moved into place) has another inode.  So the digest is reused only while size,
    mtime, ctime and inode all stay what the state recorded; anything else is read."""
    return (recorded is not None and now is not None and recorded.kind == "f" and now.kind == "f"
            and bool(recorded.digest) and not recorded.error and recorded.size == now.size
            and recorded.mtime_ns == now.mtime_ns and recorded.ctime_ns == now.ctime_ns
            and recorded.ino == now.ino)


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
        # Devices, fifos and sockets are not synced.  They are runtime objects (an agent's
        # socket, a program's fifo) that mean nothing on another host, and a non-root
        # rsync cannot create a device: syncing them would make every run fail, or fill
        # deleted/ with stale sockets.  The scan shows one as kind "s" with a note in
        # `error`, so the planner leaves its path alone on both replicas (never replaced
        # by the other side's file, never a reason to delete the other side's copy) and
        # the state keeps what it recorded; the run reports it as a notice, not an error.
        return Entry(rel_path, "s", 0, info.st_mtime_ns, stat.S_IMODE(mode), info.st_uid, info.st_gid,
                     info.st_ino, info.st_ctime_ns, error=SPECIAL_FILE_NOTE % special_file_name(mode))
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
    acl, xattr = attribute_fingerprints(abs_path, kind, info, options)
    return Entry(rel_path, kind, size, info.st_mtime_ns, stat.S_IMODE(mode), info.st_uid, info.st_gid,
                 info.st_ino, info.st_ctime_ns, link, digest, "", info.st_nlink if kind == "f" else 0, acl, xattr)


_new_tuple = tuple.__new__
S_ISREG, S_ISDIR = stat.S_ISREG, stat.S_ISDIR


def plain_entry(abs_path, rel_path, info):
    """make_entry() where no option asks for more than the lstat (no link followed, no
    digest, no ACL or xattr): the same Entry for a file or a directory, built without the
    calls a tree's every path would pay for; anything else goes to make_entry()."""
    mode = info.st_mode
    if S_ISREG(mode):
        return _new_tuple(Entry, (rel_path, "f", info.st_size, info.st_mtime_ns, mode & 0o7777, info.st_uid,
                                  info.st_gid, info.st_ino, info.st_ctime_ns, "", "", "", info.st_nlink, "", ""))
    if S_ISDIR(mode):
        return _new_tuple(Entry, (rel_path, "d", 0, info.st_mtime_ns, mode & 0o7777, info.st_uid, info.st_gid,
                                  info.st_ino, info.st_ctime_ns, "", "", "", 0, "", ""))
    return make_entry(abs_path, rel_path, info, {})


def walk_tree(root, path_filter, options):
    """Yield an Entry for every item below root in canonical order, holding one
    directory listing per level at most.  An unreadable directory, or one holding an
    item that cannot be stat'ed (no owner x, EIO), is yielded with its error set and
    not descended into: the planner then leaves its whole subtree alone."""
    plain = not any(options.get(name) for name in ("copy_links", "dir_links", "checksum", "acl", "xattr"))
    stack = [iter(_sorted_listing(root, "", path_filter, options))]
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
            if plain:
                entry = plain_entry(abs_path, rel_path, info)
            else:
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
                entry = entry._replace(error="cannot list directory: %s" % error.strerror)
                listing = None
            if listing is not None:
                unreadable = _first_unreadable(listing)
                if unreadable is not None:
                    child_path, child_error = unreadable
                    entry = entry._replace(error="cannot read %s in it: %s" % (
                        child_path.rpartition("/")[2], child_error.strerror))
                    listing = None
                else:
                    listing = iter(listing)
            yield entry
            if listing is not None:
                stack.append(listing)
        else:
            yield entry


def _sorted_listing(abs_dir, rel_prefix, path_filter, options):
    """The children of one directory, sorted by name bytes, filtered; a list of
    (absolute path, relative path, lstat result or the OSError it raised).  Every child
    is stat'ed here, before the directory itself is yielded, so that a directory with an
    item that cannot be stat'ed is known as such before the planner sees it.  Listing
    errors raise at once."""
    follow = bool(options.get("copy_links") or options.get("dir_links"))
    with os.scandir(abs_dir) as iterator:
        children = sorted(iterator, key=_name_bytes)
    excluded = path_filter.excluded
    listing = []
    for child in children:
        rel_path = rel_prefix + child.name
        try:
            if excluded(rel_path, child.is_dir(follow_symlinks=follow)):
                continue
            info = child.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # vanished since the listing
        except OSError as error:
            info = error
        listing.append((child.path, rel_path, info))
    return listing


def _name_bytes(child):
    """A directory entry's name as bytes: the sort key of a listing."""
    return child.name.encode(FS_ENCODING, FS_ENCODE_ERRORS)


def _first_unreadable(listing):
    """(relative path, OSError) of the first child of a listing that could not be
    stat'ed, None when every child could."""
    for _, rel_path, info in listing:
        if isinstance(info, OSError):
            return rel_path, info
    return None


# Scans in a child process ----------------------------------------------------------------
# A no-change run of a local pair spends most of its time in the two walks.  Where more
# than one CPU is usable, a walk runs in a forked child that sends its entries back over a
# pipe in batches, so that the parent merges and plans while the children walk.  The
# child is tied to its pipe: it ignores the stop signals (the parent handles them and
# then kills it), and once the parent is gone, even by SIGKILL, its next write fails and
# it leaves.  It never returns into the parent's code: os._exit, so no atexit handler, no
# flush of the parent's buffers, no finally that releases a lock or sends a mail.

SCAN_BATCH_ENTRIES = 1000       # entries a child sends at a time
SCAN_FRAME = struct.Struct(">cI")   # each message: its kind, the length of its pickle
SCAN_ENTRIES, SCAN_DONE, SCAN_OS_ERROR, SCAN_FAILED = b"E", b"D", b"X", b"F"
# The signals a child ignores, and the parent keeps blocked while it forks, so that no
# handler of the parent ever runs in the child.
SCAN_CHILD_IGNORES = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGALRM")
                           if hasattr(signal, name))


def usable_cpus():
    """How many CPUs this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def scan_in_child(root, path_filter, options):
    """walk_tree(root, path_filter, options), walked by a forked child where fork is
    possible; else (no fork, or fork failed) walked here."""
    if not hasattr(os, "fork"):
        return walk_tree(root, path_filter, options)
    try:
        scan = ForkedScan(root, path_filter, options)
    except OSError:
        return walk_tree(root, path_filter, options)
    return scan.entries()


class ScanChildGone(Exception):
    """The reader of a scan child's pipe is gone: the child leaves."""


class ForkedScan(object):
    """One walk_tree() in a forked child; entries() yields what it sends, in its order.
    close() ends the child whatever it is doing and reaps it."""

    running = set()    # the scans whose child may still run: end_forked_scans() ends them

    def __init__(self, root, path_filter, options):
        self.root = root
        read_fd, write_fd = os.pipe()
        blocked = hasattr(signal, "pthread_sigmask")
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SCAN_CHILD_IGNORES) if blocked else None
        try:
            with warnings.catch_warnings():
                # 3.12+ warns of fork() in a process with threads (a monitor's watchers): the
                # child runs only the walk, which takes no lock another thread may hold.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            run_scan_child(write_fd, previous_mask, root, path_filter, options)   # never returns
        os.close(write_fd)
        self.pid = pid
        self.status = None
        self.stream = os.fdopen(read_fd, "rb", 1 << 16)
        ForkedScan.running.add(self)
        if blocked:   # a stop signal that came meanwhile is handled now, with the child known
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)

    def entries(self):
        """The child's entries as they come; its OSError is raised here as the same kind
        of OSError (errno, text and file name), so the run says what a walk here would."""
        try:
            while True:
                kind, payload = self._receive()
                if kind == SCAN_ENTRIES:
                    for values in payload:
                        yield _new_tuple(Entry, values)
                elif kind == SCAN_DONE:
                    return
                elif kind == SCAN_OS_ERROR:
                    number, text, filename, filename2 = payload
                    if number is None:
                        raise OSError(text)
                    raise OSError(number, text, filename, None, filename2)
                else:
                    raise RuntimeError("the scan of %s failed: %s" % (self.root, payload))
        finally:
            self.close()

    def _receive(self):
        header = self.stream.read(SCAN_FRAME.size)
        if len(header) == SCAN_FRAME.size:
            kind, length = SCAN_FRAME.unpack(header)
            data = self.stream.read(length)
            if len(data) == length:
                return kind, pickle.loads(data)
        raise OSError(errno.EPIPE, "the process scanning this replica ended before its scan did (%s)"
                      % self._end_status(), self.root)

    def _end_status(self):
        self._reap()
        status = self.status
        if status is not None and os.WIFSIGNALED(status):
            return "killed by signal %d" % os.WTERMSIG(status)
        return "exit code %s" % (os.WEXITSTATUS(status) if status is not None else "unknown")

    def _reap(self):
        if self.pid is None:
            return
        try:
            _, self.status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            self.status = None
        self.pid = None

    def close(self):
        """End the child (SIGKILL: it holds nothing that needs a clean end) and reap it."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            self._reap()
        if not self.stream.closed:
            self.stream.close()
        ForkedScan.running.discard(self)


def end_forked_scans():
    """End every scan child still running (a run stopped, or its merge left off)."""
    for scan in list(ForkedScan.running):
        scan.close()


def run_scan_child(write_fd, signal_mask, root, path_filter, options):
    """The forked child of a ForkedScan: walk, send the entries in batches, leave by
    os._exit whatever happens."""
    code = 1
    try:
        for sig in SCAN_CHILD_IGNORES:
            signal.signal(sig, signal.SIG_IGN)
        if signal_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        # The parent's objects live on untouched in the child: no collection may finalize
        # one (closing a file descriptor the walk reuses), and none copies their pages.
        if hasattr(gc, "freeze"):
            gc.freeze()
        else:
            gc.disable()
        close_inherited_descriptors(write_fd)
        code = send_scan(write_fd, walk_tree(root, path_filter, options))
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def close_inherited_descriptors(kept):
    """Close every file descriptor but `kept`, stdin, stdout and stderr made /dev/null: the
    child must not hold the parent's lock, log, sockets, the pipes of other scans, or the
    terminal or pipe its output goes to (whoever reads that waits for its end)."""
    null = os.open(os.devnull, os.O_RDWR)
    for number in (0, 1, 2):
        if number != null:
            os.dup2(null, number)
    try:
        numbers = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        numbers = range(3, min(os.sysconf("SC_OPEN_MAX"), 65536))
    for number in numbers:
        if number > 2 and number != kept:
            try:
                os.close(number)
            except OSError:
                pass


def send_scan(write_fd, entries):
    """Send the entries in batches, then how the walk ended; the exit code of the child."""

    def send(kind, payload):
        data = pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
        message = memoryview(SCAN_FRAME.pack(kind, len(data)) + data)
        while message:
            try:
                written = os.write(write_fd, message)
            except OSError:
                raise ScanChildGone()
            message = message[written:]

    batch = []
    try:
        try:
            for entry in entries:
                batch.append(tuple(entry))
                if len(batch) >= SCAN_BATCH_ENTRIES:
                    send(SCAN_ENTRIES, batch)
                    batch = []
            if batch:
                send(SCAN_ENTRIES, batch)
            send(SCAN_DONE, None)
            return 0
        except ScanChildGone:
            raise
        except OSError as error:   # the root cannot be listed: the parent raises it as it is
            if batch:
                send(SCAN_ENTRIES, batch)   # what a walk in the parent would have yielded first
            send(SCAN_OS_ERROR, (error.errno, error.strerror if error.errno is not None else str(error),
                                 error.filename, error.filename2))
            return 0
        except Exception:
            send(SCAN_FAILED, one_line(traceback.format_exc(), 2000))
            return 1
    except ScanChildGone:
        return 1


# ======================================================================================
# State
# ======================================================================================
# The state is one file per job in the initiator's state dir: a JSON header line, then
# one line per path in canonical order holding what each replica had at the end of the
# last sync of that path.  It is written atomically, so it only moves forward.  Each
# replica's state dir also gets a small marker (how many items each side held), which
# the unmounted-replica guard reads.

class StateError(Exception):
    """The state file cannot be read; the run falls back to a first run."""


def state_dir_file(kind, instance_id):
    """The name of a job's file in a state dir (STATE_FILE_NAMES)."""
    return STATE_FILE_NAMES[kind] % instance_id


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


# The JSON coder of state lines, made once: json.loads() and json.dumps() check their
# arguments and build an encoder on every call, and they run once per path.  The encoder
# is the one json.dumps() builds with its defaults (so every line is the same text); no
# circular check, as a state line holds only strings, numbers and null.
STATE_LINE_DECODER = json.JSONDecoder()
if json.encoder.c_make_encoder is not None:
    _state_line_encoder = json.encoder.c_make_encoder(
        None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def state_line_json(value):
        return "".join(_state_line_encoder(value, 0))
else:
    state_line_json = json.dumps


class StateRecord(object):
    """One path of the previous state, as read: its line is decoded only when a merge
    needs the entries, since on a run with few changes nearly every line is compared as
    text with the scans' entries (see merge_streams) and never decoded."""
    __slots__ = ("path", "key", "line", "number", "source", "_pair")

    def __init__(self, path, key, line=None, number=0, source="", pair=None):
        self.path = path
        self.key = key
        self.line = line
        self.number = number
        self.source = source
        self._pair = pair

    def pair(self):
        """(initiator entry, target entry) as the state recorded them."""
        if self._pair is None:
            try:
                rel_path, initiator, target = transcode(STATE_LINE_DECODER.decode(self.line), native_text)
                if rel_path != self.path:
                    raise ValueError("another path")
                self._pair = (None if initiator is None else Entry(rel_path, *initiator),
                              None if target is None else Entry(rel_path, *target))
            except (ValueError, TypeError):
                raise StateError("%s: line %d is damaged" % (self.source, self.number))
        return self._pair


def as_state_records(records):
    """StateRecords from (path, initiator entry, target entry) triples or StateRecords
    (the legacy lists, --initialize and tests give triples)."""
    for record in records:
        if isinstance(record, StateRecord):
            yield record
        else:
            yield StateRecord(record[0], path_key(record[0]), pair=(record[1], record[2]))


def read_state_records(path):
    """Yield a StateRecord per path of a state file, in canonical order.  Only the path
    is decoded here (json's own string scanner, the first item of the line's list)."""
    if read_state_header(path) is None:
        return
    scan_string = json.decoder.scanstring
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
        handle.readline()
        previous_key = None
        for number, line in enumerate(handle, 2):
            if not line.startswith('["'):
                raise StateError("%s: line %d is damaged" % (path, number))
            try:
                rel_path = scan_string(line, 2)[0]
            except ValueError:
                raise StateError("%s: line %d is damaged" % (path, number))
            if not FS_IS_UTF8:
                rel_path = native_text(rel_path)
            key = path_key(rel_path)
            if previous_key is not None and key <= previous_key:
                raise StateError("%s: line %d is out of order" % (path, number))
            previous_key = key
            yield StateRecord(rel_path, key, line, number, path)


def read_state(path):
    """Yield (path, initiator entry, target entry) from a state file, in canonical order."""
    for record in read_state_records(path):
        initiator, target = record.pair()
        yield record.path, initiator, target


class StateLineCoder(object):
    """The state file line of one path (names in the wire form), remembering the last
    one: a run codes each unchanged path's entries twice, once when merge_streams compares
    them with the state's line and once when the executor writes the new state, and the
    entries are the same objects both times (held here, so their ids are not reused)."""

    def __init__(self):
        self.last = (None, None, None, None)

    def __call__(self, rel_path, initiator, target):
        last_path, last_initiator, last_target, last_line = self.last
        if initiator is last_initiator and target is last_target and rel_path == last_path:
            return last_line
        line = state_line_json(transcode([rel_path, None if initiator is None else list(initiator[1:]),
                                          None if target is None else list(target[1:])], wire_text)) + "\n"
        self.last = (rel_path, initiator, target, line)
        return line


state_line = StateLineCoder()


def state_lines(records):
    """State file lines for (path, initiator entry, target entry) records."""
    for rel_path, initiator, target in records:
        yield state_line(rel_path, initiator, target)


def write_atomically(path, chunks, like=None):
    """Write an iterable of text chunks to `path` so it holds the old or the new content,
    never a mix: a temp file beside it, fsync, rename, fsync of the directory.  With
    `like` (an os.stat result), the new file gets that mode and owner (a config rewritten
    in place); else the temp file's 0600."""
    directory = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            if like is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(like.st_mode))
                if (os.fstat(handle.fileno()).st_uid, os.fstat(handle.fileno()).st_gid) != (like.st_uid, like.st_gid):
                    os.fchown(handle.fileno(), like.st_uid, like.st_gid)
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


def write_state(path, header, lines):
    """Write the state file atomically; lines (from state_line) in canonical order."""
    header = dict(header, format=STATE_FORMAT, version=STATE_VERSION)

    def chunks():
        yield json.dumps(header, sort_keys=True) + "\n"
        for line in lines:
            yield line
    write_atomically(path, chunks())


LEGACY_RETIRED_SUFFIX = ".retired-by-osync.py"


def legacy_list_paths(state_dir, instance_id):
    """Where osync.sh keeps its *-tree-after lists: {side: path}."""
    return dict((side, os.path.join(state_dir, "%s-tree-after-%s" % (side, instance_id)))
                for side in ("initiator", "target"))


def retire_legacy_lists(state_dir, instance_id):
    """Rename osync.sh's lists once an osync.py state replaces them: they describe the
    replicas as they were then, and must never be a baseline again."""
    for path in legacy_list_paths(state_dir, instance_id).values():
        if os.path.lexists(path):
            os.replace(path, path + LEGACY_RETIRED_SUFFIX)


def read_legacy_state(state_dir, instance_id):
    """Records made from osync.sh's *-tree-after lists, so that a first osync.py run after
    osync.sh knows what both sides held and does not take old deletions for new files.
    Entries are of kind '?' with the list's time as mtime.  None if there are no lists.
    They are read once: the run that writes the first osync.py state retires them."""
    lists = {}
    for side, path in legacy_list_paths(state_dir, instance_id).items():
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
    Yields (path, previous initiator, previous target, initiator now, target now).

    One flat loop (no generator per stream, no list of heads): it runs once per path.
    Where the three heads hold the same path (every path of a tree in step) no sort key is
    made.  A path whose state line is the very line the scans' entries make (nothing
    changed on either side, the common case) is not decoded: the entries it would give
    are the scans' own, so these stand for the previous ones too."""
    records, initiator, target = as_state_records(previous), iter(initiator), iter(target)
    record = next(records, None)
    initiator_head = next(initiator, None)
    target_head = next(target, None)
    while True:
        if (record is not None and initiator_head is not None and target_head is not None
                and record.path == initiator_head.path == target_head.path):
            taken_record, now_initiator, now_target = record, initiator_head, target_head
            record, initiator_head, target_head = next(records, None), next(initiator, None), next(target, None)
        else:
            record_key = None if record is None else record.key
            initiator_key = None if initiator_head is None else path_key(initiator_head.path)
            target_key = None if target_head is None else path_key(target_head.path)
            key = record_key
            if initiator_key is not None and (key is None or initiator_key < key):
                key = initiator_key
            if target_key is not None and (key is None or target_key < key):
                key = target_key
            if key is None:
                return
            taken_record = now_initiator = now_target = None
            if record_key == key:
                taken_record = record
                record = next(records, None)
            if initiator_key == key:
                now_initiator = initiator_head
                initiator_head = next(initiator, None)
            if target_key == key:
                now_target = target_head
                target_head = next(target, None)
        if taken_record is None:
            yield (now_initiator or now_target).path, None, None, now_initiator, now_target
        elif (taken_record.line is not None and now_initiator is not None and now_target is not None
                and state_line(taken_record.path, now_initiator, now_target) == taken_record.line):
            yield taken_record.path, now_initiator, now_target, now_initiator, now_target
        else:
            recorded_initiator, recorded_target = taken_record.pair()
            yield taken_record.path, recorded_initiator, recorded_target, now_initiator, now_target


class DigestCounts(object):
    """How many files with_digests() had read on each side, and how many digests it took
    from the state, for the run's report."""

    def __init__(self):
        self.read = {"initiator": 0, "target": 0}
        self.reused = 0


def with_digests(rows, replicas, options, counts, batch_size=500, rows_held=5000):
    """CHECKSUM: the merged rows of merge_streams() with the digest of every file filled
    in, in the same order.  The scans come without digests; a file whose size, mtime,
    ctime and inode are still those the state recorded keeps the recorded digest (see
    digest_still_valid), the others are read by their replica, `batch_size` paths per
    call.  At most `rows_held` rows wait for a batch, so memory stays bounded.  A file that
    cannot be read gets an error: the planner then leaves it alone, as the scan would."""
    held = []                                   # rows as lists, in order
    wanted = {"initiator": [], "target": []}    # (row, column, path) waiting for a digest
    columns = {"initiator": 3, "target": 4}
    recorded_column = {"initiator": 1, "target": 2}

    def fill():
        for side, items in wanted.items():
            if not items:
                continue
            answers = replicas[side].digest_paths([path for _, _, path in items], options)
            counts.read[side] += len(items)
            for (row, column, _), (digest, problem) in zip(items, answers):
                entry = row[column]
                if digest:
                    row[column] = entry._replace(digest=digest)
                elif problem:
                    row[column] = entry._replace(error=problem)
                else:
                    row[column] = None   # deleted since the scan saw it: as if the scan had not
            wanted[side] = []
        for row in held:
            yield tuple(row)
        del held[:]

    for row in rows:
        row = list(row)
        for side, column in columns.items():
            entry = row[column]
            if entry is None or entry.kind != "f" or entry.error or entry.digest:
                continue
            recorded = row[recorded_column[side]]
            if digest_still_valid(recorded, entry):
                row[column] = entry._replace(digest=recorded.digest)
                counts.reused += 1
            else:
                wanted[side].append((row, column, entry.path))
        held.append(row)
        if max(len(items) for items in wanted.values()) >= batch_size or len(held) >= rows_held:
            for ready in fill():
                yield ready
    for ready in fill():
        yield ready


# ======================================================================================
# Replica
# ======================================================================================
# LocalReplica: every operation the sync needs on one replica.  Each operation takes and
# returns JSON-able data and checks what it is about to touch against what the scan saw,
# so a file changed during the run is left alone for the next run instead of being
# overwritten or deleted.

def remove_any(path):
    """Remove a file, link or whole directory tree."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_empty_dir(path):
    """rmdir, also for a symbolic link that the scan showed as the (empty) directory it
    points to (COPY_SYMLINKS, KEEP_DIRLINKS): then the link itself goes, never what it
    points to.  A directory that is not empty raises ENOTEMPTY, through a link too."""
    if not os.path.islink(path):
        os.rmdir(path)
        return
    if os.path.isdir(path) and os.listdir(path):
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), path)
    os.unlink(path)


def move_into_place(source, destination):
    """Rename source over destination.  Across filesystems (a mount point inside the
    replica) it is first copied beside the destination, so that the swap is still one
    rename: the path holds one version or the other, never a partial copy."""
    try:
        os.rename(source, destination)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    staging = tempfile.mkdtemp(prefix=".osync-", dir=os.path.dirname(destination))
    try:
        copy = os.path.join(staging, "item")
        if os.path.islink(source):
            os.symlink(os.readlink(source), copy)
        else:
            shutil.copy2(source, copy)
        os.rename(copy, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.unlink(source)


def lexists(path):
    return os.path.lexists(path)


def machine_id():
    """What tells this host from others: the systemd/dbus machine id, else the host name."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, "r") as handle:
                text = handle.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return text
    return "host:" + socket.gethostname()


def directory_ids(real_path):
    """[device, inode] of a directory and of each of its ancestors up to /, the directory
    first: the same directory reached through a bind mount has the same pair."""
    ids = []
    path = real_path
    while True:
        try:
            info = os.stat(path)
            ids.append([info.st_dev, info.st_ino])
        except OSError:
            if path == real_path:
                return []
        parent = os.path.dirname(path)
        if parent == path:
            return ids
        path = parent


def valid_directory_ids(ids):
    """Is this what directory_ids() returns (the target host's answer is not trusted)?"""
    return isinstance(ids, list) and len(ids) > 0 and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(number, int) for number in pair)
        for pair in ids)


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


class Answer(object):
    """What a replica operation answers for each item it was given, when it is not a
    sentence saying what went wrong.  The words travel as they are between the agent and
    the initiator."""
    OK = "ok"
    CHANGED = "changed"                 # changed since the scan: left for the next run
    KEPT = "kept"                       # a directory to delete still holds something that stays
    SAVED_RESTORED = "saved-restored"   # saved during the transfer: that version is back in place
    SAVED_KEPT = "saved-kept"           # saved during the transfer, changed again: kept in backup/
    WORK_FILESYSTEM = "work"            # filesystems_of: on the work dir's filesystem
    OTHER_FILESYSTEM = "other"          # filesystems_of: below a mount point inside the replica


class WorkDirLayout(object):
    """Where things go in a replica's work dir: the same for a local and a remote replica
    (remote paths are POSIX, and so are local ones wherever osync.py runs)."""

    def work_path(self, *parts):
        return posixpath.join(self.work_dir, *parts)

    def temp_dir(self):
        """Where transfers in progress and the run's scratch files live."""
        return self.work_path(TEMP_DIR_NAME)

    def transfer_backup_dir(self, stamp):
        """Where rsync puts what it replaces during this run's transfers: inside backup/, so
        that what a killed run leaves there is kept like any other backup."""
        return self.work_path(BACKUP_DIR_NAME, TRANSFER_BACKUP_PREFIX + stamp)

    def partial_dir(self):
        return self.work_path(PARTIAL_DIR_NAME)


class LocalReplica(WorkDirLayout):
    """One replica on this host.  A remote target runs this same class on its host."""

    def __init__(self, role, root, state_dir=""):
        self.role = role
        self.root = os.path.abspath(root)
        self.work_dir = os.path.join(self.root, WORK_DIR_NAME)
        self.state_dir = state_dir or os.path.join(self.work_dir, STATE_DIR_NAME)
        self.custom_state_dir = bool(state_dir)
        self.lock_path = os.path.join(self.work_dir, LOCK_FILE_NAME)
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
        link = self.link_above(rel_path)
        if link is not None:
            raise OSError(errno.ELOOP, "%s is a symbolic link, and nothing reached through a link is deleted, "
                                       "moved, backed up or changed, as it may lie outside the replica; do "
                                       "it by hand if it should be done" % link)
        return os.path.join(self.root, rel_path)

    def link_above(self, rel_path):
        """The relative path of the first parent of rel_path that lstat shows to be a
        symbolic link, None when there is none."""
        parts = rel_path.split("/")
        if any(part in ("", ".", "..") for part in parts) or parts[0] == WORK_DIR_NAME:
            raise OSError(errno.EINVAL, "not a path of the replica")
        current = self.root
        for depth, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            try:
                info = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                return None   # nothing there yet: nothing to be reached through
            if stat.S_ISLNK(info.st_mode):
                return "/".join(parts[:depth + 1])
        return None

    # -- checks -----------------------------------------------------------------------
    def probe(self, create):
        """Check the replica root.  Returns facts the run decides on; creates the root
        only when `create` (CREATE_DIRS) says so."""
        facts = {"root": self.root, "created": False}
        if not os.path.isdir(self.root):
            if lexists(self.root):
                refuse("not-a-directory", "The %s replica %s exists but is not a directory" % (self.role, self.root),
                       "Move it away, or give the path of the directory to sync")
            if not create:
                refuse("missing-replica", "The %s replica %s does not exist" % (self.role, self.root),
                       "Create it, mount it, or set CREATE_DIRS=yes")
            try:
                os.makedirs(self.root)
            except OSError as error:
                raise ReplicaError("Cannot create the %s replica %s: %s." % (self.role, self.root, error.strerror))
            facts["created"] = True
        facts["realpath"] = os.path.realpath(self.root)
        facts["machine_id"] = machine_id()
        facts["dir_ids"] = directory_ids(facts["realpath"])
        facts["time"] = time.time()
        facts["work_dir"] = os.path.isdir(self.work_dir)
        facts["readable"] = os.access(self.root, os.R_OK | os.X_OK)
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
        for name in (BACKUP_DIR_NAME, DELETED_DIR_NAME, PARTIAL_DIR_NAME):
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

    def clear_leftovers(self):
        """Remove what a killed run left behind: temp files of transfers in progress and
        half-written state files.  Called once the lock is held."""
        self.check_work_dir()
        try:
            for name in os.listdir(self.temp_dir()):
                remove_any(os.path.join(self.temp_dir(), name))
            for name in os.listdir(self.state_dir):
                if name.startswith(".tmp-"):
                    try:
                        os.unlink(os.path.join(self.state_dir, name))
                    except FileNotFoundError:
                        pass   # a refused run's report, renamed into place or removed meanwhile
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

    def children_path(self):
        return os.path.join(self.work_dir, CHILDREN_FILE_NAME)

    def record_children(self, pids):
        """Write beside the lock the children the run has going ("PID STARTTIME" lines), so
        that a run taking over after a crash can wait for any that outlived it."""
        boot = boot_id()
        lines = ["%d %s %s\n" % (pid, process_start_time(pid), boot) for pid in pids]
        write_atomically(self.children_path(), lines)
        return True

    def recorded_children(self):
        """The [pid, start time] pairs a run recorded beside the lock ([] when none).  Those
        recorded before the host last booted are left out: their pids and start times now
        belong to other processes."""
        if not check_private_dir(self.work_dir, self._work_dir_what(self.work_dir)):
            return []
        try:
            with open(self.children_path(), "rb") as handle:
                text = handle.read(65536).decode("ascii", "replace")
        except OSError:
            return []
        found = []
        boot = boot_id()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] != boot:
                continue
            if parts and parts[0].isdigit() and len(parts[0]) < 10:
                found.append([int(parts[0]), parts[1] if len(parts) > 1 else ""])
        return found

    def forget_children(self):
        try:
            os.unlink(self.children_path())
        except OSError:
            pass
        return True

    # -- scanning -----------------------------------------------------------------------
    def scan(self, filter_spec, options, forked=False):
        """The walk of this replica; with `forked`, walked by a child process while the
        caller consumes it (scan_in_child)."""
        if forked:
            return scan_in_child(self.root, PathFilter(filter_spec), options)
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

    def digest_paths(self, paths, options):
        """CHECKSUM digests of the content of the given files, each [digest, problem]:
        [hex digest, ""] once read, ["", ""] when the file is gone, ["", what went wrong]
        when it cannot be read.  A file that became a symbolic link since the scan is not
        followed (unless COPY_SYMLINKS, whose scan follows links)."""
        answers = []
        for path in paths:
            abs_path = self.abs(path)
            try:
                if not options.get("copy_links") and stat.S_ISLNK(os.lstat(abs_path).st_mode):
                    answers.append(["", "it became a symbolic link during the run"])
                    continue
                answers.append([file_digest(abs_path), ""])
            except (FileNotFoundError, NotADirectoryError):
                answers.append(["", ""])
            except OSError as error:
                answers.append(["", "cannot read: %s" % error.strerror])
        return answers

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
                results.append(Answer.CHANGED)
                continue
            try:
                abs_path = self.inside(path)
                if current is not None and current.kind != "d" and new_kind == "d":
                    # rsync does not replace a file by a directory: clear the way here.  Any
                    # other overwrite is kept by rsync itself (settle_transfers).
                    if backup:
                        self._keep_copy(path, BACKUP_DIR_NAME, stamp, multiple, link=True)
                    os.unlink(abs_path)
                elif current is not None and current.kind == "d" and new_kind != "d":
                    remove_empty_dir(abs_path)
                results.append(Answer.OK)
            except OSError as error:
                results.append("%s: %s" % (error.filename or path, error.strerror))
        return results

    def filesystems_of(self, paths):
        """For each path, "work" when its nearest existing parent directory is on the work
        dir's filesystem, "other" when it is below a mount point inside the replica."""
        try:
            work_device = os.lstat(self.temp_dir()).st_dev
        except OSError:
            return [Answer.WORK_FILESYSTEM] * len(paths)
        devices = {}
        answers = []
        for path in paths:
            parent = posixpath.dirname(path)
            while parent not in devices:
                try:
                    info = os.lstat(self.abs(parent) if parent else self.root)
                except OSError:
                    if parent:
                        parent = posixpath.dirname(parent)
                        continue
                    devices[parent] = work_device
                    break
                devices[parent] = info.st_dev if stat.S_ISDIR(info.st_mode) else work_device
            answers.append(Answer.WORK_FILESYSTEM if devices[parent] == work_device else Answer.OTHER_FILESYSTEM)
        return answers

    def settle_transfers(self, items, stamp, multiple, options):
        """After rsync: deal with what it replaced on this replica.  items: [path, what the
        scan saw here, what was sent, keep a backup].  The replaced version is the one the
        scan saw: it goes to backup/ when asked, else away.  It is not (an editor saved
        while the run transferred): the saved version is put back in place ("saved-restored")
        or, where the path changed yet again, kept in backup/ ("saved-kept").  Returns one answer a path."""
        replaced_root = self.transfer_backup_dir(stamp)
        results = []
        for path, expected, sent, keep in items:
            replaced = os.path.join(replaced_root, path)
            try:
                info = os.lstat(replaced)
            except (FileNotFoundError, NotADirectoryError):
                results.append(Answer.OK)   # nothing was replaced
                continue
            try:
                replaced_entry = self._replaced_entry(replaced, path, info, options)
                current = self._stat(path, options)
                arrived = current is not None and from_wire(sent) is not None and same_content(
                    from_wire(sent), current)
                if expected is not None and unchanged_since_scan(from_wire(expected), replaced_entry):
                    still_in_place = unchanged_since_scan(from_wire(expected), current)
                    if (keep and arrived) or not (arrived or still_in_place):
                        self._keep_copy(path, BACKUP_DIR_NAME, stamp, multiple, link=False, source=replaced)
                    else:
                        remove_any(replaced)   # not wanted, or the copy failed and the version stayed
                    results.append(Answer.OK)
                elif arrived and current.kind != "d" and replaced_entry is not None and replaced_entry.kind != "d":
                    move_into_place(replaced, self.inside(path))
                    results.append(Answer.SAVED_RESTORED)
                else:
                    self._keep_copy(path, BACKUP_DIR_NAME, stamp, multiple, link=False, source=replaced)
                    results.append(Answer.SAVED_KEPT)
            except OSError as error:
                results.append("%s: %s" % (error.filename or path, error.strerror))
        return results

    def _replaced_entry(self, replaced, path, info, options):
        """The Entry of a version rsync moved aside, comparable with what the scan saw at
        `path`.  A link the scan followed (COPY_SYMLINKS, KEEP_DIRLINKS) is followed here
        too, from where it stood (a relative link means something else in the work dir):
        else a link replaced by the file it showed would look changed, be put back, and
        be replaced again on every run."""
        if not (stat.S_ISLNK(info.st_mode) and (options.get("copy_links") or options.get("dir_links"))):
            return make_entry(replaced, path, info, {})
        pointed_to = os.path.join(os.path.dirname(self.abs(path)), os.readlink(replaced))
        try:
            target_info = os.stat(pointed_to)
        except OSError:
            return make_entry(replaced, path, info, {})
        if stat.S_ISDIR(target_info.st_mode) or options.get("copy_links"):
            return make_entry(pointed_to, path, target_info, dict(options, copy_links=False, dir_links=False))
        return make_entry(replaced, path, info, {})

    def finish_transfers(self, stamp):
        """Remove the run's transfer backup dir once settled; anything still in it is kept."""
        top = self.transfer_backup_dir(stamp)
        if not os.path.isdir(top) or os.path.islink(top):
            return True
        for directory, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass   # not empty: what it holds stays kept in backup/
        return True

    def remove_paths(self, items, soft, stamp, multiple, options):
        """Delete items (children listed before their parents), moving them into
        deleted/ when `soft`.  An item changed since the scan is left alone ("changed");
        a directory that still holds something is kept ("kept").

        With COPY_SYMLINKS or KEEP_DIRLINKS a link to a directory is scanned as that
        directory.  When it is to be deleted too, it goes itself, the link and nothing
        else, and what was seen through it is done with it ("ok", untouched); an item
        reached through a link that stays is refused with a sentence naming the link."""
        linked_dirs = set()
        follows_links = options.get("copy_links") or options.get("dir_links")
        for path, expected in items:
            if follows_links and expected is not None and from_wire(expected).kind == "d" and self._is_link(path):
                linked_dirs.add(path)
        results = []
        for path, expected in items:
            expected = from_wire(expected)
            current = self._stat(path, options)
            if current is None:
                results.append(Answer.OK)
                continue
            try:
                if self.link_above(path) in linked_dirs:
                    results.append(Answer.OK)   # goes with the link, which is deleted below
                    continue
            except OSError as error:
                results.append("%s: %s" % (path, error.strerror))
                continue
            if not unchanged_since_scan(expected, current):
                results.append(Answer.CHANGED)
                continue
            try:
                abs_path = self.inside(path)
                if current.kind == "d" and path in linked_dirs:
                    # The link itself is the item; what lies behind it is not the replica's.
                    if soft:
                        self._keep_copy(path, DELETED_DIR_NAME, stamp, multiple, link=False)
                    else:
                        os.unlink(abs_path)
                elif current.kind == "d":
                    if os.listdir(abs_path):
                        results.append(Answer.KEPT)
                        continue
                    if soft and not lexists(os.path.join(self.work_dir, DELETED_DIR_NAME, path)):
                        self._keep_copy(path, DELETED_DIR_NAME, stamp, multiple, link=False)
                    else:
                        remove_empty_dir(abs_path)
                elif soft:
                    self._keep_copy(path, DELETED_DIR_NAME, stamp, multiple, link=False)
                else:
                    os.unlink(abs_path)
                results.append(Answer.OK)
            except OSError as error:
                results.append("%s: %s" % (error.filename or path, error.strerror))
        return results

    def _is_link(self, rel_path):
        """Is rel_path, a path of the replica reached through no link, a symbolic link?"""
        try:
            return os.path.islink(self.inside(rel_path))
        except OSError:
            return False

    def _keep_copy(self, path, area, stamp, multiple, link, source=None):
        """Put the item at `path` (or at `source`, a version rsync replaced) into backup/ or
        deleted/ under the same relative path.  link=True keeps the item in place (hard
        link, or a copy where links fail); link=False moves it.  With `multiple`, or when
        the name is taken in deleted/, older copies are kept: the new one gets a
        .YYYY.MM.DD-HH.MM.SS suffix."""
        source = source or self.inside(path)
        area_root = os.path.join(self.work_dir, area)
        if not check_private_dir(area_root, self._work_dir_what(area_root)):
            raise OSError(errno.ENOENT, "the work dir has no %s/" % area, area_root)
        base = os.path.join(area_root, path)
        self._make_parent(area_root, path, stamp)
        if multiple and (area == BACKUP_DIR_NAME or lexists(base)):
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
        """Apply [path, expected, mode, uid, gid, acls, xattrs] (None: leave as is; acls and
        xattrs are the whole sets to have, as [name, base64] lists) to items unchanged since
        the scan, their ACL and xattr sets included."""
        results = []
        for item in items:
            path, expected, mode, uid, gid = item[:5]
            acls, xattrs = (list(item[5:7]) + [None, None])[:2]
            expected = from_wire(expected)
            current = self._stat(path, options)
            if not unchanged_since_scan(expected, current) or \
                    (acls is not None and expected.acl and expected.acl != current.acl) or \
                    (xattrs is not None and expected.xattr and expected.xattr != current.xattr):
                results.append(Answer.CHANGED)
                continue
            try:
                abs_path = self.inside(path)
                if (uid is not None or gid is not None) and os.geteuid() == 0:
                    os.chown(abs_path, -1 if uid is None else uid, -1 if gid is None else gid,
                             follow_symlinks=False)
                # chmod would follow a link (COPY_SYMLINKS shows it as its target): leave it be
                followed_link = current.kind != "l" and os.path.islink(abs_path)
                if mode is not None and current.kind != "l" and not followed_link:
                    os.chmod(abs_path, mode)
                # After chmod: setting an access ACL sets the group bits to its mask, as on the source.
                if acls is not None and not followed_link:
                    apply_acls(abs_path, current.kind, attribute_values_from_wire(acls))
                if xattrs is not None and not followed_link:
                    apply_xattrs(abs_path, current.kind, attribute_values_from_wire(xattrs), options)
                results.append(Answer.OK)
            except OSError as error:
                results.append("%s: %s" % (path, error.strerror))
        return results

    def read_attributes(self, items, options):
        """The ACL and xattr sets of [path, acl fingerprint, xattr fingerprint] items (None:
        not wanted), for an attribute-only update of the other replica: [acls, xattrs] as
        [name, base64] lists (None where not wanted), Answer.CHANGED where a set is no
        longer the one the scan saw, or what went wrong."""
        plain = dict(options, acl=False, xattr=False)
        results = []
        for path, acl_expected, xattr_expected in items:
            current = self._stat(path, plain)
            if current is None or current.error:
                results.append(Answer.CHANGED if current is None else "%s: %s" % (path, current.error))
                continue
            try:
                abs_path = self.inside(path)
                device = os.stat(abs_path, follow_symlinks=current.kind != "l").st_dev
                sets = read_attribute_sets(abs_path, current.kind, device, options, acl_expected is not None,
                                           xattr_expected is not None)
            except OSError as error:
                results.append("%s: %s" % (path, error.strerror))
                continue
            answer = []
            for pairs, expected in zip(sets, (acl_expected, xattr_expected)):
                if expected is None:
                    answer.append(None)
                elif pairs is None or pairs == ATTRIBUTES_UNSUPPORTED or attribute_fingerprint(pairs) != expected:
                    answer = Answer.CHANGED
                    break
                elif sum(len(value) for _, value in pairs) > ATTRIBUTE_BYTES_LIMIT:
                    answer = "%s: its ACLs or extended attributes take more than %d bytes" % (
                        path, ATTRIBUTE_BYTES_LIMIT)
                    break
                else:
                    answer.append(attribute_values_to_wire(pairs))
            results.append(answer)
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
        write_atomically(os.path.join(self.state_dir, name), [text] if isinstance(text, str) else text)
        return True

    # In the agent, the stream its requests come on: while a command runs, nothing more
    # arrives on it unless the initiator hung up (see run_hook).
    request_stream = None

    def run_hook(self, command, timeout):
        """Run a before or after command on this replica's host (see run_shell_command):
        [exit code, killed at the time limit, output].  In the agent, the command is
        killed as soon as the initiator hangs up (a stopped run), instead of running on."""
        code, killed, output = run_shell_command(command, timeout,
                                                 self._initiator_hung_up if self.request_stream else None)
        return [code, killed, output]

    def _initiator_hung_up(self):
        try:
            return bool(select.select([self.request_stream], [], [], 0)[0])
        except (OSError, ValueError):   # a stream without a file descriptor cannot be watched
            return False

    # -- monitor mode -----------------------------------------------------------------------
    watcher = None   # the TreeWatcher of start_watch

    def start_watch(self, filter_spec, options, wanted, ignored, counted):
        """Watch this replica for changes until stop_watch (monitor mode); [watcher kind,
        why it polls or ""]."""
        self.stop_watch()
        self.watcher = TreeWatcher(self.root, filter_spec, options, ignored, counted)
        return self.watcher.start(wanted)

    def take_changes(self, wait_seconds):
        """[paths changed since the last call, whether more changed], waiting up to
        wait_seconds (at most WATCH_WAIT_LIMIT) for a first change."""
        if self.watcher is None:
            raise ReplicaError("The %s replica %s is not being watched." % (self.role, self.root))
        return self.watcher.take(min(float(wait_seconds), WATCH_WAIT_LIMIT))

    def stop_watch(self):
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        return True

    def append_push_line(self, line):
        """Tell the monitor of this replica that the other replica changed (the target
        helper): one line appended to the push file at the root, never followed as a link."""
        if "\n" in line.rstrip("\n") or len(line) > 1000:
            raise ReplicaError("A push file line must be one short line.")
        path = os.path.join(self.root, PUSH_FILE_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.write(fd, line.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        return True


# Watching a replica for changes (monitor mode) --------------------------------------------
# A TreeWatcher runs for the whole monitor session, so a change made while a sync runs is
# kept for the next one.  It collects the relative paths that changed into a bounded set
# (past WATCH_PATHS_LIMIT it only remembers that something changed); what the run's filter
# excludes, the work dir, and the files named in `ignored` never count.  inotifywait on
# Linux, fswatch on macOS and the BSDs, and where neither can be used a polling rescan.

WATCH_PATHS_LIMIT = 10000
WATCH_WAIT_LIMIT = 10          # seconds take_changes may block in the agent
# q_overflow: events were lost; move_self: the root itself was moved away (its watches follow it)
INOTIFY_EVENTS = "create,modify,delete,move,attrib,close_write,q_overflow,move_self"
INOTIFY_LIMIT_TEXT = "upper limit on inotify watches reached"
WATCHER_EXCLUDE = r"/\.osync_workdir(/|$)"


class TreeWatcher(object):
    """Changes below one replica root, seen by a watcher program or by polling."""

    def __init__(self, root, filter_spec, options, ignored=(), counted=()):
        self.root = os.path.abspath(root)
        self.path_filter = PathFilter(filter_spec)
        self.options = dict(options, checksum=False, acl=False, xattr=False)
        self.ignored = set(ignored)    # relative paths that never count (a state dir, a log inside the tree)
        self.counted = set(counted)    # relative paths that always count (the target helper's push file)
        self.condition = threading.Condition()
        self.changed = set()
        self.overflow = False
        self.process = None
        self.kind = None
        self.stopped = False
        self.thread = None
        self.wake = None               # a threading.Event set on every change (a monitor watching two trees)

    # -- starting ------------------------------------------------------------------------
    def start(self, wanted="auto"):
        """Start watching; returns [watcher kind, why the polling fallback is used or ""]."""
        why = ""
        if wanted == "poll":
            why = "polling was asked for"
        elif shutil.which("inotifywait"):
            why = self._start_inotifywait()
            if not why:
                return ["inotifywait", ""]
        elif shutil.which("fswatch"):
            why = self._start_fswatch()
            if not why:
                return ["fswatch", ""]
        else:
            why = ("neither inotifywait nor fswatch is installed (install inotify-tools, or fswatch on macOS and "
                   "the BSDs)")
        self._start_polling()
        return ["poll", why]

    def _start_inotifywait(self):
        """Start inotifywait -m -r; the reason it cannot be used, or "" once its watches are set."""
        argv = ["inotifywait", "-m", "-r", "--format", "%e %w%f%0", "--no-newline", "-e", INOTIFY_EVENTS,
                "--exclude", WATCHER_EXCLUDE, self.root]
        try:
            process = CHILDREN.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        except OSError as error:
            return "inotifywait cannot be started (%s)" % error.strerror
        messages = []
        try:
            while True:
                line = process.stderr.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").strip()
                if text.startswith("Watches established"):
                    self.process = process
                    self.kind = "inotifywait"
                    self._thread(self._read_inotifywait)
                    self._thread(self._drain_stderr)
                    return ""
                if text and not text.startswith("Setting up watches"):
                    messages.append(text)
        finally:
            if self.process is not process:   # it failed, or a stop signal came while it set up its watches
                kill_process_group(process, grace=1.0)
                process.stdout.close()
                process.stderr.close()
        CHILDREN.ended(process)
        if any(INOTIFY_LIMIT_TEXT in text for text in messages):
            return ("inotifywait hit the inotify watch limit (raise fs.inotify.max_user_watches with sysctl to "
                    "use it)")
        return "inotifywait failed (%s)" % one_line("; ".join(messages) or "no message", 300)

    def _start_fswatch(self):
        argv = ["fswatch", "-0", "-r", "-e", WATCHER_EXCLUDE, self.root]
        try:
            self.process = CHILDREN.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL)
        except OSError as error:
            return "fswatch cannot be started (%s)" % error.strerror
        self.kind = "fswatch"
        self._thread(self._read_fswatch)
        return ""

    def _start_polling(self):
        self.kind = "poll"
        self.snapshot = self._poll_snapshot()
        self._thread(self._poll)

    def _thread(self, target):
        thread = threading.Thread(target=target, name="osync-watch")
        thread.daemon = True
        thread.start()
        self.thread = thread

    # -- collecting ----------------------------------------------------------------------
    def note(self, rel_path, is_dir):
        """Record one changed path, if it counts."""
        if not self.counts(rel_path, is_dir):
            return
        with self.condition:
            if rel_path in self.changed:
                return
            if len(self.changed) >= WATCH_PATHS_LIMIT:
                self.overflow = True
            else:
                self.changed.add(rel_path)
            self.condition.notify_all()
        if self.wake is not None:
            self.wake.set()

    def note_everything(self):
        with self.condition:
            self.overflow = True
            self.condition.notify_all()
        if self.wake is not None:
            self.wake.set()

    def counts(self, rel_path, is_dir):
        """Does a change of rel_path matter to the sync?"""
        if rel_path in self.counted:
            return True
        if not rel_path or rel_path in self.ignored:
            return False
        parts = rel_path.split("/")
        if parts[0] == WORK_DIR_NAME or any(part in ("", ".", "..") for part in parts):
            return False
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            if prefix in self.ignored or self.path_filter.excluded(prefix, True):
                return False
        return not self.path_filter.excluded(rel_path, is_dir)

    def relative(self, abs_path):
        """The path below the root of a path the watcher printed, None for the root itself."""
        if abs_path == self.root or not abs_path.startswith(self.root.rstrip("/") + "/"):
            return None
        return abs_path[len(self.root.rstrip("/")) + 1:].rstrip("/")

    def _records(self, stream):
        """NUL-terminated records of a watcher's output, as str."""
        pending = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                return
            pending += chunk
            while b"\0" in pending:
                record, _, pending = pending.partition(b"\0")
                yield os.fsdecode(record)

    def _read_inotifywait(self):
        for record in self._records(self.process.stdout):
            events, _, path = record.partition(" ")
            names = events.split(",")
            if "Q_OVERFLOW" in names:
                self.note_everything()   # the kernel's queue was full: what changed meanwhile is unknown
                continue
            if "MOVE_SELF" in names and path.rstrip("/") == self.root:
                self.process.terminate()   # it would watch the tree moved away, not what is now at the root
                break
            rel_path = self.relative(path)
            if rel_path is not None:
                self.note(rel_path, "ISDIR" in names)
        self._watcher_ended()

    def _read_fswatch(self):
        for path in self._records(self.process.stdout):
            rel_path = self.relative(path)
            if rel_path is not None:
                self.note(rel_path, os.path.isdir(path) and not os.path.islink(path))
        self._watcher_ended()

    def _drain_stderr(self):
        for line in iter(self.process.stderr.readline, b""):
            if INOTIFY_LIMIT_TEXT.encode() in line:
                self.note_everything()   # a new directory could not be watched: its changes are unknown

    def _watcher_ended(self):
        """The watcher program stopped (the root went away, it was killed): what changed
        since is unknown, and polling takes over."""
        if self.stopped:
            return
        self.note_everything()
        self.kind = "poll"
        self.snapshot = self._poll_snapshot()
        self._poll()

    def _poll_snapshot(self):
        """What a change would alter, for every item of the tree: kind, size, mtime, mode, owner."""
        snapshot = {}
        try:
            for entry in walk_tree(self.root, self.path_filter, self.options):
                snapshot[entry.path] = (entry.kind, entry.size, entry.mtime_ns, entry.mode, entry.uid, entry.gid,
                                        entry.ino, entry.link)
        except OSError:
            pass   # the root is gone: the sync says so
        for rel_path in self.counted:
            try:
                info = os.lstat(os.path.join(self.root, rel_path))
                snapshot[rel_path] = ("f", info.st_size, info.st_mtime_ns)
            except OSError:
                pass
        return snapshot

    def _poll(self):
        """Rescan the tree, at least a second apart and never busier than a fifth of the time."""
        while not self.stopped:
            started = time.time()
            current = self._poll_snapshot()
            spent = time.time() - started
            previous = self.snapshot
            for rel_path, signature in current.items():
                if previous.get(rel_path) != signature:
                    self.note(rel_path, signature[0] == "d")
            for rel_path in previous:
                if rel_path not in current:
                    self.note(rel_path, previous[rel_path][0] == "d")
            self.snapshot = current
            previous = current = None
            time.sleep(max(1.0, 4 * spent))

    # -- handing over --------------------------------------------------------------------
    def take(self, wait):
        """[changed paths, whether more changed than they say], waiting up to `wait`
        seconds for a first change; the collected set starts afresh."""
        deadline = time.time() + max(0.0, wait)
        with self.condition:
            while not self.changed and not self.overflow:
                left = deadline - time.time()
                if left <= 0:
                    break
                self.condition.wait(left)
            changed, overflow = sorted(self.changed), self.overflow
            self.changed = set()
            self.overflow = False
        return [changed, overflow]

    def stop(self):
        self.stopped = True
        if self.process is not None:
            kill_process_group(self.process, grace=1.0)
            CHILDREN.ended(self.process)
            self.process.wait()
            self.process = None


# ======================================================================================
# Agent
# ======================================================================================
# A remote target is served by this same file running on the remote host as an agent:
# the remote side runs the very same LocalReplica code above, each call carried by a
# message.  Everything a replica operation takes or returns is plain JSON data (paths in
# the wire form of the previous sections, entries as lists: to_wire / from_wire).

# Messages are framed as one type byte (J: JSON, Z: zlib-compressed JSON), a 4-byte
# big-endian length and the payload.  JSON is written with ensure_ascii, so the stream
# is pure ASCII whatever the names.  A request is {"op": NAME, "args": [...]}; the
# reply is {"ok": RESULT} or {"error": SENTENCE}; a scan replies with {"batch": [...]}
# messages and a final {"end": true}.
AGENT_BANNER = b"OSYNC-AGENT "
COMPRESS_ABOVE = 2048


class ProtocolError(Exception):
    """The agent stream ended or carried something that is not a message."""


class StreamEnded(ProtocolError):
    """The stream ended in the middle of a message."""


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
        raise StreamEnded("the stream ended")
    return data


# No message may be longer than this, compressed or not: a hostile or broken agent cannot
# make the initiator allocate more (a scan batch of 1000 entries with 4096-byte names,
# every byte escaped, still fits).
MESSAGE_LIMIT = 64 * 1024 * 1024


def read_message(stream, limit=MESSAGE_LIMIT):
    """The next message, or None at a clean end of stream."""
    header = stream.read(5)
    if not header:
        return None
    if len(header) != 5 or header[:1] not in (b"J", b"Z"):
        raise ProtocolError("unexpected data %r" % header[:40])
    size = struct.unpack(">I", header[1:])[0]
    if size > limit:
        raise ProtocolError("a message of %d bytes announced, more than the limit of %d" % (size, limit))
    payload = read_exactly(stream, size)
    if header[:1] == b"Z":
        payload = bounded_decompress(payload, limit)
    try:
        return json.loads(payload.decode("ascii"))
    except (UnicodeError, ValueError):
        raise ProtocolError("a message that is not ASCII JSON")


def bounded_decompress(payload, limit):
    """zlib data that must expand to at most `limit` bytes (a zip bomb stops at the limit)."""
    decompressor = zlib.decompressobj()
    try:
        data = decompressor.decompress(payload, limit + 1)
    except zlib.error as error:
        raise ProtocolError("a compressed message that cannot be decompressed (%s)" % error)
    if len(data) > limit or decompressor.unconsumed_tail:
        raise ProtocolError("a compressed message that expands to more than the limit of %d bytes" % limit)
    if not decompressor.eof:
        raise ProtocolError("a truncated compressed message")
    return data


# What the agent sends ------------------------------------------------------------------
# A remote target is untrusted: a path it reports is used on the initiator (rsync writes
# it, backups are made under it), so every path and every reply is checked here, where it
# arrives, and anything else ends the run before it is used.

ENTRY_KINDS = ("f", "d", "l", "s", "?")
# (index, name) of the whole-number and of the text fields of a wire entry.
ENTRY_INT_FIELDS = tuple((index, name) for index, (name, default) in enumerate(ENTRY_FIELDS) if type(default) is int)
ENTRY_TEXT_FIELDS = tuple((index, name) for index, (name, default) in enumerate(ENTRY_FIELDS) if default == "")
ENTRY_KIND, ENTRY_SIZE, ENTRY_MODE, ENTRY_ERROR = (Entry._fields.index(name) for name in ("kind", "size", "mode",
                                                                                          "error"))
WIRE_INT_MIN, WIRE_INT_LIMIT = -2 ** 63, 2 ** 64
WIRE_TEXT_LIMIT = 65536     # a link target, digest or error note from the agent


def wire_path_problem(path):
    """Why a relative path from the agent is not canonical, or None when it is."""
    if not isinstance(path, str):
        return "not a string"
    if not path:
        return "empty"
    if "\0" in path:
        return "it contains a NUL byte"
    if path.startswith("/"):
        return "it is absolute"
    # An empty, "." or ".." component, found without splitting every path (the scan's
    # every entry comes through here); the split names the component when there is one.
    if ("//" in path or path.endswith("/") or path in (".", "..") or path.startswith(("./", "../"))
            or "/./" in path or "/../" in path or path.endswith(("/.", "/.."))):
        for part in path.split("/"):
            if part in ("", ".", ".."):
                return "it has a component %r" % part
    if path == WORK_DIR_NAME or path.startswith(WORK_DIR_NAME + "/"):
        return "it is in the work dir %s" % WORK_DIR_NAME
    try:
        path.encode(FS_ENCODING, FS_ENCODE_ERRORS)
    except UnicodeError:
        return "it is not a file name"
    return None


def check_wire_path(path, host, where):
    """`path` if it is relative, canonical and outside the work dir; else the run ends."""
    problem = wire_path_problem(path)
    if problem is not None:
        raise agent_violation(host, "an invalid path %s %s (%s)" % (where, shown_path(path), problem))
    return path


def shown_path(path):
    return "'%s'" % printable(path, 200) if isinstance(path, str) else printable(repr(path), 200)


def entry_problem(data):
    """Why a wire entry (a to_wire list) is not a well-formed entry, or None."""
    if type(data) is not list or len(data) != len(ENTRY_FIELDS):
        return "not a list of %d fields" % len(ENTRY_FIELDS)
    kind = data[ENTRY_KIND]
    if type(kind) is not str or kind not in ENTRY_KINDS:
        return "kind %s is none of %s" % (printable(repr(kind), 40), "/".join(ENTRY_KINDS))
    for index, name in ENTRY_INT_FIELDS:
        value = data[index]
        if type(value) is not int or not WIRE_INT_MIN <= value < WIRE_INT_LIMIT:
            return "its %s %s is not a number" % (name, printable(repr(value), 40))
    if data[ENTRY_SIZE] < 0 or not 0 <= data[ENTRY_MODE] <= 0o7777:
        return "its size or mode is out of range"
    if kind == "s" and not data[ENTRY_ERROR]:
        return "a device, fifo or socket without its note"   # such a path is left alone, never synced
    for index, name in ENTRY_TEXT_FIELDS:
        value = data[index]
        if type(value) is not str or (value and (len(value) > WIRE_TEXT_LIMIT or "\0" in value)):
            return "its %s is not a short text" % name
    return None


def check_wire_entry(data, host, where):
    """The Entry a wire list from the agent stands for, once it is checked."""
    if isinstance(data, list) and data:
        check_wire_path(data[0], host, where)
    problem = entry_problem(data)
    if problem is not None:
        path = data[0] if isinstance(data, list) and data else None
        raise agent_violation(host, "an invalid entry %s%s (%s)" % (
            where, " for " + shown_path(path) if isinstance(path, str) else "", problem))
    entry = _new_tuple(Entry, data)
    if entry.error and printable(entry.error) != entry.error:
        entry = entry._replace(error=printable(entry.error))
    return entry


def checked_scan(items, host, path_filter):
    """The agent's scan as Entries, each checked: canonical path, well-formed entry, in
    strictly increasing canonical order (so no path comes twice), not excluded by the
    run's filter (the initiator would overwrite its own excluded file), and every entry
    below the root inside a directory the scan listed just before (as the walk yields
    them)."""
    previous_key = None
    previous_path = None
    directories = []     # the listed directories that enclose the latest entry
    for data in items:
        entry = check_wire_entry(data, host, "in its scan")
        key = path_key(entry.path)
        if previous_key is not None and key <= previous_key:
            raise agent_violation(host, "%s in its scan %s" % (
                shown_path(entry.path),
                "twice" if key == previous_key else "out of order (after %s)" % shown_path(previous_path)))
        if path_filter.excluded(entry.path, entry.kind == "d"):
            raise agent_violation(host, "%s in its scan, which the run excludes" % shown_path(entry.path))
        parent = entry.path.rpartition("/")[0]
        while directories and not (parent == directories[-1] or parent.startswith(directories[-1] + "/")):
            directories.pop()
        if parent and not (directories and directories[-1] == parent):
            raise agent_violation(host, "%s in its scan without its directory %s before it" % (
                shown_path(entry.path), shown_path(parent)))
        if entry.kind == "d" and not entry.error:
            directories.append(entry.path)
        previous_key, previous_path = key, entry.path
        yield entry


def checked_stats(paths, reply, host):
    """A stat_paths reply: one entry (or None) for each requested path, about that path."""
    if not isinstance(reply, list):
        raise agent_violation(host, "a stat reply that is not a list")
    if len(reply) != len(paths):
        raise agent_violation(host, "%d stat replies where %d were asked for" % (len(reply), len(paths)))
    entries = []
    for path, data in zip(paths, reply):
        entry = None if data is None else check_wire_entry(data, host, "in a stat reply")
        if entry is not None and entry.path != path:
            raise agent_violation(host, "a stat reply for %s where %s was asked" % (
                shown_path(entry.path), shown_path(path)))
        entries.append(entry)
    return entries


def checked_open_reply(reply, host, path, state_dir):
    """The agent's replica paths: absolute, normalised, its work dir inside its root."""
    if not isinstance(reply, dict) or not all(isinstance(reply.get(key), str)
                                              for key in ("root", "work_dir", "state_dir", "python")):
        raise agent_violation(host, "a malformed reply to open")
    root = reply["root"]
    wanted_root = posixpath.normpath(path)
    if wanted_root.startswith("/"):
        where_expected = root == wanted_root
    else:   # relative to the remote user's home, which only that host knows
        where_expected = wanted_root == "." or root.endswith("/" + wanted_root)
    if not root.startswith("/") or "\0" in root or posixpath.normpath(root) != root or not where_expected:
        raise agent_violation(host, "the replica root %s for %s" % (shown_path(root), shown_path(path)))
    wanted_work_dir = posixpath.join(root, WORK_DIR_NAME)
    if reply["work_dir"] != wanted_work_dir:
        raise agent_violation(host, "the work dir %s for the root %s" % (shown_path(reply["work_dir"]),
                                                                        shown_path(root)))
    wanted_state_dir = state_dir or posixpath.join(wanted_work_dir, STATE_DIR_NAME)
    if reply["state_dir"] != wanted_state_dir:
        raise agent_violation(host, "the state dir %s where %s was asked" % (shown_path(reply["state_dir"]),
                                                                             shown_path(wanted_state_dir)))
    reply = dict(reply)
    reply["python"] = printable(reply["python"], 40)
    return reply


def _is_bool(value):
    return isinstance(value, bool)


def _is_text_or_none(value):
    return value is None or isinstance(value, str)


PROBE_FACTS = {"root": lambda value: isinstance(value, str), "realpath": lambda value: isinstance(value, str),
               "created": _is_bool, "work_dir": _is_bool, "readable": _is_bool, "writable": _is_bool,
               "euid": lambda value: type(value) is int,
               "free_kb": lambda value: value is None or type(value) is int}


def _is_probe(value):
    return isinstance(value, dict) and all(check(value.get(key)) for key, check in PROBE_FACTS.items())


def _is_cleaning(value):
    return (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and value[0] >= 0
            and isinstance(value[1], list) and all(isinstance(error, str) for error in value[1]))


def shaped(is_right, shown=None):
    """The check of a CALL's result: it must pass `is_right`; `shown` turns it into what
    the run may print (texts from the agent end up in messages)."""
    def check(result, host, op):
        if not is_right(result):
            raise agent_violation(host, "a reply to %s of the wrong shape" % op)
        return shown(result) if shown else result
    return check


def shown_lock(content):
    return None if content is None else printable(content, 200)


def shown_cleaning(result):
    return [result[0], [printable(error) for error in result[1]]]


def one_answer_per_item(items, answers, host, op):
    """The check of a CHUNKED reply: one short text per item ("ok" or what went wrong)."""
    if not isinstance(answers, list) or len(answers) != len(items) or \
            not all(isinstance(answer, str) for answer in answers):
        raise agent_violation(host, "a reply to %s of the wrong shape" % op)
    return [printable(answer) for answer in answers]


def one_entry_per_path(paths, answers, host, op):
    return checked_stats(paths, answers, host)


HEX_DIGEST = re.compile(r"^[0-9a-f]{40}\Z")


def one_digest_per_path(paths, answers, host, op):
    """The check of a digest_paths reply: one [digest, problem] pair per path, the digest
    40 hex digits or empty, the problem a short text (shown as printable)."""
    if not isinstance(answers, list) or len(answers) != len(paths):
        raise agent_violation(host, "a reply to %s of the wrong shape" % op)
    checked = []
    for answer in answers:
        if not (isinstance(answer, list) and len(answer) == 2 and all(isinstance(part, str) for part in answer)):
            raise agent_violation(host, "a reply to %s of the wrong shape" % op)
        digest, problem = answer
        if (digest and (problem or not HEX_DIGEST.match(digest))) or len(problem) > WIRE_TEXT_LIMIT:
            raise agent_violation(host, "a digest that is not 40 hex digits in its reply to %s" % op)
        checked.append([digest, printable(problem)])
    return checked


def attribute_values_problem(values, is_acl):
    """Why a set of [name, base64] values from the agent is not a well-formed ACL or xattr
    set within bounds, or None."""
    if not isinstance(values, list) or len(values) > ATTRIBUTE_COUNT_LIMIT:
        return "not a list of at most %d values" % ATTRIBUTE_COUNT_LIMIT
    names = set()
    total = 0
    for pair in values:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)):
            return "not a [name, value] pair"
        name, value = pair
        if is_acl and name not in (ACL_ACCESS, ACL_DEFAULT):
            return "%s is not an ACL" % shown_path(name)
        if not is_acl and (not name or "\0" in name or name.startswith("system.") or len(name) > 255):
            return "%s is not an extended attribute name" % shown_path(name)
        if name in names:
            return "%s twice" % shown_path(name)
        names.add(name)
        try:
            total += len(base64.b64decode(value.encode("ascii"), validate=True))
        except (ValueError, UnicodeError):
            return "the value of %s is not base64" % shown_path(name)
        if total > ATTRIBUTE_BYTES_LIMIT:
            return "more than %d bytes of values" % ATTRIBUTE_BYTES_LIMIT
    return None


def checked_attribute_values(items, answers, host, op):
    """A read_attributes reply: for each [path, acl fingerprint, xattr fingerprint] asked,
    a short text, or [acls, xattrs] holding exactly the sets asked for, well formed, within
    bounds and matching the fingerprints asked for (what the scan saw)."""
    if not isinstance(answers, list) or len(answers) != len(items):
        raise agent_violation(host, "a reply to %s of the wrong shape" % op)
    checked = []
    for item, answer in zip(items, answers):
        if isinstance(answer, str):
            checked.append(printable(answer))
            continue
        if not isinstance(answer, list) or len(answer) != 2:
            raise agent_violation(host, "a reply to %s of the wrong shape" % op)
        for expected, values, is_acl in ((item[1], answer[0], True), (item[2], answer[1], False)):
            if (expected is None) != (values is None):
                raise agent_violation(host, "attribute values for %s that were not asked for" % shown_path(item[0]))
            if values is None:
                continue
            problem = attribute_values_problem(values, is_acl)
            if problem is None and attribute_fingerprint(attribute_values_from_wire(values)) != expected:
                problem = "they are not the ones its scan showed"
            if problem is not None:
                raise agent_violation(host, "invalid %s values for %s (%s)" % (
                    "ACL" if is_acl else "extended attribute", shown_path(item[0]), problem))
        checked.append(answer)
    return checked


def _is_hook_result(value):
    """[exit code, killed at the limit, output] of run_hook, the output within its bound
    (the agent keeps at most HOOK_OUTPUT_LIMIT bytes, and a line that says so)."""
    return (isinstance(value, list) and len(value) == 3 and type(value[0]) is int and _is_bool(value[1])
            and isinstance(value[2], str) and len(value[2]) <= HOOK_OUTPUT_LIMIT + 100)


def _is_watch_start(value):
    """[watcher kind, why it polls] of start_watch."""
    return (isinstance(value, list) and len(value) == 2 and value[0] in ("inotifywait", "fswatch", "poll")
            and isinstance(value[1], str) and len(value[1]) <= 2000)


def checked_changes(result, host, op):
    """[paths, more changed] of take_changes: at most WATCH_PATHS_LIMIT paths, each a
    relative path of the replica outside its work dir."""
    if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], list)
            and len(result[0]) <= WATCH_PATHS_LIMIT and _is_bool(result[1])):
        raise agent_violation(host, "a reply to %s of the wrong shape" % op)
    for path in result[0]:
        check_wire_path(path, host, "in its reply to %s" % op)
    return result


# The operations the agent serves, each the LocalReplica method of that name, and how
# its reply is checked before the run uses it.  A CALL answers with one result, checked
# by check(result, host, op); a CHUNKED call takes a list as its first argument and is
# sent in chunks of bounded size, each answer checked by check(chunk, answers, host, op);
# a STREAM (the scan) answers with batches, checked by RemoteReplica.scan against the
# run's own filter.  "open", which makes the agent's LocalReplica, comes first.  What is
# not in this table the agent refuses, and RemoteReplica has no such method.
CALL, CHUNKED, STREAM = "call", "chunked", "stream"
AGENT_OPERATIONS = {
    "probe": (CALL, shaped(_is_probe)),
    "check_work_dir": (CALL, shaped(_is_bool)),
    "prepare_work_dir": (CALL, shaped(_is_bool)),
    "clear_leftovers": (CALL, shaped(_is_bool)),
    "acquire_lock": (CALL, shaped(_is_text_or_none, shown_lock)),
    "release_lock": (CALL, shaped(_is_bool)),
    "clean_old": (CALL, shaped(_is_cleaning, shown_cleaning)),
    "read_state_file": (CALL, shaped(_is_text_or_none)),
    "write_state_file": (CALL, shaped(_is_bool)),
    "finish_transfers": (CALL, shaped(_is_bool)),
    "stat_paths": (CHUNKED, one_entry_per_path),
    "digest_paths": (CHUNKED, one_digest_per_path),
    "filesystems_of": (CHUNKED, one_answer_per_item),
    "prepare_overwrite": (CHUNKED, one_answer_per_item),
    "remove_paths": (CHUNKED, one_answer_per_item),
    "set_attributes": (CHUNKED, one_answer_per_item),
    "read_attributes": (CHUNKED, checked_attribute_values),
    "settle_transfers": (CHUNKED, one_answer_per_item),
    "run_hook": (CALL, shaped(_is_hook_result)),
    "start_watch": (CALL, shaped(_is_watch_start)),
    "take_changes": (CALL, checked_changes),
    "stop_watch": (CALL, shaped(_is_bool)),
    "append_push_line": (CALL, shaped(_is_bool)),
    "scan": (STREAM, None),
}


def agent_violation(host, what):
    """The one sentence that ends a run when the agent sends what osync.py refuses."""
    return ReplicaError("The agent on %s sent %s, which osync.py refuses; the run stopped (check that host)."
                        % (host, what))


class AgentClient(object):
    """The local end of an agent: sends requests, reads replies, streams scans.

    What the agent sends is untrusted: a reply that is not a message of the expected
    shape ends the run with a sentence naming the host (see `violation`), and the
    connection is not used again."""

    def __init__(self, process, host, stderr_file):
        self.process = process
        self.host = host
        self.stderr_file = stderr_file
        self.streaming = None   # the id of a streamed reply not read to its end
        self.broken = None      # the sentence of a protocol violation: the stream is out of step

    def lost(self, what):
        detail = read_tail(self.stderr_file)
        return ReplicaError("The connection to the agent on %s was lost (%s)%s." % (
            self.host, what, ": " + detail if detail else ""))

    def violation(self, what):
        """The error for a reply osync.py refuses (`what` says what was sent)."""
        return agent_violation(self.host, what)

    def _request(self, op, args):
        if self.broken is not None:
            raise ReplicaError(self.broken)
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
        except StreamEnded as error:
            raise self.lost(str(error))
        except ProtocolError as error:
            self.broken = str(self.violation(str(error)))
            raise ReplicaError(self.broken)
        except (OSError, ValueError) as error:
            raise self.lost(str(error))
        if reply is None:
            raise self.lost("end of stream")
        if not isinstance(reply, dict):
            self.broken = str(self.violation("a reply that is not a JSON object"))
            raise ReplicaError(self.broken)
        reply = transcode(reply, native_text)
        if "error" in reply:
            raise ReplicaError("On %s: %s" % (self.host, printable(reply["error"])))
        return reply

    def call(self, op, *args):
        self._request(op, args)
        reply = self._reply()
        if "ok" not in reply:
            self.broken = str(self.violation("a reply to %s without a result" % op))
            raise ReplicaError(self.broken)
        return reply["ok"]

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
            if reply.get("end") is True:
                self.streaming = None
                return
            batch = reply.get("batch")
            if not isinstance(batch, list):
                self.streaming = None
                self.broken = str(self.violation("a scan reply that is neither a batch nor its end"))
                raise ReplicaError(self.broken)
            for item in batch:
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


class RemoteReplica(WorkDirLayout):
    """A replica on another host: the same interface as LocalReplica, each call carried
    out by a LocalReplica in the agent that osync.py runs there.  Every reply is checked
    as AGENT_OPERATIONS says before the run uses it."""

    CHUNK = 2000

    def __init__(self, role, agent, rsync_host, paths):
        self.role = role
        self.agent = agent
        self.rsync_host = rsync_host    # "user@host" as rsync wants it
        self.root = paths["root"]
        self.work_dir = paths["work_dir"]
        self.state_dir = paths["state_dir"]
        self.display = "%s:%s" % (agent.host, self.root)

    def __getattr__(self, name):
        """Every CALL and CHUNKED operation of AGENT_OPERATIONS, as a method."""
        form, check = AGENT_OPERATIONS.get(name, (None, None))
        if form == CALL:
            return lambda *args: self._call(name, check, *args)
        if form == CHUNKED:
            return lambda items, *args: self._chunked(name, check, items, *args)
        raise AttributeError(name)

    def _call(self, op, check, *args):
        return check(self.agent.call(op, *args), self.agent.host, op)

    def _chunked(self, op, check, items, *args):
        """A call on a long list goes as several messages of bounded size, in order."""
        results = []
        for start in range(0, len(items), self.CHUNK):
            chunk = items[start:start + self.CHUNK]
            results += check(chunk, self.agent.call(op, chunk, *args), self.agent.host, op)
        return results

    def release_lock(self, content):
        if self.agent.broken is not None:
            return False   # the stream is out of step: nothing more can be asked of that agent
        return self._call("release_lock", AGENT_OPERATIONS["release_lock"][1], content)

    def run_hook(self, command, timeout):
        """run_hook on the remote host.  A stop (signal, hard time limit) while the command
        runs leaves its reply unread, so the agent is not asked anything more."""
        try:
            return self._call("run_hook", AGENT_OPERATIONS["run_hook"][1], command, timeout)
        except StopRun:
            self.agent.broken = "The run stopped while a command was running on %s." % self.agent.host
            raise

    def close(self):
        """End the agent on the remote host (the ssh connection is the transport's)."""
        self.agent.close()

    def location(self):
        return "%s:%s/" % (self.rsync_host, self.root)

    def scan(self, filter_spec, options):
        return checked_scan(self.agent.stream("scan", filter_spec, options), self.agent.host,
                            PathFilter(filter_spec))


def serve_agent(reader, writer):
    """The agent's loop: one LocalReplica, driven by requests until the stream ends.
    Only the operations of AGENT_OPERATIONS are served."""
    replica = None
    while True:
        request = read_message(reader)
        if request is None:
            return
        op, args = request.get("op"), transcode(request.get("args", []), native_text)
        try:
            if op == "open":
                replica = LocalReplica(*args)
                replica.request_stream = reader
                reply = {"ok": {"root": replica.root, "work_dir": replica.work_dir,
                                "state_dir": replica.state_dir, "python": sys.version.split()[0]}}
            elif replica is None:
                reply = {"error": "no replica opened"}
            elif op not in AGENT_OPERATIONS:
                reply = {"error": "unknown request %r" % op}
            elif AGENT_OPERATIONS[op][0] == STREAM:
                send_batches(writer, getattr(replica, op)(*args))
                reply = {"end": True}
            else:
                reply = {"ok": getattr(replica, op)(*args)}
        except OsyncError as error:
            reply = {"error": str(error)}
        except OSError as error:
            reply = {"error": "%s: %s" % (error.filename or op, error.strerror)}
        except Exception as error:  # report, keep serving: the client decides what to do
            reply = {"error": "internal error in %s: %s: %s" % (op, type(error).__name__, error)}
        send_message(writer, transcode(reply, wire_text))


def send_batches(writer, items, size=1000):
    """A streamed reply: the items in batch messages of bounded size (the final
    {"end": true} follows)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            send_message(writer, {"batch": transcode(batch, wire_text)})
            batch = []
    send_message(writer, {"batch": transcode(batch, wire_text)})


AGENT_PROCESS_NAME = b"osync-agent"
PR_SET_NAME = 15


def name_agent_process():
    """Let `ps`, `top` and `pgrep osync-agent` on the remote host show what this Python
    is (Linux: the name in /proc/self/comm, else prctl(PR_SET_NAME)).  Best effort: where
    neither works the agent keeps its interpreter's name."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/comm", "wb") as comm:
            comm.write(AGENT_PROCESS_NAME)
        return
    except OSError:
        pass
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(AGENT_PROCESS_NAME), 0, 0, 0)
    except (ImportError, OSError, AttributeError, ValueError):
        pass


def agent_main():
    """Entry point of the agent on a remote host (started by the AGENT_STUB bootstrap):
    serve replica requests on stdin/stdout until the initiator closes the stream."""
    reader, writer = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # a stray print must never corrupt the protocol stream
    name_agent_process()
    os.environ["LC_ALL"] = "C"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer.write(AGENT_BANNER + ("%s %s\n" % (VERSION, sys.version.split()[0])).encode("ascii"))
    writer.flush()
    try:
        serve_agent(reader, writer)
    except (ProtocolError, BrokenPipeError, KeyboardInterrupt):
        pass


# ======================================================================================
# Transport
# ======================================================================================
# The ssh command line and its one ControlMaster connection per run, shared by the agent
# and every rsync; and the bootstrap that starts the agent on the remote host.

SSH_URI = re.compile(r"^ssh://(?:(?P<user>[^@/\[\]]+)@)?(?P<host>\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^:/@\[\]]+)"
                     r"(?::(?P<port>[^/]*))?/(?P<path>.+)\Z", re.DOTALL)


def parse_ssh_uri(uri):
    """ssh://[user@]host[:port]//absolute/path or ssh://[user@]host[:port]/path/in/home
    -> (user or None, host, port, path).  IPv6 hosts go in brackets."""
    match = SSH_URI.match(uri)
    if not match:
        raise ConfigError("%s is not a valid target: use ssh://[user@]host[:port]//absolute/path." % uri)
    port = match.group("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError("%s is not a valid target: the port %r is not a number from 1 to 65535." % (uri, port))
    host, user = match.group("host"), match.group("user")
    for part, text in (("host", host), ("user", user)):
        if text and text.startswith("-"):
            raise ConfigError("%s is not a valid target: the %s %s starts with '-', which ssh would take as an "
                              "option; write the %s's real name." % (uri, part, text, part))
    if host.startswith("["):
        host = host[1:-1]
    return user, host, int(port) if port else 22, match.group("path")


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
    detail = one_line(stderr, 400)
    return "ssh to %s failed (exit code %s)%s." % (where, code, ": " + detail if detail else "")


# The bootstrap: the remote command is `PYTHON -c AGENT_STUB N`, with the N bytes of
# AGENT_LOADER on stdin, then osync.py as bytecode or source, then the agent protocol on
# the rest of the stream.  The stub is a frozen interface: ssh_filter.py holds a copy that
# must match it byte for byte (it lets through nothing else), so changing the stub means
# installing the new ssh_filter.py on every target host that uses it.  The stub runs any
# N bytes of Python it is given (a whole osync.py works too); AGENT_STUB_EXPLAINED is the
# same code spread out and commented; a test checks that the two compile to the same program.
AGENT_STUB = ("import sys;sys.version_info<(3,6) and (sys.stderr.write('osync.py agent: Python 3.6 or newer is "
              "needed, this is '+sys.version.split()[0]+'\\n'),sys.exit(91));"
              "sys.path=[p for p in sys.path if p not in ('','.')];"
              "n=int(sys.argv[1]);c=sys.stdin.buffer.read(n);len(c)<n and sys.exit(92);"
              "g={'__name__':'osync_agent'};exec(compile(c,'osync.py','exec'),g);g['agent_main']()")

AGENT_STUB_EXPLAINED = """
# Run as: [env _REMOTE_TOKEN=TOKEN] [sudo -n] PYTHON -c AGENT_STUB N, AGENT_LOADER on stdin.
# Exit codes before the banner (AGENT_START_FAILURES gives each its sentence):
#   91  this Python is older than 3.6 (the stub; its version on stderr)
#   92  stdin ended before N bytes arrived (the stub), or before osync.py did, or what
#       came was not loadable (AGENT_LOADER)
#   93  ssh_filter.py refused the command (wrong token, sudo not allowed, another stub)
#   126 PYTHON cannot be executed, 127 there is no PYTHON (env or the shell: the next
#       interpreter is tried), 255 ssh itself failed
import sys
# Python 2 and 3.0 to 3.5 parse this line too: they stop with exit code 91
# (AGENT_EXIT_OLD_PYTHON) and say their version on stderr.
sys.version_info<(3,6) and (sys.stderr.write('osync.py agent: Python 3.6 or newer is needed, this is '
                                             +sys.version.split()[0]+'\\n'),sys.exit(91))
# Never import a stray module (json.py, osync.py...) from the login directory.
sys.path=[p for p in sys.path if p not in ('','.')]
# Read exactly N bytes of the program (AGENT_LOADER); the loader reads osync.py after them.
n=int(sys.argv[1])
c=sys.stdin.buffer.read(n)
# Fewer bytes than announced: the stream broke, exit code 92 (AGENT_EXIT_SHORT_SOURCE).
len(c)<n and sys.exit(92)
# Not "__main__": osync.py's main() does not run.  The loader runs osync.py's code in g;
# agent_main() writes the banner and serves.
g={'__name__':'osync_agent'}
exec(compile(c,'osync.py','exec'),g)
g['agent_main']()
"""

# What the stub runs: a few lines that say which bytecode this Python reads (its magic
# number) and then read osync.py, as that bytecode or as source, and run it in the stub's
# globals, before the stub calls agent_main().  The initiator answers the hello with a
# line "CODE SIZE" or "SOURCE SIZE" and SIZE bytes (agent_payload()): a remote Python that
# is given bytecode does not compile osync.py, which saves it most of its peak memory and
# the CPU of the compile.  It runs at the top level, so that code appended after it runs
# once osync.py is defined.  Python 3.6 or newer; exit code 92 when the reply is short or
# cannot be loaded.
AGENT_LOADER = '''\
import sys
def osync_agent_code():
    """Say which bytecode this Python reads; read osync.py's code in reply."""
    import importlib.util
    import marshal
    hello = "OSYNC-LOADER %s %s\\n" % (importlib.util.MAGIC_NUMBER.hex(), sys.version.split()[0])
    sys.stdout.buffer.write(hello.encode("ascii", "replace"))
    sys.stdout.buffer.flush()
    header = sys.stdin.buffer.readline(64).split()
    if len(header) != 2 or header[0] not in (b"CODE", b"SOURCE") or not header[1].isdigit():
        sys.exit(92)
    size = int(header[1])
    body = sys.stdin.buffer.read(size)
    if len(body) < size:
        sys.exit(92)
    if header[0] == b"SOURCE":
        return compile(body, "osync.py", "exec")
    try:
        code = marshal.loads(body)
    except Exception:   # another Python's bytecode: ValueError, EOFError, even SystemError
        sys.exit(92)
    if not isinstance(code, type(osync_agent_code.__code__)):
        sys.exit(92)
    return code
exec(osync_agent_code(), globals())
del osync_agent_code
'''
AGENT_HELLO = b"OSYNC-LOADER "
# The hello, whole: the magic number in hex and the version of the remote Python.
AGENT_HELLO_LINE = re.compile(br"OSYNC-LOADER (?P<magic>[0-9a-f]{8}) "
                              br"(?P<version>[0-9]{1,2}\.[0-9]{1,3}\.[0-9]{1,3}[0-9A-Za-z.+]{0,16})\n\Z")

# Exit codes of a failed start, each with its sentence.  The stub and ssh_filter.py use
# codes that ssh (255), shells and env (126, 127), Python (1 for an uncaught exception,
# 2 for usage) and signals (128 + n) do not.
AGENT_EXIT_OLD_PYTHON = 91     # the stub: this Python is older than 3.6; its version is on stderr
AGENT_EXIT_SHORT_SOURCE = 92   # the stub or AGENT_LOADER: stdin ended before osync.py arrived whole
AGENT_EXIT_REFUSED = 93        # ssh_filter.py: not a command osync.py sends with this token
EXIT_CANNOT_EXECUTE = 126      # env or the shell: the interpreter exists but cannot be run
EXIT_NOT_FOUND = 127           # env or the shell: no such interpreter (the next one is tried)
EXIT_SSH_FAILED = 255          # ssh itself: the connection failed (ssh_failure() says why)
AGENT_START_FAILURES = {
    AGENT_EXIT_OLD_PYTHON: "{python} on {host} is Python {version}, too old for the osync.py agent: install "
                           "Python 3.6 or newer there, or set REMOTE_PYTHON to the path of one.",
    AGENT_EXIT_SHORT_SOURCE: "The stream to {host} broke while osync.py was being sent to {python}, so the agent "
                             "did not start: check the connection to {host} and run again.",
    AGENT_EXIT_REFUSED: "ssh_filter.py on {host} refused to start the osync.py agent: set _REMOTE_TOKEN to the "
                        "token that {host}'s authorized_keys gives ssh_filter.py (and add --allow-sudo there for "
                        "SUDO_EXEC), and install there the ssh_filter.py of this osync.py version.",
    EXIT_CANNOT_EXECUTE: "{python} on {host} cannot be executed: set REMOTE_PYTHON to the path of Python 3.6 or "
                         "newer there.",
    EXIT_NOT_FOUND: "No Python was found on {host} (tried {tried}): install Python 3.6 or newer there, or set "
                    "REMOTE_PYTHON to its path.",
}
# EXIT_NOT_FOUND when REMOTE_PYTHON names the one interpreter to use.
REMOTE_PYTHON_NOT_FOUND = ("REMOTE_PYTHON={python} was not found on {host}: set REMOTE_PYTHON to the path of "
                           "Python 3.6 or newer there, or leave it empty to use python3 or python.")


OLD_PYTHON_SAYS = re.compile(r"osync\.py agent: Python 3\.6 or newer is needed, this is (\S{1,40})")


def stub_python_version(detail):
    """The version an old Python's stub wrote on stderr ("unknown" when it is not there);
    `detail` is that stderr as read_tail() gives it."""
    found = OLD_PYTHON_SAYS.findall(detail)
    return found[-1] if found else "unknown"


def sudo_reports_missing(code, stderr_text):
    """`sudo -n PROGRAM` reports a missing PROGRAM as exit code 1 and "command not
    found", not as 127 the way env and the shell do."""
    return code == 1 and "sudo:" in stderr_text and "command not found" in stderr_text


def own_source():
    """The bytes of osync.py that the remote Python runs as the agent: this module's file,
    or, in a PyInstaller binary (sys.frozen), the copy of osync.py bundled in it, since a
    frozen module's __file__ names a compiled file that is not on disk."""
    bundle = getattr(sys, "_MEIPASS", None) if getattr(sys, "frozen", False) else None
    if bundle:
        path = os.path.join(bundle, "osync.py")
        remedy = "build the binary with packaging/pyinstaller/osync.spec, which bundles osync.py"
    else:
        path = os.path.abspath(__file__)
        remedy = "make it readable, or reinstall osync.py"
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ReplicaError("osync.py cannot read its own source %s to start the agent on the target (%s): %s."
                           % (path, error.strerror or error, remedy))


def parse_agent_hello(line):
    """(magic number, Python version) from the loader's hello line, or None when the line
    is anything else (a broken or hostile host): such a host is sent the source."""
    match = AGENT_HELLO_LINE.match(line)
    if not match:
        return None
    return bytes.fromhex(match.group("magic").decode("ascii")), match.group("version").decode("ascii")


# The header of a .pyc: the magic number, then (3.7 and newer, PEP 552) a flags word, then
# the source's mtime and size, or (flag bit 0) the source's hash.
PYC_HEADER_SIZE = 16 if sys.version_info >= (3, 7) else 12
PYC_HASH_BASED = 0x1
PYC_KNOWN_FLAGS = 0x3
MARSHALED_CODE_TYPES = (b"c", b"\xe3")   # a code object, without and with marshal's reference flag


def valid_pyc_code(pyc_path, source, status):
    """The marshaled code in the .pyc at pyc_path when it is this Python's and was compiled
    from this very source (its header holds this magic number and the source's mtime and
    size, or its hash); None for a missing, foreign, stale or damaged .pyc."""
    import importlib.util
    try:
        with open(pyc_path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    if len(data) <= PYC_HEADER_SIZE or data[:4] != importlib.util.MAGIC_NUMBER:
        return None
    if PYC_HEADER_SIZE == 16:
        flags = struct.unpack("<I", data[4:8])[0]
        if flags & ~PYC_KNOWN_FLAGS:
            return None
        if flags & PYC_HASH_BASED:
            matches = data[8:16] == importlib.util.source_hash(source)
        else:
            matches = data[8:16] == struct.pack("<II", int(status.st_mtime) & 0xFFFFFFFF,
                                                status.st_size & 0xFFFFFFFF)
    else:
        matches = data[4:12] == struct.pack("<II", int(status.st_mtime) & 0xFFFFFFFF, status.st_size & 0xFFFFFFFF)
    code = data[PYC_HEADER_SIZE:]
    return code if matches and code[:1] in MARSHALED_CODE_TYPES else None


def own_bytecode(magic):
    """(osync.py's code marshaled for a remote Python whose bytecode is `magic`, or None;
    the reason, for the verbose log).  Only this Python's own bytecode, so only for the
    very same magic number, and only when osync.py was imported (by a launcher, or as
    `python -m osync`) rather than run as a script or from a PyInstaller binary.  The
    cached .pyc goes when its header matches the source on disk; else the source is
    compiled here: a stale .pyc is never sent."""
    import importlib.util
    import marshal
    if getattr(sys, "frozen", False):
        return None, "osync.py runs from a binary"
    spec = globals().get("__spec__")
    if spec is None:
        return None, "osync.py runs as a script"
    if magic != importlib.util.MAGIC_NUMBER:
        return None, "another Python version than this one (%s)" % sys.version.split()[0]
    path = os.path.abspath(__file__)
    try:
        with open(path, "rb") as handle:
            source = handle.read()
            status = os.fstat(handle.fileno())
    except OSError:
        return None, "osync.py cannot be read"
    try:
        cached = getattr(spec, "cached", None) or importlib.util.cache_from_source(path)
    except NotImplementedError:   # an interpreter without a bytecode cache
        cached = None
    code = valid_pyc_code(cached, source, status) if cached else None
    if code is not None:
        return code, "from " + cached
    try:
        return marshal.dumps(compile(source, "osync.py", "exec", dont_inherit=True)), "compiled here"
    except (SyntaxError, ValueError):   # the file on disk changed into something else
        return None, "osync.py on disk does not compile"


def agent_payload(hello):
    """What answers the loader's hello line: (b"CODE" or b"SOURCE", osync.py as bytecode
    or source, how it is sent, for the verbose log)."""
    parsed = parse_agent_hello(hello)
    if parsed is None:
        return b"SOURCE", own_source(), "as source (its Python's hello was not understood)"
    magic, version = parsed
    code, why = own_bytecode(magic)
    if code is not None:
        return b"CODE", code, "as bytecode for its Python %s (%s)" % (version, why)
    return b"SOURCE", own_source(), "as source for its Python %s (%s)" % (version, why)


def write_to_agent(process, data):
    """Write to the starting agent; a stream that broke shows in its exit code instead."""
    try:
        process.stdin.write(data)
        process.stdin.flush()
    except OSError:
        pass


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
        # A key named on purpose must exist; the default ~/.ssh/id_rsa may be missing (ssh
        # then uses its agent and other keys), and so may any key when a password file or
        # Kerberos is there to fall back on, as osync v1.3 does.
        explicit = cfg.origin["SSH_RSA_PRIVATE_KEY"] != "default"
        if key and not self.key and explicit and not cfg["SSH_PASSWORD_FILE"] and not cfg["KRB5"]:
            raise ConfigError("%s: SSH_RSA_PRIVATE_KEY %s does not exist or is not a file: give the path of the ssh "
                              "private key, or leave SSH_RSA_PRIVATE_KEY unset to use ssh's own keys and agent."
                              % (cfg.origin["SSH_RSA_PRIVATE_KEY"], key))
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
                raise ReplicaError("SSH_PASSWORD_FILE needs sshpass, which is not installed: %s."
                                   % install_hint("sshpass"))
            argv = ["sshpass", "-f", self.password_file] + argv
        if not shutil.which("ssh"):
            raise ReplicaError("ssh is not installed; it is needed for the target %s: %s."
                               % (self.destination(), install_hint("ssh")))
        self.master_stderr = tempfile.TemporaryFile()
        self.master = CHILDREN.start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.master_stderr)
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
        rsync_path = " ".join(shlex.quote(arg) for arg in self.remote_prefix() + [remote_rsync_program(self.cfg)])
        return ["-e", shell, "--rsync-path=" + rsync_path, "-s"]

    def start_agent(self, role, state_dir):
        """Start the loader under the remote Python, send it osync.py, wait for the agent's
        banner, open the replica."""
        loader = AGENT_LOADER.encode("ascii")
        interpreters = [self.cfg["REMOTE_PYTHON"]] if self.cfg["REMOTE_PYTHON"] else ["python3", "python"]
        tried = []
        for python in interpreters:
            stderr_file = tempfile.TemporaryFile()
            process = CHILDREN.start(self.command([python, "-c", AGENT_STUB, str(len(loader))]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_file)
            try:
                banner = self._send_agent(process, loader)
            except ReplicaError:
                kill_process_group(process)
                raise
            if banner is not None:
                agent = AgentClient(process, self.host, stderr_file)
                try:
                    paths = checked_open_reply(agent.call("open", role, self.path, state_dir), self.host,
                                               self.path, state_dir)
                except ReplicaError:
                    kill_process_group(process)
                    raise
                self.out.verbose("Agent on %s runs under Python %s." % (self.host, paths["python"]))
                return RemoteReplica(role, agent, self.rsync_host(), paths)
            code = process.wait()
            detail = read_tail(stderr_file)
            tried.append(python)
            if code == EXIT_NOT_FOUND or sudo_reports_missing(code, detail):
                continue
            raise ReplicaError(self.start_failure(python, code, detail))
        if self.cfg["REMOTE_PYTHON"]:
            raise ReplicaError(REMOTE_PYTHON_NOT_FOUND.format(python=self.cfg["REMOTE_PYTHON"], host=self.host))
        raise ReplicaError(AGENT_START_FAILURES[EXIT_NOT_FOUND].format(host=self.host, tried=", ".join(tried)))

    def start_failure(self, python, code, detail):
        """The sentence for an agent that ended with exit code `code` before its banner."""
        if code == EXIT_SSH_FAILED:
            return ssh_failure(self.host, self.port, detail, code)
        template = AGENT_START_FAILURES.get(code)
        if template is not None:
            return template.format(host=self.host, python=python, version=stub_python_version(detail),
                                   tried=python)
        return "The osync.py agent could not start on %s (exit code %d)%s." % (
            self.host, code, ": " + detail if detail else "")

    def _send_agent(self, process, loader):
        """The loader, then osync.py in the form its hello asks for: one round trip more on
        the same connection, before the banner.  Returns the agent's banner line, or None
        when the stream ends first (the exit code says why)."""
        write_to_agent(process, loader)
        hello = self._read_banner(process, AGENT_HELLO)
        if hello is None:
            return None
        kind, payload, how = agent_payload(hello)
        self.out.verbose("osync.py is sent to the agent on %s %s." % (self.host, how))
        write_to_agent(process, b"%s %d\n" % (kind, len(payload)))
        write_to_agent(process, payload)
        return self._read_banner(process)

    BANNER_LINE_LIMIT = 65536    # bytes of one line of login noise
    BANNER_LINES_LIMIT = 1000    # lines of login noise

    def _read_banner(self, process, prefix=AGENT_BANNER):
        """Skip login noise (motd, echo in .bashrc) up to the line that starts with
        `prefix` (the loader's hello, then the agent's banner); None when the stream ends
        first.  The noise is bounded: a line too long or too many lines end the run (a
        hostile host must not make the initiator read forever)."""
        for _ in range(self.BANNER_LINES_LIMIT):
            line = process.stdout.readline(self.BANNER_LINE_LIMIT + 1)
            if not line:
                return None
            if len(line) > self.BANNER_LINE_LIMIT:
                raise agent_violation(self.host, "a line of more than %d bytes before the agent's banner"
                                      % self.BANNER_LINE_LIMIT)
            if line.startswith(prefix):
                return line
        raise agent_violation(self.host, "more than %d lines before the agent's banner" % self.BANNER_LINES_LIMIT)

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


# ======================================================================================
# Planner
# ======================================================================================
# A pure function: (previous state, initiator scan, target scan, policy) -> decisions,
# one per path, in canonical order.  Every sync rule lives here and only here.

NEW, SAME, CHANGED, DELETED, ABSENT = "new", "same", "changed", "deleted", "absent"
NOTHING, COPY, DELETE, ATTRS, SKIP = "nothing", "copy", "delete", "attrs", "skip"
OTHER_SIDE = {"initiator": "target", "target": "initiator"}

# Why the source of a copy (or of an attribute update) won: set where the choice is made,
# so that the report says what the planner did instead of guessing it again.
WON_ONLY_CHANGED = "only-changed"   # new or changed on that side only
WON_NEWER = "newer"                 # changed on both sides: the newer mtime (ctime for attributes)
WON_PREVALENCE = "prevalence"       # changed on both sides, equal times: CONFLICT_PREVALANCE
WON_EDIT = "edit"                   # deleted on the other side, changed on this one: the edit wins
WON_SUBTREE = "subtree"             # a directory kept because items below it stay
WON_MIRROR = "mirror"               # SYNC_TYPE one-way: the source side always wins

# How a decision came out, as the executor verified it; recorded_pair() says what the new
# state records for each.
DONE = "done"                       # carried out and verified
FAILED = "failed"                   # not carried out, or not as planned
KEPT = "kept"                       # a directory to delete still holds excluded or new items
NOT_WRITTEN = "not-written"         # the destination could not be cleared for the copy
UNSETTLED = "unsettled"             # what rsync replaced was put back (saved meanwhile) or not checked
SOURCE_CHANGED = "source-changed"   # the source was edited during the transfer
SOURCE_DELETED = "source-deleted"   # the source was deleted during the transfer
SAVED_AFTER = "saved-after"         # the destination was saved again after rsync wrote it
LEFT_HALF_WRITTEN = "half-written"  # a failed copy left the destination neither as it was nor as sent
COPY_OUTCOMES = frozenset((DONE, FAILED, NOT_WRITTEN, UNSETTLED, SOURCE_CHANGED, SOURCE_DELETED, SAVED_AFTER,
                           LEFT_HALF_WRITTEN))


def unusable_dir_mode(entry):
    """Is this a directory whose mode lacks owner x (0644, 0600)?  Such a mode is not
    synced: copied, it would lock the owner out of the other copy."""
    return entry is not None and entry.kind == "d" and not entry.mode & stat.S_IXUSR


class Policy(object):
    """The settings the planner needs, as plain values."""

    def __init__(self, sync_type="", prevalence="initiator", skip_deletion=(), backup_overwrites=True,
                 permissions=True, executability=True, owner=False, group=False, hardlinks=False, acl=False,
                 xattr=False, setuid_kept=True, setgid_kept=True):
        self.sync_type = sync_type
        self.prevalence = prevalence
        self.skip_deletion = frozenset(skip_deletion)
        self.backup_overwrites = backup_overwrites
        self.permissions = permissions
        self.executability = executability
        self.owner = owner
        self.group = group
        self.hardlinks = hardlinks    # PRESERVE_HARDLINKS: leaving a hard-link group is a change
        self.acl = acl
        self.xattr = xattr
        # A file's setuid (setgid) bit is synced only with its owner (group): received by
        # root without them, a setuid program of any user would become root's.
        self.setuid_kept = setuid_kept
        self.setgid_kept = setgid_kept

    def attributes(self, entry):
        """The attributes of an entry that are synced: (mode, uid, gid, ACL fingerprint,
        xattr fingerprint), None where not.  A directory mode without owner x is never
        synced: it would make the other copy unusable.  Of a link only its own xattrs are."""
        if entry is None or entry.kind == "?":
            return (None, None, None, None, None)
        xattr = entry.xattr if self.xattr else None
        if entry.kind == "l":
            return (None, None, None, None, xattr)
        if unusable_dir_mode(entry):
            mode = None
        elif self.permissions:
            mode = entry.mode
            if entry.kind == "f" and not self.setuid_kept:
                mode &= ~stat.S_ISUID
            if entry.kind == "f" and not self.setgid_kept:
                mode &= ~stat.S_ISGID
        elif self.executability and entry.kind == "f":
            mode = entry.mode & 0o111
        else:
            mode = None
        return (mode, entry.uid if self.owner else None, entry.gid if self.group else None,
                entry.acl if self.acl else None, xattr)


class Decision(object):
    """What to do with one path.  `source` is the side whose version is copied (COPY,
    ATTRS); `side` the side where something is deleted (DELETE)."""
    __slots__ = ("path", "prev_initiator", "prev_target", "initiator", "target", "action", "source", "side",
                 "conflict", "edit_won", "backup", "reason", "note", "warning", "attributes_reason",
                 "scanned_source")

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
        self.reason = ""      # why `source` won (WON_*), for COPY and ATTRS
        self.note = ""
        self.warning = ""     # a sentence for the user about this path, whatever the action
        # A COPY whose destination's attributes changed since the state too: why the side
        # whose attributes the copy carries won (WON_*), else "".  When that side is the
        # destination, `scanned_source` is the source as the scan saw it, and the source's
        # entry is the merged one it holds once the destination's attributes are set on it
        # before the transfer (its content, the destination's attributes).
        self.attributes_reason = ""
        self.scanned_source = None

    def now(self, side):
        return self.initiator if side == "initiator" else self.target

    def before(self, side):
        return self.prev_initiator if side == "initiator" else self.prev_target

    def destination(self):
        return OTHER_SIDE[self.source]

    def copy(self, source, policy, reason, conflict=False, edit_won=False):
        self.action = COPY
        self.source = source
        self.reason = reason
        self.conflict = conflict
        self.edit_won = edit_won
        loser = self.now(OTHER_SIDE[source])
        # The old version on the destination is kept when CONFLICT_BACKUP is on, a
        # conflict's loser like any other overwrite; with it off nothing is kept.
        self.backup = loser is not None and loser.kind != "d" and policy.backup_overwrites
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

    def record(self):
        """The decision as a JSON-able list: spooled by the planner and the executor."""
        return [self.path, self.action, self.source, self.side, self.conflict, self.edit_won, self.backup,
                self.reason, self.note, self.warning, to_wire(self.prev_initiator), to_wire(self.prev_target),
                to_wire(self.initiator), to_wire(self.target), self.attributes_reason,
                to_wire(self.scanned_source)]

    @classmethod
    def from_record(cls, record):
        (path, action, source, side, conflict, edit_won, backup, reason, note, warning, prev_initiator,
         prev_target, initiator, target, attributes_reason, scanned_source) = record
        decision = cls(path, from_wire(prev_initiator), from_wire(prev_target), from_wire(initiator),
                       from_wire(target))
        decision.action, decision.source, decision.side = action, source, side
        decision.conflict, decision.edit_won, decision.backup = conflict, edit_won, backup
        decision.reason, decision.note, decision.warning = reason, note, warning
        decision.attributes_reason, decision.scanned_source = attributes_reason, from_wire(scanned_source)
        return decision

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


def left_link_group(policy, before, now):
    """With PRESERVE_HARDLINKS: was this file one of several hard links to one inode, and
    is it now a file of its own on another inode?  Replaced by a copy of itself (cp -p, a
    restore) it has the same size and mtime, yet it is a change: the other copy must
    leave the group too, or an edit of another member there would change it as well."""
    return (policy.hardlinks and before is not None and now is not None and before.kind == "f"
            and now.kind == "f" and before.nlink > 1 and now.nlink == 1 and before.ino != now.ino)


def newer_side(one, other, policy):
    """The side whose version wins a conflict, and why: newer mtime, CONFLICT_PREVALANCE on
    a tie."""
    if same_mtime(one.mtime_ns, other.mtime_ns):
        return policy.prevalence, WON_PREVALENCE
    return ("initiator" if one.mtime_ns > other.mtime_ns else "target"), WON_NEWER


def note_unusable_dir_mode(decision, policy):
    """Warn about a directory mode that is not synced because it lacks owner x: when the
    directory is copied, or the other side's mode differs."""
    if not unusable_dir_mode(decision.initiator) and not unusable_dir_mode(decision.target):
        return
    for side in ("initiator", "target"):
        entry = decision.now(side)
        if not unusable_dir_mode(entry):
            continue
        other = decision.now(OTHER_SIDE[side])
        copied = decision.action == COPY and decision.source == side
        differs = policy.permissions and other is not None and other.kind == "d" and other.mode != entry.mode
        if copied or differs:
            decision.warning = ("%s on the %s has mode %04o without owner x; its mode is not synced (chmod u+x "
                                "it to sync it again)." % (decision.path, side, entry.mode))
            return


def attribute_set_tracked(fingerprint):
    """Does an ACL or xattr fingerprint stand for a set?  "" (not tracked when that entry
    was recorded: PRESERVE_ACL / PRESERVE_XATTR were off) and ATTRIBUTES_UNSUPPORTED (the
    filesystem holds none) never count as a change."""
    return fingerprint not in (None, "", ATTRIBUTES_UNSUPPORTED)


def compared_attributes(policy, one, other):
    """policy.attributes of two entries, the mode left out of both when either is a
    directory mode that is not synced, the ACL or xattr fingerprint when either does not
    stand for a set."""
    one_attrs, other_attrs = list(policy.attributes(one)), list(policy.attributes(other))
    if unusable_dir_mode(one) or unusable_dir_mode(other):
        one_attrs[0] = other_attrs[0] = None
    for index in (3, 4):
        if not (attribute_set_tracked(one_attrs[index]) and attribute_set_tracked(other_attrs[index])):
            one_attrs[index] = other_attrs[index] = None
    return tuple(one_attrs), tuple(other_attrs)


def decide_attributes(decision, policy):
    """Same content on both sides: sync the attributes if they differ."""
    one, other = decision.initiator, decision.target
    if (one.kind == other.kind and one.mode == other.mode and one.uid == other.uid and one.gid == other.gid
            and one.acl == other.acl and one.xattr == other.xattr):
        return decision   # policy.attributes() reads nothing else of an entry: equal whatever it syncs
    if policy.attributes(one) == policy.attributes(other):
        return decision   # equal before compared_attributes leaves fields out: equal after
    initiator_attrs, target_attrs = compared_attributes(policy, decision.initiator, decision.target)
    if initiator_attrs == target_attrs:
        return decision
    changed = {}
    for side in ("initiator", "target"):
        before = decision.before(side)
        if before is None or before.kind == "?":
            changed[side] = True
        else:
            before_attrs, now_attrs = compared_attributes(policy, before, decision.now(side))
            changed[side] = before_attrs != now_attrs
    if changed["initiator"] != changed["target"]:
        source, reason = ("initiator" if changed["initiator"] else "target"), WON_ONLY_CHANGED
    else:
        if decision.initiator.ctime_ns != decision.target.ctime_ns:
            source = "initiator" if decision.initiator.ctime_ns > decision.target.ctime_ns else "target"
            reason = WON_NEWER
        else:
            source, reason = policy.prevalence, WON_PREVALENCE
        # The newer change wins; the executor logs the set it replaces, and why.
        if changed["initiator"]:
            decision.note = "changed on both replicas"
        else:
            decision.note = "differ on the two replicas and the state does not say which side changed them"
    decision.action = ATTRS
    decision.source = source
    decision.reason = reason
    return decision


def attributes_changed(policy, before, now):
    """Did the synced attributes of an item change since the state recorded it?  Not
    when the state says nothing (no entry, or an osync.sh list)."""
    if before is None or now is None or before.kind == "?":
        return False
    before_attrs, now_attrs = compared_attributes(policy, before, now)
    return before_attrs != now_attrs


def with_attributes_of(policy, entry, other):
    """`entry` with the synced attributes of `other` (same kind): what `entry` holds once
    they are set on it.  With only PRESERVE_EXECUTABILITY just the x bits are taken."""
    entry_attrs, other_attrs = compared_attributes(policy, entry, other)
    fields = {}
    if entry_attrs[0] != other_attrs[0]:
        if policy.permissions:
            fields["mode"] = other.mode
        else:
            fields["mode"] = (entry.mode & ~0o111) | (other.mode & 0o111)
    for index, name in ((1, "uid"), (2, "gid"), (3, "acl"), (4, "xattr")):
        if entry_attrs[index] != other_attrs[index]:
            fields[name] = getattr(other, name)
    return entry._replace(**fields)


def decide_copied_attributes(decision, policy):
    """A copy of content changed on its source only: rsync carries the source's
    attributes, which would revert a change of the destination's attributes made since
    the state (chmod, chown, setfacl, setfattr).  That change is kept: when only the
    destination changed its attributes they win; when both sides did, the newer change
    (ctime) wins, CONFLICT_PREVALANCE on a tie.  The content is the source's either way.
    The destination's winning attributes are set on the source before the transfer, so
    the copy carries them; the source's entry becomes that merged one."""
    source = decision.source
    destination = OTHER_SIDE[source]
    sent, kept = decision.now(source), decision.now(destination)
    if kept is None or kept.kind != sent.kind or kept.kind in ("?", "d"):
        return decision
    sent_attrs, kept_attrs = compared_attributes(policy, sent, kept)
    if sent_attrs == kept_attrs or not attributes_changed(policy, decision.before(destination), kept):
        return decision
    if not attributes_changed(policy, decision.before(source), sent):
        winner, reason = destination, WON_ONLY_CHANGED
    else:
        decision.note = "changed on both replicas"
        if kept.ctime_ns != sent.ctime_ns:
            winner = destination if kept.ctime_ns > sent.ctime_ns else source
            reason = WON_NEWER
        else:
            winner, reason = policy.prevalence, WON_PREVALENCE
    decision.attributes_reason = reason
    if winner == destination:
        decision.scanned_source = sent
        merged = with_attributes_of(policy, sent, kept)
        if source == "initiator":
            decision.initiator = merged
        else:
            decision.target = merged
    return decision


def decide_two_way(decision, policy):
    """The rules of DESIGN §3 for one path."""
    initiator, target = decision.initiator, decision.target
    if initiator is not None and target is not None and initiator == decision.prev_initiator \
            and target == decision.prev_target and initiator.kind != "?":
        # Both sides exactly as the state recorded them (the common case of a run with few
        # changes): the rules below come to the same, by a shorter way.
        return decide_attributes(decision, policy)
    status = {"initiator": side_status(decision.prev_initiator, initiator),
              "target": side_status(decision.prev_target, target)}
    split = [side for side in status if left_link_group(policy, decision.before(side), decision.now(side))]
    for side in split:
        if status[side] == SAME:
            status[side] = CHANGED
    legacy = any(entry is not None and entry.kind == "?" for entry in (decision.prev_initiator, decision.prev_target))
    if initiator is not None and target is not None:
        modified = [side for side in ("initiator", "target") if status[side] in (NEW, CHANGED)]
        # Changed on one side only: copied even when both now look alike to rsync's quick
        # check (same size, and mtimes equal to the second where one side has no
        # sub-second part): a same-size rewrite in the same second must still travel.  With
        # content digests on both sides (CHECKSUM) the comparison is exact and decides, unless
        # the change is a file that left its hard-link group.
        one_sided = len(modified) == 1 and not legacy and status[OTHER_SIDE[modified[0]]] == SAME \
            and (bool(split) or not (initiator.digest and target.digest))
        if same_content(initiator, target) and not one_sided:
            return decide_attributes(decision, policy)
        if status["initiator"] == SAME and status["target"] == SAME and not legacy:
            return decide_attributes(decision, policy)
        if len(modified) == 1:
            decision.copy(modified[0], policy, WON_ONLY_CHANGED)
            return decide_copied_attributes(decision, policy)
        winner, reason = newer_side(initiator, target, policy)
        return decision.copy(winner, policy, reason, conflict=True)
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
    if status[missing] == DELETED:
        return decision.copy(present, policy, WON_EDIT, edit_won=True)
    return decision.copy(present, policy, WON_ONLY_CHANGED)


def decide_one_way(decision, policy):
    """SYNC_TYPE mirror: the destination is made equal to the source."""
    source = "initiator" if policy.sync_type == "initiator2target" else "target"
    destination = OTHER_SIDE[source]
    now_source, now_destination = decision.now(source), decision.now(destination)
    if now_source is not None:
        if now_destination is not None and same_content(now_source, now_destination) and \
                not left_link_group(policy, decision.before(source), now_source):
            decision_attrs = decide_attributes(decision, policy)
            if decision_attrs.action == ATTRS:
                decision_attrs.source = source
                decision_attrs.reason = WON_MIRROR
            return decision_attrs
        destination_edited = side_status(decision.before(destination), now_destination) in (NEW, CHANGED)
        return decision.copy(source, policy, WON_MIRROR, conflict=now_destination is not None and destination_edited)
    if now_destination is not None:
        if destination in policy.skip_deletion:
            decision.note = "deletion skipped (SKIP_DELETION)"
            return decision
        return decision.delete(destination)
    return decision


class _DirFrame(object):
    """A directory whose decision may change once its subtree has been seen: `needs` holds
    the sides where something below it stays; `offset` is where the held decisions file
    keeps the placeholder for that."""
    __slots__ = ("decision", "needs", "offset")

    def __init__(self, decision):
        self.decision = decision
        self.needs = set()
        self.offset = None


def keep_for_subtree(decision, needs, policy):
    """A directory deleted (or replaced) on one side is kept, copied back from the other,
    when something below it stays on that side (`needs`)."""
    for side in ("initiator", "target"):
        if side not in needs:
            continue
        other = decision.now(OTHER_SIDE[side])
        if decision.kind_after(side) != "d" and other is not None and other.kind == "d":
            loser = decision.now(side)
            decision.copy(OTHER_SIDE[side], policy, WON_SUBTREE, conflict=loser is not None, edit_won=True)


class _HeldDecisions(object):
    """The decisions below an open directory frame, spilled in order to a temp file, so a
    deleted directory of a million files costs no memory.

    A frame's decision is written when the frame opens, with a one-byte placeholder for
    its `needs`; when the frame closes that byte is patched in place, and reading back
    re-applies keep_for_subtree() with it: only the open frames stay in memory."""

    PLAIN, PENDING = b"-", b"?"
    NEEDS_BITS = {"initiator": 1, "target": 2}

    def __init__(self, directory, policy):
        self.directory = directory
        self.policy = policy
        self.file = None

    def add(self, decision, frame=None):
        """Hold a decision; `frame` when it is that open frame's own decision."""
        if self.file is None:
            self.file = tempfile.TemporaryFile("w+b", dir=self.directory)
        marker = self.PLAIN
        if frame is not None:
            frame.offset = self.file.tell()
            marker = self.PENDING
        # JSON escapes every non-ASCII character (surrogates included): the line is ASCII.
        self.file.write(marker + json.dumps(decision.record()).encode("ascii") + b"\n")

    def close_frame(self, frame):
        """Write down what the closed frame's subtree needs, in place of its placeholder."""
        bits = sum(self.NEEDS_BITS[side] for side in frame.needs)
        end = self.file.tell()
        self.file.seek(frame.offset)
        self.file.write(str(bits).encode("ascii"))
        self.file.seek(end)

    def release(self):
        """Yield the held decisions in order, every frame's decision settled; the file is
        then emptied for the next outermost frame."""
        if self.file is None:
            return
        self.file.seek(0)
        for line in self.file:
            marker = line[:1]
            decision = Decision.from_record(json.loads(line[1:].decode("ascii")))
            if marker != self.PLAIN:
                bits = int(marker)
                needs = [side for side, bit in self.NEEDS_BITS.items() if bits & bit]
                keep_for_subtree(decision, needs, self.policy)
            yield decision
        self.file.seek(0)
        self.file.truncate()

    def close(self):
        if self.file is not None:
            self.file.close()


def plan(previous, initiator_scan, target_scan, policy, spool_dir=None):
    """Yield one Decision per path, in canonical order (see plan_merged)."""
    return plan_merged(merge_streams(previous, initiator_scan, target_scan), policy, spool_dir)


def plan_merged(rows, policy, spool_dir=None):
    """Yield one Decision per merged row of merge_streams(), in canonical order.

    Directories are settled after their subtree: a directory that one side deleted (or
    replaced by a file) is kept, and recreated on that side, when something below it
    stays, so that an edit made inside a deleted directory is never lost.  What waits for
    such a directory is held in a temp file in `spool_dir` (None: the system's)."""
    two_way = not policy.sync_type
    frames = []                                    # the open directory frames, outermost first
    held = _HeldDecisions(spool_dir, policy)       # every decision since the outermost frame opened
    skipped_prefix = None  # an unreadable directory: its whole subtree is left alone

    def close_frame():
        frame = frames.pop()
        keep_for_subtree(frame.decision, frame.needs, policy)
        held.close_frame(frame)
        if frames:
            for side in ("initiator", "target"):
                if frame.decision.kind_after(side) is not None:
                    frames[-1].needs.add(side)

    try:
        for rel_path, prev_initiator, prev_target, now_initiator, now_target in rows:
            while frames and not rel_path.startswith(frames[-1].decision.path + "/"):
                close_frame()
                if not frames:
                    for decision in held.release():
                        yield decision
            decision = Decision(rel_path, prev_initiator, prev_target, now_initiator, now_target)
            if now_initiator is not None and now_initiator.error:
                broken = now_initiator.error
            elif now_target is not None and now_target.error:
                broken = now_target.error
            else:
                broken = ""
            if skipped_prefix is not None and rel_path.startswith(skipped_prefix):
                decision.action = SKIP
            elif broken:
                # Whatever could not be read, a directory or not on this side, may hold a
                # subtree on either side: all of it is left alone, attributes included.
                decision.action = SKIP
                decision.note = broken
                skipped_prefix = rel_path + "/"
            else:
                skipped_prefix = None
                if two_way:
                    decide_two_way(decision, policy)
                else:
                    decide_one_way(decision, policy)
                note_unusable_dir_mode(decision, policy)
            if frames:
                for side in ("initiator", "target"):
                    if decision.action == SKIP or decision.kind_after(side) is not None:
                        frames[-1].needs.add(side)
            is_dir = ((now_initiator is not None and now_initiator.kind == "d")
                      or (now_target is not None and now_target.kind == "d"))
            if two_way and is_dir and decision.action != SKIP and not all(
                    decision.kind_after(side) == "d" for side in ("initiator", "target")):
                frames.append(_DirFrame(decision))
                held.add(decision, frames[-1])
            elif frames:
                held.add(decision)
            else:
                yield decision
        while frames:
            close_frame()
        for decision in held.release():
            yield decision
    finally:
        held.close()


def baseline(initiator_scan, target_scan):
    """--initialize: records for the paths both replicas hold with the same content, so
    a later deletion on one side is propagated; anything else is left to the first run."""
    for rel_path, _, _, now_initiator, now_target in merge_streams([], initiator_scan, target_scan):
        if now_initiator is not None and now_target is not None and not now_initiator.error \
                and not now_target.error and same_content(now_initiator, now_target):
            yield rel_path, now_initiator, now_target


def _by_side(source, source_entry, destination_entry):
    """(initiator entry, target entry) from the entries of a copy's source and destination."""
    if source == "initiator":
        return (source_entry, destination_entry)
    return (destination_entry, source_entry)


def recorded_pair(decision, outcome=DONE, arrived=None):
    """(initiator entry, target entry) the new state records for a path once its decision
    came out as `outcome`; (None, None) records nothing.  `arrived` is what the
    destination of a COPY or ATTRS holds now (None: absent).

    The state moves only forward, and only for what was verified (DESIGN §4.3): whatever
    did not come out as planned records the previous pair, so the next run sees both
    sides as they are and decides again, or records what the next run needs to finish
    the work instead of taking it for an edit."""
    previous = (decision.prev_initiator, decision.prev_target)
    current = (decision.initiator, decision.target)
    if decision.action == SKIP:
        return previous           # left alone: the next run sees it as the last one did
    if decision.action == NOTHING:
        return current            # in step (or deleted on both sides: forgotten)
    if decision.action == DELETE:
        if outcome == DONE:
            return (None, None)
        if outcome == KEPT:
            return current        # the directory stays where it is, as it is now
        return previous
    source = decision.source
    if decision.action == ATTRS:
        if outcome == DONE:
            return _by_side(source, decision.now(source), arrived)
        return previous
    if outcome not in COPY_OUTCOMES:
        raise ValueError("no copy comes out as %r" % outcome)
    if outcome == DONE:
        return _by_side(source, decision.now(source), arrived)
    if outcome in (SOURCE_CHANGED, SOURCE_DELETED):
        # What arrived, if anything, is recorded as the destination's version and the
        # source's as it was before, so the next run sends the source again (or carries its
        # deletion over) instead of taking the destination for an edit.
        recorded_source = decision.before(source)
        if recorded_source is None and arrived is not None:
            # New, copied, then changed or deleted on the source: recorded as held by both
            # (the source as it was scanned), so that the next run sends the source again
            # or carries its deletion over, whenever that happens, instead of keeping the
            # copy on one side only.
            recorded_source = decision.now(source)
        if recorded_source is None and arrived is None:
            return previous
        return _by_side(source, recorded_source, arrived)
    if outcome == LEFT_HALF_WRITTEN:
        # Neither as it was nor as sent: no version recorded for the source, so the next run
        # copies it again instead of taking the destination for an edit.
        return _by_side(source, None, arrived)
    # NOT_WRITTEN, UNSETTLED (a version saved meanwhile is back in place), SAVED_AFTER (both
    # sides are newer than the state: the next run resolves the conflict by mtime instead of
    # sending the older source over the save), FAILED with the destination as it was.
    return previous


# ======================================================================================
# Executor
# ======================================================================================
# Carries out the decisions: deletions and backups through the replica interface, one
# rsync per direction for the transfers, attribute updates; then writes the new state
# from what was verified, not from a rescan.  Decisions that need no work stream
# straight into a spool file, so memory grows with the number of changes only.

RSYNC_EXIT_MEANINGS = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting input/output files",
    5: "error starting client-server protocol", 10: "error in socket I/O", 11: "error in file I/O",
    12: "error in rsync protocol data stream", 20: "received SIGUSR1 or SIGINT",
    23: "some files could not be transferred", 24: "some files vanished before they could be transferred",
    30: "timeout in data send/receive", 35: "timeout waiting for daemon connection",
    127: "rsync was not found",
}


# The rsync command line for one direction.  Argv lists only; the paths to transfer are
# given NUL-separated through --files-from, so no name is ever parsed by a shell.

def rsync_command(cfg, source, destination, list_file, verbose, transport=None, stamp="", same_device=True):
    """rsync argv that copies exactly the listed paths from source to destination.

    `same_device` is False for paths on another filesystem than the destination's work
    dir (a mount point inside the replica): rsync then writes its temp file beside the
    final name, since from another filesystem it would copy into the final name."""
    # --no-implied-dirs: the root and parents that are not listed keep their own attributes.
    # --ignore-times: every listed path was judged different by osync.py, even one rewritten
    # with the same size in the same second, which rsync's quick check would skip.  For the
    # same reason CHECKSUM is never passed on as --checksum: osync.py compares the digests
    # itself, and rsync would skip a listed file whose bytes the destination already has
    # (a copy that takes a file out of its hard-link group) after reading both sides.
    # No -D: devices, fifos and sockets are not synced (see make_entry), and no listed
    # path that became one since the scan is recreated on the other side.
    argv = [cfg["RSYNC_EXECUTABLE"], "-lt", "-8", "--no-implied-dirs", "--ignore-times", "--from0",
            "--files-from=" + list_file]
    # A directory mode without owner x is not synced (see unusable_dir_mode): a copied
    # directory always lets its owner in.  A file's setuid (setgid) bit travels only with its
    # owner (group): rsync as root without -o would make any user's setuid program root's.
    chmod = ["Du+x"]
    if not cfg["PRESERVE_OWNER"]:
        chmod.append("Fu-s")
    if not cfg["PRESERVE_GROUP"]:
        chmod.append("Fg-s")
    argv.append("--chmod=" + ",".join(chmod))
    for key, flag in (("PRESERVE_PERMISSIONS", "-p"), ("PRESERVE_OWNER", "-o"), ("PRESERVE_GROUP", "-g"),
                      ("PRESERVE_ACL", "-A"), ("PRESERVE_XATTR", "-X"), ("COPY_SYMLINKS", "-L"),
                      ("KEEP_DIRLINKS", "-K"), ("PRESERVE_HARDLINKS", "-H")):
        if cfg[key]:
            argv.append(flag)
    if cfg["PRESERVE_EXECUTABILITY"] and not cfg["PRESERVE_PERMISSIONS"]:
        argv.append("--executability")
    if cfg["BANDWIDTH"]:
        argv.append("--bwlimit=%d" % cfg["BANDWIDTH"])   # KiB/s, rsync's default unit
    # Said either way: between local directories rsync copies whole files unless told
    # --no-whole-file, over ssh it uses the delta algorithm unless told --whole-file.
    argv.append("--no-whole-file" if cfg["DELTA_COPIES"] else "--whole-file")
    # Files are written to a temp file in the destination's work dir, then renamed into
    # place: a path holds its old or its new content, never a mix.
    if same_device:
        argv.append("--temp-dir=" + destination.temp_dir())
    # Whatever rsync replaces is kept aside, so that a version saved on the destination
    # while the run transfers is never lost (see LocalReplica.settle_transfers).
    argv += ["--backup", "--backup-dir=" + destination.transfer_backup_dir(stamp)]
    if cfg["PARTIAL"]:
        # An absolute partial dir: rsync keeps an interrupted file there under its base
        # name, never at its own name, and the next transfer of that name starts from it
        # (with the delta algorithm only: --whole-file discards it).
        argv += ["--partial", "--partial-dir=" + destination.partial_dir()]
    if cfg.switch("stats"):
        argv.append("--stats")
    if verbose:
        argv.append("-i")
    if transport is not None:
        argv += transport.rsync_arguments()
        # Compression only where data crosses a network.  No --skip-compress list, unlike
        # osync v1.3: rsync >= 3.2 negotiates zstd or lz4, for which it skips nothing by
        # suffix (rsync(1): "no compression method currently supports per-file compression
        # changes"), and both cost little on data that does not compress; an older rsync
        # compressing with zlib has its own default list of compressed suffixes.
        if cfg["RSYNC_COMPRESS"]:
            argv.append("-z")
    argv += shlex.split(cfg["RSYNC_OPTIONAL_ARGS"])
    argv += [source.location(), destination.location()]
    return argv


class Outcome(object):
    """What a run did, for the summary, the conflict list and the exit code.  The paths
    themselves are kept only when the summary will list them."""

    KINDS = ("updated", "attributes", "deleted")

    def __init__(self, keep_paths):
        self.keep_paths = keep_paths
        self.counts = dict(((kind, side), 0) for kind in self.KINDS for side in OTHER_SIDE)
        self.paths = dict(((kind, side), []) for kind in self.KINDS for side in OTHER_SIDE)
        self.conflicts = []                                  # (path, winner)
        self.conflict_reports = []                           # ConflictReport of each, in path order
        self._conflict_by_path = {}
        self.failed = 0
        self.bytes = 0                                       # size of the files copied (dry: to copy)
        self.entries = {"initiator": 0, "target": 0}        # items each side holds after the run

    def add(self, kind, side, path):
        self.counts[(kind, side)] += 1
        if self.keep_paths:
            self.paths[(kind, side)].append(path)

    def add_conflict(self, decision):
        report = ConflictReport(decision)
        self.conflicts.append((decision.path, decision.source))
        self.conflict_reports.append(report)
        self._conflict_by_path[decision.path] = report

    def settle_conflict(self, path, result):
        """How the copy of a conflict's winner came out (a copy outcome constant)."""
        report = self._conflict_by_path.get(path)
        if report is not None:
            report.result = result


class ConflictReport(object):
    """One conflict of the run, for the conflict list: both sides' versions, which won and
    why (the planner's WON_* reason), whether the loser is kept, and how the copy came out
    (`result`: DONE, another copy outcome, or None before it is carried out)."""

    def __init__(self, decision):
        self.path = decision.path
        self.winner = decision.source
        self.reason = decision.reason
        self.initiator = decision.initiator
        self.target = decision.target
        self.backup = decision.backup
        self.result = None


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
    return decision.record()


def decision_from_record(record):
    return Decision.from_record(record)


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
        self.rsync_failed = set()     # destinations an rsync of this run did not fully write
        self.journal_name = None      # the state dir file that notes the transfers until settled
        self.spool = None
        self.lists = {}
        self.link_groups = {"initiator": {}, "target": {}}   # see _note_link_member
        self.special_files_left_alone = 0   # paths holding a device, fifo or socket

    # -- the whole run ----------------------------------------------------------------------
    def execute(self, decisions, spool_dir):
        """Spool the decisions, carry out the actions; return the new state's lines (a
        generator, to be consumed once) and the outcome."""
        self.spool_dir = spool_dir
        self.spool = WorkList(spool_dir)
        for step in ("remove", "overwrite", "attrs", "attrs-before-copy", "copy-replaces-attrs"):
            for side in OTHER_SIDE:
                self.lists[(step, side)] = WorkList(spool_dir)
        actions = 0
        compared = 0
        hard_links = self.cfg["PRESERVE_HARDLINKS"]
        entries = self.outcome.entries
        write_line = self.spool.file.write
        for decision in decisions:
            compared += 1
            if self.out.progress_line is not None:
                self.out.progress("Comparing the replicas: %d paths, %d changes" % (compared, actions))
            if decision.warning:
                self.out.warn(decision.warning)
            if decision.action in (NOTHING, SKIP):
                if decision.note:
                    self._report_note(decision)
                if hard_links:   # _note_link_member's own check, taken out of the loop
                    self._note_link_member(decision)
                pair = recorded_pair(decision)
                initiator, target = pair
                if pair != (decision.prev_initiator, decision.prev_target):
                    self.state_unchanged = False
                if initiator is not None and initiator.kind != "?":
                    entries["initiator"] += 1
                if target is not None and target.kind != "?":
                    entries["target"] += 1
                if initiator is not None or target is not None:
                    write_line(state_line(decision.path, initiator, target))
            else:
                actions += 1
                self.state_unchanged = False
                self._report_plan(decision)
                self.spool.file.write("@" + json.dumps(decision_record(decision)) + "\n")
                self._list_work(decision)
        self.out.progress_done()
        if self.special_files_left_alone:
            count = self.special_files_left_alone
            self.out.notice("Left %d %s alone that %s a device, fifo or socket, which osync does not sync "
                            "(--verbose lists %s)." % (count, "path" if count == 1 else "paths",
                                                       "holds" if count == 1 else "hold",
                                                       "it" if count == 1 else "them"))
        self._check_deletion_share()
        if actions and not self.dry:
            self._carry_out()
        if self.dry:
            self.close()
            self.report_failures()
            return iter(()), self.outcome
        return self._new_state(), self.outcome

    def _check_deletion_share(self):
        """The mass-deletion breaker: stop before any write when the plan deletes more than
        MAX_DELETION_SHARE percent of what a replica holds (an emptied or unmounted disk, a
        wrong path).  Deletions made on both sides are forgotten, never counted here."""
        limit = self.cfg["MAX_DELETION_SHARE"]
        if not limit or self.cfg.switch("allow_mass_deletion"):
            return
        deletions = {"initiator": 0, "target": 0}
        held = dict(self.outcome.entries)
        for decision in self._spooled_actions():
            for side in OTHER_SIDE:
                if decision.now(side) is not None:
                    held[side] += 1
            if decision.action == DELETE:
                deletions[decision.side] += 1
        for side in ("initiator", "target"):
            count = deletions[side]
            if count > MASS_DELETION_MINIMUM and count * 100 > limit * held[side]:
                self.close()
                refuse("mass-deletion",
                       "This run would delete %d of the %d items on the %s replica %s, more than MAX_DELETION_SHARE "
                       "(%d%%)" % (count, held[side], side, self.replicas[side].display, limit),
                       "Check that replica, and if those deletions are intended, run once with "
                       "--allow-mass-deletion (or raise MAX_DELETION_SHARE)")

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
            if decision.scanned_source is not None:
                # The destination's attributes win: set on the source before the transfer,
                # which then carries them back with the source's content.
                self.lists[("attrs-before-copy", decision.source)].add(self._attributes_item(
                    decision.path, decision.now(destination), decision.scanned_source,
                    self._attributes_why(decision, destination, decision.attributes_reason)))
            elif decision.attributes_reason:
                # Both changed them, the source's newer change wins: the copy replaces the
                # destination's set, which is logged before.
                self.lists[("copy-replaces-attrs", destination)].add(self._attributes_item(
                    decision.path, decision.now(decision.source), decision.now(destination),
                    self._attributes_why(decision, decision.source, decision.attributes_reason)))
        elif decision.action == ATTRS:
            destination = decision.destination()
            self.lists[("attrs", destination)].add(self._attributes_item(
                decision.path, decision.now(decision.source), decision.now(destination),
                self._attributes_why(decision, decision.source, decision.reason)))

    def _attributes_item(self, path, winner, loser, why):
        """An item of an "attrs" list, to give `loser` (an entry of the side it is set on)
        the synced attributes of `winner` (the other side's): [path, loser entry, mode, uid,
        gid, winner's ACL fingerprint, winner's xattr fingerprint, why the newer change won or
        ""].  An ACL or xattr set travels only where the two sides' differ; its values are
        read from the winner's side when it is applied."""
        mode, uid, gid = self.policy.attributes(winner)[:3]
        if mode is not None and not self.policy.permissions:
            mode = (loser.mode & ~0o111) | mode     # PRESERVE_EXECUTABILITY only: just the x bits
        winner_attrs, loser_attrs = compared_attributes(self.policy, winner, loser)
        acl = winner_attrs[3] if winner_attrs[3] != loser_attrs[3] else None
        xattr = winner_attrs[4] if winner_attrs[4] != loser_attrs[4] else None
        return [path, to_wire(loser), mode, uid, gid, acl, xattr, why]

    def _attributes_why(self, decision, winner, reason):
        """Why the attributes of `winner` replace those of a path changed on both sides
        (for the log), "" when only one side changed them."""
        if reason == WON_NEWER:
            return "%s; the %s's newer change wins" % (decision.note, winner)
        if reason == WON_PREVALENCE:
            return "%s; the %s's wins (changed at the same time, CONFLICT_PREVALANCE=%s)" % (
                decision.note, winner, self.policy.prevalence)
        return ""

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
        """(initiator entry, target entry) to record for a decision that was carried out:
        find out how it came out, report that, and record what the planner says for it."""
        if decision.action == DELETE:
            problem = self.problems.get(("remove", decision.side, decision.path))
            if problem is None:
                self.outcome.add("deleted", decision.side, decision.path)
                return recorded_pair(decision, DONE)
            return recorded_pair(decision, KEPT if problem == Answer.KEPT else FAILED)
        destination = decision.destination()
        if decision.action == COPY:
            outcome, arrived = self._copy_outcome(decision, fresh)
            if decision.conflict:
                self.outcome.settle_conflict(decision.path, outcome)
            if outcome == DONE:
                self.outcome.add("updated", destination, decision.path)
                if arrived.kind == "f":
                    self.outcome.bytes += arrived.size
            return recorded_pair(decision, outcome, arrived)
        if ("attrs", destination, decision.path) in self.problems or fresh[(destination, decision.path)] is None:
            return recorded_pair(decision, FAILED)
        self.outcome.add("attributes", destination, decision.path)
        return recorded_pair(decision, DONE, fresh[(destination, decision.path)])

    def _copy_outcome(self, decision, fresh):
        """How a copy came out (the planner's outcome constants), reported, and what its
        destination holds now."""
        source, destination, path = decision.source, decision.destination(), decision.path
        if ("overwrite", destination, path) in self.problems:
            return NOT_WRITTEN, None
        if ("settle", destination, path) in self.problems:
            return UNSETTLED, None
        sent = decision.now(source)
        source_now = fresh[(source, path)]
        arrived = fresh[(destination, path)]
        if arrived is not None and arrived.error:
            arrived = None
        if not unchanged_since_scan(sent, source_now):
            # A log appended to, a file saved or deleted during the run.
            if source_now is None:
                self.out.notice("%s was deleted on the %s during its transfer; the next run deletes it on the "
                                "%s too." % (path, source, destination))
                return SOURCE_DELETED, arrived
            self.out.notice("%s changed on the %s during its transfer; the next run sends it again." % (path, source))
            return SOURCE_CHANGED, arrived
        if arrived is not None and not same_content(sent, arrived) and destination not in self.rsync_failed \
                and not unchanged_since_scan(decision.now(destination), arrived):
            # rsync wrote every path and said so: what is there now was saved after it (an editor).
            self.out.notice("%s was saved on the %s after the run wrote it: the saved version stays and the "
                            "next run resolves the conflict." % (path, destination))
            return SAVED_AFTER, arrived
        if arrived is None or not same_content(sent, arrived):
            self._fail("Could not copy %s from the %s to the %s; the next run tries again."
                       % (path, source, destination))
            if arrived is not None and not unchanged_since_scan(decision.now(destination), arrived):
                return LEFT_HALF_WRITTEN, arrived
            return FAILED, arrived
        return DONE, arrived

    # -- reporting ----------------------------------------------------------------------------
    def _report_note(self, decision):
        if decision.action == SKIP and only_special_files((decision.initiator, decision.target)):
            # Not an error: a device, fifo or socket is left alone on every run.
            self.out.verbose("Left %s alone on both replicas: %s." % (decision.path, decision.note))
            self.special_files_left_alone += 1
        elif decision.action == SKIP:
            self.out.error("Left %s alone on both replicas: %s." % (decision.path, decision.note))
            self.outcome.failed += 1
        else:
            self.out.verbose("%s: %s." % (decision.path, decision.note))

    def _report_plan(self, decision):
        if decision.conflict:
            self.out.notice(self._conflict_notice(decision))
            self.outcome.add_conflict(decision)
        elif decision.edit_won:
            self.out.notice(self._edit_won_notice(decision))
        if self.dry:
            kind = {COPY: "updated", ATTRS: "attributes", DELETE: "deleted"}[decision.action]
            self.outcome.add(kind, decision.side if decision.action == DELETE else decision.destination(),
                             decision.path)
            if decision.action == COPY and decision.now(decision.source).kind == "f":
                self.outcome.bytes += decision.now(decision.source).size
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

    def _conflict_notice(self, decision):
        """The conflict notice: the reason the planner gave for the winner, and what becomes
        of the losing version."""
        winner, loser = decision.source, decision.destination()
        fate = self._loser_fate(decision)
        if decision.reason == WON_MIRROR:
            return ("Conflict on %s: changed on the %s, but SYNC_TYPE=%s mirrors the %s: the %s's version replaces "
                    "the %s's edit, which %s." % (decision.path, loser, self.policy.sync_type, winner, winner,
                                                  loser, fate))
        if decision.reason == WON_SUBTREE:
            return ("Conflict on %s: the %s holds a %s there, but items below the %s's directory stay: the directory "
                    "stays and the %s's version %s." % (decision.path, loser, KIND_NAMES.get(
                        decision.now(loser).kind, "item"), winner, loser, fate))
        if decision.reason == WON_PREVALENCE:
            why = "equal mtimes, CONFLICT_PREVALANCE=%s" % self.policy.prevalence
        else:
            why = "newer"
        return ("Conflict on %s: changed on both replicas; the %s's version wins (%s), the %s's version %s."
                % (decision.path, winner, why, loser, fate))

    def _edit_won_notice(self, decision):
        """The notice for a deletion undone because the other side changed (or keeps items
        below) what was deleted."""
        copied = "would be copied" if self.dry else "is copied"
        if decision.reason == WON_SUBTREE:
            return ("%s was deleted on the %s but items below it stay on the %s: the directory %s back."
                    % (decision.path, decision.destination(), decision.source, copied))
        return ("%s was deleted on the %s but changed on the %s: the changed version %s back."
                % (decision.path, decision.destination(), decision.source, copied))

    @staticmethod
    def _loser_fate(decision):
        """What happens to a conflict's losing version, for the conflict notice."""
        if decision.backup:
            return "is kept in its backup dir"
        loser = decision.now(decision.destination())
        if loser is not None and loser.kind == "d":
            return "was a directory"
        return "is replaced (CONFLICT_BACKUP=no)"

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
        self._attributes_before_copies()
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            still_copied = (item for item in self.lists[("overwrite", side)]
                            if ("overwrite", side, item[0]) not in self.problems)
            self._apply("overwrite", side, still_copied,
                        lambda chunk: replica.prepare_overwrite(chunk, self.stamp, multiple, self.options),
                        "Cannot replace %s on the %s replica: %s.")
        journal = self.write_transfer_journal(multiple)
        for destination in OTHER_SIDE:
            self._transfer(OTHER_SIDE[destination], destination)
        self.settle_all(self.stamp, multiple, lambda side: self._settle_items(side))
        if journal:
            os.unlink(journal)
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            self._apply("attrs", side, self.lists[("attrs", side)],
                        lambda chunk: self._set_attributes(side, chunk),
                        "Cannot set the attributes of %s on the %s replica: %s.")

    def _attributes_before_copies(self):
        """Before any transfer: log the attribute sets that copies replace although they
        changed on both sides, and set the destination's winning attributes on the source
        of each copy that must carry them.  Where that cannot be done (the source or the
        destination changed since the scan, an error) the copy is not made either: the
        path stays as it is on both sides, and the next run sees both changes again."""
        for side in OTHER_SIDE:
            for batch in in_chunks(self.lists[("copy-replaces-attrs", side)], self.ATTRIBUTE_BATCH):
                notices = self._replaced_attributes(side, batch)
                for item in batch:
                    if item[0] in notices:
                        self.out.notice(notices[item[0]])
        for source in OTHER_SIDE:
            self._apply("attrs", source, self.lists[("attrs-before-copy", source)],
                        lambda chunk: self._set_attributes(source, chunk),
                        "Cannot set the attributes of %s on the %s replica before copying it: %s.")
            destination = OTHER_SIDE[source]
            for item in self.lists[("attrs-before-copy", source)]:
                problem = self.problems.get(("attrs", source, item[0]))
                if problem is not None:
                    self.problems[("overwrite", destination, item[0])] = problem

    # ACL and xattr values of this many items at most travel in one message (each set of
    # one item is at most ATTRIBUTE_BYTES_LIMIT), so a message stays within its limit.
    ATTRIBUTE_BATCH = 64

    def _set_attributes(self, destination, chunk):
        """Attribute-only updates of a chunk of the destination's "attrs" list: the ACL and
        xattr sets that differ are read from the source (still as the scan saw them), the
        older set of a path changed on both sides is logged, then everything is applied;
        one answer per item."""
        source = OTHER_SIDE[destination]
        answers = []
        for batch in in_chunks(chunk, self.ATTRIBUTE_BATCH):
            wanted = [[item[0], item[5], item[6]] for item in batch if item[5] is not None or item[6] is not None]
            values = {}
            if wanted:
                for asked, answer in zip(wanted, self.replicas[source].read_attributes(wanted, self.options)):
                    values[asked[0]] = answer
            replaced = self._replaced_attributes(destination, [item for item in batch if item[7]])
            updates = []
            for item in batch:
                answer = values.get(item[0], [None, None])
                if isinstance(answer, str):
                    continue
                updates.append(item[:5] + answer)
            results = iter(self.replicas[destination].set_attributes(updates, self.options) if updates else ())
            for item in batch:
                answer = values.get(item[0], [None, None])
                if answer == Answer.CHANGED:
                    # Left for the next run, which sees the source's new set: noted here, as the
                    # source (not the destination) changed.
                    self.out.notice("%s changed on the %s during the run; it is left for the next run."
                                    % (item[0], source))
                    self.problems[("attrs", destination, item[0])] = Answer.CHANGED
                    answers.append(Answer.OK)
                    continue
                if isinstance(answer, str):
                    answers.append("cannot read them on the %s: %s" % (source, answer))
                    continue
                result = next(results)
                if result == Answer.OK and item[0] in replaced:
                    self.out.notice(replaced[item[0]])
                answers.append(result)
        return answers

    def _replaced_attributes(self, destination, items):
        """{path: notice} for the paths whose attributes changed on both sides: the newer
        change wins, and the notice says what the older one (on `destination`) was."""
        wanted = []
        for item in items:
            old = from_wire(item[1])
            if item[5] is not None or item[6] is not None:
                wanted.append([item[0], old.acl if item[5] is not None else None,
                               old.xattr if item[6] is not None else None])
        old_sets = {}
        if wanted:
            for asked, answer in zip(wanted, self.replicas[destination].read_attributes(wanted, self.options)):
                if not isinstance(answer, str):
                    old_sets[asked[0]] = answer
        notices = {}
        for item in items:
            path, old, (mode, uid, gid) = item[0], from_wire(item[1]), item[2:5]
            parts = []
            if mode is not None and mode != old.mode:
                parts.append("mode %04o" % old.mode)
            if uid is not None and uid != old.uid:
                parts.append("owner %d" % old.uid)
            if gid is not None and gid != old.gid:
                parts.append("group %d" % old.gid)
            # Changed again meanwhile (then left for the next run anyway): only its fingerprint is known.
            acls, xattrs = old_sets.get(path, (None, None))
            if item[5] is not None:
                parts.append("ACL " + (shown_acls(attribute_values_from_wire(acls)) if acls is not None else old.acl))
            if item[6] is not None:
                parts.append("xattrs " + (shown_xattrs(attribute_values_from_wire(xattrs)) if xattrs is not None
                                          else old.xattr))
            notices[path] = ("Attributes of %s %s, and the %s's are replaced: %s."
                             % (path, item[7], destination, "; ".join(parts)))
        return notices

    def settle_all(self, stamp, multiple, items_of):
        """Deal with what the transfers of the run `stamp` replaced, on both replicas."""
        for side in OTHER_SIDE:
            replica = self.replicas[side]
            self._apply("settle", side, items_of(side),
                        lambda chunk: replica.settle_transfers(chunk, stamp, multiple, self.options),
                        "Cannot keep what rsync replaced at %s on the %s replica: %s.")
            replica.finish_transfers(stamp)

    def journal_path(self):
        return os.path.join(self.replicas["initiator"].state_dir, self.journal_name)

    def write_transfer_journal(self, multiple):
        """Before rsync replaces anything: note in the initiator's state dir what the settle
        step will need, so that a run killed before it settled (kill -9, power loss) is
        settled by the next one: a version saved meanwhile goes back in place instead of
        staying replaced by the older one.  Returns the journal's path."""
        def lines():
            yield json.dumps({"stamp": self.stamp, "multiple": multiple}) + "\n"
            for side in OTHER_SIDE:
                for item in self._settle_items(side):
                    yield json.dumps([side, item]) + "\n"
        if not self.journal_name:
            return None
        self.replicas["initiator"].write_state_file(self.journal_name, lines())
        return self.journal_path()

    def settle_interrupted_transfers(self, spool_dir):
        """Settle the transfers of an earlier run that stopped before it could (its journal
        is still there), before this run scans anything."""
        path = self.journal_path()
        items = {"initiator": WorkList(spool_dir), "target": WorkList(spool_dir)}
        try:
            try:
                with open(path, "r", encoding="utf-8", errors="surrogateescape") as handle:
                    header = json.loads(handle.readline() or "{}")
                    stamp = header.get("stamp") if isinstance(header, dict) else None
                    if not isinstance(stamp, str) or not re.match(r"^[0-9.-]+\Z", stamp):
                        raise ValueError("it names no run")
                    for line in handle:
                        side, item = json.loads(line)
                        items[side].add(item)
            except FileNotFoundError:
                return
            except OSError as error:
                raise ReplicaError("Cannot read the transfer journal %s: %s." % (path, error.strerror))
            except (ValueError, KeyError, TypeError) as error:
                self.out.warn("The transfer journal %s cannot be read (%s); it is removed." % (path, error))
            else:
                self.out.notice("An earlier run stopped before it checked what its transfers replaced; checking "
                                "it now.")
                self.settle_all(stamp, bool(header.get("multiple")), lambda side: items[side])
            os.unlink(path)
        finally:
            for work_list in items.values():
                work_list.close()

    def _apply(self, step, side, items, call, failure):
        """Run one replica operation over a work list in chunks; remember and report
        every path that did not come out "ok" (success is the rule, so only those are kept)."""
        for chunk in in_chunks(items, self.CHUNK):
            for item, answer in zip(chunk, call(chunk)):
                if answer == Answer.OK:
                    continue
                path = item[0]
                self.problems[(step, side, path)] = answer
                if answer == Answer.KEPT:
                    self.out.notice("Kept directory %s on the %s: it still holds items that are excluded or new."
                                    % (path, side))
                elif answer == Answer.CHANGED:
                    self.out.notice("%s changed on the %s during the run; it is left for the next run."
                                    % (path, side))
                elif answer == Answer.SAVED_RESTORED:
                    self.out.notice("%s was saved on the %s while the run transferred it: the saved version is "
                                    "back in place and the next run resolves the conflict." % (path, side))
                elif answer == Answer.SAVED_KEPT:
                    self.out.notice("%s was saved on the %s while the run transferred it and changed again: the "
                                    "saved version is kept in its backup dir." % (path, side))
                else:
                    self._fail(failure % (path, side, answer))

    def _copies_to(self, destination):
        """The spooled COPY decisions whose destination is still to be written, then, with
        PRESERVE_HARDLINKS, the in-step hard links of the files they copy (see
        _link_companions)."""
        source = OTHER_SIDE[destination]
        linked = set()   # the source inodes of copied files that have other hard links
        for decision in self._spooled_actions():
            if decision.action == COPY and decision.destination() == destination \
                    and ("overwrite", destination, decision.path) not in self.problems:
                sent = decision.now(source)
                if sent.kind == "f" and sent.nlink > 1 and self.link_groups[source]:
                    linked.add(sent.ino)
                yield decision
        for companion in self._link_companions(source, linked):
            yield companion

    def _note_link_member(self, decision):
        """With PRESERVE_HARDLINKS, remember a file in step on both sides that has other
        hard links (on either side), by its inode there.  Only such files are held, never
        every file."""
        if not self.cfg["PRESERVE_HARDLINKS"] or decision.action != NOTHING:
            return
        initiator, target = decision.initiator, decision.target
        if initiator is None or target is None or initiator.kind != "f" or target.kind != "f" \
                or initiator.error or target.error:
            return
        for side, entry in (("initiator", initiator), ("target", target)):
            if entry.nlink > 1:
                self.link_groups[side].setdefault(entry.ino, []).append((decision.path, initiator, target))

    def _link_companions(self, source, inodes):
        """rsync -H links only the files of one transfer list: a file copied to join a
        hard-link group (a new `ln`) goes with the other members, already in step, so
        that rsync makes them one group on the destination.  They go as copies that change
        nothing (the destination's version is the source's), settled like any transfer;
        their state stays, since inode and link count are no change of their own."""
        for inode in sorted(inodes):
            for path, initiator, target in self.link_groups[source].get(inode, ()):
                companion = Decision(path, initiator, target, initiator, target)
                companion.source = source
                yield companion

    def _settle_items(self, destination):
        for decision in self._copies_to(destination):
            yield [decision.path, to_wire(decision.now(destination)), to_wire(decision.now(decision.source)),
                   decision.backup]

    def _transfer(self, source, destination):
        """rsync every path going from source to destination (verified later, while the
        new state is written): one rsync for the paths on the work dir's filesystem, one
        more for those below a mount point inside the destination, if any."""
        destination_replica = self.replicas[destination]
        with tempfile.NamedTemporaryFile("wb", prefix="osync-files-", dir=self.spool_dir) as local_list, \
                tempfile.NamedTemporaryFile("wb", prefix="osync-files-", dir=self.spool_dir) as foreign_list:
            counts = {local_list: 0, foreign_list: 0}
            sending = (decision.path for decision in self._copies_to(destination))
            for chunk in in_chunks(sending, self.CHUNK):
                for path, filesystem in zip(chunk, destination_replica.filesystems_of(chunk)):
                    listing = local_list if filesystem == Answer.WORK_FILESYSTEM else foreign_list
                    # "./" keeps rsync from reading a name that starts with # or ; as a comment.
                    listing.write(b"./" + os.fsencode(path) + b"\0")
                    counts[listing] += 1
            for listing, same_device in ((local_list, True), (foreign_list, False)):
                if counts[listing]:
                    listing.flush()
                    self._run_rsync(source, destination, listing.name, same_device)

    # A line of rsync --info=progress2: bytes so far, percent, rate, time left, and
    # "(xfr#N, to-chk=LEFT/TOTAL)" once a file is done.
    PROGRESS_LINE = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+)\s+(\d+:\d+:\d+)"
                               r"(?:\s+\(xfr#(\d+), (?:ir|to)-chk=(\d+)/(\d+)\))?\s*$")

    def _show_progress(self, source, destination, line):
        """Turn one rsync progress line into the terminal's progress line; False for
        any other line (rsync's -i list), which is kept for the log."""
        match = self.PROGRESS_LINE.match(line)
        if match is None:
            return False
        done, percent, rate, left, files, to_check, total = match.groups()
        text = "Copying to the %s: %s%%, %s bytes, %s" % (destination, percent, done, rate)
        if total:
            text += ", %d/%s files" % (int(total) - int(to_check), total)
        self.out.progress(text + ", %s left" % left)
        return True

    def _run_rsync(self, source, destination, list_file, same_device):
        argv = rsync_command(self.cfg, self.replicas[source], self.replicas[destination], list_file,
                             verbose=self.out.screen_threshold <= VERBOSE, transport=self.transport,
                             stamp=self.stamp, same_device=same_device)
        if self.out.progress_line is not None and self.out.progress_line.enabled():
            # rsync's own overall progress (rsync >= 3.1), shown on the terminal only.
            argv.insert(len(argv) - 2, "--info=progress2")
            self.out.debug("Running: %s" % " ".join(shlex.quote(arg) for arg in argv))
            code, stdout, stderr = run_command_watched(
                argv, lambda line: self._show_progress(source, destination, line))
            self.out.progress_done()
        else:
            self.out.debug("Running: %s" % " ".join(shlex.quote(arg) for arg in argv))
            code, stdout, stderr = run_command(argv)
        if code not in (0, 24):
            self.rsync_failed.add(destination)
        if stdout.strip():
            self.out.verbose("rsync %s -> %s:\n%s" % (source, destination, stdout.strip()))
        if code == 24:
            self.out.notice("Some files vanished on the %s during the transfer; the next run handles them."
                            % source)
        elif code not in (0, 23):
            self.out.error("rsync from the %s to the %s failed with exit code %d (%s): %s" % (
                source, destination, code, RSYNC_EXIT_MEANINGS.get(code, "unknown error"), one_line(stderr)))
        elif stderr.strip():
            self.out.warn("rsync from the %s to the %s said: %s" % (source, destination, one_line(stderr)))


# ======================================================================================
# Run
# ======================================================================================
# One sync end to end: checks, guards, locks, plan, execution, state, cleanup, summary,
# exit code.  Then the command line and main().

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


class Hooks(object):
    """The before and after commands of a run, run as osync v1.3 runs them: LOCAL_RUN_*_CMD
    on this host, REMOTE_RUN_*_CMD on the target host through the agent, each a shell
    command line under its own time limit (MAX_EXEC_TIME_PER_CMD_BEFORE/AFTER), never in
    a dry run.  The before commands run before anything is written to either replica, this
    host's first (it may wake or mount what the target needs); the after commands once the
    state is written and the locks are released, the target's first, and only after a run
    without errors or warnings unless RUN_AFTER_CMD_ON_ERROR."""

    def __init__(self, cfg, out, dry, transport):
        self.cfg = cfg
        self.out = out
        self.dry = dry
        self.transport = transport

    def before(self, side, replica):
        """Run the before command of `side` ("local" or "remote"); with STOP_ON_CMD_ERROR a
        failure stops the run here."""
        key = self.key(side, "BEFORE")
        if not self.run_one(key, side, replica) and self.cfg["STOP_ON_CMD_ERROR"]:
            refuse("before-command", "Stopping on command execution error: %s failed and STOP_ON_CMD_ERROR=yes "
                   "stops the run" % key, "Fix the command (its output is in the log), or set "
                   "STOP_ON_CMD_ERROR=no to sync even when it fails")

    def after(self, replicas, finished):
        """Run the after commands, if the run allows it; `finished` is False when the run
        is being stopped by an error, a guard, a signal or the time limit."""
        keys = [self.key(side, "AFTER") for side in ("remote", "local")]
        if not any(self.cfg[key] for key in keys):
            return
        counter = self.out.counter
        trouble = ("did not finish" if not finished else "had errors" if counter.errors
                   else "had warnings" if counter.warnings else None)
        if trouble and not self.dry and not self.cfg["RUN_AFTER_CMD_ON_ERROR"]:
            self.out.notice("The after commands are not run: the run %s (RUN_AFTER_CMD_ON_ERROR=yes runs them "
                            "anyway)." % trouble)
            return
        for side, key in zip(("remote", "local"), keys):
            try:
                self.run_one(key, side, replicas["initiator" if side == "local" else "target"])
            except OsyncError as error:   # the connection to the agent broke, or it broke the protocol
                self.out.error("%s could not be run: %s" % (key, error))
            except StopRun as stop:
                if finished:
                    raise
                self.out.log(logging.ERROR if stop.level == "ERROR" else logging.WARNING, stop.reason)
                return   # the reason the run itself stopped is logged next

    @staticmethod
    def key(side, phase):
        return "%s_RUN_%s_CMD" % ("LOCAL" if side == "local" else "REMOTE", phase)

    def run_one(self, key, side, replica):
        """Run the command of `key`, if set; False when it failed (an error is logged).  A
        remote command whose agent is lost or misbehaves raises that ReplicaError."""
        command = self.cfg[key]
        if not command:
            return True
        if side == "remote" and self.transport is None:
            self.out.warn("Ignoring %s: the target is a local directory, not a remote host." % key)
            return True
        where = "this host" if side == "local" else self.transport.host
        shown = printable(command, 1000)
        if self.dry:
            self.out.notice("Dry run: %s [%s] is not run on %s." % (key, shown, where))
            return True
        if replica is None:   # the connection failed, and the run with it
            self.out.notice("%s is not run: there is no connection to %s." % (key, where))
            return False
        limit_key = "MAX_EXEC_TIME_PER_CMD_" + key.split("_")[2]
        self.out.notice("Running %s [%s] on %s." % (key, shown, where))
        code, killed, output = replica.run_hook(command, self.cfg[limit_key])
        if killed:
            self.out.error("%s on %s ran past its time limit (%s=%d seconds): it was stopped, with every "
                           "process it started." % (key, where, limit_key, self.cfg[limit_key]))
        elif code < 0:
            self.out.error("%s on %s was killed by signal %d." % (key, where, -code))
        elif code:
            self.out.error("%s on %s failed with exit code %d." % (key, where, code))
        else:
            self.out.notice("%s succeeded." % key)
        failed = killed or code != 0
        if output.strip() and (failed or self.out.wants(VERBOSE)):
            lines = ["  " + printable(line, 2000) for line in output.rstrip("\n").split("\n")]
            self.out.log(logging.ERROR if failed else VERBOSE, "Output of %s:\n%s" % (key, "\n".join(lines)))
        return not failed


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
                        "checksum": cfg["CHECKSUM"], "acl": cfg["PRESERVE_ACL"], "xattr": cfg["PRESERVE_XATTR"]}
        self.attributes_warned = set()   # replicas told this run that they cannot hold ACLs or xattrs
        self.missing = set()   # sides that do not exist yet (dry run with CREATE_DIRS)
        self.locked = []
        self.sync_id = os.urandom(16).hex()   # given to the state and both markers by this run
        self.legacy_used = False              # the baseline came from osync.sh's lists

    def run(self):
        cfg, out = self.cfg, self.out
        spec = filter_spec(cfg)
        if not shutil.which(cfg["RSYNC_EXECUTABLE"]):
            refuse("missing-rsync", "rsync (RSYNC_EXECUTABLE=%s) is not installed or not in PATH"
                   % cfg["RSYNC_EXECUTABLE"], "Install it (%s), or set RSYNC_EXECUTABLE to the path of rsync"
                   % install_hint("rsync"))
        hooks = Hooks(cfg, out, self.dry, self.transport)
        try:
            finished = False
            try:
                hooks.before("local", self.replicas["initiator"])
                if self.transport is not None:
                    self.connect()
                hooks.before("remote", self.replicas["target"])
                self.run_checked(spec)
                finished = True
            finally:
                end_forked_scans()   # before the after-hooks, which may look at the replicas
                hooks.after(self.replicas, finished)
        finally:
            self.disconnect()

    def disconnect(self):
        """End the agent and the ssh connection of a remote target."""
        if self.transport is not None:
            if self.replicas["target"] is not None:
                self.replicas["target"].close()
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
                refuse("no-ping", "Cannot ping %s (REMOTE_HOST_PING=yes skips the task when its host does not "
                       "answer)" % host,
                       "Check that %s is up and reachable, or set REMOTE_HOST_PING=no" % host)
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
            bookkeeping = []
            if not self.dry:
                for replica in self.replicas.values():
                    replica.clear_leftovers()
                bookkeeping = self.read_bookkeeping()
                self.mark_sync_start()
            if cfg.switch("initialize"):
                self.initialize(spec)
                return
            try:
                outcome = self.sync(spec, facts)
                if out.report is not None:
                    out.report.outcome = outcome
            except Refusal:
                self.restore_bookkeeping(bookkeeping)   # a guard of the plan: nothing was changed
                raise
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
                asked = time.time()
                facts[side] = replica.probe(create and not self.dry)
                facts[side]["local_time"] = (asked + time.time()) / 2
            except ReplicaError:
                if not (self.dry and create):
                    raise
                self.out.notice("The %s replica %s does not exist; a real run would create it." % (
                    side, replica.display))
                self.missing.add(side)
                facts[side] = {"realpath": os.path.abspath(replica.root), "work_dir": False, "readable": True,
                               "writable": True,
                               "free_kb": None, "euid": os.geteuid(), "created": False}
            if facts[side]["created"]:
                self.out.notice("Created the %s replica %s (CREATE_DIRS)." % (side, replica.display))
        one, other = facts["initiator"]["realpath"], facts["target"]["realpath"]
        if self.transport is not None:
            one = other = None
        if one is not None and one == other:
            refuse("same-replica", "The initiator and the target are the same directory (%s)" % one,
                   "Give two different directories")
        for inner, outer in ((one, other), (other, one)):
            if inner is not None and inner.startswith(outer.rstrip("/") + "/"):
                refuse("nested-replicas", "The replica %s lies inside the replica %s" % (inner, outer),
                       "They must not overlap: give two separate directories")
        self.check_overlap(facts)
        self.check_clocks(facts)
        for side, replica in self.replicas.items():
            if not facts[side]["readable"]:
                refuse("unreadable-replica", "The %s replica %s cannot be read by this user" % (side, replica.display),
                       "Give the user read and search permission on it (chmod u+rx) and run again")
            if not facts[side]["writable"] and not self.dry:
                refuse("unwritable-replica", "The %s replica %s is not writable by this user" % (side, replica.display),
                       "Give the user write permission on it (chmod u+w; remount it read-write if it is mounted "
                       "read-only) and run again")
            free = facts[side]["free_kb"]
            if self.cfg["MINIMUM_SPACE"] and free is not None and free < self.cfg["MINIMUM_SPACE"]:
                self.out.warn("There is not enough free space on the %s replica %s (%d KiB, MINIMUM_SPACE is %d)."
                              % (side, replica.display, free, self.cfg["MINIMUM_SPACE"]))
        return facts

    def check_overlap(self, facts):
        """Refuse replicas that are one directory or lie one inside the other, however they
        are reached (a bind mount, a symlink, ssh to this very host): the device and inode of
        each root are compared with the other root and its ancestors on the same host."""
        initiator, target = facts["initiator"], facts["target"]
        if not (valid_directory_ids(initiator.get("dir_ids")) and valid_directory_ids(target.get("dir_ids"))):
            return   # a side that does not exist yet (dry run), or an agent that cannot say
        if initiator.get("machine_id") != target.get("machine_id"):
            return
        displays = dict((side, replica.display) for side, replica in self.replicas.items())
        if initiator["dir_ids"][0] == target["dir_ids"][0]:
            refuse("same-replica", "The initiator %s and the target %s are the same directory"
                   % (displays["initiator"], displays["target"]), "Give two different directories")
        for inner, outer in (("target", "initiator"), ("initiator", "target")):
            if facts[outer]["dir_ids"][0] in facts[inner]["dir_ids"][1:]:
                refuse("nested-replicas", "The %s %s lies inside the %s %s"
                       % (inner, displays[inner], outer, displays[outer]),
                       "They must not overlap: give two separate directories")

    def check_clocks(self, facts):
        """Conflicts are decided by modification times set on two hosts: a remote clock that
        is off is worth a warning, with both times."""
        remote_time = facts["target"].get("time")
        if self.transport is None or isinstance(remote_time, bool) or not isinstance(remote_time, (int, float)):
            return
        skew = facts["target"]["time"] - facts["target"]["local_time"]
        if abs(skew) <= CLOCK_SKEW_LIMIT:
            return
        def shown(seconds):
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
        self.out.warn("The clock of %s is %d seconds %s this host's (%s there, %s here); conflicts are decided by "
                      "modification times, so set both clocks right (e.g. with NTP)." % (
                          self.transport.host, abs(round(skew)), "ahead of" if skew > 0 else "behind",
                          shown(facts["target"]["time"]), shown(facts["target"]["local_time"])))

    MARKER_FIELDS = {"instance": str, "written": str, "replicas": dict, "sync_id": str, "pending_sync_id": str,
                     "initiator_entries": int, "target_entries": int}

    def read_marker(self, replica):
        """A replica's marker as a dict of the known fields of the right types; {} when
        there is none or it is damaged (a marker may come from an untrusted host)."""
        try:
            text = replica.read_state_file(state_dir_file("marker", self.instance))
            marker = json.loads(text) if text else {}
        except (ReplicaError, ValueError):
            return {}
        if not isinstance(marker, dict):
            return {}
        checked = {}
        for field, kind in self.MARKER_FIELDS.items():
            value = marker.get(field)
            if isinstance(value, kind) and not isinstance(value, bool) and not (kind is int and value < 0):
                checked[field] = value
        return checked

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
                    witnesses.append(self.marker_location(witness))
            if held:
                witnesses.append(self.state_path())
            elif not os.path.exists(self.state_path()):
                held, witnesses = self.legacy_count(side)
            if held:
                refuse("missing-work-dir",
                       "The %s replica %s has no %s although the last sync left %d items in it: it looks unmounted "
                       "or replaced" % (side, replica.display, WORK_DIR_NAME, held),
                       "Mount it; or, if it really is meant to start over, delete %s (the next run then merges "
                       "both sides and deletes nothing)" % " and ".join(witnesses))
        self.guard_older_sync(facts)

    def legacy_count(self, side):
        """How many items osync.sh's lists say `side` held, and the lists: (0, []) without lists."""
        state_dir = self.replicas["initiator"].state_dir
        records = read_legacy_state(state_dir, self.instance)
        if not records:
            return 0, []
        index = 1 if side == "initiator" else 2
        held = sum(1 for record in records if record[index] is not None)
        return held, sorted(legacy_list_paths(state_dir, self.instance).values())

    def marker_location(self, replica):
        """The marker file of a replica, as the user would find it."""
        path = posixpath.join(replica.state_dir, state_dir_file("marker", self.instance))
        return "%s:%s" % (self.transport.destination(), path) if isinstance(replica, RemoteReplica) else path

    def guard_older_sync(self, facts):
        """Refuse a replica whose marker is not of the sync the state records: an older disk
        swapped in, a clone or a restored copy would otherwise lose, on both sides, every
        file added since its own last sync.  Each sync gives both markers and the state one
        fresh id; a run that stopped halfway leaves its id as pending in the markers."""
        try:
            header = read_state_header(self.state_path())
        except StateError:
            return   # an unreadable state is not used: the run merges and deletes nothing
        if not header or header.get("replicas") != self.pair_identity() or not header.get("sync_id"):
            return
        last = header["sync_id"]
        for side, replica in self.replicas.items():
            if side in self.missing:
                continue
            marker = self.read_marker(replica)
            if marker.get("replicas") != self.pair_identity():
                marker = {}
            if last in (marker.get("sync_id"), marker.get("pending_sync_id")):
                continue
            if not marker and not facts[side]["work_dir"]:
                continue   # no work dir at all: guard_unmounted has judged it
            if marker:
                refuse("older-disk",
                       "The %s replica %s has a work dir from an older sync (its marker %s is not of sync %s, the "
                       "last one, which the state %s records): it looks like an older disk, a clone or a restored "
                       "copy" % (side, replica.display, self.marker_location(replica), last, self.state_path()),
                       "Put the current disk back; or, to sync this one as it is, delete %s and %s (the next run "
                       "then merges both sides and deletes nothing)"
                       % (self.marker_location(replica), self.state_path()))
            refuse("unknown-disk",
                   "The %s replica %s has a work dir but no marker of the last sync (%s): it looks like another "
                   "disk, a clone or a restored copy" % (side, replica.display, self.marker_location(replica)),
                   "Put the current disk back; or, to sync this one as it is, delete %s (the next run then merges "
                   "both sides and deletes nothing)" % self.state_path())

    def mark_sync_start(self):
        """Before the first change, note this run's sync id in both markers as pending: a
        run that stops after writing the state, but before the markers, locks no one out.
        The guards have matched each marker with the state, so it takes the state's id."""
        try:
            header = read_state_header(self.state_path()) or {}
        except StateError:
            header = {}
        for replica in self.replicas.values():
            marker = self.read_marker(replica)
            if marker.get("replicas") != self.pair_identity():
                marker = {"instance": self.instance, "replicas": self.pair_identity()}
            if header.get("sync_id") and header.get("replicas") == self.pair_identity():
                marker["sync_id"] = header["sync_id"]
            marker["pending_sync_id"] = self.sync_id
            replica.write_state_file(state_dir_file("marker", self.instance), json.dumps(marker) + "\n")

    def bookkeeping_files(self):
        """The state files a run updates before its first change: both markers (the pending
        sync id) and the initiator's resume bookkeeping."""
        files = [(replica, state_dir_file("marker", self.instance)) for replica in self.replicas.values()]
        files += [(self.replicas["initiator"], state_dir_file(kind, self.instance))
                  for kind in ("last_action", "resume_count")]
        return files

    def read_bookkeeping(self):
        """What the bookkeeping files hold before the run touches them (None: absent)."""
        return [(replica, name, replica.read_state_file(name)) for replica, name in self.bookkeeping_files()]

    def restore_bookkeeping(self, saved):
        """Put the bookkeeping files back as they were, after a guard refused the plan: the
        refused run then counts as no run at all (no resume, no pending sync id)."""
        for replica, name, text in saved:
            if text is None:
                continue
            try:
                replica.write_state_file(name, text)
            except (OsyncError, OSError) as error:
                self.out.warn("Cannot put back %s in the state dir of the %s replica (%s); the next run counts "
                              "this one as interrupted." % (name, replica.role, error))

    def take_locks(self):
        if self.dry or self.cfg.switch("no_locks"):
            return
        initiator = self.replicas["initiator"]
        self.take_lock(initiator)
        self.stop_orphaned_children(initiator)
        CHILDREN.on_change = initiator.record_children
        initiator.record_children(CHILDREN.pids())
        self.take_lock(self.replicas["target"])

    ORPHAN_WAIT = 10

    def stop_orphaned_children(self, initiator):
        """Children of a run that died without cleaning up (recorded beside the lock) may still
        write to the replicas: wait a little for them to end, then stop them, before this run
        touches anything."""
        def still_running(pid, started):
            # The same process, not a later one that got its pid once it ended.
            return pid_alive(pid) and process_start_time(pid) == started

        orphans = [(pid, started) for pid, started in initiator.recorded_children()
                   if started and still_running(pid, started)]
        if orphans:
            self.out.notice("Processes %s of an earlier run are still running; waiting for them to end."
                            % ", ".join(str(pid) for pid, _ in orphans))
            deadline = time.time() + self.ORPHAN_WAIT
            while time.time() < deadline and any(still_running(pid, started) for pid, started in orphans):
                time.sleep(0.1)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid, started in orphans:
                    if still_running(pid, started):
                        try:
                            os.kill(pid, sig)
                        except OSError:
                            pass
                time.sleep(1)
            left = [pid for pid, started in orphans if still_running(pid, started)]
            if left:
                refuse("orphans", "Processes %s of an earlier run cannot be stopped"
                       % ", ".join(str(pid) for pid in left), "Stop them and run again")
        initiator.forget_children()

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
                refuse("damaged-lock", "The lock %s/%s/lock of the %s replica holds %r, which is not PID@INSTANCE_ID"
                       % (replica.display, WORK_DIR_NAME, replica.role, existing[:80]),
                       "Remove it or run with --force-unlock")
            pid = int(owner) if existing else 0
            if existing and pid <= INT_MAXIMUM and pid_alive(pid):
                command = process_command_line(pid)
                if command is not None and not looks_like_osync(command):
                    refuse("foreign-lock", "The lock %s/%s/lock holds pid %d, which is running but is not %s (it is "
                           "`%s`)" % (replica.display, WORK_DIR_NAME, pid, PROGRAM, " ".join(command)[:200]),
                           "If no %s runs for this task, run with --force-unlock" % PROGRAM)
                refuse("locked", "There is already a running instance [%s] of osync for the %s replica %s"
                       % (existing, replica.role, replica.display), "Let it finish, then run again")
            if (isinstance(replica, RemoteReplica) and existing and owner_instance != self.instance
                    and not self.cfg["FORCE_STRANGER_LOCK_RESUME"]):
                refuse("stranger-lock", "The %s replica %s holds a dead lock [%s] of another instance, which is not "
                       "taken over unless FORCE_STRANGER_LOCK_RESUME=yes" % (replica.role, replica.display, existing),
                       "If no run of that instance syncs this replica, set FORCE_STRANGER_LOCK_RESUME=yes and "
                       "run again")
            self.out.notice("There is a dead osync lock [%s] on the %s replica; taking it over." % (existing,
                                                                                                  replica.role))
            replace = existing
        refuse("lock-contended", "Cannot take the lock of the %s replica %s: other runs keep taking it"
               % (replica.role, replica.display), "Run again when they have finished")

    def release_locks(self):
        end_forked_scans()   # no scan of this run goes on once another run may take the replicas
        if CHILDREN.on_change is not None:
            CHILDREN.on_change = None
            self.replicas["initiator"].forget_children()
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
                      group=cfg["PRESERVE_GROUP"] and root, hardlinks=cfg["PRESERVE_HARDLINKS"],
                      acl=cfg["PRESERVE_ACL"], xattr=cfg["PRESERVE_XATTR"], setuid_kept=cfg["PRESERVE_OWNER"],
                      setgid_kept=cfg["PRESERVE_GROUP"])

    def scan(self, side, spec, digests=True):
        """A replica's scan; with digests=False, CHECKSUM's digests are left to
        with_digests(), which reads only the files that moved since the last run."""
        if side in self.missing:
            return iter(())
        options = self.options if digests else dict(self.options, checksum=False)
        if self.scans_in_children(side):
            entries = self.replicas[side].scan(spec, options, forked=True)
        else:
            entries = self.replicas[side].scan(spec, options)
        return self.warn_unsupported_attributes(side, entries)

    def scans_in_children(self, side):
        """Is this side's scan walked by a forked child, in parallel with the merge?  For a
        local replica on more than one CPU (a remote target scans on its own host, in its
        agent, while the initiator's child walks and the run checks what the agent sends)."""
        return isinstance(self.replicas[side], LocalReplica) and usable_cpus() > 1

    def planned(self, previous, spec, policy, spool_dir):
        """The decisions for both scans against `previous`; with CHECKSUM, the digests are
        filled in between the merge and the planner (see with_digests)."""
        rows = merge_streams(previous, self.scan("initiator", spec, digests=False),
                             self.scan("target", spec, digests=False))
        if self.cfg["CHECKSUM"]:
            rows = self.reported_digests(rows)
        return plan_merged(rows, policy, spool_dir)

    def reported_digests(self, rows):
        """with_digests() over the rows; once they are all through, say how many files
        CHECKSUM read on each side."""
        counts = DigestCounts()
        for row in with_digests(rows, self.replicas, self.options, counts):
            yield row
        self.out.verbose("CHECKSUM read %d files on the initiator and %d on the target; %d unchanged files kept "
                         "the digest of the last run." % (counts.read["initiator"], counts.read["target"],
                                                          counts.reused))

    def warn_unsupported_attributes(self, side, entries):
        """The scan's entries, passed on; one warning per run and replica whose filesystem
        cannot hold the ACLs or xattrs that are preserved (the rest of the sync goes on).
        With neither preserved no entry can say so: the entries are returned as they are."""
        if not self.options.get("acl") and not self.options.get("xattr"):
            return entries
        return self._warned_unsupported_attributes(side, entries)

    def _warned_unsupported_attributes(self, side, entries):
        for entry in entries:
            if side not in self.attributes_warned and ATTRIBUTES_UNSUPPORTED in (entry.acl, entry.xattr):
                self.attributes_warned.add(side)
                missing, keys = [], []
                if entry.acl == ATTRIBUTES_UNSUPPORTED:
                    missing.append("ACLs (PRESERVE_ACL)")
                    keys.append("PRESERVE_ACL=no")
                if entry.xattr == ATTRIBUTES_UNSUPPORTED:
                    missing.append("extended attributes (PRESERVE_XATTR)")
                    keys.append("PRESERVE_XATTR=no")
                self.out.warn("The filesystem of %s on the %s replica %s cannot hold %s: they are not synced to or "
                              "from the items on it, everything else is (set %s for this task to silence this "
                              "warning)." % (entry.path, side, self.replicas[side].display, " and ".join(missing),
                                             " and ".join(keys)))
            yield entry

    def state_path(self):
        return os.path.join(self.replicas["initiator"].state_dir, state_dir_file("state", self.instance))

    def pair_identity(self):
        """Which two replicas this job syncs: the state and markers apply to them only."""
        identity = {}
        for side, replica in self.replicas.items():
            host = self.transport.destination() + ":" if side == "target" and self.transport else ""
            identity[side] = host + replica.root
        return identity

    def state_header(self):
        return {"instance": self.instance, "written": self.stamp, "replicas": self.pair_identity(),
                "sync_id": self.sync_id}

    def previous_state(self):
        path = self.state_path()
        header = read_state_header(path)
        if header is not None:
            if header.get("replicas") != self.pair_identity():
                self.out.warn("The state %s was recorded for other replicas (%s); this run merges both replicas "
                              "and deletes nothing." % (path, ", ".join(sorted((header.get("replicas") or {}).values()))))
                return iter(())
            return read_state_records(path)
        legacy = read_legacy_state(self.replicas["initiator"].state_dir, self.instance)
        if legacy is not None:
            self.out.notice("No osync.py state yet: using the osync.sh lists of the last run as the baseline.")
            self.legacy_used = True
            return iter(legacy)
        self.out.notice("No state from an earlier run: this first run merges both replicas and deletes nothing.")
        return iter(())

    def sync(self, spec, facts):
        out = self.out
        self.note_resume()
        policy = self.policy(facts)
        # As rsync -X: every namespace but system.* where both sides run as root, else user.* only.
        self.options["xattr_all"] = all(side_facts["euid"] == 0 for side_facts in facts.values())
        spool_dir = tempfile.gettempdir() if self.dry else self.replicas["initiator"].temp_dir()
        if not self.dry:
            self.executor(policy).settle_interrupted_transfers(spool_dir)
        executor = self.executor(policy)
        try:
            decisions = self.planned(self.previous_state(), spec, policy, spool_dir)
            lines, outcome = executor.execute(decisions, spool_dir)
        except StateError as error:
            executor.close()
            end_forked_scans()
            out.warn("The state of the last run cannot be used (%s); this run merges both replicas and deletes "
                     "nothing." % error)
            executor = self.executor(policy)
            decisions = self.planned(iter(()), spec, policy, spool_dir)
            lines, outcome = executor.execute(decisions, spool_dir)
        if self.dry:
            if self.cfg["LOG_CONFLICTS"]:
                self.write_conflicts(outcome)
            return outcome
        if executor.state_unchanged:
            executor.close()   # every path is exactly as recorded: the state file stays as it is
        else:
            write_state(self.state_path(), self.state_header(), lines)
        self.write_markers(outcome)
        if self.cfg["LOG_CONFLICTS"]:
            self.write_conflicts(outcome)
        if outcome.failed == 0:
            self.replicas["initiator"].write_state_file(state_dir_file("last_action", self.instance), "synced\n")
            self.replicas["initiator"].write_state_file(state_dir_file("resume_count", self.instance), "0\n")
        return outcome

    def executor(self, policy):
        executor = Executor(self.cfg, self.out, self.replicas, policy, self.options, self.stamp, self.dry,
                            self.transport)
        if not self.dry:
            executor.journal_name = state_dir_file("transfers", self.instance)
        return executor

    def note_resume(self):
        """osync's resume bookkeeping: every run continues where the previous one stopped,
        and interrupted runs are counted and reported."""
        if self.dry:
            return
        initiator = self.replicas["initiator"]
        last = (initiator.read_state_file(state_dir_file("last_action", self.instance)) or "synced").strip()
        count_text = (initiator.read_state_file(state_dir_file("resume_count", self.instance)) or "0").strip()
        count = int(count_text) if count_text.isdigit() else 0
        if last != "synced" and self.cfg["RESUME_SYNC"]:
            if self.cfg["RESUME_TRY"] and count >= self.cfg["RESUME_TRY"]:
                self.out.warn("The last %d runs did not finish; check the log. This run continues where they "
                              "stopped." % (count + 1))
                count = 0
            else:
                self.out.notice("Continuing the interrupted run [%d previous tries]." % count)
                count += 1
            initiator.write_state_file(state_dir_file("resume_count", self.instance), "%d\n" % count)
        initiator.write_state_file(state_dir_file("last_action", self.instance), "update-replica\n")

    def write_markers(self, outcome):
        """After the state: both markers get the state's sync id and what each side holds;
        osync.sh's lists, if this run used them, are retired."""
        try:
            header = read_state_header(self.state_path()) or {}
        except StateError:
            header = {}
        marker = json.dumps({"instance": self.instance, "written": self.stamp, "replicas": self.pair_identity(),
                             "sync_id": header.get("sync_id"),
                             "initiator_entries": outcome.entries["initiator"],
                             "target_entries": outcome.entries["target"]}) + "\n"
        for replica in self.replicas.values():
            replica.write_state_file(state_dir_file("marker", self.instance), marker)
        if self.legacy_used:
            retire_legacy_lists(self.replicas["initiator"].state_dir, self.instance)

    def report_root(self, side):
        """How --summary and the conflict list name a replica's root: its path on its own
        host, without host:, as osync v1.3 prints it (scripts parse these lines)."""
        return self.replicas[side].root.rstrip("/") + "/"

    def write_conflicts(self, outcome):
        """LOG_CONFLICTS: the run's conflicts to the log and to conflicts-ID in the state dir,
        each as osync's `INITIATOR/path << >> TARGET/path` line (scripts parse it) followed by
        two indented lines: both versions, and which won, why and where the loser went.
        ALERT_CONFLICTS mails the list too.  A dry run only logs what a real run would do."""
        lines = []
        for report in outcome.conflict_reports:
            lines += self.conflict_lines(report)
        text = "".join(line + "\n" for line in lines)
        if not self.dry:
            self.replicas["initiator"].write_state_file(state_dir_file("conflicts", self.instance), text)
        if not lines:
            return
        count = len(outcome.conflict_reports)
        self.out.notice("File conflicts: INITIATOR << >> TARGET\n%sThere are %d conflicting files."
                        % (text, count))
        if self.cfg["ALERT_CONFLICTS"] and not self.dry:
            send_conflict_mail(self.cfg, self.out, text, count)

    def conflict_lines(self, report):
        """The lines of one conflict in the conflict list."""
        roots = dict((side, self.report_root(side)) for side in OTHER_SIDE)
        loser = OTHER_SIDE[report.winner]
        versions = "; ".join("%s: %s" % (side, describe_version(report.initiator if side == "initiator"
                                                                 else report.target))
                             for side in ("initiator", "target"))
        if report.reason == WON_NEWER:
            why = "newer modification time"
        elif report.reason == WON_PREVALENCE:
            why = "same modification time, CONFLICT_PREVALANCE=%s" % self.cfg["CONFLICT_PREVALANCE"]
        elif report.reason == WON_MIRROR:
            why = "SYNC_TYPE=%s" % self.cfg["SYNC_TYPE"]
        elif report.reason == WON_SUBTREE:
            why = "items below the %s's directory stay" % report.winner
        else:
            why = report.reason
        lost = report.initiator if loser == "initiator" else report.target
        would = "would be" if self.dry else "was"
        if report.result not in (None, DONE) or (report.result is None and not self.dry):
            fate = ("is not settled (the copy came out %s): the next run looks at this path again"
                    % (report.result or "not carried out"))
        elif report.backup:
            name = report.path + ("." + self.stamp if self.cfg["CONFLICT_BACKUP_MULTIPLE"] else "")
            fate = "%s kept in %s%s/%s/%s" % (would, roots[loser], WORK_DIR_NAME, BACKUP_DIR_NAME, name)
        elif lost is not None and lost.kind == "d":
            fate = "was a directory: what it holds is synced item by item"
        else:
            fate = "%s replaced without a backup (CONFLICT_BACKUP=no)" % would
        return ["%s%s << >> %s%s" % (roots["initiator"], report.path, roots["target"], report.path),
                "    %s" % versions,
                "    the %s's version %s (%s); the %s's version %s" % (
                    report.winner, "wins" if self.dry else "won", why, loser, fate)]

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
        for area, key in ((BACKUP_DIR_NAME, "CONFLICT_BACKUP_DAYS"), (DELETED_DIR_NAME, "SOFT_DELETE_DAYS")):
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
        initiator, target = self.report_root("initiator"), self.report_root("target")
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


def describe_version(entry):
    """One side's version of a conflict, for the conflict list: kind, size, mtime."""
    if entry is None:
        return "absent"
    moment = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.mtime_ns // 10 ** 9))
    fraction = entry.mtime_ns % 10 ** 9
    if fraction:
        moment += (".%09d" % fraction).rstrip("0")
    if entry.kind == "f":
        return "%d bytes, modified %s" % (entry.size, moment)
    return "%s, modified %s" % (KIND_NAMES.get(entry.kind, "item"), moment)


# Alert mails ----------------------------------------------------------------------------------
# When DESTINATION_MAILS is set: a mail after a run with warnings or errors (after every
# run with ALWAYS_SEND_MAILS), one when the run passes its soft or hard time limit, and
# with ALERT_CONFLICTS one listing the conflicts.  Sent through SMTP_SERVER (smtplib, the
# server's certificate verified against the system's CA certificates, or the bundle that
# the standard SSL_CERT_FILE variable names), else through the local sendmail, mutt or
# mail.  A mail that cannot be sent is one warning: it never stops the run.

MAIL_BODY_LINES = 1000          # the last lines of the run's log in an alert mail's body
MAIL_TIMEOUT = 60               # seconds for the SMTP server or the local mailer
MAIL_ATTACHED_LOG_LIMIT = 32 * 1024 * 1024   # bytes of log lines kept for the attachment
CONFLICT_MAIL_LIMIT = 16384     # characters of the conflict list in its mail, as osync v1.3
LOCAL_MAILERS = ("sendmail", "mutt", "mail")
SENDMAIL_PLACES = ("/usr/sbin/sendmail", "/usr/lib/sendmail")


def mail_recipients(cfg):
    """DESTINATION_MAILS as a list: addresses separated by spaces, commas or semicolons."""
    return [address for address in re.split(r"[\s,;]+", cfg["DESTINATION_MAILS"]) if address]


def mail_sender(cfg):
    return cfg["SENDER_MAIL"] or "%s@%s" % (current_user(), socket.gethostname())


def mail_charset(cfg, out):
    """MAIL_BODY_CHARSET, or utf-8 when it is empty or not a charset Python knows."""
    charset = cfg["MAIL_BODY_CHARSET"].strip() or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        out.warn("%s: MAIL_BODY_CHARSET %r is not a known charset; alert mails are sent in UTF-8."
                 % (cfg.origin["MAIL_BODY_CHARSET"], charset))
        return "utf-8"
    return charset


def mail_text(text, charset):
    """`text` as the body charset can carry it: a name's undecodable bytes as \\xNN, a
    character the charset lacks as a backslash escape."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.encode(charset, "backslashreplace").decode(charset)


def build_mail(cfg, charset, subject, body, attachment=None):
    """The MIME message: a text body, and optionally (name, bytes) attached as gzip."""
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText
    from email.utils import formatdate, make_msgid
    text = MIMEText(mail_text(body, charset), "plain", charset)
    if attachment is None:
        message = text
    else:
        message = MIMEMultipart()
        message.attach(text)
        name, data = attachment
        part = MIMEApplication(data, "gzip")
        part.add_header("Content-Disposition", "attachment", filename=name)
        message.attach(part)
    message["Subject"] = subject
    message["From"] = mail_sender(cfg)
    message["To"] = ", ".join(mail_recipients(cfg))
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid("osync")
    return message


def send_mail(cfg, message, attachment=None):
    """Send a message to DESTINATION_MAILS; returns None, or why it could not be sent (the
    end of a sentence).  `attachment` (name, bytes) is what a local mutt attaches."""
    recipients = mail_recipients(cfg)
    odd = [address for address in recipients if address.startswith("-") or "@" not in address]
    if odd:
        return "DESTINATION_MAILS holds %s, which is not a mail address" % ", ".join(odd)
    if cfg["SMTP_SERVER"]:
        return send_by_smtp(cfg, message, recipients)
    return send_by_local_mailer(cfg, message, recipients, attachment)


def send_by_smtp(cfg, message, recipients):
    import smtplib
    import ssl
    server, port, encryption = cfg["SMTP_SERVER"], cfg["SMTP_PORT"], cfg["SMTP_ENCRYPTION"]
    where = "the SMTP server %s:%d (SMTP_ENCRYPTION=%s)" % (server, port, encryption)
    client = None
    try:
        context = ssl.create_default_context()
        if encryption == "ssl":
            client = smtplib.SMTP_SSL(server, port, timeout=MAIL_TIMEOUT, context=context)
        else:
            client = smtplib.SMTP(server, port, timeout=MAIL_TIMEOUT)
        client.ehlo()
        if encryption == "tls":
            client.starttls(context=context)
            client.ehlo()
        if cfg["SMTP_USER"]:
            client.login(cfg["SMTP_USER"], cfg["SMTP_PASSWORD"])
        refused = client.send_message(message, mail_sender(cfg), recipients)
    except ssl.SSLError as error:
        advice = ""
        if isinstance(error, getattr(ssl, "SSLCertVerificationError", ())) or "CERTIFICATE_VERIFY" in str(error):
            advice = ("; its certificate must be valid for %s and signed by an authority this host trusts "
                      "(the system's CA certificates, or the bundle the SSL_CERT_FILE variable names)" % server)
        return "%s refused the encrypted connection (%s)%s" % (where, one_line(str(error), 300), advice)
    except smtplib.SMTPAuthenticationError as error:
        return "%s did not accept the login (%s); check SMTP_USER and SMTP_PASSWORD" % (
            where, smtp_reply(error))
    except smtplib.SMTPNotSupportedError as error:
        return "%s does not support what SMTP_ENCRYPTION or SMTP_USER asks for (%s)" % (where, one_line(str(error)))
    except smtplib.SMTPRecipientsRefused as error:
        return "%s refused every recipient (%s)" % (where, ", ".join(sorted(error.recipients)))
    except smtplib.SMTPResponseException as error:
        return "%s answered %s" % (where, smtp_reply(error))
    except (smtplib.SMTPException, OSError, UnicodeError) as error:
        return "cannot reach %s (%s); check SMTP_SERVER, SMTP_PORT and SMTP_ENCRYPTION" % (
            where, one_line(str(error) or type(error).__name__, 300))
    finally:
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()
    if refused:
        return "%s refused %s (the others got it)" % (where, ", ".join(sorted(refused)))
    return None


def smtp_reply(error):
    """An SMTP error reply as a printable line: code and text."""
    text = error.smtp_error.decode("utf-8", "replace") if isinstance(error.smtp_error, bytes) else error.smtp_error
    return "%s %s" % (error.smtp_code, one_line(str(text), 300))


def find_local_mailer():
    """(name, path) of the first local mailer found: sendmail, mutt, mail; or None."""
    for name in LOCAL_MAILERS:
        path = shutil.which(name)
        if path is None and name == "sendmail":
            path = next((place for place in SENDMAIL_PLACES if os.access(place, os.X_OK)), None)
        if path is not None:
            return name, path
    return None


def send_by_local_mailer(cfg, message, recipients, attachment):
    """Without SMTP_SERVER: sendmail gets the whole message; mutt the body and the
    attachment; mail the body only."""
    found = find_local_mailer()
    if found is None:
        return ("SMTP_SERVER is not set and no local mailer (sendmail, mutt or mail) is installed; set SMTP_SERVER "
                "or install a mail transfer agent")
    name, path = found
    subject = str(message["Subject"])
    body = message.get_payload(0) if message.is_multipart() else message
    body_bytes = body.get_payload(decode=True)
    attached = None
    if name == "sendmail":
        argv = [path, "-oi"] + (["-f", cfg["SENDER_MAIL"]] if cfg["SENDER_MAIL"] else []) + recipients
        data = message.as_bytes()
    elif name == "mutt":
        argv = [path, "-s", subject]
        if attachment is not None:
            attached = tempfile.NamedTemporaryFile(prefix="osync.", suffix="." + attachment[0])
            attached.write(attachment[1])
            attached.flush()
            argv += ["-a", attached.name]
        argv += ["--"] + recipients
        data = body_bytes
    else:
        argv = [path, "-s", subject] + recipients
        data = body_bytes
    try:
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as error:
            return "cannot run %s: %s" % (path, error.strerror)
        try:
            _, errors = process.communicate(data, timeout=MAIL_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_process_group(process, grace=2.0)
            return "%s did not finish within %d seconds" % (path, MAIL_TIMEOUT)
    finally:
        if attached is not None:
            attached.close()
    if process.returncode != 0:
        said = one_line(errors.decode("utf-8", "replace"), 300)
        return "%s exited with code %d%s" % (path, process.returncode, " (%s)" % said if said else "")
    return None


class RunLogCollector(logging.Handler):
    """This run's log lines, as the log file has them: the last MAIL_BODY_LINES for a mail
    body, all of them in a temp file for the attachment (secrets hidden by the formatter)."""

    def __init__(self, output):
        logging.Handler.__init__(self, logging.DEBUG)
        self.output = output
        self.setFormatter(LineFormatter(output))
        self.last = collections.deque(maxlen=MAIL_BODY_LINES)
        self.spool = tempfile.TemporaryFile()
        self.spooled = 0   # bytes in the spool; past MAIL_ATTACHED_LOG_LIMIT only the body's tail grows

    def emit(self, record):
        if record.levelno < min(self.output.screen_threshold, NOTICE):
            return   # not in the log file either
        try:
            text = self.format(record)
            self.last.extend(text.split("\n"))
            if self.spooled < MAIL_ATTACHED_LOG_LIMIT:
                line = text.encode("utf-8", "surrogateescape") + b"\n"
                self.spooled += len(line)
                if self.spooled >= MAIL_ATTACHED_LOG_LIMIT:
                    line += b"[...] the rest of this run's log is in the log file, not in this attachment.\n"
                self.spool.write(line)
        except (OSError, ValueError, UnicodeError):
            pass

    def handleError(self, record):
        """A line that cannot be kept is left out of the mail, never printed as a traceback."""

    def compressed(self):
        """All of this run's log lines, gzip-compressed."""
        import gzip
        self.acquire()
        try:
            self.spool.flush()
            self.spool.seek(0)
            buffer = io.BytesIO()
            with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:
                shutil.copyfileobj(self.spool, packed)
            self.spool.seek(0, os.SEEK_END)
            return buffer.getvalue()
        finally:
            self.release()

    def tail(self):
        self.acquire()
        try:
            return list(self.last)
        finally:
            self.release()


class AlertMails(object):
    """The alert mails of one run (nothing at all when DESTINATION_MAILS is empty)."""

    def __init__(self, cfg, out):
        self.cfg = cfg
        self.out = out
        self.instance = cfg["INSTANCE_ID"]
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.enabled = bool(mail_recipients(cfg)) and not debug_requested()
        self.collector = None
        self.threads = []
        self.charset = "utf-8"
        if self.enabled:
            self.collector = RunLogCollector(out)
            out.logger.addHandler(self.collector)

    def start(self):
        """Once the log is open: say what cannot work, before the run needs it."""
        if mail_recipients(self.cfg) and debug_requested():
            self.out.notice("_DEBUG is set: no alert mail is sent.")
        if self.enabled:
            self.charset = mail_charset(self.cfg, self.out)

    def while_running(self, limit):
        """The watchdog's call when the run passes SOFT_MAX_EXEC_TIME or HARD_MAX_EXEC_TIME:
        the mail is sent from a thread, so the run is not held up."""
        if not self.enabled:
            return
        if limit == "soft":
            subject = "Currently running - Warning alert for %s" % self.instance
            state = ("is still running: it passed SOFT_MAX_EXEC_TIME (%d seconds) and goes on"
                     % self.cfg["SOFT_MAX_EXEC_TIME"])
        else:
            subject = "Currently running - Error alert for %s" % self.instance
            state = ("passed HARD_MAX_EXEC_TIME (%d seconds) and is being stopped; the next run continues where "
                     "it stops" % self.cfg["HARD_MAX_EXEC_TIME"])
        prepared = self.alert(subject, state)
        if prepared is None:
            return
        thread = threading.Thread(target=self.deliver, args=(prepared, subject), name="osync-mail")
        thread.daemon = True
        thread.start()
        self.threads.append(thread)

    def after_run(self):
        """The mail at the end of the run: with warnings or errors, or always with
        ALWAYS_SEND_MAILS."""
        for thread in self.threads:
            thread.join(MAIL_TIMEOUT + 10)
        if not self.enabled:
            return
        code = self.out.exit_code()
        if code == 0 and not self.cfg["ALWAYS_SEND_MAILS"]:
            return
        kind = {0: "Alert", 1: "Error alert", 2: "Warning alert"}[code]
        state = {0: "finished successfully", 1: "finished with errors", 2: "finished with warnings"}[code]
        subject = "Finished run - %s for %s" % (kind, self.instance)
        prepared = self.alert(subject, state)
        if prepared is not None:
            self.deliver(prepared, subject)

    def alert(self, subject, state):
        """An alert mail: what happened, then this run's last log lines; the whole run's
        log attached gzip-compressed."""
        try:
            return self._alert(subject, state)
        except (OSError, ValueError, UnicodeError, LookupError) as error:
            self.out.warn("Cannot prepare the mail [%s]: %s." % (subject, one_line(str(error))))
            return None

    def _alert(self, subject, state):
        lines = self.collector.tail()
        body = ["Execution of %s instance %s on %s (started %s) %s." % (
            PROGRAM, self.instance, socket.gethostname(), self.started, state)]
        if self.out.logfile:
            body.append("Log file: %s" % self.out.logfile)
        body += ["", "Last %d lines of this run's log:" % len(lines)] + lines
        name = "osync.%s.log.gz" % self.instance
        attachment = (name, self.collector.compressed())
        return build_mail(self.cfg, self.charset, subject, "\n".join(body) + "\n", attachment), attachment

    def deliver(self, prepared, subject):
        message, attachment = prepared
        try:
            problem = send_mail(self.cfg, message, attachment)
        except Exception as error:   # a mail never stops the run, whatever went wrong with it
            problem = "%s: %s" % (type(error).__name__, one_line(str(error)))
        report_mail(self.cfg, self.out, subject, problem)


def report_mail(cfg, out, subject, problem):
    """One line for a mail sent, one warning for a mail that could not be."""
    recipients = ", ".join(mail_recipients(cfg))
    if problem is None:
        out.notice("Sent the mail [%s] to %s." % (subject, recipients))
    else:
        out.warn("Cannot send the mail [%s] to %s: %s." % (subject, recipients, problem))


def send_conflict_mail(cfg, out, text, count):
    """ALERT_CONFLICTS: the conflict list by mail (up to CONFLICT_MAIL_LIMIT characters),
    as osync v1.3 sends it: its own subject, no attachment."""
    if not mail_recipients(cfg):
        out.notice("ALERT_CONFLICTS is set but DESTINATION_MAILS is empty: the conflicts are not mailed.")
        return
    if debug_requested():
        return
    subject = "Conflictual files found in [%s]" % cfg["INSTANCE_ID"]
    if len(text) > CONFLICT_MAIL_LIMIT:
        text = text[:CONFLICT_MAIL_LIMIT] + "\n[...] the whole list is in the state dir of the initiator.\n"
    body = "%s instance %s on %s found %d conflicting files: INITIATOR << >> TARGET\n\n%s" % (
        PROGRAM, cfg["INSTANCE_ID"], socket.gethostname(), count, hide_secrets(text, secret_values(cfg)))
    try:
        message = build_mail(cfg, mail_charset(cfg, out), subject, body)
        problem = send_mail(cfg, message)
    except (OSError, ValueError, UnicodeError) as error:
        problem = one_line(str(error))
    report_mail(cfg, out, subject, problem)


# Run report ---------------------------------------------------------------------------------
# After every run (dry and refused runs too) a small JSON file in the initiator's state dir
# says how it went, and optionally the same figures as a Prometheus textfile: monitoring
# needs no log parsing.

REPORT_ERRORS_KEPT = 100


class _ErrorLines(logging.Handler):
    """Keeps the first error lines of the run (the failed paths with their reasons)."""

    def __init__(self, report):
        logging.Handler.__init__(self, logging.ERROR)
        self.report = report

    def emit(self, record):
        if len(self.report.errors) < REPORT_ERRORS_KEPT:
            self.report.errors.append(record.getMessage())
        else:
            self.report.errors_left_out += 1


REPORT_WRITE_ATTEMPTS = 5   # a run taking the lock clears temp files once, so one retry is nearly always enough


class RunReport(object):
    """What one run did: start, end, exit code, counts, failures; written when it ends."""

    def __init__(self, cfg, out):
        self.cfg = cfg
        self.out = out
        self.dry = cfg.switch("dry")
        self.outcome = None        # the executor's Outcome, once the sync has run
        self.refused_by = None     # the guard that refused the run
        self.errors = []
        self.errors_left_out = 0
        out.logger.addHandler(_ErrorLines(self))

    def state_dir(self):
        """The initiator's state dir, or None when it is not there to write to: a report
        never creates a work dir (a refused or dry run writes nothing else) and never
        follows one through a link."""
        replica = LocalReplica("initiator", self.cfg["INITIATOR_SYNC_DIR"], self.cfg["INITIATOR_CUSTOM_STATE_DIR"])
        try:
            if replica.custom_state_dir:
                usable = check_private_dir(replica.state_dir, "The custom state dir", other_owners=(0,))
            else:
                usable = check_private_dir(replica.work_dir, "The work dir") and \
                    check_private_dir(replica.state_dir, "The state dir")
        except ReplicaError:
            return None   # the run has said why it is unsafe, or it would have written nothing anyway
        return replica.state_dir if usable else None

    def figures(self, code, end):
        outcome = self.outcome
        counts = dict(("%s_%s" % (kind, side), 0) for kind in Outcome.KINDS for side in OTHER_SIDE)
        if outcome is not None:
            for (kind, side), number in outcome.counts.items():
                counts["%s_%s" % (kind, side)] = number
        secrets = self.out.secrets
        return collections.OrderedDict([
            ("instance_id", self.cfg["INSTANCE_ID"]),
            ("initiator", self.cfg["INITIATOR_SYNC_DIR"]),
            ("target", hide_secrets(self.cfg["TARGET_SYNC_DIR"], secrets)),
            ("start", iso_time(self.out.start)), ("end", iso_time(end)),
            ("start_timestamp", round(self.out.start, 3)), ("end_timestamp", round(end, 3)),
            ("duration_seconds", round(end - self.out.start, 3)),
            ("dry_run", self.dry), ("exit_code", code),
            ("result", "refused" if self.refused_by else {0: "ok", 1: "errors", 2: "warnings"}[code]),
            ("refused_by", self.refused_by),
            ("transfers", counts["updated_initiator"] + counts["updated_target"]),
            ("attribute_updates", counts["attributes_initiator"] + counts["attributes_target"]),
            ("deletions", counts["deleted_initiator"] + counts["deleted_target"]),
            ("bytes", outcome.bytes if outcome is not None else 0),
            ("conflicts", len(outcome.conflicts) if outcome is not None else 0),
            ("failed_paths", outcome.failed if outcome is not None else 0),
            ("warnings", self.out.counter.warnings), ("errors", self.out.counter.errors),
            ("counts", collections.OrderedDict(sorted(counts.items()))),
            ("error_lines", [printable(hide_secrets(line, secrets), 2000) for line in self.errors]),
            ("error_lines_left_out", self.errors_left_out),
        ])

    def write(self, code):
        """Write the report (atomically); a report that cannot be written is a warning."""
        report = self.figures(code, time.time())
        state_dir = self.state_dir()
        if state_dir is None:
            self.out.verbose("No run report: the state dir of the initiator does not exist (yet).")
        else:
            path = os.path.join(state_dir, state_dir_file("report", self.cfg["INSTANCE_ID"]))
            try:
                self._write_report_file(path, json.dumps(report, indent=2) + "\n")
            except OSError as error:
                self.out.warn("Cannot write the run report %s: %s." % (path, error.strerror or error))
        textfile = self.cfg["PROMETHEUS_TEXTFILE"]
        if textfile and not self.dry:
            try:
                write_atomically(os.path.abspath(textfile), [prometheus_text(report)])
                os.chmod(os.path.abspath(textfile), 0o644)   # read by node_exporter, another user
            except OSError as error:
                self.out.warn("Cannot write the Prometheus textfile %s (PROMETHEUS_TEXTFILE): %s."
                              % (textfile, error.strerror or error))


    @staticmethod
    def _write_report_file(path, text):
        """A refused run, or one that has just let go of its lock, writes its report while
        another run may be taking the lock: that run clears the state dir's temp files, ours
        among them, so a temp file removed under us is written again (the state dir's lock
        is not ours to wait for, and the report is one small file replaced whole)."""
        for attempt in range(REPORT_WRITE_ATTEMPTS):
            try:
                write_atomically(path, [text])
                return
            except FileNotFoundError:
                if attempt == REPORT_WRITE_ATTEMPTS - 1 or not os.path.isdir(os.path.dirname(path)):
                    raise


def iso_time(seconds):
    """A time as ISO 8601 with the local offset, e.g. 2024-05-01T03:00:00+0200."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


PROMETHEUS_METRICS = (
    ("start_timestamp", "osync_last_run_start_timestamp_seconds", "When the last run started (Unix time)."),
    ("end_timestamp", "osync_last_run_end_timestamp_seconds", "When the last run ended (Unix time)."),
    ("duration_seconds", "osync_last_run_duration_seconds", "How long the last run took."),
    ("exit_code", "osync_last_run_exit_code", "Exit code of the last run: 0 ok, 1 errors, 2 warnings."),
    ("refused", "osync_last_run_refused", "1 when a guard refused the last run before any change."),
    ("transfers", "osync_last_run_transfers", "Files and directories copied by the last run."),
    ("attribute_updates", "osync_last_run_attribute_updates", "Attribute-only updates of the last run."),
    ("deletions", "osync_last_run_deletions", "Deletions made by the last run."),
    ("bytes", "osync_last_run_transferred_bytes", "Size of the files copied by the last run."),
    ("conflicts", "osync_last_run_conflicts", "Conflicts resolved by the last run."),
    ("failed_paths", "osync_last_run_failed_paths", "Paths the last run could not sync (retried next run)."),
)


def prometheus_label(value):
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def prometheus_text(report):
    """The report's figures in the Prometheus text exposition format."""
    labels = '{instance_id="%s"}' % prometheus_label(report["instance_id"])
    values = dict(report, refused=1 if report["refused_by"] else 0)
    lines = []
    for field, name, help_text in PROMETHEUS_METRICS:
        lines.append("# HELP %s %s" % (name, help_text))
        lines.append("# TYPE %s gauge" % name)
        lines.append("%s%s %s" % (name, labels, values[field]))
    return "\n".join(lines) + "\n"


# Monitor mode -------------------------------------------------------------------------------
# --on-changes syncs, then watches both replicas (a remote target through its agent, on
# the session's one connection) and syncs again MIN_WAIT seconds after the last change, at
# most MAX_WAIT seconds after the first one, or MAX_WAIT seconds after the last sync when
# nothing changed.  The watchers run the whole time, syncs included, so a change made
# during a sync is seen; a changed path whose item is now exactly what the state of the
# last sync records (the sync's own writes) does not start another sync.
# --on-changes-target is osync v1.3's helper on the target host: it appends a line to the
# initiator's push file whenever the target changes, and the initiator's monitor syncs.

MONITOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
MONITOR_STEP = 0.5            # seconds between two looks at the watchers
MONITOR_BACKOFF_LIMIT = 60    # seconds between two attempts to reach a host that is gone
MONITOR_UNCAPPED_FACTOR = 10  # with MAX_WAIT=0, a burst of changes is synced after 10 x MIN_WAIT at most
MONITOR_RETRY_LIMIT = 3600    # seconds at most between two tries of a sync that keeps failing
MONITOR_REPLY_GRACE = 10      # seconds a target's agent may take to answer take_changes beyond its wait


def monitor_requested(cfg):
    return cfg.switch("on_changes") or cfg.switch("on_changes_target")


class SystemdNotifier(object):
    """The service manager's notifications (sd_notify) when NOTIFY_SOCKET is set: READY=1,
    STATUS=..., and WATCHDOG=1 every half WATCHDOG_USEC from a thread of its own."""

    def __init__(self, out):
        self.out = out
        self.address = os.environ.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):
            self.address = "\0" + self.address[1:]   # an abstract socket name
        self.socket = None
        self.failed = False
        self.stopped = False
        self.watchdog_interval = None
        if not self.address:
            return
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2000000.0

    def send(self, text):
        if self.socket is None:
            return
        try:
            self.socket.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError as error:
            if not self.failed:
                self.failed = True
                self.out.warn("Cannot notify the service manager through NOTIFY_SOCKET %s: %s."
                              % (os.environ.get("NOTIFY_SOCKET"), error.strerror or error))

    def start(self):
        if self.watchdog_interval is None:
            return
        thread = threading.Thread(target=self._keep_alive, name="osync-watchdog")
        thread.daemon = True
        thread.start()

    def _keep_alive(self):
        while not self.stopped:
            self.send("WATCHDOG=1")
            time.sleep(self.watchdog_interval)

    def close(self):
        self.stopped = True
        if self.socket is not None:
            self.send("STOPPING=1")
            self.socket.close()
            self.socket = None


class Debounce(object):
    """When to act on changes: MIN_WAIT seconds after the last one, at most MAX_WAIT
    after the first (10 x MIN_WAIT when MAX_WAIT is 0); MAX_WAIT seconds after the last
    action when nothing changed (never when MAX_WAIT is 0)."""

    def __init__(self, min_wait, max_wait):
        self.min_wait = min_wait
        self.max_wait = max_wait
        self.cap = max_wait or MONITOR_UNCAPPED_FACTOR * min_wait
        self.first = None
        self.last = None
        self.acted = time.time()

    def changed(self, now):
        if self.first is None:
            self.first = now
        self.last = now

    def due(self, now):
        """"changes", "timeout" or None."""
        if self.first is not None:
            if now - self.last >= self.min_wait or now - self.first >= self.cap:
                return "changes"
            return None
        if self.max_wait and now - self.acted >= self.max_wait:
            return "timeout"
        return None

    def reset(self, acted=False):
        self.first = self.last = None
        if acted:
            self.acted = time.time()


def relative_inside(root, path):
    """`path` relative to `root` when it lies inside it (a state dir or log in the tree), else None."""
    if not path:
        return None
    root, path = posixpath.normpath(root), posixpath.normpath(path)
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return None


def matches_state(recorded, current):
    """Is an item now what the state of the last sync recorded for it (None: absent)?
    Then a change seen there was that sync's own write, or is synced already."""
    if recorded is None or current is None:
        return recorded is None and current is None
    if recorded.error or current.error:
        return False
    if not same_version(recorded, current) or recorded.mode != current.mode:
        return False
    return recorded.kind != "f" or same_mtime(recorded.mtime_ns, current.mtime_ns)


class MonitorWatchdog(Watchdog):
    """The watchdog of one sync of a monitor, which tells the monitor of a stop signal."""

    def __init__(self, monitor, *args, **options):
        Watchdog.__init__(self, *args, **options)
        self.monitor = monitor

    def _on_signal(self, signum, frame):
        if self.monitor.signalled is not None:
            return   # the stop is under way
        self.monitor.signalled = signum
        try:
            Watchdog._on_signal(self, signum, frame)
        finally:
            for sig in MONITOR_SIGNALS:
                signal.signal(sig, ignore_late_signal)


class MonitorSync(SyncRun):
    """One sync of the monitor: a run like any other, on the monitor's connection to a
    remote target, which stays open for the next sync (SyncRun.run closes its own)."""

    def __init__(self, cfg, out, monitor):
        SyncRun.__init__(self, cfg, out)
        self.monitor = monitor
        if self.transport is not None:
            self.transport = monitor.transport

    def connect(self):
        if self.monitor.target is None:
            raise ReplicaError("There is no connection to %s." % self.monitor.host)
        self.replicas["target"] = self.monitor.target

    def disconnect(self):
        """The connection stays open for the monitor's next sync."""


class MonitorReport(RunReport):
    """The run report of one sync of a monitor: its own start and duration."""

    def __init__(self, cfg, out):
        RunReport.__init__(self, cfg, out)
        self.started = time.time()

    def figures(self, code, end):
        figures = RunReport.figures(self, code, end)
        figures["start"] = iso_time(self.started)
        figures["start_timestamp"] = round(self.started, 3)
        figures["duration_seconds"] = round(end - self.started, 3)
        return figures


class Monitor(object):
    """What both monitor modes share: stop signals, the service manager, the link to a
    remote host re-established with backoff (1, 2, 4 ... 60 seconds)."""

    def __init__(self, cfg, out):
        self.cfg = cfg
        self.out = out
        self.spec = filter_spec(cfg)
        self.options = {"copy_links": cfg["COPY_SYMLINKS"], "dir_links": cfg["KEEP_DIRLINKS"]}
        self.signalled = None
        self.previous_handlers = {}
        self.notifier = SystemdNotifier(out)
        self.transport = None
        self.host = None
        self.backoff = 0
        self.retry_at = 0
        self.connected_since = None
        self.polling_told = set()
        out.progress_line = None   # a service's log has no progress line

    def _on_signal(self, signum, frame):
        if self.signalled is not None:
            return   # the stop is under way (a sync's watchdog saw the first signal)
        for sig in MONITOR_SIGNALS:
            signal.signal(sig, ignore_late_signal)   # one clean stop
        self.signalled = signum
        raise StopRun("Stopped by signal %s." % signal.Signals(signum).name)

    def serve(self):
        """Run the monitor until a stop signal; exit code 0 then, whatever the syncs did."""
        for sig in MONITOR_SIGNALS:
            self.previous_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.notifier.start()
            self.loop()
        except StopRun:
            if self.signalled is None:
                raise
            self.out.counter.errors = self.out.counter.warnings = 0
            self.out.notice("#### Monitor stopped by signal %s." % signal.Signals(self.signalled).name)
        finally:
            for sig in MONITOR_SIGNALS:
                signal.signal(sig, ignore_late_signal)
            try:
                self.close()
            finally:
                self.notifier.close()
                for sig, handler in self.previous_handlers.items():
                    signal.signal(sig, handler)

    def check_signal(self):
        if self.signalled is not None:
            raise StopRun("Stopped by signal %s." % signal.Signals(self.signalled).name)

    def sleep(self, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            self.check_signal()
            time.sleep(min(MONITOR_STEP, max(0.0, deadline - time.time())))
        self.check_signal()

    def tell_watchers(self, started):
        """One warning for the replicas of `started` ([side, where, [kind, why]]) watched by
        polling, the first time they are, saying why; the others in verbose mode."""
        polled = []
        for side, where, (kind, why) in started:
            if kind == "poll" and side not in self.polling_told:
                self.polling_told.add(side)
                polled.append((side, where, why))
            else:
                self.out.verbose("Monitor: the %s replica %s is watched with %s." % (side, where, kind))
        if polled:
            reasons = sorted(set(why for _, _, why in polled))
            names = " and the ".join("%s replica %s" % (side, where) for side, where, _ in polled)
            self.out.warn("Monitor: the %s %s watched by polling, a rescan every second or more that costs more on "
                          "big trees: %s."
                          % (names, "are" if len(polled) > 1 else "is", "; ".join(reasons)))

    # -- the remote host -------------------------------------------------------------------
    def open_remote(self, uri, role, state_dir):
        """Reach the remote replica: the master connection and the agent.  Raises ReplicaError."""
        transport = SshTransport(self.cfg, uri, self.out)
        self.host = transport.host
        try:
            transport.start()
            replica = transport.start_agent(role, state_dir)
        except BaseException:
            transport.close()
            raise
        self.transport = transport
        self.connected_since = time.time()
        return replica

    def close_remote(self, replica):
        if replica is not None:
            try:
                kill_process_group(replica.agent.process, grace=2.0)
                CHILDREN.ended(replica.agent.process)
            except OSError:
                pass
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def lost(self, why):
        """The link is gone: say so, and when the next attempt is.  The wait doubles at each
        failure and starts again at 1 second once a connection has lasted the longest wait."""
        if self.connected_since is not None and time.time() - self.connected_since >= MONITOR_BACKOFF_LIMIT:
            self.backoff = 0
        self.connected_since = None
        self.backoff = min(MONITOR_BACKOFF_LIMIT, self.backoff * 2) if self.backoff else 1
        self.retry_at = time.time() + self.backoff
        self.out.warn("Monitor: %s; trying again in %d second%s." % (why.rstrip("."), self.backoff,
                                                                      "" if self.backoff == 1 else "s"))

    def reconnect_due(self):
        return time.time() >= self.retry_at

    def connected(self):
        self.out.notice("Monitor: connected to %s again." % self.host)


class MonitorSession(Monitor):
    """--on-changes: sync, watch both replicas, sync again when they change."""

    SIDES = ("initiator", "target")

    def __init__(self, cfg, out):
        Monitor.__init__(self, cfg, out)
        self.remote = cfg["TARGET_SYNC_DIR"].startswith("ssh://")
        self.initiator = make_replica(cfg, "initiator")
        self.local_target = None if self.remote else make_replica(cfg, "target")
        self.target = None       # the RemoteReplica of a remote target while connected
        self.watchers = {}       # side -> TreeWatcher, for the local replicas
        self.wake = None         # set by either local watcher on a change
        self.pending = dict((side, set()) for side in self.SIDES)
        self.unknown = set()     # sides where more changed than the watcher could list
        self.syncs = 0
        self.debounce = Debounce(cfg["MIN_WAIT"], cfg["MAX_WAIT"])
        self.failures = 0        # failed syncs in a row
        self.sync_retry_at = None  # when a failed sync is tried again, changes or not

    # -- start ------------------------------------------------------------------------------
    def ignored(self, root, side):
        """Paths in the replica that osync itself writes outside the work dir."""
        names = [self.cfg["%s_CUSTOM_STATE_DIR" % side.upper()]]
        if side == "initiator":
            names += [self.out.logfile, self.cfg["PROMETHEUS_TEXTFILE"] and os.path.abspath(
                self.cfg["PROMETHEUS_TEXTFILE"])]
        return [rel for rel in (relative_inside(root, name) for name in names if name) if rel]

    def start(self):
        """What must work before the monitor can: both replicas there, the link to a
        remote target; else the monitor ends at once (exit 1)."""
        cfg = self.cfg
        if not shutil.which(cfg["RSYNC_EXECUTABLE"]):
            raise ConfigError("rsync (RSYNC_EXECUTABLE=%s) is not installed or not in PATH: install it (%s), or set "
                              "RSYNC_EXECUTABLE to the path of rsync." % (cfg["RSYNC_EXECUTABLE"], install_hint("rsync")))
        for replica in (self.initiator, self.local_target):
            if replica is not None:
                replica.probe(cfg["CREATE_DIRS"])
        self.wake = threading.Event()
        started = []
        for side, replica in (("initiator", self.initiator), ("target", self.local_target)):
            if replica is not None:
                watcher = TreeWatcher(replica.root, self.spec, self.options, self.ignored(replica.root, side),
                                      [PUSH_FILE_NAME] if side == "initiator" else [])
                watcher.wake = self.wake
                self.watchers[side] = watcher
                started.append([side, replica.root, watcher.start()])
        if self.remote:
            started.append(self.connect(tell=False))
        self.tell_watchers(started)

    def connect(self, tell=True):
        """Open the remote target and watch it through its agent; with tell=False, return
        [side, where, how it is watched] for tell_watchers instead of telling it."""
        replica = self.open_remote(self.cfg["TARGET_SYNC_DIR"], "target", self.cfg["TARGET_CUSTOM_STATE_DIR"])
        try:
            replica.probe(self.cfg["CREATE_DIRS"])
            answer = replica.start_watch(self.spec, self.options, "auto", self.ignored(replica.root, "target"), [])
        except BaseException:
            self.close_remote(replica)
            raise
        self.target = replica
        if not tell:
            return ["target", replica.display, answer]
        self.tell_watchers([["target", replica.display, answer]])
        return None

    def disconnect(self, why):
        replica, self.target = self.target, None
        self.close_remote(replica)
        self.lost(why)

    def close(self):
        for watcher in self.watchers.values():
            watcher.stop()
        if self.target is not None:
            replica, self.target = self.target, None
            self.close_remote(replica)

    # -- the loop ---------------------------------------------------------------------------
    def loop(self):
        cfg, out = self.cfg, self.out
        out.notice("#### Running osync in initiator file monitor mode (MIN_WAIT=%d, MAX_WAIT=%d)."
                   % (cfg["MIN_WAIT"], cfg["MAX_WAIT"]))
        self.start()
        reason = "first sync of the monitor"
        while True:
            self.sync(reason)
            if self.syncs == 1:
                self.notifier.send("READY=1")
            out.notice("#### Monitoring now.")
            reason = self.wait_for_changes()

    def wait_for_changes(self):
        """Block until a sync is due; returns why it is."""
        debounce = self.debounce
        while True:
            self.check_signal()
            if self.remote and self.target is None:
                if self.reconnect_due() and self.reconnect():
                    return "the connection to %s is back" % self.host
            if self.collect(MONITOR_STEP):
                debounce.changed(time.time())
            due = debounce.due(time.time())
            if due is not None and self.remote and self.target is None:
                continue   # synced once the link is back
            if self.retry_due():
                return "trying failed sync %d again" % self.syncs
            if due == "timeout":
                return "MAX_WAIT (%d seconds) passed without changes" % self.cfg["MAX_WAIT"]
            if due == "changes":
                reason = self.changes_to_sync()
                debounce.reset()
                if reason:
                    return reason

    def retry_due(self):
        """A failed sync (a held lock, a replica away) is tried again on its own, since the
        changes it was for are not seen again; while the link to a remote target is down,
        the reconnection syncs instead."""
        if self.remote and self.target is None:
            return False
        return self.sync_retry_at is not None and time.time() >= self.sync_retry_at

    def schedule_retry(self, code):
        """After a failed sync, the next try in MIN_WAIT seconds (1 at least), doubling
        with each failure in a row up to MONITOR_RETRY_LIMIT."""
        if code != 1:
            self.failures = 0
            self.sync_retry_at = None
            return
        self.failures += 1
        delay = min(MONITOR_RETRY_LIMIT, max(1, self.cfg["MIN_WAIT"]) * 2 ** min(self.failures - 1, 20))
        self.sync_retry_at = time.time() + delay
        self.out.notice("Monitor: sync %d is tried again in %d second%s, or at the next change."
                        % (self.syncs, delay, "" if delay == 1 else "s"))

    def reconnect(self):
        try:
            self.connect()
        except ReplicaError as error:
            self.lost("%s is still out of reach: %s" % (self.host, str(error).rstrip(".")))
            return False
        self.connected()
        self.unknown.add("target")   # what changed there while the link was down is not known
        return True

    def collect(self, wait):
        """Take what the watchers saw (waiting up to `wait` seconds); True when something counted."""
        got = False
        if self.remote:
            if self.target is not None:
                asked = time.time()
                timer, hung = self.hang_up_after(wait + MONITOR_REPLY_GRACE)
                try:
                    paths, overflow = self.target.take_changes(wait)
                except ReplicaError as error:
                    if hung.is_set():
                        error = "its agent did not answer within %d seconds" % (wait + MONITOR_REPLY_GRACE)
                    self.disconnect("the connection to %s was dropped: %s" % (self.host, str(error).rstrip(".")))
                    paths, overflow = [], True
                finally:
                    timer.cancel()
                got = self.add("target", paths, overflow) or got
                if not got and self.target is not None:
                    self.sleep(wait - (time.time() - asked))   # an agent that answers at once does not spin us
            else:
                self.sleep(wait)
        else:
            self.wake.wait(wait)   # a change on either local replica
            self.wake.clear()
            got = self.add("target", *self.watchers["target"].take(0)) or got
        return self.add("initiator", *self.watchers["initiator"].take(0)) or got

    def hang_up_after(self, seconds):
        """A timer that ends the agent's session when it has not answered within `seconds`
        (a frozen host, a hung mount there), so the wait for its reply ends and the
        monitor connects again.  Returns the timer and an event set when it did."""
        process = self.target.agent.process
        fired = threading.Event()

        def hang_up():
            fired.set()
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except OSError:
                pass
        timer = threading.Timer(seconds, hang_up)
        timer.daemon = True
        timer.start()
        return timer, fired

    def add(self, side, paths, overflow):
        """Keep what a watcher (or the target's agent) saw, at most WATCH_PATHS_LIMIT paths a
        side between two syncs; past that, only that the side changed."""
        if overflow or len(self.pending[side]) + len(paths) > WATCH_PATHS_LIMIT:
            self.unknown.add(side)
        if side in self.unknown:
            self.pending[side].intersection_update([PUSH_FILE_NAME])   # the target helper's file still says so
        else:
            self.pending[side].update(paths)
        return bool(paths) or overflow

    def changes_to_sync(self):
        """Why the changes seen call for a sync, or None when every changed path is as the
        last sync left it (its own writes)."""
        pending, unknown = self.pending, self.unknown
        self.pending = dict((side, set()) for side in self.SIDES)
        self.unknown = set()
        helper = self.push_seen(pending)
        changed = dict((side, sorted(pending[side])) for side in self.SIDES)
        if not unknown:
            changed = self.not_synced(changed)
        sides = [side for side in self.SIDES if side in unknown or changed[side]]
        words = []
        for side in sides:
            count = len(changed[side])
            words.append("the %s (%s)" % (side, "more than can be listed" if side in unknown else
                                         "%d path%s" % (count, "" if count == 1 else "s")))
        if helper:
            words.append("the target helper's push file")
        if not words:
            self.out.verbose("Monitor: the changes seen are the last sync's own writes; nothing to sync.")
            return None
        return "changes on " + " and ".join(words)

    @staticmethod
    def push_seen(pending):
        if PUSH_FILE_NAME in pending["initiator"]:
            pending["initiator"].discard(PUSH_FILE_NAME)
            return True
        return False

    def not_synced(self, changed):
        """The changed paths whose item differs from what the state of the last sync records."""
        wanted = set(changed["initiator"]) | set(changed["target"])
        if not wanted:
            return changed
        replicas = {"initiator": self.initiator, "target": self.target if self.remote else self.local_target}
        try:
            current = {}
            for side in self.SIDES:
                entries = replicas[side].stat_paths(changed[side], self.options) if changed[side] else []
                current[side] = dict(zip(changed[side], entries))
            recorded = {}
            path = os.path.join(self.initiator.state_dir, state_dir_file("state", self.cfg["INSTANCE_ID"]))
            for rel_path, initiator, target in read_state(path):
                if rel_path in wanted:
                    recorded[rel_path] = {"initiator": initiator, "target": target}
        except (StateError, OsyncError, OSError) as error:
            self.out.verbose("Monitor: cannot compare the changes with the state (%s); syncing." % error)
            return changed
        result = {}
        for side in self.SIDES:
            result[side] = [rel_path for rel_path in changed[side]
                            if not matches_state(recorded.get(rel_path, {}).get(side), current[side][rel_path])]
        return result

    # -- one sync ---------------------------------------------------------------------------
    def sync(self, reason):
        """One sync, as a run of its own: its own count of warnings and errors, run report
        and alert mail.  A failed sync is logged and mailed, and the monitor goes on."""
        cfg, out = self.cfg, self.out
        self.syncs += 1
        out.counter.errors = out.counter.warnings = 0
        # What was seen so far happened before this sync's scan, which sees it.
        self.pending = dict((side, set()) for side in self.SIDES)
        self.unknown = set()
        handlers = list(out.logger.handlers)
        out.report = MonitorReport(cfg, out)
        mails = AlertMails(cfg, out)
        try:
            out.notice("#### Monitor: sync %d starts (%s)." % (self.syncs, reason))
            mails.start()
            run_task(cfg, out, mails, sync=self.sync_once)
            code = out.exit_code()
            out.report.write(code)
            mails.after_run()
        finally:
            for handler in out.logger.handlers[:]:
                if handler not in handlers:
                    out.logger.removeHandler(handler)
            if mails.collector is not None:
                mails.collector.spool.close()
            out.report = None
            CHILDREN.pids()   # forget the children that ended
            self.debounce.reset(acted=True)
        code = out.exit_code()
        result = {0: "succeeded", 1: "failed", 2: "finished with warnings"}[code]
        out.notice("#### Monitor: sync %d %s." % (self.syncs, result))
        self.schedule_retry(code)
        self.notifier.send("STATUS=Sync %d %s at %s; watching for changes." % (
            self.syncs, result, time.strftime("%Y-%m-%d %H:%M:%S")))
        self.check_signal()
        if self.remote and self.target is not None and (self.target.agent.broken is not None
                                                        or self.target.agent.process.poll() is not None):
            self.disconnect("the connection to %s was lost during sync %d" % (self.host, self.syncs))

    def sync_once(self, cfg, out, mails):
        with MonitorWatchdog(self, out, cfg["SOFT_MAX_EXEC_TIME"], cfg["HARD_MAX_EXEC_TIME"], cfg["KEEP_LOGGING"],
                             on_limit=mails.while_running):
            MonitorSync(cfg, out, self).run()


class TargetHelper(Monitor):
    """--on-changes-target, as osync v1.3: on the target host, watch the target and append
    INSTANCE_ID#time to the initiator's push file (through its agent when the initiator
    is ssh://), which the initiator's monitor takes for a change."""

    def __init__(self, cfg, out):
        Monitor.__init__(self, cfg, out)
        if cfg["TARGET_SYNC_DIR"].startswith("ssh://"):
            raise ConfigError("--on-changes-target runs on the target host: TARGET_SYNC_DIR must be a local "
                              "directory there, not %s." % cfg["TARGET_SYNC_DIR"])
        self.remote = cfg["INITIATOR_SYNC_DIR"].startswith("ssh://")
        self.target = LocalReplica("target", cfg["TARGET_SYNC_DIR"], cfg["TARGET_CUSTOM_STATE_DIR"])
        self.initiator = None
        if not self.remote:
            self.initiator = LocalReplica("initiator", cfg["INITIATOR_SYNC_DIR"], cfg["INITIATOR_CUSTOM_STATE_DIR"])
        self.watcher = None
        self.debounce = Debounce(cfg["MIN_WAIT"], cfg["MAX_WAIT"])

    def loop(self):
        cfg, out = self.cfg, self.out
        out.notice("#### Running osync in target helper file monitor mode (MIN_WAIT=%d, MAX_WAIT=%d)."
                   % (cfg["MIN_WAIT"], cfg["MAX_WAIT"]))
        self.target.probe(False)
        if self.initiator is not None:
            self.initiator.probe(False)
        ignored = [rel for rel in (relative_inside(self.target.root, name) for name in (
            cfg["TARGET_CUSTOM_STATE_DIR"], out.logfile) if name) if rel]
        self.watcher = TreeWatcher(self.target.root, self.spec, self.options, ignored)
        self.tell_watchers([["target", self.target.root, self.watcher.start()]])
        if self.remote:
            self.initiator = self.open_remote(cfg["INITIATOR_SYNC_DIR"], "initiator",
                                              cfg["INITIATOR_CUSTOM_STATE_DIR"])
        ready = False
        while True:
            while not self.trigger():
                self.sleep(max(0.0, self.retry_at - time.time()))
            if not ready:
                self.notifier.send("READY=1")
                ready = True
            while True:
                paths, overflow = self.watcher.take(MONITOR_STEP)
                if paths or overflow:
                    self.debounce.changed(time.time())
                if self.debounce.due(time.time()):
                    break
                self.check_signal()
            self.debounce.reset(acted=True)

    def trigger(self):
        """Append the line to the push file; False when the initiator cannot be reached."""
        if self.initiator is None:
            try:
                self.initiator = self.open_remote(self.cfg["INITIATOR_SYNC_DIR"], "initiator",
                                                  self.cfg["INITIATOR_CUSTOM_STATE_DIR"])
            except ReplicaError as error:
                self.lost("%s is out of reach: %s" % (self.host, str(error).rstrip(".")))
                return False
            self.connected()
        now = time.time()
        line = "%s#%s.%09d\n" % (self.cfg["INSTANCE_ID"], time.strftime("%Y%m%dT%H%M%S", time.localtime(now)),
                                 int((now % 1) * 1e9))
        try:
            self.initiator.append_push_line(line)
        except (ReplicaError, OSError) as error:
            if not self.remote:
                raise ReplicaError("Cannot append to %s: %s." % (
                    os.path.join(self.initiator.root, PUSH_FILE_NAME), getattr(error, "strerror", None) or error))
            replica, self.initiator = self.initiator, None
            self.close_remote(replica)
            self.lost("the connection to %s was dropped: %s" % (self.host, str(error).rstrip(".")))
            return False
        self.out.notice("Initiator of instance [%s] should be notified of file changes now." % self.cfg["INSTANCE_ID"])
        self.notifier.send("STATUS=Initiator notified at %s; watching for changes."
                           % time.strftime("%Y-%m-%d %H:%M:%S"))
        return True

    def close(self):
        if self.watcher is not None:
            self.watcher.stop()
        if self.remote and self.initiator is not None:
            replica, self.initiator = self.initiator, None
            self.close_remote(replica)


def run_monitor(cfg, out):
    """--on-changes or --on-changes-target, until a stop signal."""
    if cfg.switch("dry"):
        raise ConfigError("Monitor mode cannot be combined with --dry: a dry run would be repeated forever.")
    monitor = TargetHelper(cfg, out) if cfg.switch("on_changes_target") else MonitorSession(cfg, out)
    monitor.serve()


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
        write_stdout(help_text())
        return 0
    if args.version:
        write_stdout("%s %s\n" % (PROGRAM, VERSION))
        return 0
    if not argv:
        write_stdout(help_text())
        return 1
    if args.config is not None and args.config.startswith("-"):
        raise ConfigError("Unknown option %s. Run %s --help for the options." % (args.config, PROGRAM))
    if args.upgrade_conf is not None:
        return upgrade_request(args)
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


# What may go with --upgrade-conf: it rewrites one file and syncs nothing.
UPGRADE_COMPANIONS = ("silent", "verbose", "errors_only", "no_prefix", "non_interactive")


# Upgrading old configs (--upgrade-conf) ----------------------------------------------------
# Configs of osync v1.0 to v1.2 load as they are, each old name translated with a warning.
# --upgrade-conf rewrites one in place with the current names, so that it loads without
# them: the user's lines and comments stay, only what the reader translates is changed,
# and every key the file lacks is added with its default and its comment from sync.conf.

# The section titles of osync v1.0-v1.2 configs ("## ---------- GENERAL OPTIONS").
OLD_SECTION_HEADERS = {
    "GENERAL OPTIONS": "GENERAL",
    "REMOTE OPTIONS": "REMOTE_OPTIONS",
    "REMOTE SYNC OPTIONS": "REMOTE_OPTIONS",
    "MISC OPTIONS": "MISC_OPTIONS",
    "BACKUP AND DELETION OPTIONS": "BACKUP_DELETE_OPTIONS",
    "BACKUP AND TRASH OPTIONS": "BACKUP_DELETE_OPTIONS",
    "RESUME OPTIONS": "RESUME_OPTIONS",
    "ALERT OPTIONS": "ALERT_OPTIONS",
    "EXECUTION HOOKS": "EXECUTION_HOOKS",
}
OLD_SECTION_HEADER = re.compile(r"^\s*#+\s*-+\s*([A-Za-z][A-Za-z ]*[A-Za-z])\s*-*\s*$")
# "#### osync v1.00a config file rev 2015040601": the revision is CONFIG_FILE_REVISION now.
OLD_REVISION_COMMENT = re.compile(r"^\s*#+\s*osync\b.*\bconfig file rev\s*[0-9]+\s*$", re.IGNORECASE)
# The state lists of osync v1.0-v1.2, named after the replica (master, slave) they describe.
OLD_STATE_PREFIXES = (("master", "initiator"), ("slave", "target"))
OLD_STATE_LISTS = ("tree-current", "tree-after", "deleted-list", "failed-delete")
PLAIN_CONFIG_WORD = re.compile(r"^[A-Za-z0-9_./@:+,%=-]+\Z")


def config_word(value):
    """`value` written so that read_config_file reads exactly it back (no expansion)."""
    if PLAIN_CONFIG_WORD.match(value):
        return value
    return "'%s'" % value.replace("'", "'\\''")


def example_blocks():
    """{key: the lines sync.conf gives it}: its comments, then KEY=default."""
    blocks = {}
    current = []
    for line in example_config().split("\n"):
        if not line:
            current = []
            continue
        current.append(line)
        match = ASSIGNMENT.match(line)
        if match:
            blocks[match.group(1)] = current
            current = []
    return blocks


class UpgradedLine(object):
    """One line of the upgraded file, and the lines added before or after it."""

    def __init__(self, text, key=None):
        self.text = text
        self.key = key          # the (current) key the line sets, or None
        self.before = []
        self.after = []


def upgrade_assignment(line, key, value, legacy_target):
    """The upgraded text of one KEY=value line, and the change made in words (or None)."""
    start = line.index(key + "=")
    name = OLD_NAMES.get(key, key)
    setting = SETTINGS_BY_KEY.get(name)
    new_value = None
    if name == "TARGET_SYNC_DIR" and legacy_target is not None:
        new_value = legacy_target
    elif setting is not None and setting.kind in ("choice", "list") and value.strip() and \
            set(re.split(r"[\s,]+", value.strip())) & set(OLD_VALUES):
        new_value = convert_value(setting, value)
    elif name == "CONFIG_FILE_REVISION" and (not re.match(r"^[0-9]+(\.[0-9]+)*\Z", value.strip()) or
                                             version_tuple(value) < version_tuple(CONFIG_FILE_REVISION_REQUIRED)):
        new_value = CONFIG_FILE_REVISION_REQUIRED
    if new_value is not None:
        text = "%s%s=%s" % (line[:start], name, config_word(new_value))
        return text, "%s=%s" % (name, new_value) if name == key else "%s to %s=%s" % (key, name, new_value)
    if name != key:
        return line[:start] + name + line[start + len(key):], "%s to %s" % (key, name)
    return line, None


def upgraded_config_lines(text, assignments, cfg):
    """The lines of the upgraded config and the list of changes made, in words.

    `assignments` are read_config_file's of `text`, `cfg` the Config loaded from it (which
    holds the ssh:// target that v1.0's REMOTE_* settings name)."""
    by_line = dict((number, (key, value)) for number, key, value in assignments)
    written = set(key for _, key, _ in assignments)
    targets = [number for number, key, _ in assignments if OLD_NAMES.get(key, key) == "TARGET_SYNC_DIR"]
    legacy_target = None
    if targets and cfg["TARGET_SYNC_DIR"].startswith("ssh://") and \
            not by_line[targets[-1]][1].startswith("ssh://"):
        legacy_target = cfg["TARGET_SYNC_DIR"]     # REMOTE_SYNC=yes with REMOTE_HOST...
    rows = []
    changes = []
    commented = []
    headers = 0
    for number, line in enumerate(text.splitlines(), 1):
        header = OLD_SECTION_HEADER.match(line)
        if header and header.group(1).upper() in OLD_SECTION_HEADERS:
            rows.append(UpgradedLine("[%s]" % OLD_SECTION_HEADERS[header.group(1).upper()]))
            headers += 1
            continue
        if OLD_REVISION_COMMENT.match(line) and number not in by_line:
            continue
        if number not in by_line:
            rows.append(UpgradedLine(line))
            continue
        key, value = by_line[number]
        if key == "REMOTE_RSYNC_PATH" and "RSYNC_REMOTE_PATH" not in written:
            start = line.index(key + "=")
            rows.append(UpgradedLine(line[:start] + "RSYNC_REMOTE_PATH" + line[start + len(key):],
                                     "RSYNC_REMOTE_PATH"))
            changes.append("REMOTE_RSYNC_PATH to RSYNC_REMOTE_PATH")
            continue
        if key in LEGACY_REMOTE_KEYS:
            if not commented:
                rows.append(UpgradedLine("# osync v1.0 settings that osync.py no longer reads (TARGET_SYNC_DIR="
                                         "ssh://user@host:port//path names a remote target):"))
            rows.append(UpgradedLine("#" + line))
            commented.append(key)
            continue
        is_last_target = bool(targets) and number == targets[-1]
        new_text, change = upgrade_assignment(line, key, value, legacy_target if is_last_target else None)
        rows.append(UpgradedLine(new_text, OLD_NAMES.get(key, key)))
        if change:
            changes.append(change)
    if commented:
        changes.append("%s turned into comments" % ", ".join(commented))
    if headers:
        changes.append("%d section title%s turned into [SECTION] lines" % (headers, "s" if headers > 1 else ""))
    added = add_missing_keys(rows)
    if added:
        changes.append("%d missing key%s added with %s default and comment" % (
            len(added), "s" if len(added) > 1 else "", "their" if len(added) > 1 else "its"))
    lines = []
    for index, row in enumerate(rows):
        if row.before:
            lines.extend(row.before[1:] + [""])
        lines.append(row.text)
        lines.extend(row.after)
        if row.after and index + 1 < len(rows) and rows[index + 1].text.strip() and not rows[index + 1].before:
            lines.append("")
    return lines, changes


def add_missing_keys(rows):
    """Add every key of sync.conf that `rows` do not set, with its comment and default,
    in its section: after the key before it, else after the [SECTION] line, else before
    the first key of the section; a section the file lacks goes at its end.  Returns the
    keys added."""
    blocks = example_blocks()
    last_line = dict((row.key, index) for index, row in enumerate(rows) if row.key)
    header_line = {}
    for index, row in enumerate(rows):
        match = re.match(r"^\s*\[([A-Za-z0-9_ -]*)\]\s*$", row.text)
        if match:
            header_line.setdefault(match.group(1), index)
    tail = UpgradedLine("")
    anchors = {}
    added = []
    settings = [setting for setting in SETTINGS if setting.key and setting.conf]
    for position, setting in enumerate(settings):
        section = setting.section
        if setting.key in last_line:
            anchors[section] = rows[last_line[setting.key]].after
            continue
        if section not in anchors:
            later = [last_line[other.key] for other in settings[position:]
                     if other.section == section and other.key in last_line]
            if section in header_line:
                anchors[section] = rows[header_line[section]].after
            elif later:
                first = min(later)
                while first > 0 and rows[first - 1].text.lstrip().startswith("#") and rows[first - 1].key is None:
                    first -= 1
                anchors[section] = rows[first].before
            else:
                tail.after.extend(["", "[%s]" % section, "# ---- %s" % SECTION_TITLES[section]])
                anchors[section] = tail.after
        anchors[section].extend([""] + blocks[setting.key])
        added.append(setting.key)
    if tail.after:
        rows.append(UpgradedLine(tail.after[0]))
        rows[-1].after = tail.after[1:]
    return added


def keep_saved_copy(path, data, info):
    """Write the original `data` to PATH.save, or PATH.save.1, .2... when that exists (a
    backup is never overwritten); returns its path."""
    candidate = path + ".save"
    number = 0
    while True:
        try:
            handle = open(candidate, "xb")
            break
        except FileExistsError:
            number += 1
            candidate = "%s.save.%d" % (path, number)
    with handle:
        handle.write(data)
        handle.flush()
        os.fchmod(handle.fileno(), stat.S_IMODE(info.st_mode))
        if (os.fstat(handle.fileno()).st_uid, os.fstat(handle.fileno()).st_gid) != (info.st_uid, info.st_gid):
            os.fchown(handle.fileno(), info.st_uid, info.st_gid)
        os.fsync(handle.fileno())
    os.utime(candidate, ns=(info.st_atime_ns, info.st_mtime_ns))
    return candidate


def check_upgradable(path, info):
    """Refuse, before anything is written, a file the upgrade could not replace as it is."""
    directory = os.path.dirname(path)
    if not os.access(path, os.W_OK):
        raise ConfigError("Config file %s is not writable, so it was not upgraded; make it writable "
                          "(or run as its owner) and try again." % path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("The directory %s is not writable, so %s was not upgraded: the upgrade writes the new "
                          "file and a .save copy of the old one there." % (directory, path))
    if os.geteuid() not in (0, info.st_uid):
        raise ConfigError("Config file %s belongs to user id %d, so it was not upgraded: run --upgrade-conf as that "
                          "user or as root, so that the file keeps its owner." % (path, info.st_uid))


def rename_old_state_files(state_dir, instance_id):
    """Rename osync v1.0-v1.2's master-/slave- state lists of `instance_id` in `state_dir`
    to their initiator-/target- names; returns (level, message) pairs."""
    messages = []
    if not instance_id or not os.path.isdir(state_dir):
        return messages
    for old_prefix, new_prefix in OLD_STATE_PREFIXES:
        for name in OLD_STATE_LISTS:
            for suffix in ("", "-dry"):
                old = os.path.join(state_dir, "%s-%s-%s%s" % (old_prefix, name, instance_id, suffix))
                new = os.path.join(state_dir, "%s-%s-%s%s" % (new_prefix, name, instance_id, suffix))
                if not os.path.lexists(old):
                    continue
                if os.path.lexists(new):
                    messages.append(("warn", "State file %s was not renamed: %s exists already, so both were "
                                             "left as they are." % (old, new)))
                    continue
                try:
                    os.rename(old, new)
                except OSError as error:
                    messages.append(("warn", "Cannot rename state file %s to %s: %s; rename it yourself."
                                             % (old, new, error.strerror)))
                    continue
                messages.append(("notice", "State file %s renamed %s." % (old, os.path.basename(new))))
    return messages


def upgrade_state_files(cfg):
    """Rename the old state lists in both replicas' state dirs, where they are local."""
    instance = cfg["INSTANCE_ID"]
    messages = []
    for side in ("INITIATOR", "TARGET"):
        root = cfg["%s_SYNC_DIR" % side]
        if root.startswith("ssh://"):
            messages.append(("notice", "The state dir of the %s %s was left as it is: osync.py reads no old "
                                       "osync state list there, so they do no harm." % (side.lower(), root)))
            continue
        if not root:
            continue
        state_dir = cfg["%s_CUSTOM_STATE_DIR" % side] or os.path.join(
            os.path.expanduser(root), WORK_DIR_NAME, STATE_DIR_NAME)
        messages += rename_old_state_files(state_dir, instance)
    return messages


def upgrade_config_file(path):
    """--upgrade-conf: rewrite the osync v1.0-v1.2 config `path` to the current format,
    keeping the original as PATH.save, and rename the old state lists of its replicas.
    Returns (level, message) pairs; a file that cannot be upgraded is a ConfigError and
    stays untouched."""
    cfg = Config(quicksync=False)
    cfg.load_file(path)     # every error the reader would give, with its file, line and key
    assignments = read_config_file(path)
    keys = set(key for _, key, _ in assignments)
    if not keys & {"INITIATOR_SYNC_DIR", "MASTER_SYNC_DIR"}:
        raise ConfigError("%s is not an osync config file: it sets neither INITIATOR_SYNC_DIR nor MASTER_SYNC_DIR, "
                          "so it was not upgraded." % path)
    real_path = os.path.realpath(path)
    with open(real_path, "rb") as handle:
        data = handle.read()
    text = data.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines, changes = upgraded_config_lines(text, assignments, cfg)
    new_text = "\n".join(lines) + "\n"
    messages = []
    if new_text == text:
        messages.append(("notice", "Config file %s is already in the current format; nothing was rewritten." % path))
    else:
        info = os.stat(real_path)
        check_upgradable(real_path, info)
        saved = keep_saved_copy(real_path, data, info)
        write_atomically(real_path, [new_text], like=info)
        messages.append(("notice", "Config file %s upgraded to the current format (%s); the original is kept as %s."
                                   % (path, "; ".join(changes), saved)))
        upgraded = Config(quicksync=False)
        upgraded.load_file(path)
        messages += [("warn", warning) for warning in upgraded.warnings]
        cfg = upgraded
    return messages + upgrade_state_files(cfg)


def upgrade_request(args):
    """The Config of `--upgrade-conf FILE`: the file to upgrade and the screen switches."""
    if not args.upgrade_conf:
        raise ConfigError("--upgrade-conf needs the config file to upgrade: --upgrade-conf=/etc/osync/NAME.conf.")
    if args.config is not None:
        raise ConfigError("--upgrade-conf takes the config file to upgrade as its value, so %s cannot be given "
                          "as well: run %s --upgrade-conf=FILE alone." % (args.config, PROGRAM))
    cfg = Config(quicksync=False)
    for setting in SETTINGS:
        if not setting.option or setting.option == "--upgrade-conf":
            continue
        if getattr(args, option_dest(setting)) in (None, False):
            continue
        if option_dest(setting) not in UPGRADE_COMPANIONS:
            raise ConfigError("%s cannot be combined with --upgrade-conf, which only rewrites a config file and "
                              "syncs nothing." % setting.option)
        cfg.switches[option_dest(setting)] = True
    cfg.switches["upgrade_conf"] = args.upgrade_conf
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
    cfg = parse_or_report(argv, out)
    if isinstance(cfg, int):
        return cfg
    if cfg.switch("upgrade_conf"):
        return run_upgrade(cfg, out)
    mails = None if monitor_requested(cfg) else AlertMails(cfg, out)   # a monitor mails each sync
    open_run_log(cfg, out)
    if mails is not None:
        mails.start()
    run_task(cfg, out, mails)
    if mails is not None:
        mails.after_run()
    return report_stop(out)


def debug_requested():
    return os.environ.get("_DEBUG", "").lower() in ("true", "yes", "1")


def parse_or_report(argv, out):
    """The Config of this run; or an exit code: 0 or 1 after help or version, 1 once a
    command line or config that cannot be used is reported (on the screen unless --silent,
    and in the log where messages go before the config is read)."""
    try:
        return parse_command_line(argv)
    except Exception as error:
        out.configure(silent="--silent" in argv, debug=debug_requested())
        out.open_log(early_log_candidates())
        if isinstance(error, ConfigError):
            out.critical(str(error))
        else:
            report_internal_error(out, error)
        out.close()
        return 1


def open_run_log(cfg, out):
    """The screen switches and the log file of the config, then the lines that open a run
    in the log, with what loading the config had to say."""
    out.configure(silent=cfg.switch("silent"), errors_only=cfg.switch("errors_only"),
                  verbose=cfg.switch("verbose"), debug=debug_requested(),
                  prefix="none" if cfg.switch("no_prefix") else "time")
    for value in secret_values(cfg):
        out.add_secret(value)
    out.open_log(log_file_candidates(cfg["INSTANCE_ID"], cfg["LOGFILE"]))
    out.report = RunReport(cfg, out)
    out.notice("-------------------------------------------------------------")
    out.notice("%s - %s %s%s started." % (time.strftime("%Y-%m-%d %H:%M:%S"), PROGRAM, VERSION,
                                          " (dry run)" if cfg.switch("dry") else ""))
    out.notice("Sync task [%s] launched as %s@%s (PID %d)." % (cfg["INSTANCE_ID"], current_user(),
                                                              socket.gethostname(), os.getpid()))
    for notice in cfg.notices:
        out.notice(notice)
    for warning in cfg.warnings:
        out.warn(warning)


def run_task(cfg, out, mails=None, sync=None):
    """Do what the command line asks for (or `sync`, one sync of a monitor); however it
    stops, the reason is logged, and what was logged decides the exit code."""
    try:
        if sync is not None:
            sync(cfg, out, mails)
        elif monitor_requested(cfg):
            run_monitor(cfg, out)
        else:
            run_sync(cfg, out, mails)
    except OsyncError as error:
        if isinstance(error, Refusal) and out.report is not None:
            out.report.refused_by = error.guard
        out.critical(str(error))
    except StopRun as stop:
        out.log(logging.ERROR if stop.level == "ERROR" else logging.WARNING, stop.reason)
    except OSError as error:  # the disk or the system refused something osync.py itself does
        out.critical("Stopped: %s%s. Nothing was lost; the next run continues where this one stopped."
                     % (error.strerror or error, " (%s)" % error.filename if error.filename else ""))
    except Exception as error:  # a bug: say it plainly, keep the traceback in the log
        report_internal_error(out, error)


def run_upgrade(cfg, out):
    """--upgrade-conf FILE: rewrite the config, rename old state files, say what was done;
    returns the exit code (an error changes nothing and exits 1)."""
    out.configure(silent=cfg.switch("silent"), errors_only=cfg.switch("errors_only"),
                  verbose=cfg.switch("verbose"), debug=debug_requested(),
                  prefix="none" if cfg.switch("no_prefix") else "time")
    out.open_log(early_log_candidates())
    path = cfg.switch("upgrade_conf")
    try:
        for level, message in upgrade_config_file(path):
            if level == "warn":
                out.warn(message)
            else:
                out.notice(message)
    except OsyncError as error:
        out.critical(str(error))
    except OSError as error:
        out.critical("Cannot upgrade config file %s: %s%s." % (
            path, error.strerror or error, " (%s)" % error.filename if error.filename else ""))
    except Exception as error:  # a bug: say it plainly, keep the traceback in the log
        report_internal_error(out, error)
    out.close()
    return out.exit_code()


def run_sync(cfg, out, mails=None):
    """One sync of the two replicas, under the soft and hard time limits."""
    with Watchdog(out, cfg["SOFT_MAX_EXEC_TIME"], cfg["HARD_MAX_EXEC_TIME"], cfg["KEEP_LOGGING"],
                  on_limit=mails.while_running if mails is not None else None):
        SyncRun(cfg, out).run()


def report_stop(out):
    """End the run: stop what is left of its children, log how it finished, close the
    log; returns the exit code (0 ok, 1 errors, 2 warnings only)."""
    CHILDREN.close()
    out.progress_done()
    if out.report is not None:
        out.report.write(out.exit_code())
    code = out.exit_code()
    out.notice("%s finished%s." % (PROGRAM, {0: "", 1: " with errors", 2: " with warnings"}[code]))
    out.close()
    return code


def report_internal_error(out, error):
    """A bug: one sentence on the screen, the traceback in the log file at any log level."""
    import traceback
    out.trace("Traceback of the unexpected error:\n" + traceback.format_exc().rstrip())
    out.critical("Unexpected internal error: %s: %s. Please report it with the log %s."
                 % (type(error).__name__, error, out.logfile))


def write_stdout(text):
    """Print help or version text; a closed or broken stdout (`| head`) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        try:   # so that Python's own flush at exit finds nothing to complain about
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
