"""`diffusiond generate/status/cancel/list` run as subprocesses against the real server."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from PIL import Image

from diffusiond.testing.waits import eventually
from tests.support.images import png_claiming
from tests.support.server import REPO_ROOT, ServerProcess, poll_until, server_env, wait_idle


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diffusiond", *args],
        capture_output=True,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
        timeout=timeout,
        check=False,
    )


def test_generate_writes_named_pngs_and_prints_their_paths(
    server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    finished = cli(
        "generate",
        "a red door",
        "-n",
        "2",
        "--seed",
        "42",
        "--steps",
        "4",
        "--size",
        "128x64",
        "--sampler",
        "dpm++2m",
        "--cfg",
        "5",
        "--negative",
        "fog",
        "-o",
        str(tmp_path),
        "--server",
        server.url,
    )
    assert finished.returncode == 0, finished.stderr
    paths = [Path(line) for line in finished.stdout.split()]
    assert len(paths) == 2
    job_id = paths[0].name.split("-")[0]
    assert job_id.startswith("gen_")
    assert [p.name for p in paths] == [f"{job_id}-1-seed42.png", f"{job_id}-2-seed43.png"]
    for path in paths:
        assert path.parent == tmp_path
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            assert picture.size == (128, 64)
    state = client.get(f"/v1/images/generations/{job_id}").json()
    assert [image["seed"] for image in state["result"]["images"]] == [42, 43]


def test_status_list_and_cancel(server: ServerProcess, client: httpx.Client) -> None:
    job_id = client.post(
        "/v1/images/generations",
        json={"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3},
    ).json()["id"]
    poll_until(client, job_id)

    status = cli("status", job_id, "--json", "--server", server.url)
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["status"] == "complete"
    assert body["images"] == [{"seed": 3, "width": 64, "height": 64}]

    readable = cli("status", job_id, "--server", server.url)
    assert f"{job_id}: complete" in readable.stdout

    listed = cli("list", "--json", "--server", server.url)
    assert job_id in [entry["id"] for entry in json.loads(listed.stdout)]
    newest_complete = cli(
        "list", "--json", "--status", "complete", "--limit", "1", "--server", server.url
    )
    assert [entry["id"] for entry in json.loads(newest_complete.stdout)] == [job_id]
    bad_filter = cli("list", "--status", "finished", "--server", server.url)
    assert bad_filter.returncode == 2  # a usage error, as for any INVALID_REQUEST
    assert "status must be one or more of" in bad_filter.stderr
    table = cli("list", "--server", server.url)
    assert job_id in table.stdout
    assert "status" in table.stdout

    refused = cli("cancel", job_id, "--server", server.url)
    assert refused.returncode == 1
    assert "ALREADY_TERMINAL" in refused.stderr

    missing = cli("status", "gen_0_missing", "--server", server.url)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr


def test_cancel_command_cancels_a_running_job(server: ServerProcess, client: httpx.Client) -> None:
    job_id = client.post(
        "/v1/images/generations", json={"prompt": "x", "width": 2048, "height": 2048, "steps": 150}
    ).json()["id"]
    poll_until(client, job_id, lambda body: body["status"] == "in_progress")
    finished = cli("cancel", job_id, "--server", server.url)
    assert finished.returncode == 0
    assert finished.stdout.strip() == f"{job_id}: cancelled"
    wait_idle(client)


def test_no_server_is_one_friendly_line_and_exit_2() -> None:
    finished = cli("generate", "x", "--server", "http://127.0.0.1:9")
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no diffusiond server answered at http://127.0.0.1:9" in lines[0]
    assert "diffusiond serve" in lines[0]
    assert "Traceback" not in finished.stderr


def test_an_invalid_request_exits_2_naming_the_field(server: ServerProcess) -> None:
    finished = cli("generate", "x", "--steps", "0", "--server", server.url)
    assert finished.returncode == 2
    assert "steps must be an integer from 1 to 150" in finished.stderr


def test_sigint_cancels_the_job_on_the_server_and_exits_130(
    server: ServerProcess, client: httpx.Client, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffusiond",
            "generate",
            "a long one",
            "--size",
            "2048x2048",
            "--steps",
            "150",
            "-o",
            str(tmp_path),
            "--server",
            server.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(),
        cwd=REPO_ROOT,
    )
    try:
        newest: dict[str, str] = {}

        def running() -> bool:
            jobs = client.get("/v1/images/generations").json()["generations"]
            if jobs and jobs[0]["status"] == "in_progress":
                newest.update(jobs[0])
                return True
            return False

        def cli_job_running() -> bool:
            assert process.poll() is None, process.communicate()
            return running()

        # The job's start is only visible by polling.
        eventually(cli_job_running, timeout=60, message="the CLI's job never started")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr
    assert "Traceback" not in stderr
    state = client.get(f"/v1/images/generations/{newest['id']}").json()
    assert state["status"] == "cancelled", server.text()[-1500:]
    assert list(tmp_path.iterdir()) == []


def test_local_generation_needs_no_server(tmp_path: Path, model_home: Path) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusiond",
            "generate",
            "a bell",
            "--local",
            "-n",
            "2",
            "--seed",
            "8",
            "--steps",
            "3",
            "--size",
            "64x64",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=180,
        check=False,
        env=server_env({"DIFFUSIOND_HOME": str(model_home)}),
    )
    assert finished.returncode == 0, finished.stderr
    names = sorted(Path(line).name for line in finished.stdout.split())
    assert len(names) == 2
    assert names[0].startswith("local_")
    assert names[0].endswith("-1-seed8.png")
    assert names[1].endswith("-2-seed9.png")


# -- hostile input (issue 14, items 5 and 6) -----------------------------------------------


def test_from_png_on_a_decompression_bomb_is_one_clear_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    finished = cli("generate", "--from-png", str(bomb), "--server", "http://127.0.0.1:9")
    assert "Traceback" not in finished.stderr
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"--from-png {bomb}:" in lines[0]
    assert "100000x100000" in lines[0]


def test_from_png_on_a_gif_and_a_text_file_names_the_rule(tmp_path: Path) -> None:
    gif = tmp_path / "a.gif"
    Image.new("P", (8, 8)).save(gif, format="GIF")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path, rule in ((gif, "GIF is not accepted"), (text, "not a PNG, JPEG or WebP")):
        finished = cli("generate", "--from-png", str(path), "--server", "http://127.0.0.1:9")
        assert finished.returncode == 2, finished.stderr
        assert rule in finished.stderr
        assert "Traceback" not in finished.stderr


class HostileServer(ThreadingHTTPServer):
    """Answers every generation with the id it was given, complete with one image."""

    generation_id = "../../x"

    def body(self) -> bytes:
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        state = {
            "id": self.generation_id,
            "status": "complete",
            "createdAt": 1,
            "updatedAt": 2,
            "result": {
                "images": [
                    {
                        "image": base64.b64encode(png.getvalue()).decode(),
                        "seed": 1,
                        "width": 8,
                        "height": 8,
                    }
                ],
                "timeTaken": 1,
            },
        }
        return json.dumps(state).encode()


class HostileHandler(BaseHTTPRequestHandler):
    server: HostileServer

    def _answer(self, status: int) -> None:
        if self.path == "/health":
            payload = json.dumps({"status": "ok", "busy": False, "pollIntervalMs": 10}).encode()
        else:
            payload = self.server.body()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer(201)

    def do_GET(self) -> None:
        self._answer(200)

    def log_message(self, *_: object) -> None:
        pass


def test_an_id_from_a_hostile_server_never_names_a_file_outside_the_folder(
    tmp_path: Path,
) -> None:
    output = tmp_path / "a" / "out"
    with HostileServer(("127.0.0.1", 0), HostileHandler) as hostile:
        thread = threading.Thread(target=hostile.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{hostile.server_address[1]}"
            finished = cli("generate", "x", "-o", str(output), "--server", url)
        finally:
            hostile.shutdown()
            thread.join()
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.png"))
    assert written == []  # not tmp_path/x-1-seed1.png, not anywhere
    assert finished.returncode == 1, finished.stderr
    assert "'../../x'" in finished.stderr
    assert "Traceback" not in finished.stderr
