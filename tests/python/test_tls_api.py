"""The OpenAI API over TLS (`serve --tls-cert/--tls-key`) with the dev CA's certificate: an
OpenAI client that trusts the CA is served; plaintext, an untrusting client and a key that does
not fit the certificate are refused with clear errors; a rotated certificate is picked up."""
import shutil
import socket
import ssl
import subprocess
import time

import urllib.error
import urllib.request

import openai
import pytest

from conftest import MODEL_NAME, ROOT, Server

CA_SCRIPT = ROOT / "deploy" / "tls" / "make-dev-ca.sh"


def get(url, ca_dir):
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return r.status


def make_ca(dir, name):
    subprocess.run(["bash", str(CA_SCRIPT), str(dir), name], check=True, capture_output=True)
    return dir


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"), "api-test-ca")


@pytest.fixture(scope="module")
def tls_server(ca):
    s = Server("--tls-cert", str(ca / "api.crt"), "--tls-key", str(ca / "api.key"))
    yield s
    s.stop()


def test_a_client_trusting_the_ca_is_served(tls_server, ca):
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca / "ca.crt")))
    client = openai.OpenAI(
        base_url=f"https://{tls_server.addr}/v1", api_key="unused", max_retries=0, http_client=http
    )
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 4


def test_plaintext_and_untrusting_clients_are_refused_and_the_server_serves_on(tls_server, ca, tmp_path):
    host, port = tls_server.addr.split(":")
    # Plaintext HTTP to the TLS port: no HTTP answer comes back.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = s.recv(64)
        except ConnectionResetError:
            got = b""
        assert not got.startswith(b"HTTP/"), got
    # A client that trusts another CA refuses the certificate.
    other = make_ca(tmp_path / "other", "another-ca")
    with pytest.raises(urllib.error.URLError) as e:
        get(f"https://{tls_server.addr}/health", other)
    assert isinstance(e.value.reason, ssl.SSLCertVerificationError), e.value
    # The server still serves a trusting client.
    assert get(f"https://{tls_server.addr}/health", ca) == 200


def test_a_key_that_does_not_fit_the_certificate_stops_the_server_with_a_named_error(ca, tmp_path):
    with pytest.raises(RuntimeError) as e:
        Server("--tls-cert", str(ca / "api.crt"), "--tls-key", str(ca / "worker.key"))
    msg = str(e.value)
    assert "does not fit" in msg and "worker.key" in msg, msg


def test_a_rotated_certificate_is_served_to_new_connections(ca, tmp_path):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(ca / "api.crt", cert)
    shutil.copy(ca / "api.key", key)
    s = Server("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        host, port = s.addr.split(":")

        def served_by():
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as t:
                    return t.getpeercert(binary_form=True)

        first = served_by()
        # Rotate in place: a new CA's certificate for the same names.
        new = make_ca(tmp_path / "new", "rotated-ca")
        shutil.copy(new / "api.key", key)
        shutil.copy(new / "api.crt", cert)
        deadline = time.monotonic() + 45
        while served_by() == first:
            assert time.monotonic() < deadline, "the rotated certificate was not picked up"
            time.sleep(1)
        assert get(f"https://{s.addr}/health", new) == 200
    finally:
        s.stop()
