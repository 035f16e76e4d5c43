"""docker/: the GPU discovery script's parsing of nvidia-smi (run with fake nvidia-smi executables), and the
images/compose file agreeing with the package (extras, Python, paths). Docker itself does not run here."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPT = DOCKER / "gpu-discovery.sh"


def _discover(tmp_path: Path, fake_output: str | None, status: int = 0) -> subprocess.CompletedProcess:
    """Run the script with PATH = a folder holding a fake nvidia-smi (None: no nvidia-smi at all) + the system."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if fake_output is not None:
        fake = bindir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n"
                        '[ "$1 $2" = "--query-gpu=index --format=csv,noheader" ] || '
                        '{ echo "bad args: $*" >&2; exit 9; }\n'
                        f"printf '%s' '{fake_output}'\nexit {status}\n")
        fake.chmod(0o755)
    return subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bindir}:/usr/bin:/bin"})


@pytest.mark.parametrize("output,addresses", [("0\n1\n", ["0", "1"]), ("3", ["3"]), (" 0 \r\n\n 2\n", ["0", "2"]),
                                              ("", [])])
def test_discovery_script_emits_sparks_resource_json(tmp_path, output, addresses):
    r = _discover(tmp_path, output)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"name": "gpu", "addresses": addresses}


def test_discovery_script_without_nvidia_smi_fails_clearly(tmp_path):
    if Path("/usr/bin/nvidia-smi").exists() or Path("/bin/nvidia-smi").exists():
        pytest.skip("a real nvidia-smi is on the system PATH")
    r = _discover(tmp_path, None)
    assert r.returncode == 1 and "nvidia-smi not found on PATH" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("output,status,message", [("No devices were found", 0, "unexpected GPU index"),
                                                    ("", 6, "nvidia-smi --query-gpu=index failed")])
def test_discovery_script_rejects_bad_nvidia_smi_output(tmp_path, output, status, message):
    r = _discover(tmp_path, output, status)
    assert r.returncode == 1 and message in r.stderr and r.stdout == ""


def _extras(dockerfile: str) -> set[str]:
    used = re.findall(r'pip install "\.\[([\w,]+)\]"', (DOCKER / dockerfile).read_text())
    assert len(used) == 1, f"{dockerfile} must pip install the package with its extras once"
    return set(used[0].split(","))


def test_images_install_this_package_the_same_way():
    extras = set(re.findall(r'"(\w+)": \[', (ROOT / "setup.py").read_text().split("extras_require", 1)[1]))
    assert 'pip install -q -e ".[opencl' in (ROOT / "dev.sh").read_text()
    assert {"opencl"} <= _extras("Dockerfile.cpu") <= extras
    assert {"opencl", "gpu"} <= _extras("Dockerfile.cuda") <= extras
    for name, python in [("Dockerfile.cpu", "python3"), ("Dockerfile.cuda", "python3.11")]:
        text = (DOCKER / name).read_text()
        assert f"{python} -m venv" in text and "openjdk-17-jre-headless" in text
        for src in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    assert "FROM debian:bookworm" in (DOCKER / "Dockerfile.cpu").read_text()  # bookworm's python3 is 3.11


def test_compose_file_points_at_the_installed_discovery_script():
    compose = (DOCKER / "docker-compose.yml").read_text()
    for service in ("master", "cpu-worker-1", "cpu-worker-2", "gpu-worker"):
        assert re.search(rf"^  {service}:", compose, re.MULTILINE), f"no service {service}"
    assert compose.count('"spark-class", "org.apache.spark.deploy.worker.Worker", "spark://master:7077"') == 2
    assert re.findall(r"discoveryScript=(\S+)", compose) == ["/opt/sparkdl/docker/gpu-discovery.sh"]
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert "WORKDIR /opt/sparkdl" in cuda and "COPY docker/gpu-discovery.sh ./docker/gpu-discovery.sh" in cuda
    assert "dockerfile: docker/Dockerfile.cpu" in compose and "dockerfile: docker/Dockerfile.cuda" in compose
