#!/usr/bin/env python3
"""osync.py - the installed command: runs the osync module that install.py (or a package)
put in MODULE_DIR, from its byte-compiled form.

A script is compiled again at every start, and compiling the 9,000 lines of osync.py
takes 25-30 MiB of the process's peak memory; a module imported from its valid .pyc
(MODULE_DIR/__pycache__) skips that.  Python checks the .pyc against the source's
modification time and size (or its hash) at every import, so a changed osync.py is
compiled anew, never run from a stale .pyc.

Standard library only; Python 3.6 or newer.
"""

import os
import sys

# The folder of the osync module, relative to the folder of this launcher (its real one,
# after links): /usr/local/bin -> /usr/local/lib/osync for install.py; the packages, which
# put the launcher in /usr/bin and the module in /usr/share/osync, change this line.
MODULE_DIR = "../lib/osync"
REINSTALL = "reinstall with install.py"


def module_folder():
    """The absolute folder that holds the osync module of this install."""
    here = os.path.dirname(os.path.realpath(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(here, MODULE_DIR))


def fail(sentence):
    sys.stderr.write("ERROR: %s\n" % sentence)
    return 1


def main():
    folder = module_folder()
    module_file = os.path.join(folder, "osync.py")
    if not os.path.isfile(module_file):
        return fail("osync.py is not installed completely: %s is missing; %s." % (module_file, REINSTALL))
    # The module folder first, and not this launcher's own folder, whose osync.py is this file.
    launcher_folders = set([os.path.dirname(os.path.abspath(__file__)),
                            os.path.dirname(os.path.realpath(os.path.abspath(__file__)))])
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") not in launcher_folders]
    sys.path.insert(0, folder)
    try:
        import osync
    except KeyboardInterrupt:
        return 130
    except Exception as error:   # a damaged or unreadable module: a sentence, not a traceback
        return fail("osync.py cannot load its module %s (%s: %s); %s."
                    % (module_file, type(error).__name__, error, REINSTALL))
    if os.path.dirname(os.path.abspath(getattr(osync, "__file__", "") or "")) != folder \
            or not callable(getattr(osync, "main", None)):
        return fail("osync.py loaded another module named osync (%s) instead of %s; %s."
                    % (getattr(osync, "__file__", "built in"), module_file, REINSTALL))
    return osync.main()


if __name__ == "__main__":
    sys.exit(main())
