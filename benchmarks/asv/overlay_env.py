"""asv's install and uninstall commands for its per-commit environments (``environment_type: virtualenv``).

asv checks each commit out, builds its wheel (``build_command``: ``pip wheel --no-deps --no-build-isolation``) and
runs ``install``: the commit's wheel goes into asv's small virtualenv with ``--no-deps``, then a ``.pth`` file
appends the site-packages of the project venv -- the dependency set (torch, transformers, ...) -- *after* the
environment's own. So every commit runs its own code on today's dependencies, with nothing downloaded per commit
(torch's CPU wheel comes from an index pip may not reach, and is 200+ MB):

* the commit's ``rankbench``/``rankbench_plugins`` shadow the venv's editable install, whose import hook is a
  ``.pth`` file that is not processed here (a path added by a ``.pth`` line is not a site directory);
* its entry points (the built-in plugins) win, since ``importlib.metadata`` keeps the first distribution of a name.

The dependency venv is ``<repo>/.venv`` unless ``RANKBENCH_DEPS_PYTHON`` names another interpreter; it must be the
same Python minor version as asv's environment. A commit that needs a dependency the venv lacks fails to import
(asv records its benchmarks as failed). Run by asv as ``python overlay_env.py install WHEEL CONF_DIR`` /
``python overlay_env.py uninstall`` inside the environment.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

PTH = "zz_rankbench_deps.pth"
DEPS_ENV = "RANKBENCH_DEPS_PYTHON"
PROBE = (
    "import json, sys, sysconfig; p = sysconfig.get_paths(); "
    "print(json.dumps([list(sys.version_info[:2]), p['purelib'], p['platlib']]))"
)


def _site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _deps_paths(conf_dir: str) -> list[str]:
    python = os.environ.get(DEPS_ENV) or str(Path(conf_dir) / ".venv" / "bin" / "python")
    if not Path(python).exists():
        raise SystemExit(f"overlay_env: no dependency interpreter at {python} (run `make install`, or set {DEPS_ENV})")
    version, purelib, platlib = json.loads(subprocess.check_output([python, "-c", PROBE], text=True))
    if tuple(version) != tuple(sys.version_info[:2]):
        raise SystemExit(
            f"overlay_env: {python} is Python {version[0]}.{version[1]}, asv's environment is "
            f"{sys.version_info[0]}.{sys.version_info[1]}; set `pythons` in asv.conf.json to match"
        )
    return list(dict.fromkeys([purelib, platlib]))


def uninstall() -> None:
    (_site() / PTH).unlink(missing_ok=True)  # first, so pip sees only this environment's own packages
    subprocess.call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "rankbench"])


def install(wheel: str, conf_dir: str) -> None:
    uninstall()
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel]
    )
    (_site() / PTH).write_text("\n".join(_deps_paths(conf_dir)) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["install"] and len(sys.argv) == 4:
        install(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["uninstall"]:
        uninstall()
    else:
        raise SystemExit("usage: overlay_env.py install WHEEL CONF_DIR | uninstall")
