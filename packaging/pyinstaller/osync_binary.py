"""Entry point of the PyInstaller binary: osync.py's main() once the environment that
osync.py hands to its children (rsync, ssh, hooks, the mailer) is the caller's again.

The bootloader of a onefile binary puts its unpacked bundle first in LD_LIBRARY_PATH (on
Linux; DYLD_LIBRARY_PATH on macOS) and keeps the caller's value in *_ORIG.  The binary
itself is already linked by then; only the children would load the bundle's libcrypto or
libz instead of their own, and ssh refuses to run with an OpenSSL it was not built for."""

import os
import sys

LIBRARY_PATH_VARIABLES = ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "LIBPATH")


def restore_library_path():
    """The caller's library path for every child: its saved value, or none at all."""
    for name in LIBRARY_PATH_VARIABLES:
        saved = os.environ.pop(name + "_ORIG", None)
        if saved is not None:
            os.environ[name] = saved
        else:
            os.environ.pop(name, None)


if getattr(sys, "frozen", False):
    restore_library_path()

import osync  # noqa: E402  (after the environment is restored, as the first thing osync sees)

if __name__ == "__main__":
    sys.exit(osync.main())
