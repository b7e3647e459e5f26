"""Two processes on the loopback address drive one 1x4 mesh (2 CPU devices each) through
`jax.distributed` (`--coordinator`), and generate what one process generates alone; only
process 0 reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from coreinfer_jax import Dense, Generator, Stability
from eval_files import write_truthfulqa

PROMPT = "The quick brown fox"
SPARSE = ["--method", "stability", "--keep", "0.5", "--layers", "0:2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(checkpoint, method_args: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "coreinfer_jax", "generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT,
         "--max-new-tokens", "8", "--mesh", "1x4", "--json", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i), "--raw", *method_args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("method_args, method", [([], Dense()),
                                                 (SPARSE, Stability(keep=0.5, layers=(0, 2), shards=4))])
def test_two_processes_generate_what_one_does(tiny_checkpoint, method_args, method) -> None:
    checkpoint = tiny_checkpoint("llama_tied")
    (out0, _), (out1, _) = run_two_processes(checkpoint, method_args)
    # Gloo's threads write their connection log to stdout, at times interleaved mid-line; our
    # report is the one JSON line, and only process 0 writes it.
    ours = [[line for line in out.splitlines() if line.startswith("{")] for out in (out0, out1)]
    assert len(ours[0]) == 1 and ours[1] == []
    got = json.loads(ours[0][0])
    want = Generator.load(checkpoint).generate(PROMPT, 8, method=method, stop_at_eos=True)
    assert got["tokens"] == want.tokens[0]
    if method_args:
        assert got["core_neurons"] == want.core_neurons[0].tolist()
        assert got["shards"] == 4


def test_bad_process_settings_say_what_is_wrong(tiny_checkpoint, capsys) -> None:
    from coreinfer_jax.tools.cli import main

    assert main(["generate", "--checkpoint", str(tiny_checkpoint("llama")), "--prompt", PROMPT,
                 "--coordinator", "localhost", "--num-processes", "2"]) == 2
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tiny_checkpoint("llama")), "--prompt", PROMPT,
                 "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id must be in 0..1" in capsys.readouterr().err


def test_only_process_0_reports_eval_sweep_and_bench(tiny_checkpoint, tmp_path, monkeypatch, capsys) -> None:
    """Every process of a `--coordinator` job computes the same results. The others print
    nothing and write no file, so no two processes write one output at once."""
    from coreinfer_jax.tools.cli import main

    ckpt = str(tiny_checkpoint("llama"))
    data = write_truthfulqa(tmp_path / "tqa.csv")
    sparse = ["--keep", "0.5", "--layers", "0:2"]

    def eval_to(records):
        return ["eval", "--task", "truthfulqa", "--data", str(data), "--checkpoint", ckpt, *sparse, "--zero-shot",
                "--max-new-tokens", "4", "--records", str(records)]

    assert main(eval_to(tmp_path / "mine.jsonl")) == 0  # process 0 (the only one without jax.distributed) reports
    assert "stability" in capsys.readouterr().out and (tmp_path / "mine.jsonl").stat().st_size > 0
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    assert main(eval_to(tmp_path / "records.jsonl")) == 0
    assert main(["sweep", "--checkpoint", ckpt, "--tasks", "truthfulqa", "--rules", "paper", "--keep", "0.5",
                 "--layers", "0:2", "--data", f"truthfulqa={data}", "--limit", "2", "--zero-shot",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "sweep")]) == 0
    bench = ["bench", "--keep", "0.5", "--new-tokens", "4", "--reps", "1", "--no-torch"]
    assert main([*bench, "--shapes", "smollm2-135m", "--random-weights", "--tiny"]) == 0
    assert main([*bench, "--checkpoint", ckpt, "--layers", "0:2", "--batch", "2"]) == 0
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl", "tqa.csv"]
