"""
Building the CPU kernels (cpu_kernels.py): at start-up rather than on the first request, past a
build killed half-way, with a one-line error when another process's build never ends;
and the module's name, which must not shadow an installed package.
"""
import glob
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

import cpu_kernels
from conftest import ROOT, Server, need_kernels, script_env

START_S = 60  # a server's own start-up beside the build: a tiny model, the database, the first request


def holder(folder_code):
    """A child process that takes the build lock of the folder folder_code evaluates to, leaves a
    build folder with torch's lock file in it (what a build killed half-way leaves), says 'held'
    and sleeps."""
    return subprocess.Popen(
        [sys.executable, "-c", f"""
import os, time, cpu_kernels
folder = {folder_code}
held = cpu_kernels.build_lock(folder, 5)  # kept: a collected one releases the lock
held.__enter__()
os.makedirs(os.path.join(folder, f"build-{{os.getpid()}}"))
open(os.path.join(folder, f"build-{{os.getpid()}}", "lock"), "w").close()
print("held", flush=True)
time.sleep(600)
"""], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, text=True)


def test_no_top_level_module_shadows_the_kernels_package():
    """Hugging Face's `kernels` package (which transformers imports when it is installed) must not
    resolve to a file of this project from the repository root."""
    assert not glob.glob(os.path.join(ROOT, "kernels.*")) and not os.path.isdir(os.path.join(ROOT, "kernels"))
    found = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s else '')"], cwd=ROOT, capture_output=True, text=True, check=True)
    origin = found.stdout.strip()
    assert not origin or not os.path.realpath(origin).startswith(os.path.realpath(ROOT) + os.sep), origin


def test_no_top_level_module_shadows_an_installed_package(tmp_path):
    """Each top-level module of the project (model, storage, tokenizer, ...) and the server package
    must not share its name with a package installed beside it: a process started from the
    repository root would import the project's file in the package's place."""
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))) + ["server"]
    code = ("import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n)))")
    found = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, capture_output=True, text=True,
                           check=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert found.stdout.split() == [], found.stdout  # importable from elsewhere: an installed package of that name


def test_a_lock_left_by_a_killed_builder_does_not_block(tmp_path):
    proc = holder(repr(str(tmp_path)))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(cpu_kernels.KernelBuildError):  # held by a live process: waited for, then refused
            with cpu_kernels.build_lock(str(tmp_path), 0.5):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert open(tmp_path / "build.lock").read().strip() == str(proc.pid)  # the dead owner's pid is still written
    assert os.path.exists(tmp_path / f"build-{proc.pid}" / "lock")  # and torch's lock of its build
    started = time.monotonic()
    with cpu_kernels.build_lock(str(tmp_path), 5):
        assert time.monotonic() - started < 2
        assert open(tmp_path / "build.lock").read().strip() == str(os.getpid())
        assert not os.path.exists(tmp_path / f"build-{proc.pid}")  # the killed build's folder is gone


def test_a_build_that_never_ends_is_a_one_line_error_not_a_hang(tmp_path):
    env = dict(script_env(), TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", """
import os, time, cpu_kernels
held = cpu_kernels.build_lock(cpu_kernels.locate()[2], 5)  # kept: a collected one releases the lock
held.__enter__()
print("held", flush=True)
time.sleep(600)
"""], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "cpu_kernels", "--timeout", "1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert time.monotonic() - started < 30
    finally:
        proc.kill()
        proc.wait()
    assert run.returncode != 0 and run.stdout == ""
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CPU kernels: gave up after 1 s waiting for the build by pid " + str(proc.pid)), last
    assert not glob.glob(str(tmp_path / "*" / "*.so"))  # no compile meanwhile


def test_create_app_loads_the_kernels_before_it_returns(monkeypatch, caplog, tmp_path):
    import api_server
    calls = []
    monkeypatch.setattr(cpu_kernels, "ops", lambda: calls.append(1))
    with caplog.at_level(logging.INFO):
        api_server.create_app(dict(model_type=None, device="cpu", lut_db=str(tmp_path / "l.sqlite"),
                                   state_db=str(tmp_path / "s.sqlite"), models_dir=str(tmp_path / "out")))
    assert calls == [1]
    assert any("loading the CPU kernels" in r.getMessage() for r in caplog.records)


def test_need_kernels_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ops", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        need_kernels()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        need_kernels()


def test_a_server_after_a_build_killed_half_way_is_ready_with_kernels_within_one_build(hf_tiny, tmp_path):
    """The one test that compiles (a fresh TORCH_EXTENSIONS_DIR): a process killed (-9, with its
    compiler) during its first build, then a server on the same folder: it logs that it builds
    the kernels before it reports ready, is ready within the time of one build, and answers."""
    env = dict(script_env(), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    first = subprocess.Popen([sys.executable, "-c", "import cpu_kernels; cpu_kernels.ops()"], cwd=ROOT, env=env,
                             start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(str(tmp_path / "ext" / "*" / "build-*" / "build.ninja")):
            assert first.poll() is None and time.monotonic() < deadline, "the first build did not start"
            time.sleep(0.1)
        time.sleep(3)  # the compiler is running
        assert first.poll() is None and glob.glob(str(tmp_path / "ext" / "*" / "build-*" / "lock"))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # as a service manager stops it: the compiler goes too
        first.wait()
    os.makedirs(tmp_path / "server")
    started = time.monotonic()
    server = Server(str(tmp_path / "server"), env).start(timeout=900)  # a hang fails below, a slow machine not
    try:
        ready_s = time.monotonic() - started
        built = re.search(r"CPU kernels built in (\d+) s", open(server.log).read())
        assert built, "the server did not build the kernels before it was ready"
        assert ready_s < int(built.group(1)) + START_S, (ready_s, built.group(0))  # no wait on the dead build
        r = requests.post(server.url + "/train_lut", json={"label": "TLG Capital is an asset management firm.",
                                                          "lut_name": "u"}, timeout=60)
        assert r.status_code == 200, r.text
        r = requests.post(server.url + "/generate", json={"prompt": "TLG Capital is", "length": 8, "lut_name": "u"},
                          timeout=60)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    log = open(server.log).read()
    assert "CPU kernels built" in log and "unavailable" not in log, log[-3000:]
    building, ready = log.index("building the CPU kernels"), log.index("Running on")
    assert building < ready
    assert glob.glob(str(tmp_path / "ext" / "*" / "*.so")) and not glob.glob(str(tmp_path / "ext" / "*" / "build-*"))
