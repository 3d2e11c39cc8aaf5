"""SSH access: off by default, keys only; checked with OpenSSH's own ssh-keygen, sshd, ssh."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from firmware import ssh_access
from firmware.ssh_access import SshSetupError
from tests.support import REPO

IMAGE_SSHD = REPO / "image/rootfs/etc/ssh/sshd_config.d/mirrorunit.conf"
needs_openssh = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("ssh-keygen", "ssh"))
    or not Path("/usr/sbin/sshd").exists(),
    reason="OpenSSH missing: scripts/setup-system.sh installs it")


def _client_key(tmp: Path, kind: str = "ed25519", bits: int | None = None) -> tuple[Path, str]:
    key = tmp / f"id_{kind}{bits or ''}"
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "admin@desk", "-f", str(key)]
    if bits:
        argv += ["-b", str(bits)]
    subprocess.run(argv, check=True)
    return key, Path(f"{key}.pub").read_text()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    return d


def test_off_until_enabled(config_dir: Path) -> None:
    st = ssh_access.state(config_dir)
    assert not st.enabled and st.describe() == "SSH off"


@needs_openssh
def test_enable_writes_a_host_key_openssh_reads(config_dir: Path, tmp_path: Path) -> None:
    _, pub = _client_key(tmp_path)
    calls: list[list[str]] = []
    remounts: list[bool] = []
    st = ssh_access.enable(config_dir, pub, remount=remounts.append,
                           runner=lambda a: calls.append(list(a)))
    assert st.enabled and st.authorized_keys == 1
    assert remounts == [True, False]
    assert calls == [["systemctl", "restart", "ssh.service"]]
    ssh = config_dir / "ssh"
    assert (ssh / "ssh_host_ed25519_key").stat().st_mode & 0o077 == 0
    assert (ssh / "authorized_keys").stat().st_mode & 0o077 == 0
    # ssh-keygen derives the same public key from our private key, and prints our fingerprint
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(ssh / "ssh_host_ed25519_key")],
                             check=True, capture_output=True, text=True).stdout.split()[:2]
    assert derived == (ssh / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    printed = subprocess.run(["ssh-keygen", "-l", "-f", str(ssh / "ssh_host_ed25519_key.pub")],
                             check=True, capture_output=True, text=True).stdout.split()[1]
    assert printed == st.host_key_fingerprint
    # enabling again keeps the host key clients already trust
    before = (ssh / "ssh_host_ed25519_key").read_bytes()
    ssh_access.enable(config_dir, pub)
    assert (ssh / "ssh_host_ed25519_key").read_bytes() == before
    st = ssh_access.disable(config_dir, runner=lambda a: calls.append(list(a)))
    assert not st.enabled and calls[-1] == ["systemctl", "stop", "ssh.service"]
    assert (ssh / "ssh_host_ed25519_key").read_bytes() == before


@needs_openssh
@pytest.mark.parametrize("text, words", [
    ("", "no public key given"),
    ("# only a comment\n", "no public key given"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP admin\n", "not a supported public key type"),
    ('from="10.0.0.1" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA x\n', "options before the key"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDamaged\n", "key data is damaged"),
    ("ssh-ed25519\n", "key data is missing"),
    ("password123\n", "not a supported public key type"),
])
def test_bad_keys_are_refused_and_nothing_is_written(config_dir: Path, text: str,
                                                      words: str) -> None:
    with pytest.raises(SshSetupError, match=words):
        ssh_access.enable(config_dir, text)
    assert not (config_dir / "ssh").exists()


@needs_openssh
def test_short_rsa_key_is_refused(config_dir: Path, tmp_path: Path) -> None:
    _, pub = _client_key(tmp_path, "rsa", 1024)
    with pytest.raises(SshSetupError, match="RSA key of 1024 bits"):
        ssh_access.enable(config_dir, pub)


def test_cli_reports_and_refuses(config_dir: Path, tmp_path: Path) -> None:
    def cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "firmware", "ssh", "--config-dir",
                               str(config_dir), "--no-service", *argv], input=stdin,
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    assert cli("status").stdout.strip() == "SSH off"
    r = cli("enable", "--keys", "-", stdin="not a key\n")
    assert r.returncode == 1 and "not a supported public key type" in r.stderr
    assert cli("status").stdout.strip() == "SSH off"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_openssh
@pytest.mark.skipif(os.geteuid() != 0, reason="sshd needs root")
def test_real_sshd_accepts_the_enabled_key_only(config_dir: Path, tmp_path: Path) -> None:
    """sshd with the image's own settings, pointed at this config partition: the enabled
    key logs in, another key and a password do not, and the host key is the one we made."""
    key, pub = _client_key(tmp_path)
    other, _ = _client_key(tmp_path, "ecdsa")
    st = ssh_access.enable(config_dir, pub)
    conf = IMAGE_SSHD.read_text().replace("/config/", f"{config_dir}/")
    port = _free_port()
    (tmp_path / "sshd_config").write_text(
        conf + f"Port {port}\nListenAddress 127.0.0.1\nStrictModes no\nUsePAM no\n"
        f"PidFile {tmp_path}/sshd.pid\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp_path / "sshd_config")],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert sshd.poll() is None, sshd.stderr.read() if sshd.stderr else ""
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.1)
        known = tmp_path / "known_hosts"
        host_pub = (config_dir / "ssh/ssh_host_ed25519_key.pub").read_text().split()
        known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")

        def ssh(identity: Path, *extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ssh", "-p", str(port), "-i", str(identity), "-o", "IdentitiesOnly=yes",
                 "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                 "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *extra,
                 "root@127.0.0.1", "echo", "in"], capture_output=True, text=True, timeout=60)

        r = ssh(key)
        assert r.returncode == 0 and r.stdout.strip() == "in", r.stderr
        r = ssh(other)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = ssh(key, "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert st.host_key_fingerprint and st.host_key_fingerprint.startswith("SHA256:")
    finally:
        sshd.terminate()
        sshd.wait(10)
