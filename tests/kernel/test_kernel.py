"""hasten-kernel's own behaviour, through a real jupyter_client over ZeroMQ: live output, interrupts
during a launch and of plain code, failing ranks, forged signatures, and the kernelspec commands."""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from queue import Empty

import pytest
import zmq
from jupyter_client import KernelManager
from jupyter_client.session import Session


@pytest.fixture(scope="module")
def kernel():
    log = tempfile.NamedTemporaryFile(prefix="hasten-kernel-", suffix=".log", delete=False)
    km = KernelManager(kernel_name="hasten")
    km.start_kernel(stderr=log)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    yield km, kc, Path(log.name)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    os.unlink(log.name)


def execute(kc, code, timeout=300, on_output=None):
    """Runs a cell; returns (reply content, [(arrival time, msg_type, content)])."""
    outputs = []

    def hook(msg):
        outputs.append((time.monotonic(), msg["msg_type"], msg["content"]))
        if on_output:
            on_output(msg)

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], outputs


def stdout_of(outputs):
    return "".join(c["text"] for _, t, c in outputs if t == "stream" and c["name"] == "stdout")


def stderr_of(outputs):
    return "".join(c["text"] for _, t, c in outputs if t == "stream" and c["name"] == "stderr")


def test_output_without_a_trailing_newline_neither_hangs_nor_waits(kernel):
    _, kc, _ = kernel
    started = time.monotonic()
    reply, outputs = execute(
        kc,
        'use std::io::Write;\nprint!("tick"); std::io::stdout().flush().unwrap();\n'
        'std::thread::sleep(std::time::Duration::from_secs(2));\nprint!(" tock")',
    )
    done = time.monotonic()
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "tick tock"
    first = next(t for t, kind, _ in outputs if kind == "stream")
    # "tick" reached the notebook while the cell was still sleeping.
    assert done - first > 1.5, (started, first, done)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_cell_printing_500k_lines_streams_and_leaves_the_kernel_small(kernel):
    km, kc, _ = kernel
    pid = km.provisioner.pid
    assert execute(kc, "2 + 2")[0]["status"] == "ok"
    before = rss_mib(pid)
    reply, outputs = execute(kc, 'for i in 0..500_000 { println!("line {i}"); }', timeout=600)
    after = rss_mib(pid)
    assert reply["status"] == "ok"
    text = stdout_of(outputs)
    assert text.startswith("line 0\n") and text.endswith("line 499999\n"), text[-100:]
    # Streamed in bounded messages, not gathered into one.
    streams = [c["text"] for _, t, c in outputs if t == "stream"]
    assert len(streams) > 10 and max(map(len, streams)) < 256 * 1024, (len(streams),)
    # Before: the kernel stayed 600-870 MB larger after such a cell, for good.
    print(f"kernel RSS {before:.0f} MiB before, {after:.0f} MiB after 500k lines")
    assert after - before < 100, (before, after)


def test_a_panicking_cell_is_an_error_and_keeps_the_notebook_state(kernel):
    _, kc, _ = kernel
    assert execute(kc, "let kept = 41;")[0]["status"] == "ok"
    reply, outputs = execute(kc, 'panic!("boom")')
    assert reply["status"] == "error"
    assert reply["ename"] == "Panic" and reply["evalue"] == "boom"
    reply, outputs = execute(kc, "kept + 1")
    assert reply["status"] == "ok"
    assert [c["data"]["text/plain"] for _, t, c in outputs if t == "execute_result"] == ["42"]


def test_a_failing_rank_ends_the_cell_with_its_rank_and_message(kernel):
    _, kc, _ = kernel
    code = (
        "fn fails_on_one(_: ()) -> Result<(), String> {\n"
        '    if std::env::var("RANK").unwrap() == "1" { panic!("rank one gives up") }\n'
        "    std::thread::sleep(std::time::Duration::from_secs(60));\n"
        "    Ok(())\n"
        "}\n"
        "notebook_launcher(fails_on_one, (), 2)?"
    )
    started = time.monotonic()
    reply, outputs = execute(kc, code)
    assert time.monotonic() - started < 30
    assert reply["status"] == "error"
    assert "rank 1" in reply["evalue"] and "rank one gives up" in reply["evalue"], reply
    assert "[rank1]:" in stderr_of(outputs)
    assert execute(kc, "1 + 1")[0]["status"] == "ok"


def wait_for_output(kc_outputs, needle, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in "".join(kc_outputs):
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {''.join(kc_outputs)!r}")


def run_and_interrupt(km, kc, code, needle):
    """Starts `code`, interrupts once `needle` was printed, returns the reply and the output."""
    seen = []
    msg_id = kc.execute(code)
    deadline = time.monotonic() + 120
    reply = None
    interrupted = False
    while reply is None and time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.1)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                seen.append(msg["content"]["text"])
        except Empty:
            pass
        if not interrupted and needle in "".join(seen):
            km.interrupt_kernel()
            interrupted_at = time.monotonic()
            interrupted = True
        try:
            shell = kc.get_shell_msg(timeout=0.01)
            if shell["parent_header"].get("msg_id") == msg_id:
                reply = shell["content"]
        except Empty:
            pass
    assert interrupted, "".join(seen)
    assert reply is not None, "no reply after the interrupt"
    return reply, "".join(seen), time.monotonic() - interrupted_at


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped; check its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_interrupt_during_a_launch_stops_every_rank_and_keeps_variables(kernel):
    km, kc, _ = kernel
    assert execute(kc, "let survivor = String::from(\"still here\");")[0]["status"] == "ok"
    code = (
        "fn spin(_: ()) -> Result<(), String> {\n"
        '    println!("pid {}", std::process::id());\n'
        "    loop { std::thread::sleep(std::time::Duration::from_millis(50)); }\n"
        "}\n"
        "notebook_launcher(spin, (), 2)?"
    )
    reply, text, took = run_and_interrupt(km, kc, code, "[rank1]: pid")
    wait_for_output([text], "[rank0]: pid", timeout=1)
    assert reply["status"] == "error"
    assert "nterrupt" in reply["evalue"], reply
    assert took < 15
    pids = [int(line.split()[-1]) for line in text.splitlines() if "pid" in line]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), f"ranks left behind: {pids}"
    reply, outputs = execute(kc, "survivor.clone()")
    assert reply["status"] == "ok"
    assert '"still here"' in [c["data"]["text/plain"] for _, t, c in outputs if t == "execute_result"]


def test_interrupting_plain_code_restarts_the_runner_and_says_so(kernel):
    km, kc, _ = kernel
    assert execute(kc, "fn answer() -> i32 { 42 }\nlet lost = 1;")[0]["status"] == "ok"
    code = 'println!("looping"); loop { std::thread::sleep(std::time::Duration::from_millis(50)); }'
    reply, _, took = run_and_interrupt(km, kc, code, "looping")
    assert reply["status"] == "error"
    assert reply["ename"] == "RunnerRestarted"
    assert "variables are gone" in reply["evalue"]
    assert took < 15
    # Definitions stay; variables went with the old process.
    reply, outputs = execute(kc, "answer()")
    assert reply["status"] == "ok"
    assert execute(kc, "lost")[0]["status"] == "error"


def forge(km, key, marker):
    """Sends an execute_request signed with `key` straight to the kernel's shell socket."""
    info = km.get_connection_info()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    session = Session(key=key)
    msg = session.msg(
        "execute_request",
        {"code": f'std::fs::write("{marker}", "ran").unwrap();', "silent": False,
         "store_history": True, "user_expressions": {}, "allow_stdin": False,
         "stop_on_error": True},
    )
    session.send(sock, msg)
    return sock


@pytest.mark.parametrize("key", [b"not-the-key", b""], ids=["forged", "unsigned"])
def test_messages_with_a_bad_or_missing_signature_are_rejected(kernel, key, tmp_path):
    km, kc, log = kernel
    marker = tmp_path / "ran"
    sock = forge(km, key, marker)
    assert sock.poll(3000) == 0, "the kernel answered a message whose signature does not verify"
    sock.close(linger=0)
    assert not marker.exists(), "the forged cell ran"
    assert "signature does not verify" in log.read_text()
    assert execute(kc, "2 + 2")[0]["status"] == "ok"


def test_a_replayed_signed_message_runs_once(kernel, tmp_path):
    km, kc, log = kernel
    marker = tmp_path / "runs"
    info = km.get_connection_info()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    session = Session(key=km.session.key)
    msg = session.msg(
        "execute_request",
        {"code": 'use std::io::Write; std::fs::OpenOptions::new().create(true).append(true)'
                 f'.open("{marker}").unwrap().write_all(b"x").unwrap();',
         "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False,
         "stop_on_error": True},
    )
    frames = session.serialize(msg)
    sock.send_multipart(frames)
    assert sock.poll(300_000), "the kernel did not answer a correctly signed message"
    sock.recv_multipart()
    # The same frames again, byte for byte, on shell and on control: both must be refused.
    sock.send_multipart(frames)
    control = zmq.Context.instance().socket(zmq.DEALER)
    control.connect(f"tcp://{info['ip']}:{info['control_port']}")
    control.send_multipart(frames)
    assert sock.poll(3000) == 0, "the kernel answered a replayed message"
    assert control.poll(1000) == 0, "the kernel answered a message replayed on control"
    sock.close(linger=0)
    control.close(linger=0)
    assert marker.read_text() == "x", "the replayed cell ran again"
    assert "already used (a replayed message)" in log.read_text()
    assert execute(kc, "2 + 2")[0]["status"] == "ok"


def test_an_empty_key_is_warned_about_loudly(tmp_path):
    log = tmp_path / "kernel.log"
    km = KernelManager(kernel_name="hasten")
    km.session.key = b""
    with open(log, "w") as stderr:
        km.start_kernel(stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while "empty key" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "WARNING: the connection file has an empty key" in text, text
        assert "can execute code in this kernel" in text
    finally:
        km.shutdown_kernel(now=True)


def test_magics_launch_and_switch_debug_mode(kernel):
    _, kc, _ = kernel
    reply, outputs = execute(kc, "%debug on")
    assert "ACCELERATE_DEBUG_MODE=1" in stdout_of(outputs)
    code = (
        "fn report(_: ()) -> Result<bool, String> {\n"
        "    let on = hasten::utils::debug_mode_from_env().map_err(|e| e.to_string())?;\n"
        '    println!("debug {on}");\n'
        "    Ok(on)\n"
        "}"
    )
    assert execute(kc, code)[0]["status"] == "ok"
    reply, outputs = execute(kc, "%launch -n 2 --cpu report")
    # The whole error, so a failure under load says which rank did what.
    assert reply["status"] == "ok", (reply.get("ename"), reply.get("evalue"), stdout_of(outputs))
    assert "[rank0]: debug true" in stdout_of(outputs) and "[rank1]: debug true" in stdout_of(outputs)
    execute(kc, "%debug off")
    reply, outputs = execute(kc, "%launch report")
    assert "[rank1]: debug false" in stdout_of(outputs)
    reply, _ = execute(kc, "%launch -n")
    assert reply["status"] == "error" and "usage: %launch" in reply["evalue"]


def test_install_and_uninstall_a_kernelspec_jupyter_lists(kernel_binary_path, tmp_path):
    # Only this prefix: an empty user data directory hides a kernelspec the user installed.
    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "share" / "jupyter"),
               JUPYTER_DATA_DIR=str(tmp_path / "user-data"))
    subprocess.run([kernel_binary_path, "install", "--prefix", tmp_path], check=True, env=env)
    listed = json.loads(subprocess.run(
        ["jupyter", "kernelspec", "list", "--json"], check=True, capture_output=True, text=True, env=env,
    ).stdout)
    spec = listed["kernelspecs"]["hasten"]
    assert spec["spec"]["display_name"] == "Rust (hasten)"
    assert spec["spec"]["language"] == "rust"
    assert {"logo-32x32.png", "logo-64x64.png", "kernel.json"} <= {p.name for p in Path(spec["resource_dir"]).iterdir()}
    out = subprocess.run([kernel_binary_path, "uninstall", "--prefix", tmp_path], check=True,
                         capture_output=True, text=True, env=env).stdout
    assert "removed" in out
    listed = json.loads(subprocess.run(
        ["jupyter", "kernelspec", "list", "--json"], check=True, capture_output=True, text=True, env=env,
    ).stdout)
    assert "hasten" not in listed["kernelspecs"]


def test_two_kernels_at_once_keep_their_cells_apart():
    """Both kernels share the prebuilt dependencies; each must still run its own cells (before the
    per-slot fingerprint and the locked private copies, they loaded each other's)."""
    import threading

    results, errors = {}, []

    def session(tag):
        try:
            km = KernelManager(kernel_name="hasten")
            km.start_kernel()
            kc = km.client()
            kc.start_channels()
            kc.wait_for_ready(timeout=120)
            values = []
            for i in range(5):
                reply, outputs = execute(kc, f"let v{i} = {tag} * 100 + {i}; v{i} * 2")
                assert reply["status"] == "ok", reply
                values += [c["data"]["text/plain"] for _, t, c in outputs if t == "execute_result"]
            results[tag] = values
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        except Exception as e:  # reported below, with the tag
            errors.append((tag, e))

    threads = [threading.Thread(target=session, args=(tag,)) for tag in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tag in (1, 2):
        assert results[tag] == [str((tag * 100 + i) * 2) for i in range(5)], results


def test_restart_gives_a_fresh_kernel():
    km = KernelManager(kernel_name="hasten")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        assert execute(kc, "let before_restart = 1;")[0]["status"] == "ok"
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=120)
        assert execute(kc, "before_restart")[0]["status"] == "error"
        reply, outputs = execute(kc, "2 * 21")
        assert reply["status"] == "ok"
        assert [c["data"]["text/plain"] for _, t, c in outputs if t == "execute_result"] == ["42"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_registry_missing_locked_packages_gives_an_actionable_message(kernel_binary_path, tmp_path):
    """Issue 13: notebooks resolve offline against hasten's Cargo.lock. With a cargo registry that lacks
    its packages (an empty CARGO_HOME), bringing hasten into scope fails; `hasten-kernel warm` and a cell
    both say what failed, with cargo's own words, and what to do (once: an empty message)."""
    env = dict(os.environ, CARGO_HOME=str(tmp_path / "empty-cargo-home"), HASTEN_CACHE=str(tmp_path / "cache"))
    warm = subprocess.run([str(kernel_binary_path), "warm"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert warm.returncode != 0
    for expected in ("bringing hasten into scope failed", "cargo metadata --locked --offline",
                     "(--offline)", "cargo fetch --locked"):
        assert expected in warm.stderr, warm.stderr

    km = KernelManager(kernel_name="hasten")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        reply, _ = execute(kc, "1 + 1")
        assert reply["status"] == "error"
        assert "cargo fetch --locked" in reply["evalue"], reply
        assert "(--offline)" in "\n".join(reply["traceback"]), reply
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
