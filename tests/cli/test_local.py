"""`runctl local`: a plain torch.save script run as a real subprocess against a real S3 server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runctl.checkpoints import MARKER_NAME, Manifest
from runctl.s3url import S3URL
from tests.cli.cli_support import ROOT, keys, run
from tests.servers import S3Server

TRAIN = textwrap.dedent(
    """
    import json, os, sys, time
    import torch

    ckpt = os.environ["RUNCTL_CHECKPOINT_DIR"]
    saves, code = int(sys.argv[1]), int(sys.argv[2])
    for step in range(1, saves + 1):
        torch.save({"step": step, "w": torch.arange(step * 5000)}, os.path.join(ckpt, f"step_{step}.pt"))
        print(f"saved {step}", flush=True)
        time.sleep(0.3)
    env = {k: v for k, v in os.environ.items() if k.startswith("RUNCTL_")}
    print("ENV " + json.dumps(env), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--hang" in sys.argv:
        print("ready", flush=True)
        time.sleep(60)
    sys.exit(code)
    """
)


def runctl_local(
    server: S3Server, tmp_path: Path, *args: str, **popen: object
) -> subprocess.Popen[str]:
    """``python -m runctl local ...`` as a real child process, reaching the server through the environment."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": server.endpoint_url}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "runctl", "local", *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,  # type: ignore[arg-type]
    )


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_record(ckpt: Path) -> dict:
    (path,) = (ckpt / ".runctl" / "runs").glob("*.json")
    return json.loads(path.read_text())


def assert_landed_whole(server: S3Server, bucket: S3URL, ckpt: Path, steps: range) -> None:
    stored = keys(server, bucket)
    for step in steps:
        name = f"step_{step}.pt"
        assert stored.get(f"run/{name}") == (ckpt / name).read_bytes(), name
    import torch

    for step in steps:
        (ckpt / "check.pt").write_bytes(stored[f"run/step_{step}.pt"])
        assert torch.load(ckpt / "check.pt")["step"] == step


@pytest.mark.parametrize("code", [0, 3])
def test_every_checkpoint_lands_whole_and_the_exit_code_propagates(
    moto_server: S3Server, tmp_path: Path, code: int
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    ckpt = tmp_path / "ckpt"
    proc = runctl_local(
        moto_server,
        tmp_path,
        "--checkpoint-dir",
        "ckpt",
        "--upload-to",
        f"{bucket}run/",
        "--keep-last-n",
        "10",
        "--settle",
        "0.3",
        "--log",
        "train.log",
        "train.py",
        "4",
        str(code),
    )
    rc, out, err = finish(proc)
    assert rc == code, (out, err)

    assert_landed_whole(moto_server, bucket, ckpt, range(1, 5))

    # the script's environment carries runctl's defaults
    env = json.loads(next(line for line in out.splitlines() if line.startswith("ENV "))[4:])
    assert env["RUNCTL_CHECKPOINT_DIR"] == str(ckpt)
    assert env["RUNCTL_S3_URL"] == f"{bucket}run/"
    assert env["RUNCTL_KEEP_LAST_N"] == "10"
    assert env["RUNCTL_ENDPOINT_URL"] == moto_server.endpoint_url

    # --log tees both streams while they still reach runctl's own stdout / stderr
    log = (tmp_path / "train.log").read_text()
    assert "saved 4" in log and "to stderr" in log and "ENV " in log
    assert "saved 1" in out and "to stderr" in err

    record = run_record(ckpt)
    assert record["exit_code"] == code and record["script_exit_code"] == code
    assert record["command"][1:] == ["train.py", "4", str(code)]
    assert record["end"] >= record["start"]
    assert sorted(u["name"] for u in record["uploads"] if u["state"] == "verified") == [
        f"step_{i}.pt" for i in range(1, 5)
    ]
    assert "uploaded 4 checkpoints" in err


def test_sigint_is_forwarded_and_runctl_exits_130_after_uploading(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    ckpt = tmp_path / "ckpt"
    proc = runctl_local(
        moto_server,
        tmp_path,
        "--checkpoint-dir",
        "ckpt",
        "--upload-to",
        f"{bucket}run/",
        "--settle",
        "0.3",
        "train.py",
        "3",
        "0",
        "--hang",
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if line.strip() == "ready" or time.monotonic() > deadline:
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # to runctl only: it must forward it to the script
    rc, out, err = finish(proc, timeout=60)
    assert rc == 130, err
    assert time.monotonic() - started < 30  # the script did not sleep its 60 s out
    assert "KeyboardInterrupt" in err  # the script itself got the signal
    assert_landed_whole(moto_server, bucket, ckpt, range(1, 4))
    record = run_record(ckpt)
    assert record["exit_code"] == 130 and record["signal"] == signal.SIGINT


HELPER_TRAIN = textwrap.dedent(
    """
    import torch
    from runctl.integrations.loop import CheckpointManager

    with CheckpointManager() as manager:
        print("helper uploads", manager.uploader is not None, flush=True)
        for step in range(1, 5):
            manager.save({"step": step, "w": torch.arange(step * 5000)}, step)
    """
)

LIGHTNING_TRAIN = textwrap.dedent(
    """
    import os
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    from runctl.integrations.lightning import RunctlCheckpoint

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            x, y = batch
            # step 2's score is the best; later ones only get worse
            self.log("score", torch.tensor(10.0 if self.global_step == 1 else -float(self.global_step)))
            return torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.randn(40, 4)
    cb = RunctlCheckpoint(dirpath=os.environ["RUNCTL_CHECKPOINT_DIR"], every_n_train_steps=2,
                          save_top_k=-1, monitor="score", mode="max")
    trainer = pl.Trainer(max_steps=10, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, x.sum(1)), batch_size=4))
    print("BEST", os.path.basename(cb.best_model_path), flush=True)
    """
)


def run_script(
    server: S3Server, tmp_path: Path, source: str, local_keep_last_n: int
) -> tuple[S3URL, Path, str, str]:
    """``runctl local --checkpoint-dir ckpt --upload-to <bucket>run/ --keep-last-n 2 ... script``
    over ``source``, to a successful end: (bucket, ckpt, stdout, stderr)."""
    bucket = S3URL(server.new_bucket())
    (tmp_path / "script.py").write_text(source)
    proc = runctl_local(
        server, tmp_path, "--checkpoint-dir", "ckpt", "--upload-to", f"{bucket}run/",
        "--keep-last-n", "2", "--local-keep-last-n", str(local_keep_last_n), "--settle", "0.3",
        "script.py",
    )
    rc, out, err = finish(proc, timeout=180)
    assert rc == 0, (out, err)
    return bucket, tmp_path / "ckpt", out, err


def test_runctl_local_stands_aside_for_a_helper_that_uploads_the_same_directory(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket, ckpt, out, err = run_script(moto_server, tmp_path, HELPER_TRAIN, local_keep_last_n=1)
    assert "helper uploads True" in out
    # The helper uploaded each checkpoint once, with runctl local's N; runctl local stood aside.
    record = run_record(ckpt)
    assert record["uploads"] == [] and isinstance(record["uploaded_by_script"], int)
    assert "uploads" in err and "itself" in err
    assert sorted(k for k in keys(moto_server, bucket) if k.endswith(".pt")) == [
        "run/step_3.pt",
        "run/step_4.pt",
    ]
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["step_4.pt"]


def test_under_runctl_local_lightnings_best_checkpoint_survives_retention(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # runctl local's watcher cannot know which checkpoint Lightning calls best: its keep-last-N
    # must not be the one that runs.
    bucket, ckpt, out, _ = run_script(moto_server, tmp_path, LIGHTNING_TRAIN, local_keep_last_n=2)
    best = next(line.split()[1] for line in out.splitlines() if line.startswith("BEST "))
    assert best == "epoch=0-step=2.ckpt"
    in_s3 = sorted(k[len("run/"):] for k in keys(moto_server, bucket) if k.endswith(".ckpt"))
    assert in_s3 == sorted([best, "epoch=0-step=8.ckpt", "epoch=0-step=10.ckpt"])
    assert (ckpt / best).exists()


def test_plain_run_passes_output_through_without_a_checkpoint_dir(tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('hi', sys.argv[1:])\nsys.exit(5)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "local", str(script), "--", "--lr", "0.1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "hi ['--lr', '0.1']\n"


def test_an_executable_runs_itself(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\necho "job $1 $RUNCTL_CHECKPOINT_DIR"\nexit 4\n')
    script.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runctl",
            "local",
            "--checkpoint-dir",
            str(tmp_path / "c"),
            str(script),
            "x",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == f"job x {tmp_path / 'c'}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("missing.py",), "does not exist"),
        (("--upload-to", "s3://bkt/run/", "SCRIPT.py"), "--checkpoint-dir"),
        (("--checkpoint-dir", "c", "--upload-to", "s3://bkt/", "SCRIPT.py"), "bucket root"),
        (("--checkpoint-dir", "c", "--upload-to", "nope://x", "SCRIPT.py"), "--upload-to"),
        (
            (
                "--checkpoint-dir",
                "c",
                "--upload-to",
                "s3://bkt/r/",
                "--keep-last-n",
                "0",
                "SCRIPT.py",
            ),
            "--keep-last-n",
        ),
        (("--checkpoint-dir", "c", "--keep-last-n", "2", "SCRIPT.py"), "--upload-to"),
        (("--settle", "-1", "SCRIPT.py"), "--settle"),
        # "[Errno 2] No such file or directory: '/proc/nope'", exit 1.
        (("--checkpoint-dir", "/proc/nope/c", "SCRIPT.py"), "--checkpoint-dir '/proc/nope/c': cannot make"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "SCRIPT.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = run("local", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


COUNT_SIGINT = textwrap.dedent(
    """
    import signal, sys, time
    count = 0
    def handler(signum, frame):
        global count
        count += 1
    signal.signal(signal.SIGINT, handler)
    print("ready", flush=True)
    while count == 0:
        time.sleep(0.02)
    time.sleep(0.5)  # a duplicate would arrive meanwhile
    print(f"count {count}", flush=True)
    sys.exit(0)
    """
)


def test_sigint_to_runctl_reaches_the_script_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "count.py").write_text(COUNT_SIGINT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "local", "count.py"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc, timeout=30)
    assert rc == 130, err
    assert out.strip() == "count 1"


def test_started_with_sigint_ignored_runctl_ignores_it_as_its_script_does(tmp_path: Path) -> None:
    # A shell starts background jobs with SIGINT ignored, and the script inherits that. runctl
    # still caught SIGINT: `kill -INT` reached a script that ignored it, which trained on to its
    # end, and runctl then said "interrupted by signal 2 (script exit code 0)" and exited 130.
    (tmp_path / "sleepy.py").write_text(
        "import signal, time\n"
        "print('ready', signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)\n"
        "time.sleep(2)\n"
        "print('done', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "local", "sleepy.py"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `train &` in a script
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready True"
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc, timeout=60)
    assert (rc, out.strip()) == (0, "done"), err
    assert "interrupted" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_ctrl_c_at_a_terminal_is_not_delivered_twice(tmp_path: Path) -> None:
    import pty
    import select

    (tmp_path / "count.py").write_text(COUNT_SIGINT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pid, fd = pty.fork()
    if pid == 0:  # the child: runctl in the foreground of its own terminal
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, "-m", "runctl", "local", "count.py"], env)
    output = b""

    def read_until(text: bytes, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while text not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    output += os.read(fd, 1024)
                except OSError:
                    return

    try:
        read_until(b"ready", 30)
        os.write(fd, b"\x03")  # Ctrl-C: the terminal signals the whole foreground group
        read_until(b"interrupted", 30)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, output
    assert b"count 1" in output


@pytest.mark.parametrize(("code", "expected"), [(0, 1), (3, 3)])
def test_a_failed_upload_fails_a_successful_run_and_says_so(
    moto_server: S3Server, tmp_path: Path, code: int, expected: int
) -> None:
    (tmp_path / "save.py").write_text(
        "import os, sys, time\n"
        "open(os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'step_1.pt'), 'wb').write(b'w')\n"
        "time.sleep(0.5)  # well past --settle: a failure right after a save leaves it out\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runctl",
            "local",
            "--checkpoint-dir",
            "ckpt",
            "--upload-to",
            "s3://no-such-bucket-local/run/",
            "--settle",
            "0.2",
            "save.py",
            str(code),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == expected, proc.stderr
    record = run_record(tmp_path / "ckpt")
    assert record["script_exit_code"] == code and record["exit_code"] == expected
    assert [(u["name"], u["state"]) for u in record["uploads"]] == [("step_1.pt", "failed")]
    assert "NoSuchBucket" in record["uploads"][0]["detail"]
    if code == 0:
        assert "the script succeeded but uploads failed, so the exit code is 1" in proc.stderr
    else:
        assert "uploads failed too" in proc.stderr


def test_hugging_face_style_directories_upload_whole_with_their_marker(
    moto_server: S3Server, tmp_path: Path
) -> None:
    bucket = S3URL(moto_server.new_bucket())
    (tmp_path / "hf.py").write_text(
        textwrap.dedent(
            """
            import os, time
            root = os.environ["RUNCTL_CHECKPOINT_DIR"]
            for step in (10, 20):
                d = os.path.join(root, f"checkpoint-{step}")
                os.makedirs(d)
                header = b'{"w":{"dtype":"U8","shape":[50000],"data_offsets":[0,50000]}}'
                safetensors = len(header).to_bytes(8, "little") + header  # then its 50,000 bytes
                for name, head in (("model.safetensors", safetensors), ("optimizer.pt", b"")):
                    with open(os.path.join(d, name), "wb") as fh:
                        fh.write(head + os.urandom(50_000))
                        time.sleep(0.2)
                with open(os.path.join(d, "trainer_state.json"), "w") as fh:
                    fh.write('{"global_step": %d}' % step)
                time.sleep(0.3)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runctl",
            "local",
            "--checkpoint-dir",
            "ckpt",
            "--upload-to",
            f"{bucket}run/",
            "--settle",
            "5",
            "hf.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    stored = keys(moto_server, bucket)
    for step in (10, 20):
        local = tmp_path / "ckpt" / f"checkpoint-{step}"
        for f in local.iterdir():
            assert stored[f"run/checkpoint-{step}/{f.name}"] == f.read_bytes()
        assert f"run/checkpoint-{step}/.runctl-manifest.json" in stored
    record = run_record(tmp_path / "ckpt")
    assert sorted(u["name"] for u in record["uploads"] if u["state"] == "verified") == [
        "checkpoint-10",
        "checkpoint-20",
    ]


def test_an_upload_left_by_an_earlier_run_is_resumed_and_counted(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The first run's upload fails (no bucket yet); the next run, once the bucket exists, resumes
    # it from the journal before its script saves anything, and its summary says so.
    (tmp_path / "save.py").write_text(
        "import os, sys\n"
        "if sys.argv[1] == 'save':\n"
        "    open(os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'step_1.pt'), 'wb').write(b'w')\n"
    )
    bucket = f"resume-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}

    def local(what: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt"]
            + ["--upload-to", f"s3://{bucket}/run/", "--settle", "0.2", "save.py", what],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = local("save")
    assert first.returncode == 1 and "NoSuchBucket" in first.stderr, first.stderr
    moto_server.client().create_bucket(Bucket=bucket)
    second = local("nothing")
    assert second.returncode == 0, second.stderr
    assert "uploaded 1 checkpoint " in second.stderr, second.stderr
    latest = max((tmp_path / "ckpt" / ".runctl" / "runs").glob("*.json"))
    record = json.loads(latest.read_text())
    assert [(u["name"], u["state"]) for u in record["uploads"]] == [("step_1.pt", "verified")]
    assert moto_server.client().get_object(Bucket=bucket, Key="run/step_1.pt")["Body"].read() == b"w"
    journal = (tmp_path / "ckpt" / ".runctl" / "journal.jsonl").read_text().splitlines()
    states = [json.loads(line)["state"] for line in journal]
    assert states == ["queued", "failed", "uploaded", "verified"]  # one upload, not a second


def _pending_from_a_crash(ckpt: Path, name: str, mib: int = 300) -> bytes:
    """Leave ``ckpt/name`` (``mib`` MiB) queued in the journal, as a run killed mid-upload does."""
    from runctl.journal import Journal

    ckpt.mkdir(exist_ok=True)
    path = ckpt / name
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))
    st = path.stat()
    Journal(ckpt).record(name, "queued", size=st.st_size, mtime=st.st_mtime)
    return path.read_bytes()[:64]


def _journal_states(ckpt: Path, name: str) -> list[str]:
    lines = (ckpt / ".runctl" / "journal.jsonl").read_text().splitlines()
    return [doc["state"] for doc in map(json.loads, lines) if doc["name"] == name]


def test_after_a_crash_a_pending_upload_goes_up_once_though_both_uploaders_resume_it(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # runctl local's uploader resumes step_0.pt at once; the script's own uploader (which
    # claims the directory) resumes it too, and must not send it a second time.
    head = _pending_from_a_crash(tmp_path / "ckpt", "step_0.pt")
    script = "from runctl.integrations.loop import CheckpointManager\nwith CheckpointManager():\n    pass\n"
    bucket, ckpt, out, err = run_script(moto_server, tmp_path, script, local_keep_last_n=2)
    assert _journal_states(ckpt, "step_0.pt").count("uploaded") == 1, err
    assert keys(moto_server, bucket)["run/step_0.pt"][:64] == head


def test_after_a_crash_an_old_resumed_version_never_lands_over_a_newer_save(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The crashed run left a large last.ckpt pending; the restarted script saves a new, small
    # last.ckpt at once and uploads it itself while runctl local still sends the old one.
    _pending_from_a_crash(tmp_path / "ckpt", "last.ckpt")
    script = textwrap.dedent(
        """
        import os
        from pathlib import Path
        from runctl.integrations._common import UploadOptions

        root = Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        up = UploadOptions.build().make_uploader(root)
        (root / "new.tmp").write_bytes(b"the newer last.ckpt")
        os.replace(root / "new.tmp", root / "last.ckpt")
        up.submit(root / "last.ckpt")
        up.close(600)
        """
    )
    bucket, ckpt, out, err = run_script(moto_server, tmp_path, script, local_keep_last_n=2)
    assert keys(moto_server, bucket)["run/last.ckpt"] == b"the newer last.ckpt", err
    assert _journal_states(ckpt, "last.ckpt")[-1] == "verified"


def test_a_crash_and_restart_inside_one_runctl_local_session_is_resumed(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # A launcher that restarts a failed attempt (a retry loop, torchrun --max-restarts): the
    # second attempt's uploader resumes what the first left when it was killed mid-upload.
    (tmp_path / "attempt.py").write_text(
        textwrap.dedent(
            """
            import os, signal, sys, time
            import torch
            from runctl.integrations.loop import CheckpointManager

            manager = CheckpointManager()
            if sys.argv[1] == "crash":
                manager.save({"w": torch.ones(300 << 18)}, 0)  # 300 MiB of float32
                time.sleep(0.5)
                os.kill(os.getpid(), signal.SIGKILL)  # its s5cmd, in its own session, goes on alone
            manager.close()
            """
        )
    )
    (tmp_path / "launcher.sh").write_text(
        f"#!/bin/sh\n{sys.executable} attempt.py crash || exec {sys.executable} attempt.py again\n"
    )
    (tmp_path / "launcher.sh").chmod(0o755)
    bucket = S3URL(moto_server.new_bucket())
    proc = runctl_local(
        moto_server, tmp_path, "--checkpoint-dir", "ckpt", "--upload-to", f"{bucket}run/",
        "--settle", "0.3", "./launcher.sh",
    )
    rc, out, err = finish(proc, timeout=180)
    assert rc == 0, (out, err)
    ckpt = tmp_path / "ckpt"
    (name,) = [p.name for p in ckpt.iterdir() if p.name != ".runctl"]
    assert _journal_states(ckpt, name)[-1] == "verified", err
    assert keys(moto_server, bucket)[f"run/{name}"] == (ckpt / name).read_bytes()


def test_sigterm_while_runctl_local_waits_for_uploads_exits_143(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The script has ended; runctl is sending its last checkpoint. SIGTERM stops that wait,
    # and runctl exits 143 as it would have with the script still running (not 1, for a
    # "failed" upload); what was not sent stays pending for the next run.
    (tmp_path / "save.py").write_text(
        "import os\n"
        "with open(os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'step_1.pt'), 'wb') as fh:\n"
        "    for _ in range(300):\n"
        "        fh.write(os.urandom(1 << 20))\n"
        "print('saved', flush=True)\n"
    )
    bucket = S3URL(moto_server.new_bucket())
    proc = runctl_local(
        moto_server, tmp_path, "--checkpoint-dir", "ckpt", "--upload-to", f"{bucket}run/",
        "--settle", "0.2", "save.py",
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
    client = moto_server.client()
    deadline = time.monotonic() + 60
    while not client.list_multipart_uploads(Bucket=bucket.bucket).get("Uploads"):
        assert proc.poll() is None and time.monotonic() < deadline, "no upload began"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc, timeout=60)
    assert rc == 143, err
    assert "interrupted by signal 15 (script exit code 0)" in err
    assert run_record(tmp_path / "ckpt")["exit_code"] == 143
    assert _journal_states(tmp_path / "ckpt", "step_1.pt")[-1] in ("queued", "uploaded")


def test_a_torch_save_that_raised_half_way_is_never_uploaded(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The save raised (an object that cannot be pickled), leaving a closed, quiet, broken
    # step_200.pt; runctl uploaded it, marked it complete, and keep-last-1 deleted step_100.pt
    # from S3 and from disk: nothing whole was left anywhere.
    pytest.importorskip("torch")
    bucket = S3URL(moto_server.new_bucket())
    (tmp_path / "tornsave.py").write_text(
        textwrap.dedent(
            """
            import os, pathlib, threading, time, torch
            d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
            torch.save({"w": torch.zeros(1000), "step": 100}, d / "step_100.pt")
            time.sleep(1.5)
            torch.save({"w": torch.zeros(1000), "lock": threading.Lock()}, d / "step_200.pt")
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [
            sys.executable, "-m", "runctl", "local",
            "--checkpoint-dir", "ckpt", "--upload-to", f"{bucket}ts/",
            "--keep-last-n", "1", "--local-keep-last-n", "1", "--settle", "0.5",
            "tornsave.py",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "data.pkl" in proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["ts/step_100.pt"]
    assert (tmp_path / "ckpt" / "step_100.pt").exists()


@pytest.mark.parametrize("log", [False, True])
def test_with_json_stdout_holds_runctl_s_records_alone(tmp_path: Path, log: bool) -> None:
    # `runctl --json local` mixed the script's prints ("saved 100") with its JSON lines: jq failed.
    (tmp_path / "chatty.py").write_text("print('saved 100', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = ["--log", str(tmp_path / "run.log")] if log else []
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "--json", "local", *extra, "chatty.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["type"] for r in records] == ["run"]
    assert "saved 100" in proc.stderr
    if log:
        assert "saved 100" in (tmp_path / "run.log").read_text()


def test_a_directory_saved_again_under_a_verified_name_is_uploaded_again(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The Trainer's rotation deletes checkpoint-100/, a later run saves a new one under the same
    # name: the watcher took every verified version of a directory for this one (it asked the
    # journal without size or time), so S3 kept the first run's weights and the run said 0.
    (tmp_path / "hf.py").write_text(
        "import os, sys\n"
        "d = os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'checkpoint-100')\n"
        "os.makedirs(d, exist_ok=True)\n"
        "open(os.path.join(d, 'model.bin'), 'wb').write(sys.argv[1].encode() * 1000)\n"
        "open(os.path.join(d, 'trainer_state.json'), 'w').write('{}')\n"
    )
    bucket = S3URL(moto_server.new_bucket(), "")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}

    def local(weights: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt"]
            + ["--upload-to", f"s3://{bucket.bucket}/run/", "--settle", "0.2", "hf.py", weights],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    first = local("a")
    assert first.returncode == 0 and "uploaded 1 checkpoint " in first.stderr, first.stderr
    import shutil

    shutil.rmtree(tmp_path / "ckpt" / "checkpoint-100")
    second = local("bb")
    assert second.returncode == 0 and "uploaded 1 checkpoint " in second.stderr, second.stderr
    assert keys(moto_server, bucket)["run/checkpoint-100/model.bin"] == b"bb" * 1000
    # The same version again is still known: a third run with nothing new sends nothing.
    (tmp_path / "same.py").write_text("")
    third = subprocess.run(
        [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt"]
        + ["--upload-to", f"s3://{bucket.bucket}/run/", "--settle", "0.2", "same.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert third.returncode == 0 and "uploaded 0 checkpoints" in third.stderr, third.stderr


def test_a_checkpoint_whose_name_is_not_utf8_fails_the_run_by_name(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The uploader refuses such a name; the watcher took the refusal for a file that had
    # vanished, said it at INFO, and the run exited 0 with one of its two checkpoints in S3.
    (tmp_path / "save.py").write_text(
        "import os\n"
        "d = os.fsencode(os.environ['RUNCTL_CHECKPOINT_DIR'])\n"
        "open(os.path.join(d, b'step_1\\xe9.pt'), 'wb').write(b'one')\n"
        "open(os.path.join(d, b'step_2.pt'), 'wb').write(b'two')\n"
    )
    bucket = moto_server.new_bucket()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt"]
        + ["--upload-to", f"s3://{bucket}/run/", "--settle", "0.2", "save.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "step_1\\udce9.pt: its name is not valid UTF-8" in proc.stderr, proc.stderr
    assert sorted(keys(moto_server, S3URL(bucket, ""))) == ["run/step_2.pt"]


def test_a_directory_checkpoint_holding_a_fifo_is_uploaded_without_it(
    moto_server: S3Server, tmp_path: Path
) -> None:
    # The watcher's format check opened every file of a directory checkpoint: on a FIFO, open()
    # waits for a writer, and runctl never exited after its script had.
    (tmp_path / "save.py").write_text(
        "import os\n"
        "d = os.path.join(os.environ['RUNCTL_CHECKPOINT_DIR'], 'checkpoint-1')\n"
        "os.makedirs(d)\n"
        "open(os.path.join(d, 'model.bin'), 'wb').write(b'weights')\n"
        "os.mkfifo(os.path.join(d, 'pipe'))\n"
        "open(os.path.join(d, 'trainer_state.json'), 'w').write('{}')\n"
    )
    bucket = moto_server.new_bucket()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt"]
        + ["--upload-to", f"s3://{bucket}/run/", "--settle", "0.2", "save.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "leaving out pipe: not a regular file" in proc.stderr, proc.stderr
    assert sorted(keys(moto_server, S3URL(bucket, ""))) == [
        f"run/checkpoint-1/{MARKER_NAME}",
        "run/checkpoint-1/model.bin",
        "run/checkpoint-1/trainer_state.json",
    ]


def _local_run(moto_server: S3Server, tmp_path: Path, bucket: S3URL, script: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "train.py").write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    return subprocess.run(
        [
            sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt",
            "--upload-to", f"{bucket}run/", "--settle", "0.5", "train.py",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_a_checkpoint_a_background_process_still_writes_after_the_script_is_left_out(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """The script hands its last save to a process it starts in the background and exits 0: the
    final scan found that file quiet and closed-looking to the script's own tree, and sent it
    half written as verified (resume pass). Anyone's open file is still being written."""
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib, subprocess, sys, time
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        (d / "step_1.pt").write_bytes(b"1" * 1000)
        time.sleep(1.5)
        writer = (
            "import sys, time\\n"
            "fh = open(sys.argv[1], 'wb'); fh.write(b'2' * 1000); fh.flush()\\n"
            "open(sys.argv[2], 'w').close(); time.sleep(4); fh.write(b'2' * 2000); fh.close()\\n"
        )
        started = d.parent / "started"
        subprocess.Popen([sys.executable, "-c", writer, str(d / "step_2.pt"), str(started)], start_new_session=True)
        while not started.exists():
            time.sleep(0.05)
        time.sleep(1.5)  # quiet for longer than --settle: to the script's tree, a closed file
        """,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "not uploading step_2.pt: still open for writing after the script exited" in proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["run/step_1.pt"]


def test_a_whole_save_still_open_when_the_script_failed_is_uploaded(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """A torch.save whose file was open at the last look (a slow close) and whose script then
    failed: its format says whole, so it goes up, not left out as torn for good (resume pass)."""
    pytest.importorskip("torch")
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib, time, torch
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        with open(d / "step_2.pt", "wb") as fh:
            torch.save({"step": 2}, fh)
            fh.flush()
            time.sleep(1.5)  # open across several looks, as a slow close or fsync keeps it
        os._exit(1)
        """,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "not uploading step_2.pt" not in proc.stderr, proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["run/step_2.pt"]


def test_a_sharded_save_cut_short_by_a_failure_is_left_out(moto_server: S3Server, tmp_path: Path) -> None:
    """A directory save that raised after 2 of its 4 shards (a full disk), the script exiting
    1: the final scan sent the half directory and marked it complete, and keep-last-N 1 then
    deleted step-100, in S3 and on disk (local pass)."""
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib, sys, time
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        for step in (100, 200):
            (d / f"step-{step}").mkdir()
            for shard in range(4):
                if step == 200 and shard == 2:
                    sys.exit("OSError: [Errno 28] No space left on device")
                (d / f"step-{step}" / f"shard_{shard}.bin").write_bytes(b"s" * 1000)
            time.sleep(1.5)
        """,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "not uploading step-200: changed moments before the script failed" in proc.stderr, proc.stderr
    assert not [k for k in keys(moto_server, bucket) if k.startswith("run/step-200/")]
    assert f"run/step-100/{MARKER_NAME}" in keys(moto_server, bucket)


def test_saves_whose_names_are_no_checkpoints_are_named_at_the_end(moto_server: S3Server, tmp_path: Path) -> None:
    """checkpoint.pth.tar, model_best.pth.tar, best.pt: never uploaded, and the run said
    "uploaded 0 checkpoints", exit 0, naming none of them (local pass)."""
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        for name in ("checkpoint.pth.tar", "best.pt", "step_3.pt", "notes.md"):
            (d / name).write_bytes(b"x")
        """,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["run/step_3.pt"]
    said = [line for line in proc.stderr.splitlines() if "not taken for a checkpoint" in line]
    assert [line.split(": ")[3] for line in said] == ["best.pt", "checkpoint.pth.tar"], proc.stderr


def test_a_distributed_checkpoint_waits_for_its_metadata(moto_server: S3Server, tmp_path: Path) -> None:
    """torch.distributed.checkpoint writes its shards, then .metadata: a save that paused
    between shards longer than --settle went up, and was marked complete, half done (local pass)."""
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib, time
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"]) / "step-200"
        d.mkdir()
        for rank in range(2):
            (d / f"__{rank}_0.distcp").write_bytes(b"s" * 1000)
            time.sleep(1.5)  # gathering the next rank's state: longer than --settle
        (d / ".metadata").write_bytes(b"m")
        time.sleep(1.5)
        """,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    marker = Manifest.from_bytes(keys(moto_server, bucket)[f"run/step-200/{MARKER_NAME}"])
    assert sorted(marker.files) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "uploaded 1 checkpoint (2.0 KiB)" in proc.stderr, proc.stderr  # once, whole; not its first shard


def test_a_script_that_uploads_itself_and_fails_to_fails_the_run(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """runctl local stands aside for the script's own uploader; when those uploads do not land
    (here: no such bucket; the script only warns), the run is no success: exit 1, names given
    (it said "the script uploaded ... itself", exit 0)."""
    (tmp_path / "script.py").write_text(
        textwrap.dedent(
            """
            import torch
            from runctl.integrations.loop import CheckpointManager

            with CheckpointManager(on_upload_error="warn") as manager:
                for step in range(1, 3):
                    manager.save({"step": step}, step)
            """
        )
    )
    proc = runctl_local(
        moto_server, tmp_path, "--checkpoint-dir", "ckpt", "--upload-to", "s3://no-such-bucket-7/run/",
        "--settle", "0.3", "script.py",
    )  # fmt: skip
    rc, out, err = finish(proc, timeout=180)
    assert rc == 1, (out, err)
    assert "itself" in err and "not uploaded: step_1.pt, step_2.pt" in err, err
    record = run_record(tmp_path / "ckpt")
    assert record["exit_code"] == 1 and "step_2.pt" in record["upload_error"]


def test_a_save_killed_under_a_wrapper_shell_is_left_out_as_when_killed_directly(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """train.sh runs python, which the OOM killer ends mid-save: the shell exits 137 rather than
    dying of the signal, and the half-written step_2.pth (a format that cannot tell) went up."""
    bucket = S3URL(moto_server.new_bucket())
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import os, signal, time
            d = os.environ["RUNCTL_CHECKPOINT_DIR"]
            open(os.path.join(d, "step_1.pth"), "wb").write(b"a" * 40_000)
            time.sleep(1.5)
            with open(os.path.join(d, "step_2.pth"), "wb") as f:
                f.write(b"b" * 10_000); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(f"#!/bin/sh\n{sys.executable} {tmp_path / 'train.py'}\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.run(
        [
            sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt",
            "--upload-to", f"{bucket}run/", "--settle", "0.5", str(wrapper),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    assert "not uploading step_2.pth" in proc.stderr, proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["run/step_1.pth"]


def test_sigterm_reaches_the_trainer_under_a_wrapper_shell(moto_server: S3Server, tmp_path: Path) -> None:
    """SIGTERM went to the script only: under train.sh the shell died and its python trainer went
    on training and saving after runctl had exited 143, none of it uploaded (resume review)."""
    bucket = S3URL(moto_server.new_bucket())
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import os, pathlib, signal, sys, time
            here = pathlib.Path(sys.argv[1])
            def stop(signum, frame):
                (here / "got-term").write_text(str(os.getpid()))
                sys.exit(143)
            signal.signal(signal.SIGTERM, stop)
            (here / "trainer.pid").write_text(str(os.getpid()))
            for _ in range(600):
                time.sleep(0.1)
            """
        )
    )
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(f"#!/bin/sh\n{sys.executable} {tmp_path / 'train.py'} {tmp_path}\necho after\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "local", "--checkpoint-dir", "ckpt", "--upload-to", f"{bucket}run/", str(wrapper)],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "trainer.pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    trainer = int((tmp_path / "trainer.pid").read_text())
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, timeout=60)
    assert rc == 143, err
    assert (tmp_path / "got-term").read_text() == str(trainer)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{trainer}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{trainer}"), "the trainer outlived runctl"


def test_profile_and_region_flags_reach_the_script(moto_server: S3Server, tmp_path: Path) -> None:
    """`runctl --region R local`: a script that uploads with its own CheckpointManager (runctl
    then stands aside) signed for the default region, not R (config pass)."""
    bucket = S3URL(moto_server.new_bucket())
    (tmp_path / "train.py").write_text('import os\nprint("AWS", os.environ.get("AWS_REGION"), os.environ.get("AWS_DEFAULT_REGION"))\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "--region", "eu-north-1", "local", "--checkpoint-dir", "ckpt",
         "--upload-to", f"{bucket}run/", "train.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "AWS eu-north-1 eu-north-1" in done.stdout
    # Without --upload-to or --endpoint-url, where the script does its own uploads: --profile
    # and --region were dropped, and it signed as [default] (walkthrough).
    (tmp_path / "train.py").write_text(
        'import os\nprint("AWS", *(os.environ.get(v) for v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION")))\n'
    )
    (tmp_path / "config").write_text("[profile p]\nregion = eu-west-3\n")
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "--profile", "p", "--region", "eu-north-1", "local", "train.py"],
        cwd=tmp_path, env={**env, "AWS_CONFIG_FILE": str(tmp_path / "config")}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "AWS p p eu-north-1" in done.stdout, done.stdout


def test_a_script_that_saves_on_ctrl_c_and_exits_130_has_that_save_uploaded(
    moto_server: S3Server, tmp_path: Path
) -> None:
    """130 (or 143) from a script that handled the signal, saved and closed its checkpoint is
    not a kill: its save was left out as "changed moments before the script was killed", and
    journaled so (diff review). A shell's 137 still is (the test above)."""
    bucket = S3URL(moto_server.new_bucket())
    proc = _local_run(
        moto_server, tmp_path, bucket,
        """
        import os, pathlib, sys
        d = pathlib.Path(os.environ["RUNCTL_CHECKPOINT_DIR"])
        (d / "step_2.bin").write_bytes(b"2" * 1000)  # the save on the way out
        sys.exit(130)
        """,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert sorted(keys(moto_server, bucket)) == ["run/step_2.bin"], proc.stderr
