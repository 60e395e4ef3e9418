"""Every tdvmcall module is imported before any test runs.

hypothesis draws some integers from the constants it finds in the code it considers local (our
package, installed editable), and it reads them from the modules already imported.  Without this,
the planted-bug budgets of tests/test_fuzz.py would depend on which tests happened to import which
wing first (a run of test_fuzz.py alone and the whole suite drew different examples).

The suite may also be started with SIGINT ignored: a shell without job control starts a
background job so (POSIX), and an ignored signal stays ignored across exec.  The commands the
signal tests start would then inherit the ignored disposition and, as documented for `nohup`,
keep ignoring Ctrl-C.  Those tests stand for a user at a terminal, where SIGINT is not ignored, so
the suite restores Python's own handler first; the children start with the default disposition."""

import importlib
import pkgutil
import signal

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import tdvmcall

for _mod in pkgutil.walk_packages(tdvmcall.__path__, "tdvmcall."):
    if _mod.name != "tdvmcall.__main__":
        importlib.import_module(_mod.name)
