"""The inference server's memory and time under hostile requests (issue 22's reproductions): the peak RSS
of ``adapterhub serve --model`` (its ``VmHWM``) against its idle RSS, while it is sent four 15 MB prompts
at once, a model of 20,000 ``name:w`` terms, malformed and out-of-range fields, half-sent heads and bodies
and clients that vanish mid-body. Every answer must be a 4xx (or 200), quickly.

    python bench/serve_hostile.py

A random Llama (4 layers, hidden 256, a word-level tokenizer of 4096 words, context 4096) and one
random PEFT adapter in a temporary home; the server is a subprocess on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in MB."""
    fields = dict(
        ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln
    )
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, float]:
    started = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, ConnectionError):
        status = 0  # the server answered and closed before the whole body was sent (a 413 unread)
    return status, time.perf_counter() - started


def main() -> None:
    import torch
    from serve import PRESETS, make_model, write_adapters

    from adapterhub import Hub

    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    model, tok = make_model(PRESETS["cpu"], "cpu", torch.float32)
    model.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    (adapter,) = write_adapters(model, work / "adapters", 1, 8)
    with Hub(work / "home") as hub:
        hub.add_base(work / "base", name="tiny")
        hub.add_adapter(adapter, name="a")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "adapterhub",
            "--home",
            str(work / "home"),
            "serve",
            "--port",
            "0",
            "--model",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = next((w for w in line.split() if w.startswith("http://")), "")
    if not url:
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    host, port = url.split("//")[1].split(":")
    chat = url + "/v1/chat/completions"
    ok = json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 4}
    ).encode()
    assert post(chat, ok)[0] == 200
    idle, _ = rss(proc.pid)
    results: dict[str, Any] = {"idle_rss_mb": idle}

    def timed(name: str, fn: Any) -> None:
        started = time.perf_counter()
        out = fn()
        results[name] = {"result": out, "seconds": round(time.perf_counter() - started, 2)}

    huge = json.dumps({"model": "tiny", "prompt": "w5 " * 5_000_000, "max_tokens": 1}).encode()  # 15 MB
    under = json.dumps({"model": "tiny", "prompt": "w5 " * 1_000_000, "max_tokens": 1}).encode()  # 3 MB

    def four(body: bytes) -> list[int]:
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda: codes.append(post(url + "/v1/completions", body)[0]))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(codes)

    def head_only() -> str:
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(huge)}\r\n\r\n".encode()
        )
        line = s.recv(200).split(b"\r\n")[0].decode()
        s.close()
        return line

    timed("15MB_prompt_head_only", head_only)
    timed("four_15MB_prompts", lambda: four(huge))
    timed("four_3MB_prompts", lambda: four(under))
    timed(
        "model_of_20000_terms",
        lambda: post(
            chat,
            json.dumps(
                {"model": "+".join(["a:0.001"] * 20_000), "messages": [{"role": "user", "content": "w1"}]}
            ).encode(),
        )[0],
    )
    hostile = [
        {"stop": 5},
        {"n": "abc"},
        {"n": [1]},
        {"stream_options": "x", "stream": True},
        {"seed": 2**70},
        {"temperature": 1e-300},
        {"model": "a:3e38"},
        {"stream": "no"},
        {"stop": {"a": 1}},
        {"n": 0},
        {"max_tokens": True},
        {"max_tokens": 2.7},
        {"messages": [{"role": "hacker", "content": "x"}]},
        {"logit_bias": {"99999999": 5}},
        {"top_p": 0},
    ]
    codes = []
    for extra in hostile:
        body = {"model": "a", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2, **extra}
        codes.append(post(chat, json.dumps(body).encode())[0])
    codes.append(post(chat, b'{"model": "a", "max_tokens": 1e999, "messages": []}')[0])
    results["hostile_fields"] = {"statuses": sorted(set(codes)), "no_500": all(c < 500 for c in codes)}

    def half() -> list[str]:
        out = []
        for data in (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
            b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a"',
        ):
            s = socket.create_connection((host, int(port)))
            s.sendall(data)
            s.close()
            out.append("sent and dropped")
        return out

    timed("half_sent_and_dropped", half)
    time.sleep(1)
    now, peak = rss(proc.pid)
    results["rss_after_mb"] = now
    results["peak_rss_mb"] = peak
    results["peak_over_idle_mb"] = peak - idle
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    results["traceback_lines_in_log"] = err.count("Traceback")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
