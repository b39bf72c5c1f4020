"""Real `switchyard serve` (and worker) processes for the API tests, on free loopback ports."""
import os
import pathlib
import signal
import subprocess
import tempfile
import time

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "debug" / "switchyard"))
FIXTURES = pathlib.Path(os.environ.get("SWITCHYARD_FIXTURES", ROOT.parent / "shared" / "fixtures"))
MODEL = FIXTURES / "tiny-mixtral-trained"
MODEL_NAME = MODEL.name


def _wait_ready(proc, ready, log, timeout=120.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ready.exists() and ready.read_text().strip():
            return ready.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise RuntimeError(f"not ready after {timeout}s:\n{log.read_text()}")


class Proc:
    """A switchyard process that writes its address to a ready file; stopped with `stop()`."""

    def __init__(self, *args):
        self.dir = tempfile.TemporaryDirectory()
        d = pathlib.Path(self.dir.name)
        ready, self.log = d / "ready", d / "log"
        env = dict(os.environ, SWITCHYARD_THREADS="2", SWITCHYARD_LOG="warn")
        self.proc = subprocess.Popen(
            [BIN, *args, "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env
        )
        self.addr = _wait_ready(self.proc, ready, self.log)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.dir.cleanup()


class Server(Proc):
    def __init__(self, *extra):
        super().__init__("serve", str(MODEL), "--port", "0", *extra)
        self.url = f"http://{self.addr}"

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)


class Worker(Proc):
    def __init__(self, experts):
        super().__init__("worker", "--model", str(MODEL), "--experts", experts, "--listen", "127.0.0.1:0")


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture
def make_server():
    made = []

    def make(*extra):
        s = Server(*extra)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def make_worker():
    made = []

    def make(experts):
        w = Worker(experts)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()
