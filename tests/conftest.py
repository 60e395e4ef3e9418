"""Every tdvmcall module is imported before any test runs.

hypothesis draws some integers from the constants it finds in the code it considers local (our
package, installed editable), and it reads them from the modules already imported.  Without this,
the planted-bug budgets of tests/test_fuzz.py would depend on which tests happened to import which
wing first (a run of test_fuzz.py alone and the whole suite drew different examples)."""

import importlib
import pkgutil

import tdvmcall

for _mod in pkgutil.walk_packages(tdvmcall.__path__, "tdvmcall."):
    if _mod.name != "tdvmcall.__main__":
        importlib.import_module(_mod.name)
