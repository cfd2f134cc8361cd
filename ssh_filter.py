#!/usr/bin/env python3
"""ssh_filter.py - the forced command that guards an osync.py target host.

Put it in front of the initiator's key in the target user's ~/.ssh/authorized_keys:

    command="/usr/local/bin/ssh_filter.py SomeAlphaNumericToken9",restrict ssh-ed25519 AAAA... osync@initiator

and give the initiator's config the same token (_REMOTE_TOKEN=SomeAlphaNumericToken9).
Every command that key asks for then comes here in SSH_ORIGINAL_COMMAND.  Only what
osync.py sends, carrying the token, is let through:

    env _REMOTE_TOKEN=TOKEN [sudo -n] PYTHON -c <osync.py agent bootstrap> N
    env _REMOTE_TOKEN=TOKEN [sudo -n] [DIR/]rsync --server ...

`sudo -n` is allowed only when the key's command line adds --allow-sudo.  The command
is split with shlex and executed directly (execvp): never through a shell, never eval.
Anything else is refused: a line in ~/.ssh/ssh_filter.log and exit code 93 (EXIT_REFUSED).

Standard library only; Python 3.6 or newer.
"""

import os
import re
import shlex
import sys
import time

# The bootstrap osync.py sends as `python -c`: osync.py's AGENT_STUB, byte for byte (a test
# checks that both files agree; osync.py's AGENT_STUB_EXPLAINED is the same code, commented).
# A new osync.py that changes the stub needs this new ssh_filter.py on every target host.
AGENT_STUB = ("import sys;sys.version_info<(3,6) and (sys.stderr.write('osync.py agent: Python 3.6 or newer is "
              "needed, this is '+sys.version.split()[0]+'\\n'),sys.exit(91));"
              "sys.path=[p for p in sys.path if p not in ('','.')];"
              "n=int(sys.argv[1]);c=sys.stdin.buffer.read(n);len(c)<n and sys.exit(92);"
              "g={'__name__':'osync_agent'};exec(compile(c,'osync.py','exec'),g);g['agent_main']()")
# The exit code of a refused command: osync.py's AGENT_EXIT_REFUSED, which it turns into a
# sentence about _REMOTE_TOKEN (ssh, shells and Python do not use this code).
EXIT_REFUSED = 93
PYTHON_NAME = re.compile(r"^python[0-9.]*$")
RSYNC_NAME = re.compile(r"^[A-Za-z0-9_.+-]*rsync[A-Za-z0-9_.+-]*$")
LOG_FILE = os.path.join(os.path.expanduser("~"), ".ssh", "ssh_filter.log")


def allowed(argv, token, allow_sudo):
    """Is this command (already split) one that osync.py sends with the right token?"""
    if len(argv) < 3 or argv[0] != "env" or argv[1] != "_REMOTE_TOKEN=" + token or not token:
        return False
    rest = argv[2:]
    if rest[:2] == ["sudo", "-n"]:
        if not allow_sudo:
            return False
        rest = rest[2:]
    if not rest:
        return False
    program = os.path.basename(rest[0])
    if RSYNC_NAME.match(program) and rest[1:2] == ["--server"]:
        return True
    if PYTHON_NAME.match(program) and len(rest) == 4 and rest[1] == "-c" and rest[2] == AGENT_STUB \
            and rest[3].isdigit():
        return True
    return False


def log(message):
    try:
        if not os.path.isdir(os.path.dirname(LOG_FILE)):
            os.makedirs(os.path.dirname(LOG_FILE), 0o700)
        fd = os.open(LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as handle:
            handle.write("%s - %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), message))
    except OSError:
        pass


def main(arguments):
    if not arguments or arguments[0].startswith("-"):
        sys.stderr.write("usage: ssh_filter.py TOKEN [--allow-sudo]  (as a command= in authorized_keys)\n")
        return 1
    token = arguments[0]
    allow_sudo = "--allow-sudo" in arguments[1:]
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        argv = shlex.split(command)
    except ValueError:
        argv = []
    if not allowed(argv, token, allow_sudo):
        shown = command.replace(token, "__TOKEN__") if token else command
        log("Command [%s] not allowed (from %s)." % (shown[:500] or "<interactive shell>",
                                                     os.environ.get("SSH_CLIENT", "?").split(" ")[0]))
        sys.stderr.write("ssh_filter.py: command refused.\n")
        return EXIT_REFUSED
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.stderr.write("ssh_filter.py: cannot run %s: %s\n" % (argv[0], error.strerror))
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
