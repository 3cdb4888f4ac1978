"""Bad configuration gives one clear line that says what to do, never a traceback."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imgpipe(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "imgpipe_dagster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)  # fmt: skip


def assert_one_clear_line(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("imgpipe: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_unreachable_database_url():
    result = imgpipe("db", "up", env={"IMGPIPE_DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/imgpipe"})
    assert_one_clear_line(result, "cannot connect to PostgreSQL", "IMGPIPE_DATABASE_URL")
    assert "hunter2" not in result.stderr + result.stdout


def test_dev_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = imgpipe("dev", "--port", str(port), env={"IMGPIPE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    assert_one_clear_line(result, f"port {port}", "--port")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user")
def test_embedded_data_directory_owned_by_someone_else(tmp_path):
    home = REPO / ".imgpipe" / "test" / f"foreign-{os.getpid()}"
    (home / "pg").mkdir(parents=True, exist_ok=True)
    try:
        os.chown(home / "pg", 65534, 65534)  # nobody
        env = {"IMGPIPE_HOME": str(home)}
        env_without_url = {k: v for k, v in os.environ.items() if k != "IMGPIPE_DATABASE_URL"}
        result = subprocess.run([sys.executable, "-m", "imgpipe_dagster.cli", "db", "up"], capture_output=True,
                                text=True, timeout=120, env={**env_without_url, **env}, cwd=REPO)  # fmt: skip
        assert_one_clear_line(result, "belongs to uid 65534", "IMGPIPE_HOME")
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


# No database is reached in the cases below: a URL where nothing listens proves they fail before it.
NO_DATABASE = {"IMGPIPE_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}


def assert_one_line(result, prefix, *needles):
    """Exit 2, no traceback, exactly one line starting with ``prefix`` that holds every needle."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_ingest_of_a_symlink_loop(tmp_path):
    (tmp_path / "urls.txt").symlink_to(tmp_path / "urls.txt")
    result = imgpipe("ingest", str(tmp_path / "urls.txt"), env=NO_DATABASE)
    assert_one_line(result, "imgpipe ingest: ", "urls.txt", "symbolic link loop")


def run_as_nobody(argv):
    """The CLI's main in a child process that dropped root (root reads every file): (exit code, stderr)."""
    from imgpipe_dagster.cli import main

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stdout = sys.stderr = os.fdopen(write_end, "w", buffering=1)
            os.setgid(65534)
            os.setuid(65534)
            os.environ.update(NO_DATABASE)
            code = main(argv)
        except BaseException:  # noqa: BLE001 - reported to the parent, which asserts on it
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        text = output.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def test_ingest_of_an_unreadable_file():
    folder = Path(tempfile.mkdtemp(prefix="imgpipe-unreadable-"))  # not under pytest's 0700 folders
    try:
        folder.chmod(0o755)
        urls = folder / "urls.txt"
        urls.write_text("https://example.com/a.jpg\n")
        urls.chmod(0o000)
        if os.geteuid() == 0:
            code, stderr = run_as_nobody(["ingest", str(urls)])
        else:
            result = imgpipe("ingest", str(urls), env=NO_DATABASE)
            code, stderr = result.returncode, result.stderr
        result = subprocess.CompletedProcess([], code, "", stderr)
        assert_one_line(result, "imgpipe ingest: ", "urls.txt", "cannot be read", "Permission denied")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("value", ["not-a-url", "host=db.example password=hunter2", "mysql://a@b/c"])
def test_database_url_that_is_not_a_postgresql_url(value):
    result = imgpipe("verify", env={"IMGPIPE_DATABASE_URL": value})
    assert_one_line(result, "imgpipe: ", "IMGPIPE_DATABASE_URL is not a PostgreSQL URL")
    assert "hunter2" not in result.stderr + result.stdout


def gpu_server_start(tmp_path, *args, env=None):
    return imgpipe("gpu-server", "start", "--state-dir", str(tmp_path / "state"), "--devices", "cpu", *args,
                   env={**NO_DATABASE, **(env or {})})  # fmt: skip


def test_gpu_server_start_with_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "weights").mkdir()
    result = gpu_server_start(tmp_path, "--model", str(tmp_path / "weights"), "--base-port", "0")
    assert_one_line(result, "imgpipe: ", "weights is not a model folder (no config.json)")


def test_gpu_server_start_on_a_busy_port(tmp_path, tiny_model_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = gpu_server_start(tmp_path, "--model", str(tiny_model_dir), "--base-port", str(port))
    assert_one_line(result, "imgpipe: ", f"port {port}", "in use", "--base-port")


def test_gpu_server_on_a_public_address_needs_a_token(tmp_path, tiny_model_dir):
    env = {"IMGPIPE_GPU_TOKEN": ""}
    result = gpu_server_start(tmp_path, "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--base-port", "0", env=env)
    assert_one_line(result, "imgpipe: ", "refusing to listen on 0.0.0.0", "IMGPIPE_GPU_TOKEN", "--insecure-no-token")
    # a token on the command line would show in `ps` for as long as the servers take to start
    result = gpu_server_start(tmp_path, "--model", str(tiny_model_dir), "--base-port", "0", "--token", "s3cret")
    assert_one_line(result, "imgpipe: ", "--token", "IMGPIPE_GPU_TOKEN")


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ("profile: hyper", ["unknown profile 'hyper'", "conservative, medium, aggressive"]),
        ("worker: {concurency: 3}", ["unexpected config entry \"concurency\"", "ops.image_analysis.config.worker"]),
        ("worker: {max_concurrent_workers: lots}", ["ops.image_analysis.config.worker.max_concurrent_workers", "Int"]),
        ("worker: {max_concurrent_workers: 0}", ["worker.max_concurrent_workers", "greater than or equal to 1"]),
    ],
    ids=["unknown-profile", "unknown-key", "wrong-type", "out-of-range"],
)
def test_run_config_is_checked_in_one_line_per_problem(tmp_path, config, needles):
    path = tmp_path / "run.yaml"
    path.write_text(f"ops:\n  image_analysis:\n    config:\n      {config}\n")
    result = imgpipe("check-config", str(path), env=NO_DATABASE)
    assert_one_line(result, "imgpipe: ", *needles)


def test_a_token_written_out_in_run_config_is_refused(tmp_path):
    path = tmp_path / "external.yaml"
    path.write_text("resources:\n  gpu_model:\n    config:\n      mode: external\n      token: s3cret-value\n")
    result = imgpipe("check-config", str(path), env=NO_DATABASE)
    assert_one_line(result, "imgpipe: ", "token is written out", "{env: IMGPIPE_GPU_TOKEN}")
    assert "s3cret-value" not in result.stderr
    # the variable's name is what belongs there
    path.write_text("resources:\n  gpu_model:\n    config:\n      mode: external\n      endpoints: [http://h:1]\n"
                    "      token: {env: IMGPIPE_GPU_TOKEN}\n")  # fmt: skip
    result = imgpipe("check-config", str(path), env={**NO_DATABASE, "IMGPIPE_GPU_TOKEN": "from-the-environment"})
    assert result.returncode == 0, result.stderr


def test_a_profile_file_passes_the_run_config_check():
    result = imgpipe("check-config", "profiles/medium.yaml", "profiles/aggressive.yaml", env=NO_DATABASE)
    assert result.returncode == 0, result.stderr
