"""Packaging surface: one version, python -m ssm, show_config's facts."""
import subprocess
import sys
from importlib.metadata import version

import pytest

import ssm
from conftest import child_process_kwargs
from ssm import _config, _cpu
from ssm._version import __version__

SIMD_PATHS = ("x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2)", "x86-64 baseline (SSE2)",
              "generic (no target clones)",
              # local builds with SSM_CFLAGS=-DSSM_FORCE_CLONE=... (setup.py)
              "arch=x86-64-v4 only (SSM_FORCE_CLONE)", "arch=x86-64-v3 only (SSM_FORCE_CLONE)",
              "arch=x86-64 only (SSM_FORCE_CLONE)")


def test_one_version():
    # ssm/_version.py is the one place: a public PEP 440 version, which the installed
    # metadata (pyproject reads the file) repeats
    from packaging.version import Version
    v = Version(__version__)
    assert str(v) == __version__ and v.local is None, __version__
    assert version("ssm") == __version__


def _main(tmp_path, *args):
    # from another folder: `python -m` puts the working directory first on sys.path, and
    # the source tree's ssm/ has no compiled extension
    return subprocess.run([sys.executable, "-m", "ssm", *args], capture_output=True, text=True,
                          check=True, cwd=tmp_path).stdout


def test_main_version(tmp_path):
    out = _main(tmp_path, "--version")
    assert out.strip() == f"ssm {__version__}"


def test_main_config(tmp_path):
    out = _main(tmp_path, "--config")
    for key in ("ssm:", "numpy:", "compiler:", "build flags:", "simd path:", "openmp runtime:",
                "threads (default):", "gpu:"):
        assert key in out, out


def test_config_facts():
    c = _config.config()
    assert c["ssm"] == __version__
    assert c["simd path"] in SIMD_PATHS
    assert "openmp" in c["build flags"].lower()  # -fopenmp, /openmp, -Xpreprocessor -fopenmp
    assert c["threads (default)"] >= 1
    assert _cpu.compiler() != "unknown"


def test_show_config_prints(capsys):
    ssm.show_config()
    assert "simd path:" in capsys.readouterr().out


def _fake_source_tree(tmp_path):
    """A folder laid out like a fresh clone: ssm/ with the Python sources and _cpu.pyx but
    no compiled extension, setup.py beside it (made from the installed ssm's files)."""
    import os
    import shutil
    root = tmp_path / "clone"
    pkg = os.path.dirname(os.path.abspath(ssm.__file__))
    shutil.copytree(pkg, root / "ssm", ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c"))
    (root / "ssm" / "_cpu.pyx").touch()
    (root / "setup.py").touch()
    return root


def test_import_from_source_tree_says_so(tmp_path):
    # `python -m ...` from the root of a clone imports ./ssm, which has no extension: the
    # error must say that and what to do, not "partially initialized module (circular import)"
    # (-S: without site-packages an editable install's import hook cannot win over the
    # folder; with a regular install, as the README has, the folder wins anyway)
    root = _fake_source_tree(tmp_path)
    for args in (["-c", "import ssm"], ["-m", "ssm", "--version"], ["-m", "ssm.bench", "--help"]):
        r = subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True,
                           cwd=root)
        assert r.returncode != 0, (args, r.stdout)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: ssm: this is the source tree of ssm"), r.stderr
        assert "ssm-bench" in last and "pip install -e ." in last and "circular" not in last, last


def _console_script(name):
    """Where pip put the script: beside this Python (a venv), in the scheme's or the user
    scheme's scripts folder, or on PATH."""
    import os
    import shutil
    import sysconfig
    folders = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:
        folders.append(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user")))
    except (AttributeError, KeyError):
        pass
    for folder in folders:
        if folder and os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return shutil.which(name)


def test_console_script_runs_from_a_source_tree(tmp_path):
    # the README's main command is `pip install ".[bench]" && ssm-bench`, run from the root
    # of the clone: the console script imports the installed ssm whatever the folder
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ssm-bench"]
    assert ep.value == "ssm.bench:main"
    script = _console_script("ssm-bench")
    assert script, "ssm-bench is declared but not on PATH or beside this Python"
    root = _fake_source_tree(tmp_path)
    r = subprocess.run([script, "--shape", "1", "3", "8", "8", "--threads", "1", "--budget",
                        "0.01", "--min-reps", "1", "--ops", "fused", "--no-torch",
                        "--no-sklearn", "--quiet"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "fused" in r.stdout, r.stdout


# ---------------------------------------------------------------- lazy submodules


def _fresh(tmp_path, code):
    """Run `code` in a fresh interpreter (this process has imported ssm.ops already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, **child_process_kwargs(tmp_path)).stdout


def _public_submodules():
    import pkgutil
    return sorted(m.name for m in pkgutil.iter_modules(ssm.__path__) if not m.name.startswith("_"))


def test_import_ssm_stays_light(tmp_path):
    out = _fresh(tmp_path, "import sys, ssm; print(' '.join(sorted(sys.modules)))").split()
    for name in ("ssm.ops", "ssm.bench", "ssm.testing", "ssm.torch", "ssm.jax", "matplotlib",
                 "cupy", "torch", "jax"):
        assert name not in out


def test_submodules_are_attributes(tmp_path):
    # README's `ssm.ops.run(...)` after a plain `import ssm`, in a process that has not
    # imported the submodules: each resolves to the module `import ssm.<name>` gives.
    import importlib.util
    names = _public_submodules()
    assert {"ops", "bench"} <= set(names)
    # the optional submodules (ssm.torch, ssm.jax, ssm.dask) import their library: checked
    # where it is installed
    names = [n for n in names if n not in ssm._OPTIONAL or importlib.util.find_spec(n)]
    code = ("import importlib, ssm\n"
            f"for name in {names!r}:\n"
            "    assert name in dir(ssm) or name in ssm._OPTIONAL, name\n"
            "    assert getattr(ssm, name) is importlib.import_module('ssm.' + name), name\n"
            "print(ssm.ops.names())\n")
    assert "SpatialSoftmaxWithLoss" in _fresh(tmp_path, code)


@pytest.mark.parametrize("name, extra", [("torch", "torch"), ("jax", "jax")])
def test_framework_submodule_without_its_framework(tmp_path, name, extra):
    # sys.modules[name] = None: `import name` fails as where it is not installed
    code = (f"import sys; sys.modules[{name!r}] = None\n"
            "import ssm\n"
            "try:\n"
            f"    ssm.{name}\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, e)\n")
    out = _fresh(tmp_path, code).strip()
    assert out.startswith(f"ImportError ssm.{name} needs ") and f"ssm[{extra}]" in out, out


def test_dir_lists_submodules_and_public_names():
    # the optional submodules (ssm._OPTIONAL: the framework adaptors, ssm.dask) are left
    # out: listing them (help(ssm), inspect) would import their library, or fail where it
    # is not installed
    # (once imported, they are attributes like any other; test_help_imports_no_framework
    # checks a fresh process)
    listed = dir(ssm)
    for name in _public_submodules() + ssm.__all__:
        assert name in listed or name in ssm._OPTIONAL, name


def test_help_imports_no_framework(tmp_path):
    out = _fresh(tmp_path, "import sys, pydoc, ssm; pydoc.render_doc(ssm); "
                           "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    assert out.strip() == "[]"


def test_unknown_attribute(tmp_path):
    with pytest.raises(AttributeError, match=r"^module 'ssm' has no attribute 'no_such_thing'$"):
        ssm.no_such_thing
    assert not hasattr(ssm, "no_such_thing")
    # a submodule that is not installed (or not written yet) is a missing attribute too
    out = _fresh(tmp_path, "import ssm; print(hasattr(ssm, 'nonexistent'))")
    assert out.strip() == "False"


def test_bench_extra_installs_the_light_peers():
    # `pip install "ssm[bench]"` brings what ssm.bench compares with (scikit-learn's
    # HalfMultinomialLoss) and plots with; PyTorch, a large download, is left to the user.
    import re
    from importlib.metadata import requires
    bench = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower()
             for r in requires("ssm") or () if re.search(r"""extra\s*==\s*["']bench["']""", r)}
    assert {"scikit-learn", "matplotlib", "threadpoolctl"} <= bench
    assert "torch" not in bench


@pytest.mark.parametrize("module, library, extra", [("ssm.dask", "dask", "dask"),
                                                    ("ssm.torch", "torch", "torch"),
                                                    ("ssm.jax", "jax", "jax")])
def test_optional_module_without_its_library_says_how_to_install_it(tmp_path, module, library,
                                                                    extra):
    code = (f"import sys; sys.modules[{library!r}] = None\n"  # the library made unimportable
            f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       **child_process_kwargs(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"pip install 'ssm[{extra}]'" in r.stdout, r.stdout
