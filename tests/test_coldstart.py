"""Cold-start data by modality bridging (python -m megatron_vr1.coldstart) against real HTTP
servers on loopback: a scripted one (right and wrong answers, broken formats, repetition, 429/500,
timeouts, malformed JSON), and megatron_vr1.serve with the toy model."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from scripted_server import ScriptedServer

LONG = ("I look at the figure carefully. There are several shapes drawn on a light background, and I count "
        "the circles one at a time from left to right, checking each against the legend and the labels. ")
# scenario -> (what the reasoner replies, where the record must land)
SCENARIOS = {
    "right": (f"<think>\n{LONG}So there are five.\n</think>\nFinal Answer: 5", "kept"),
    "right_reasoning_field": ({"content": "Final Answer: \\boxed{5}", "reasoning_content": LONG + "Five."}, "kept"),
    "right_lone_close": (f"{LONG}Five in all.</think> The count is \\boxed{{5}}.", "kept"),
    "rewritten": (f"<think>According to the description, {LONG}As described, five.</think> Final Answer: 5", "kept"),
    "leftover": (f"<think>{LONG}The caption describes five circles.</think> Final Answer: 5", "mentions_description"),
    "wrong": (f"<think>{LONG}</think> Final Answer: 7", "wrong_answer"),
    "no_think": ("Final Answer: 5", "no_think"),
    "unclosed": (f"<think>{LONG} Final Answer: 5", "unclosed_think"),
    "multiple": (f"<think>{LONG}</think> Final Answer: 5\nFinal Answer: 6", "multiple_answers"),
    "no_answer": (f"<think>{LONG}</think> I cannot tell.", "no_answer"),
    "repetition": ("<think>" + "the circle is red and the square is blue and " * 12 + "</think> Final Answer: 5",
                   "repetition"),
    "short": ("<think> It is five. </think> Final Answer: 5", "too_short"),
    "r429_once": (None, "kept"),
    "r500_once": (None, "kept"),
    "r500": (None, "error:reasoner:http_500"),
    "malformed": (None, "error:reasoner:bad_response"),
    "m_timeout": (None, "error:mllm:timeout"),
    "m429_once": (None, "kept"),
}


def scenario_of(body: dict) -> str:
    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    return text.split("[[", 1)[1].split("]]", 1)[0]


def make_script(delay: float = 0.0):
    failed, lock = set(), threading.Lock()

    def once(key) -> bool:
        with lock:
            if key in failed:
                return False
            failed.add(key)
            return True

    def script(body):
        time.sleep(delay)
        scenario = scenario_of(body)
        is_mllm = body["model"] == "mllm"
        if is_mllm:
            if scenario == "m_timeout":
                time.sleep(4.0)  # well past mllm.timeout, even on a loaded machine
            if scenario == "m429_once" and once(("m", scenario)):
                return 429, "slow down", {"Retry-After": "0"}
            if isinstance(body["messages"][-1]["content"], list):  # the image travels as a data URI
                assert any(p.get("type") == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,")
                           for p in body["messages"][-1]["content"])
            return 200, f"The image shows five circles. [[{scenario}]]", {}
        if scenario == "r429_once" and once(("r", scenario)):
            return 429, "slow down", {"Retry-After": "0"}
        if scenario == "r500_once" and once(("r", scenario)):
            return 500, "oops", {}
        if scenario == "r500":
            return 500, "down", {}
        if scenario == "malformed":
            return 200, '{"choices": [{"message": ', {"X-Raw-Body": "1"}
        reply = SCENARIOS[scenario][0]
        return 200, SCENARIOS["right"][0] if reply is None else reply, {}

    return script


def write_records(root: Path, names: list[str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "records.jsonl", "w") as f:
        for i, name in enumerate(names):
            Image.new("RGB", (56, 56), (200, 30 + i, 30)).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"r{i}", "problem": f"<image>How many circles are there? [[{name}]]",
                                "images": [f"images/{i}.png"], "answer": "5"}) + "\n")
    return root / "records.jsonl"


def command(records: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_vr1.coldstart", f"input={records}", f"out={out}",
            f"mllm.base_url={url}", "mllm.model=mllm", f"reasoner.base_url={url}", "reasoner.model=reasoner",
            "mllm.timeout=2.0", "mllm.max_retries=1", "reasoner.max_retries=2", "mllm.backoff=0.01",
            "reasoner.backoff=0.01", "progress=false", *extra]


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OPENAI_API_KEY="test")


def test_every_record_lands_under_its_reason(tmp_path):
    names = list(SCENARIOS)
    records = write_records(tmp_path / "in", names)
    with ScriptedServer(make_script()) as server:
        proc = subprocess.run(command(records, tmp_path / "out", server.url), capture_output=True, text=True,
                              env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    got = {r["id"]: (r["status"] if r["status"] == "kept" else r["reason"]) for r in rows}
    assert len(rows) == len(names)
    assert got == {f"r{i}": SCENARIOS[n][1] for i, n in enumerate(names)}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["input"] == len(names) and report["pending"] == 0
    assert report["kept"] + sum(report["dropped"].values()) == report["input"]
    assert report["kept"] == sum(v[1] == "kept" for v in SCENARIOS.values())
    assert report["usage"]["reasoner"]["retries"] >= 2 + 2 * 2  # two once-failures, r500 and malformed twice each
    assert report["usage"]["mllm"]["prompt_tokens"] > 0
    samples = {s["id"]: s for s in json.loads((tmp_path / "out" / "sft.json").read_text())}
    assert set(samples) == {f"r{i}" for i, n in enumerate(names) if SCENARIOS[n][1] == "kept"}
    rewritten = samples[f"r{names.index('rewritten')}"]["messages"][1]["content"]
    assert "description" not in rewritten.lower() and "According to the image" in rewritten
    for s in samples.values():
        user, assistant = s["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>")
        assert assistant["content"].startswith("<think>\n") and assistant["content"].endswith(
            "</think><answer> Final Answer: 5 </answer>")
        assert (tmp_path / "out" / s["images"][0]).is_file()
    # the output trains: the SFT entry point reads every sample (none skipped)
    from megatron_vr1.data import build_toy_tokenizer

    tok = build_toy_tokenizer(tmp_path / "tok")
    sft = subprocess.run([sys.executable, "-m", "megatron_vr1.sft", f"data.train={tmp_path / 'out' / 'sft.json'}",
                          f"tokenizer={tok}", f"checkpoint.dir={tmp_path / 'sft'}", "train.steps=1",
                          f"train.global_batch_size={len(samples)}", "data.skip_bad_samples=true",
                          "data.max_tokens=2048", "train.micro_batch_tokens=2048", "data.num_workers=0",
                          "metrics.tensorboard=false", "checkpoint.at_end=false"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert sft.returncode == 0, sft.stderr[-3000:]
    metrics = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["skipped"] == 0 and metrics["samples"] == len(samples)


def test_sigkill_at_random_points_then_restarts_give_one_runs_output(tmp_path):
    rng = random.Random(7)
    names = [rng.choice(["right", "wrong", "no_think", "repetition", "r500_once", "short"]) for _ in range(40)]
    records = write_records(tmp_path / "in", names)
    with ScriptedServer(make_script(delay=0.02)) as server:
        whole = subprocess.run(command(records, tmp_path / "whole", server.url, "max_records_in_flight=4"),
                               capture_output=True, text=True, env=_env(), timeout=300)
        assert whole.returncode == 0, whole.stderr[-3000:]
        out = tmp_path / "killed"
        kills = 0
        for _ in range(3):
            proc = subprocess.Popen(command(records, out, server.url, "max_records_in_flight=4"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
            time.sleep(rng.uniform(2.5, 5.0))  # start-up takes ~2 s: the kills land mid-run
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        assert kills >= 1
        final = subprocess.run(command(records, out, server.url, "max_records_in_flight=4"), capture_output=True,
                               text=True, env=_env(), timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))  # each once: no duplicate, no loss
    a, b = (json.loads((d / "sft.json").read_text()) for d in (tmp_path / "whole", out))
    assert a == b
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "whole", out))
    assert (ra["kept"], ra["dropped"], rb["pending"]) == (rb["kept"], rb["dropped"], 0)


def test_bad_records_are_an_error_or_a_counted_drop(tmp_path):
    records = write_records(tmp_path / "in", ["right", "right"])
    lines = records.read_text().splitlines()
    lines[1] = json.dumps({"id": "r1", "problem": "<image>How many? [[right]]", "images": ["images/missing.png"],
                           "answer": "5"})
    records.write_text("\n".join(lines) + "\n")
    with ScriptedServer(make_script()) as server:
        proc = subprocess.run(command(records, tmp_path / "out", server.url), capture_output=True, text=True,
                              env=_env(), timeout=300)
        assert proc.returncode == 2 and "record 'r1' (#1)" in proc.stderr and "missing.png" in proc.stderr
        assert "Traceback" not in proc.stderr
        proc = subprocess.run(command(records, tmp_path / "out", server.url, "skip_bad_records=true"),
                              capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["input"], report["kept"], report["dropped"]) == (2, 1, {"bad_record": 1})


def test_an_endpoint_where_every_request_fails_is_an_error(tmp_path):
    """A dead or mistyped endpoint: every record dropped at it is not a finished run (exit 1, one
    line saying what to check), and retry_failed=true against a live one goes on."""
    records = write_records(tmp_path / "in", ["right", "right"])
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    proc = subprocess.run(command(records, tmp_path / "out", dead), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(line) == 1 and "every request failed (mllm:" in line[0] and "retry_failed=true" in line[0], proc.stderr
    with ScriptedServer(make_script()) as server:
        again = subprocess.run(command(records, tmp_path / "out", server.url, "retry_failed=true"),
                               capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["kept"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_megatron_vr1_serve_with_the_toy_model(tmp_path):
    """The pipeline completes against the project's own server on the toy model, whatever it says."""
    from megatron_vr1.cli.make_tiny_model import write_tiny_model
    from megatron_vr1.config import load_model_conf
    from omegaconf import OmegaConf

    hf = write_tiny_model(tmp_path / "hf", OmegaConf.to_container(load_model_conf("toy").hf_config, resolve=True),
                          tokenizer="toy", seed=0, min_pixels=3136, max_pixels=12845056)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "megatron_vr1.serve", f"checkpoint={hf}", f"port={port}",
                               "model_name=toy"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while True:
            try:
                models = json.loads(urllib.request.urlopen(f"{url}/models", timeout=2).read())
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"server did not start: {server.stdout.read().decode()[-3000:] if server.poll() is not None else ''}")
                time.sleep(0.3)
        assert models["data"][0]["id"] == "toy"
        records = write_records(tmp_path / "in", ["right"] * 4)
        cmd = [sys.executable, "-m", "megatron_vr1.coldstart", f"input={records}", f"out={tmp_path / 'out'}",
               f"mllm.base_url={url}", "mllm.model=toy", f"reasoner.base_url={url}", "reasoner.model=toy",
               "mllm.max_tokens=24", "reasoner.max_tokens=24", "progress=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["input"] == 4 and report["pending"] == 0
        assert report["kept"] + sum(report["dropped"].values()) == 4
        assert not any(k.startswith("error:") for k in report["dropped"])  # every request was answered
        assert report["usage"]["mllm"]["requests"] == 8 and report["usage"]["reasoner"]["requests"] == 4
        # a request the server cannot serve is a 400 that says why
        bad = urllib.request.Request(f"{url}/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "toy", "messages": [{"role": "user", "content": [
                                         {"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 400 and "data: URI" in json.loads(err.value.read())["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sigint_stops_cleanly_and_the_same_command_goes_on(tmp_path):
    records = write_records(tmp_path / "in", ["right", "wrong"] * 15)
    with ScriptedServer(make_script(delay=0.05)) as server:
        cmd = command(records, tmp_path / "out", server.url, "max_records_in_flight=2")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        journal = tmp_path / "out" / "records.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-2000:]
        assert "stopped on request" in err and "Traceback" not in err
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        lines = journal.read_text().splitlines()
        assert report["pending"] > 0 and report["kept"] + sum(report["dropped"].values()) == len(lines)
        assert report["kept"] + sum(report["dropped"].values()) + report["pending"] == 30
        again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["input"], report["kept"], report["dropped"], report["pending"]) == (30, 15, {"wrong_answer": 15}, 0)
    assert sorted(json.loads(x)["id"] for x in journal.read_text().splitlines()) == sorted(f"r{i}" for i in range(30))
