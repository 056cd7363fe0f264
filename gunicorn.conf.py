"""gunicorn settings for a PyTorch model server: gunicorn -c gunicorn.conf.py 'api_server:create_app()'

One worker process owns the model (each worker would hold its own copy of the weights); the
engine inside it batches concurrent requests, so the worker needs many threads, not processes.
The app is created after the fork (no preload), so no torch state crosses a fork.
Configure the app with GPT_* environment variables (see api_server.create_app).
"""
import os

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:5000")
workers = 1
worker_class = "gthread"  # request threads block on their generation while the engine runs
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
preload_app = False
timeout = 600  # a long generation must not get the worker killed
graceful_timeout = 60
keepalive = 5
accesslog = "-"


def post_fork(server, worker):
    import torch
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", os.cpu_count() or 1)))
