"""gunicorn settings for a PyTorch model server: gunicorn -c gunicorn.conf.py 'api_server:create_app()'

One worker process owns the model (each worker would hold its own copy of the weights); the
engine inside it batches concurrent requests, so the worker needs many threads, not processes.
The app is created after the fork (no preload), so no torch state crosses a fork; the CPU kernels
are built before it, once, by a child process of the master (on_starting), so workers only load them.
Configure the app with GPT_* environment variables (see api_server.create_app).

Metrics: prometheus_client's multiprocess mode. Each worker writes its metrics to files in
PROMETHEUS_MULTIPROC_DIR (set here unless given; emptied at start-up) and GET /metrics sums every
worker's; a worker that exits has its live gauges dropped.
"""
import os
import subprocess
import sys
import tempfile

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:5000")
workers = 1
worker_class = "gthread"  # request threads block on their generation while the engine runs
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
preload_app = False
timeout = 600  # a long generation must not get the worker killed
graceful_timeout = 60
keepalive = 5
accesslog = "-"
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), f"gpt2lut-metrics-{os.getpid()}"))


def on_starting(server):
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # the metric files of an earlier run, nothing else
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))
    if not os.environ.get("GPT_DEVICE", "auto").startswith("cuda"):
        prebuild_kernels(server)


def prebuild_kernels(server):
    """Build the CPU kernels (~30 s the first time on a machine) before the socket is bound and
    workers fork, in a child process: torch stays out of the master. A failure is one log line and
    the workers fall back as cpu_kernels.ops() does."""
    server.log.info("building or finding the CPU kernels: python -m cpu_kernels")
    limit = 2 * float(os.environ.get("CPU_KERNELS_BUILD_TIMEOUT", "600"))  # its wait for another build, then its own
    try:
        done = subprocess.run([sys.executable, "-m", "cpu_kernels"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=limit)
        if done.returncode:
            server.log.error("CPU kernels not built (python -m cpu_kernels exited %d; its error is above)",
                             done.returncode)
    except (OSError, subprocess.TimeoutExpired) as e:
        server.log.error("CPU kernels not built: %s", e)


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def post_fork(server, worker):
    import torch
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count() or 1)))
