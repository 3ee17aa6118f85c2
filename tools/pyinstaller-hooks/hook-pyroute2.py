# pyroute2 imports many of its modules by name at run time (IPRoute's
# backends, the netlink message classes): take them all, but not its pytest
# fixtures.
from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules("pyroute2", filter=lambda name: not name.startswith("pyroute2.fixtures"))
excludedimports = ["pyroute2.fixtures"]
